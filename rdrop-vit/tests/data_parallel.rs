//! The data-parallel update is the one-process update: two ranks on threads
//! ([`LocalCollective`]), each holding its half of every global batch
//! ([`rdrop_core::dist::shard`]), running the CPU engine on the `tiny` ViT with dropout 0.1,
//! against one process holding the whole batch, over 3 updates of SGD with momentum and
//! clipping.
//!
//! `N` ranks at accumulation `A` (micro-batch `m`) compute the one-process update at
//! accumulation `N·A` with the same `m` (the same micro-batches, weights and masks); in `mean`
//! mode this is also the update at accumulation `A` (micro-batch `N·m`), since masks are keyed
//! by the sample's index in the global batch and the weights are per sample. Asserted within
//! 1e-6: parameters after 3 updates (max |Δ|), loss, ce, kl and gradient norm (relative), for
//! `A` = 1 and 2, `mean` and `reference`; the two ranks' parameters are bit-identical. A
//! control shows the tolerance is tight: giving the ranks each other's halves (so each sample
//! gets another sample's masks) moves the parameters by far more than 1e-6.
//!
//! The gradients are summed in buckets during the last backward (one per block here): the
//! result is the one all-reduce after the backward to the bit, whatever the bucket size, each
//! bucket is handed over final, and the sums really overlap the backward.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::dist::{shard, LocalCollective};
use rdrop_core::{
    DropoutRng, FlatRDropModel, FlatTrainer, LossMode, MicroStep, StepStats, TrainConfig,
};
use rdrop_vit::{Engine, ViTConfig, VisionTransformer};

mod common;
use common::micro_batches;

fn train_cfg(mode: LossMode, accum: usize) -> TrainConfig {
    common::train_cfg(mode, accum, 0.1, 1e-4)
}

const GLOBAL_BATCH: usize = 8;
const UPDATES: usize = 3;
const WORLD: usize = 2;

fn vit() -> ViTConfig {
    ViTConfig {
        dropout: 0.1,
        attention_dropout: 0.1,
        attention_output_dropout: 0.1,
        ..ViTConfig::preset("tiny").unwrap()
    }
}

/// A model with a non-zero head and non-trivial LayerNorms and biases (as in `engine.rs`), so
/// that every parameter moves from the first update.
fn model(cfg: &ViTConfig) -> VisionTransformer {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = VisionTransformer::new(cfg, vb, DropoutRng::new(17)).unwrap();
    for (name, v) in m.named_vars() {
        let is_ln = name.contains("layernorm");
        if is_ln || name.starts_with("classifier") || name.ends_with(".bias") {
            let base = if is_ln && name.ends_with("weight") {
                1.0
            } else {
                0.0
            };
            let noise = Tensor::randn(0f32, 0.2, v.shape(), &Device::Cpu).unwrap();
            v.set(&(noise + base).unwrap()).unwrap();
        }
    }
    m
}

/// `UPDATES` global batches (images, labels); random: made once per test and shared.
fn batches(cfg: &ViTConfig) -> Vec<(Tensor, Tensor)> {
    (0..UPDATES)
        .map(|u| {
            let s = cfg.image_size;
            let x = Tensor::randn(0f32, 1.0, (GLOBAL_BATCH, 3, s, s), &Device::Cpu).unwrap();
            let y: Vec<u32> = (0..GLOBAL_BATCH)
                .map(|i| ((i * 3 + u) % cfg.num_classes) as u32)
                .collect();
            (x, Tensor::new(y, &Device::Cpu).unwrap())
        })
        .collect()
}

/// One process, the whole batch at accumulation `accum`: the final parameters and the stats.
fn one_process(
    model: &VisionTransformer,
    data: &[(Tensor, Tensor)],
    cfg: TrainConfig,
) -> (Vec<f32>, Vec<StepStats>) {
    let mut engine = Engine::from_model(model).unwrap();
    let mut trainer = FlatTrainer::new(cfg, &engine).unwrap();
    let stats = data
        .iter()
        .map(|b| {
            let mbs = micro_batches(b, 0..GLOBAL_BATCH, cfg.accum_steps);
            trainer.update(&mut engine, &mbs).unwrap()
        })
        .collect();
    (engine.params().to_vec(), stats)
}

/// `WORLD` ranks on threads, rank `r` holding `shard(B, WORLD, owner(r))` of every batch:
/// each rank's final parameters and stats.
fn ranks(
    model: &VisionTransformer,
    data: &[(Tensor, Tensor)],
    cfg: TrainConfig,
    owner: impl Fn(usize) -> usize + Sync,
) -> Vec<(Vec<f32>, Vec<StepStats>)> {
    let group = LocalCollective::group(WORLD);
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                let owner = &owner;
                let mut engine = Engine::from_model(model).unwrap();
                s.spawn(move || {
                    let rank = rdrop_core::dist::Collective::rank(&c);
                    let mut trainer = FlatTrainer::new(cfg, &engine).unwrap();
                    let stats = data
                        .iter()
                        .map(|b| {
                            let mine = shard(GLOBAL_BATCH, WORLD, owner(rank));
                            let mbs = micro_batches(b, mine, cfg.accum_steps);
                            trainer.update_distributed(&mut engine, &mbs, &c).unwrap()
                        })
                        .collect::<Vec<_>>();
                    (engine.params().to_vec(), stats)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn assert_same_update(
    what: &str,
    got: &(Vec<f32>, Vec<StepStats>),
    want: &(Vec<f32>, Vec<StepStats>),
) {
    let d = max_abs_diff(&got.0, &want.0);
    let worst = got.1.iter().zip(&want.1).fold(0f64, |m, (g, w)| {
        m.max(rel(g.loss, w.loss))
            .max(rel(g.ce, w.ce))
            .max(rel(g.kl, w.kl))
            .max(rel(g.grad_norm, w.grad_norm))
    });
    eprintln!("{what}: parameters max |Δ| {d:.2e}, stats worst relative {worst:.2e}");
    assert!(d <= 1e-6, "{what}: parameters differ by {d}");
    for (k, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
        for (name, a, b) in [
            ("loss", g.loss, w.loss),
            ("ce", g.ce, w.ce),
            ("kl", g.kl, w.kl),
            ("grad_norm", g.grad_norm, w.grad_norm),
        ] {
            assert!(
                rel(a, b) <= 1e-6,
                "{what}: update {}: {name} {a} vs {b}",
                k + 1
            );
        }
        assert_eq!((g.step, g.samples), (w.step, GLOBAL_BATCH));
        assert_eq!(g.lr, w.lr);
    }
}

fn check(mode: LossMode, accum: usize) {
    let cfg = vit();
    let m = model(&cfg);
    let data = batches(&cfg);
    let init = Engine::from_model(&m).unwrap().params().to_vec();
    let dist = ranks(&m, &data, train_cfg(mode, accum), |r| r);
    // Every rank applied the same update, to the bit.
    assert_eq!(dist[0].0, dist[1].0, "{mode:?} A={accum}: ranks diverged");
    for r in 1..WORLD {
        for (a, b) in dist[0].1.iter().zip(&dist[r].1) {
            assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm));
        }
    }
    // The same micro-batches in one process: accumulation WORLD·A.
    let single = one_process(&m, &data, train_cfg(mode, WORLD * accum));
    let moved = max_abs_diff(&single.0, &init);
    eprintln!("{mode:?} A={accum}: the parameters moved by up to {moved:.2e}");
    assert!(
        moved > 1e-3,
        "the parameters hardly moved ({moved}): the test would be vacuous"
    );
    assert_same_update(
        &format!("{mode:?} A={accum} vs one process A={}", WORLD * accum),
        &dist[0],
        &single,
    );
    if mode == LossMode::Mean {
        // Mean: the micro-batch size does not matter either.
        let single_a = one_process(&m, &data, train_cfg(mode, accum));
        assert_same_update(
            &format!("{mode:?} A={accum} vs one process A={accum}"),
            &dist[0],
            &single_a,
        );
    }
}

#[test]
fn two_ranks_equal_one_process_mean_accum_1() {
    check(LossMode::Mean, 1);
}

#[test]
fn two_ranks_equal_one_process_mean_accum_2() {
    check(LossMode::Mean, 2);
}

#[test]
fn two_ranks_equal_one_process_reference_accum_1() {
    check(LossMode::Reference, 1);
}

#[test]
fn two_ranks_equal_one_process_reference_accum_2() {
    check(LossMode::Reference, 2);
}

/// The control: ranks holding each other's halves key each sample's masks by the wrong global
/// index, and the result is far outside the tolerance.
#[test]
fn swapped_halves_are_detected() {
    let cfg = vit();
    let m = model(&cfg);
    let data = batches(&cfg);
    let swapped = ranks(&m, &data, train_cfg(LossMode::Mean, 1), |r| WORLD - 1 - r);
    let single = one_process(&m, &data, train_cfg(LossMode::Mean, 1));
    let d = max_abs_diff(&swapped[0].0, &single.0);
    eprintln!("swapped halves: parameters max |Δ| {d:.2e}");
    assert!(
        d > 1e-4,
        "swapping the halves changed the parameters by only {d}"
    );
}

/// Ranks with unequal shares would weight samples wrongly: every rank refuses the update.
#[test]
fn unequal_shares_are_refused() {
    let cfg = vit();
    let m = model(&cfg);
    let data = batches(&cfg);
    let group = LocalCollective::group(WORLD);
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                let mut engine = Engine::from_model(&m).unwrap();
                let data = &data;
                s.spawn(move || {
                    let rank = rdrop_core::dist::Collective::rank(&c);
                    let rows = if rank == 0 { 0..3 } else { 3..GLOBAL_BATCH };
                    let mut trainer =
                        FlatTrainer::new(train_cfg(LossMode::Mean, 1), &engine).unwrap();
                    let mbs = micro_batches(&data[0], rows, 1);
                    let before = engine.params().to_vec();
                    let e = trainer
                        .update_distributed(&mut engine, &mbs, &c)
                        .unwrap_err();
                    assert_eq!(engine.params(), &before[..], "no step on error");
                    e.to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errors {
        assert!(e.contains("equal share"), "{e}");
    }
}

/// A world of one (threads or the TCP group of a one-rank launch) is the plain update, to the
/// bit.
#[test]
fn one_rank_is_the_plain_update() {
    let cfg = vit();
    let m = model(&cfg);
    let data = batches(&cfg);
    let tcfg = train_cfg(LossMode::Mean, 2);
    let plain = one_process(&m, &data, tcfg);
    let spec = rdrop_core::dist::WorldSpec::single();
    let group = rdrop_core::dist::Group::join(&spec, std::time::Duration::from_secs(1)).unwrap();
    let local = LocalCollective::group(1).pop().unwrap();
    for c in [&group as &dyn rdrop_core::dist::Collective, &local] {
        let mut engine = Engine::from_model(&m).unwrap();
        let mut trainer = FlatTrainer::new(tcfg, &engine).unwrap();
        for (b, want) in data.iter().zip(&plain.1) {
            let mbs = micro_batches(b, 0..GLOBAL_BATCH, 2);
            let got = trainer.update_distributed(&mut engine, &mbs, c).unwrap();
            assert_eq!((got.loss, got.grad_norm), (want.loss, want.grad_norm));
        }
        assert_eq!(engine.params(), &plain.0[..]);
    }
    group.finish().unwrap();
}

/// A second model with `base`'s weights and seed (each rank of the autograd path owns one).
fn copy_of(base: &VisionTransformer) -> VisionTransformer {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = VisionTransformer::new(base.config(), vb, DropoutRng::new(17)).unwrap();
    for ((n, v), (bn, bv)) in m.named_vars().iter().zip(base.named_vars()) {
        assert_eq!(n, &bn);
        v.set(&bv.as_tensor().copy().unwrap()).unwrap();
    }
    m
}

fn var_values(m: &VisionTransformer) -> Vec<f32> {
    m.named_vars()
        .iter()
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// The autograd trainer's distributed update (the CUDA path's; here on CPU through the host
/// all-reduce): two ranks equal one process at accumulation `WORLD·A`, as for the engine.
fn check_autograd(mode: LossMode, accum: usize) {
    let cfg = vit();
    let base = model(&cfg);
    let data = batches(&cfg);
    let init = var_values(&base);
    let tcfg = train_cfg(mode, accum);
    let one = copy_of(&base);
    let mut trainer =
        rdrop_core::Trainer::new(train_cfg(mode, WORLD * accum), one.named_vars()).unwrap();
    let single_stats: Vec<StepStats> = data
        .iter()
        .map(|b| {
            let mbs = micro_batches(b, 0..GLOBAL_BATCH, WORLD * accum);
            trainer.update(&one, &mbs).unwrap()
        })
        .collect();
    let single = (var_values(&one), single_stats);
    let moved = max_abs_diff(&single.0, &init);
    assert!(moved > 1e-3, "the parameters hardly moved ({moved})");
    let group = LocalCollective::group(WORLD);
    let dist: Vec<(Vec<f32>, Vec<StepStats>)> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                let m = copy_of(&base);
                let data = &data;
                s.spawn(move || {
                    let rank = rdrop_core::dist::Collective::rank(&c);
                    let mut t = rdrop_core::Trainer::new(tcfg, m.named_vars()).unwrap();
                    let stats = data
                        .iter()
                        .map(|b| {
                            let mbs = micro_batches(b, shard(GLOBAL_BATCH, WORLD, rank), accum);
                            t.update_distributed(&m, &mbs, &c).unwrap()
                        })
                        .collect::<Vec<_>>();
                    (var_values(&m), stats)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        dist[0].0, dist[1].0,
        "autograd {mode:?} A={accum}: ranks diverged"
    );
    assert_same_update(
        &format!(
            "autograd {mode:?} A={accum} vs one process A={}",
            WORLD * accum
        ),
        &dist[0],
        &single,
    );
}

#[test]
fn autograd_two_ranks_equal_one_process_mean_accum_1() {
    check_autograd(LossMode::Mean, 1);
}

#[test]
fn autograd_two_ranks_equal_one_process_reference_accum_2() {
    check_autograd(LossMode::Reference, 2);
}

/// Buckets change when the sums run, not what they are: every bucket size gives the
/// parameters of one all-reduce after the backward, to the bit (the in-process collective sums
/// each element in rank order, as TCP does).
#[test]
fn buckets_are_bit_identical_to_one_all_reduce() {
    let cfg = vit();
    let m = model(&cfg);
    let data = batches(&cfg);
    let with = |mb: f64| TrainConfig {
        grad_bucket_mb: mb,
        ..train_cfg(LossMode::Mean, 2)
    };
    let flat = ranks(&m, &data, with(0.0), |r| r);
    // 1e-9: 4 buckets (head, block 1, block 0, embeddings); 0.01 MiB: 3 (the head joins
    // block 1); 25: 1 (after the backward).
    for mb in [1e-9, 0.01, 25.0] {
        let got = ranks(&m, &data, with(mb), |r| r);
        assert_eq!(got[0].0, flat[0].0, "bucket {mb} MiB: parameters differ");
        for (a, b) in got[0].1.iter().zip(&flat[0].1) {
            assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm), "{mb} MiB");
        }
    }
}

/// Each bucket the engine hands over is final (equal, to the bit, to the gradients once the
/// whole backward is done), the buckets come from the end of the buffer down and tile it
/// once, and a weight adds the same gradients as `accumulate`.
#[test]
fn buckets_are_handed_over_final_in_backward_order() {
    let cfg = vit();
    let m = model(&cfg);
    let data = batches(&cfg);
    let (x, y) = (&data[0].0, &data[0].1);
    let loss = train_cfg(LossMode::Mean, 1).loss;
    let mut plain = Engine::from_model(&m).unwrap();
    plain.zero_grads();
    plain
        .accumulate(&MicroStep {
            x,
            y,
            update: 1,
            first_sample: 0,
            loss: &loss,
            weight: 0.5,
        })
        .unwrap();
    let want = plain.params_and_grads().1.to_vec();
    assert!(want.iter().all(|g| g.is_finite()));

    let mut engine = Engine::from_model(&m).unwrap();
    let ready = engine.grad_ready_cuts();
    let n = engine.layout().len();
    assert_eq!(ready.len(), cfg.num_layers + 2, "{ready:?}");
    let cuts = rdrop_core::dist::bucket_cuts(&ready, n, 0);
    assert_eq!(cuts, ready);
    engine.zero_grads();
    let mut handed: Vec<(usize, Vec<f32>)> = Vec::new();
    let base = engine.params_and_grads().1.as_ptr() as usize;
    engine
        .accumulate_overlapped(
            &MicroStep {
                x,
                y,
                update: 1,
                first_sample: 0,
                loss: &loss,
                weight: 0.5,
            },
            &cuts,
            &mut |g| {
                let start = (g.as_ptr() as usize - base) / std::mem::size_of::<f32>();
                handed.push((start, g.to_vec()));
            },
        )
        .unwrap();
    let got = engine.params_and_grads().1.to_vec();
    assert_eq!(
        got, want,
        "the overlapped backward computes other gradients"
    );
    let mut end = n;
    for ((start, values), cut) in handed.iter().zip(&cuts) {
        assert_eq!(*start, *cut);
        assert_eq!(start + values.len(), end, "buckets must tile the buffer");
        assert_eq!(
            values[..],
            want[*start..end],
            "bucket [{start}, {end}) changed after it was handed over"
        );
        assert!(
            values.iter().any(|&g| g != 0.0),
            "bucket [{start}, {end}) is all zero"
        );
        end = *start;
    }
    assert_eq!((handed.len(), end), (cuts.len(), 0));
}

/// The engine, counting the buckets it has handed over so far.
struct Counting<'a> {
    inner: &'a mut Engine,
    handed: &'a std::sync::atomic::AtomicUsize,
}

impl FlatRDropModel for Counting<'_> {
    fn layout(&self) -> &rdrop_core::FlatLayout {
        self.inner.layout()
    }
    fn params_and_grads(&mut self) -> (&mut [f32], &mut [f32]) {
        self.inner.params_and_grads()
    }
    fn zero_grads(&mut self) {
        FlatRDropModel::zero_grads(self.inner)
    }
    fn accumulate(&mut self, mb: &MicroStep<'_>) -> rdrop_core::Result<rdrop_core::MicroLoss> {
        self.inner.accumulate(mb)
    }
    fn rng_state(&self) -> rdrop_core::RngState {
        self.inner.rng_state()
    }
    fn grad_ready_cuts(&self) -> Vec<usize> {
        self.inner.grad_ready_cuts()
    }
    fn accumulate_overlapped<'g>(
        &'g mut self,
        mb: &MicroStep<'_>,
        cuts: &[usize],
        ready: &mut dyn FnMut(&'g mut [f32]),
    ) -> rdrop_core::Result<rdrop_core::MicroLoss> {
        let handed = self.handed;
        self.inner.accumulate_overlapped(mb, cuts, &mut |g| {
            handed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ready(g);
        })
    }
}

/// A world of one whose first gradient all-reduce returns only once the backward has handed
/// over every bucket: an update can finish only if the backward runs on while the first
/// bucket's sum is in flight (a reduction made inside the backward would wait for ever; the
/// gate gives up after 60 s and the update fails).
struct Gate<'a> {
    handed: &'a std::sync::atomic::AtomicUsize,
    buckets: usize,
    calls: std::sync::Mutex<Vec<(usize, usize)>>,
}

impl rdrop_core::dist::Collective for Gate<'_> {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), rdrop_core::dist::DistError> {
        let mut calls = self.calls.lock().unwrap();
        let seen = self.handed.load(std::sync::atomic::Ordering::SeqCst);
        if calls.is_empty() {
            let t0 = std::time::Instant::now();
            while self.handed.load(std::sync::atomic::Ordering::SeqCst) < self.buckets {
                if t0.elapsed() > std::time::Duration::from_secs(60) {
                    return Err(rdrop_core::dist::DistError::Unsupported(
                        "the backward stopped while the first bucket was being summed".into(),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        calls.push((seen, buf.len()));
        Ok(())
    }
    fn all_reduce_f64(&self, _v: &mut [f64]) -> Result<(), rdrop_core::dist::DistError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), rdrop_core::dist::DistError> {
        Ok(())
    }
}

#[test]
fn bucket_sums_overlap_the_backward() {
    let cfg = vit();
    let m = model(&cfg);
    let data = batches(&cfg);
    let tcfg = train_cfg(LossMode::Mean, 2);
    let plain = one_process(&m, &data[..1], tcfg);
    let mut engine = Engine::from_model(&m).unwrap();
    let handed = std::sync::atomic::AtomicUsize::new(0);
    let buckets = cfg.num_layers + 2;
    let gate = Gate {
        handed: &handed,
        buckets,
        calls: Default::default(),
    };
    let mut trainer = FlatTrainer::new(tcfg, &engine).unwrap();
    let mut model = Counting {
        inner: &mut engine,
        handed: &handed,
    };
    let mbs = micro_batches(&data[0], 0..GLOBAL_BATCH, 2);
    let got = trainer.update_distributed(&mut model, &mbs, &gate).unwrap();
    let calls = gate.calls.into_inner().unwrap();
    // The first sum started once the first bucket was handed over, and returned only once the
    // backward had handed over the rest.
    assert_eq!(calls.len(), buckets, "{calls:?}");
    assert!(calls[0].0 >= 1, "{calls:?}");
    assert_eq!(
        calls.iter().map(|c| c.1).sum::<usize>(),
        engine.layout().len()
    );
    // Only the last micro-batch's backward hands buckets over.
    assert_eq!(handed.into_inner(), buckets);
    assert_eq!(
        (got.loss, got.grad_norm),
        (plain.1[0].loss, plain.1[0].grad_norm)
    );
    assert_eq!(engine.params(), &plain.0[..]);
}
