//! The data-parallel update between two real processes over the TCP control plane
//! ([`Group`], host all-reduce): this test binary re-executes itself as rank 1
//! (`child_entry`, selected by `RDROP_DP_TCP_ROLE`). Both processes build the same `tiny` ViT
//! (dropout 0.1) and data from a deterministic generator, each trains on its half of every
//! global batch with the CPU engine, and the result is compared with one process holding the
//! whole batch: parameters within 1e-6 after 3 updates, the two ranks' parameters bit-identical.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::dist::{shard, Group, LaunchSource, WorldSpec};
use rdrop_core::{DropoutRng, FlatTrainer, LossMode, OptimConfig, StepStats, TrainConfig};
use rdrop_vit::{Engine, ViTConfig, VisionTransformer};

mod common;
use common::micro_batches;

fn train_cfg(accum: usize) -> TrainConfig {
    common::train_cfg(
        LossMode::Mean,
        accum,
        0.0,
        OptimConfig::default().weight_decay,
    )
}

const ROLE: &str = "RDROP_DP_TCP_ROLE";
const GLOBAL_BATCH: usize = 8;
const UPDATES: usize = 3;
const WORLD: usize = 2;
const ACCUM: usize = 2;

/// `n` values in `[-scale, scale)` from SplitMix64 of `seed` (the same in every process).
fn det(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn model() -> VisionTransformer {
    let cfg = ViTConfig {
        dropout: 0.1,
        attention_dropout: 0.1,
        attention_output_dropout: 0.1,
        ..ViTConfig::preset("tiny").unwrap()
    };
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = VisionTransformer::new(&cfg, vb, DropoutRng::new(23)).unwrap();
    for (i, (name, v)) in m.named_vars().into_iter().enumerate() {
        let base = if name.contains("layernorm") && name.ends_with("weight") {
            1.0
        } else {
            0.0
        };
        let vals: Vec<f32> = det(i as u64 + 1, v.elem_count(), 0.2)
            .into_iter()
            .map(|x| x + base)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    m
}

fn data(cfg: &ViTConfig) -> Vec<(Tensor, Tensor)> {
    let s = cfg.image_size;
    (0..UPDATES)
        .map(|u| {
            let n = GLOBAL_BATCH * 3 * s * s;
            let x = Tensor::from_vec(
                det(1000 + u as u64, n, 1.5),
                (GLOBAL_BATCH, 3, s, s),
                &Device::Cpu,
            )
            .unwrap();
            let y: Vec<u32> = (0..GLOBAL_BATCH)
                .map(|i| ((i * 3 + u) % cfg.num_classes) as u32)
                .collect();
            (x, Tensor::new(y, &Device::Cpu).unwrap())
        })
        .collect()
}

/// Rank `rank` of the job at `port`: the final parameters and the stats.
fn run_rank(rank: usize, port: u16) -> (Vec<f32>, Vec<StepStats>) {
    let spec = WorldSpec {
        rank,
        world_size: WORLD,
        local_rank: rank,
        local_world_size: WORLD,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        source: LaunchSource::Torchrun,
    };
    let group = Group::join(&spec, Duration::from_secs(60)).unwrap();
    let m = model();
    let mut engine = Engine::from_model(&m).unwrap();
    let mut trainer = FlatTrainer::new(train_cfg(ACCUM), &engine).unwrap();
    let stats = data(m.config())
        .iter()
        .map(|b| {
            let mbs = micro_batches(b, shard(GLOBAL_BATCH, WORLD, rank), ACCUM);
            trainer
                .update_distributed(&mut engine, &mbs, &group)
                .unwrap()
        })
        .collect();
    group.finish().unwrap();
    (engine.params().to_vec(), stats)
}

/// FNV-1a over the parameters' bits.
fn fingerprint(p: &[f32]) -> u64 {
    p.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(x.to_bits())).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Rank 1's side (does nothing in a normal test run).
#[test]
fn child_entry() {
    if std::env::var(ROLE).is_err() {
        return;
    }
    let port: u16 = std::env::var("DP_PORT").unwrap().parse().unwrap();
    let (params, stats) = run_rank(1, port);
    println!("PARAMS {}", fingerprint(&params));
    println!(
        "LOSS {:?}",
        stats.iter().map(|s| s.loss.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn two_processes_over_tcp_equal_one_process() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, "rank1")
        .env("DP_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (params, stats) = run_rank(0, port);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rank 1 failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both ranks hold the same parameters and logged the same losses, to the bit.
    assert!(
        stdout.contains(&format!("PARAMS {}", fingerprint(&params))),
        "rank 1: {stdout}"
    );
    let losses = stats.iter().map(|s| s.loss.to_bits()).collect::<Vec<_>>();
    assert!(
        stdout.contains(&format!("LOSS {losses:?}")),
        "rank 1: {stdout}"
    );
    // And they equal one process holding every sample (accumulation WORLD·ACCUM, same
    // micro-batches).
    let m = model();
    let init = Engine::from_model(&m).unwrap().params().to_vec();
    let mut engine = Engine::from_model(&m).unwrap();
    let mut trainer = FlatTrainer::new(train_cfg(WORLD * ACCUM), &engine).unwrap();
    for (b, s) in data(m.config()).iter().zip(&stats) {
        let mbs = micro_batches(b, 0..GLOBAL_BATCH, WORLD * ACCUM);
        let want = trainer.update(&mut engine, &mbs).unwrap();
        assert!(
            (s.loss - want.loss).abs() <= 1e-6 * want.loss.abs(),
            "{} vs {}",
            s.loss,
            want.loss
        );
        assert!((s.grad_norm - want.grad_norm).abs() <= 1e-6 * want.grad_norm);
    }
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff(engine.params(), &init) > 1e-3,
        "the parameters hardly moved"
    );
    let d = diff(&params, engine.params());
    eprintln!("two processes vs one: parameters max |Δ| {d:.2e}");
    assert!(d <= 1e-6, "parameters differ by {d}");
}
