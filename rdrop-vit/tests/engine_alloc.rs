//! The engine's steady-state training step keeps no memory and allocates nothing of its own
//! size: a counting allocator (this test binary's global allocator) watches 20 updates of the
//! `cpu-small` ViT after a warm-up.
//!
//! What is asserted: the live heap after every update is exactly what it was after the
//! warm-up (nothing retained, nothing leaked), and the peak extra heap inside an update stays
//! below 1% of the planned activations. The `gemm` crate allocates its packing scratch on
//! every call (up to a few MiB) and the loss's label view is borrowed, not copied: those
//! transient allocations are counted and reported, not forbidden.
#![allow(unsafe_code)] // a GlobalAlloc impl is unsafe by definition; it only counts

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::{DropoutRng, FlatTrainer, TrainConfig};
use rdrop_vit::{Engine, ViTConfig, VisionTransformer};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(l.size() as isize, Ordering::Relaxed) + l.size() as isize;
        PEAK.fetch_max(live, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let d = new as isize - l.size() as isize;
        let live = LIVE.fetch_add(d, Ordering::Relaxed) + d;
        PEAK.fetch_max(live, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn steady_state_step_keeps_and_plans_nothing() {
    let cfg = ViTConfig::preset("cpu-small").unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = VisionTransformer::new(&cfg, vb, DropoutRng::new(1)).unwrap();
    let mut engine = Engine::from_model(&model).unwrap();
    let m = 16;
    let x = Tensor::randn(0f32, 1.0, (m, 3, 32, 32), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..m as u32).collect::<Vec<_>>(), m, &Device::Cpu).unwrap();
    let batch = [(x, y)];
    let tcfg = TrainConfig {
        accum_steps: 1,
        micro_batch: m,
        ..TrainConfig::default()
    };
    let mut trainer = FlatTrainer::new(tcfg, &engine).unwrap();
    for _ in 0..2 {
        trainer.update(&mut engine, &batch).unwrap();
    }
    let plan = engine.plan_bytes() as isize;
    // The test's own records are allocated before the baseline.
    let mut counts = Vec::with_capacity(20);
    let mut deltas: Vec<isize> = Vec::with_capacity(20);
    let base = LIVE.load(Ordering::Relaxed);
    let mut extra_peak = 0isize;
    for step in 0..20 {
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let c0 = COUNT.load(Ordering::Relaxed);
        trainer.update(&mut engine, &batch).unwrap();
        counts.push(COUNT.load(Ordering::Relaxed) - c0);
        extra_peak = extra_peak.max(PEAK.load(Ordering::Relaxed) - base);
        deltas.push(LIVE.load(Ordering::Relaxed) - base);
        let _ = step;
    }
    assert!(
        deltas.iter().all(|&d| d == 0),
        "live heap after each update, relative to the start: {deltas:?}"
    );
    eprintln!(
        "plan {:.1} MiB; peak transient heap in an update {:.2} MiB; allocations per update {:?}",
        plan as f64 / (1 << 20) as f64,
        extra_peak as f64 / (1 << 20) as f64,
        counts
    );
    assert!(plan > 0);
    assert!(
        extra_peak * 100 < plan,
        "an update allocated {extra_peak} bytes at its peak (plan: {plan})"
    );
}
