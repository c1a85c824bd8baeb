//! Helpers shared by the CLI test files (each file is its own crate and says `mod common;`):
//! the binary with a clean environment, a tiny ViT for second-long runs, and readers of a run
//! folder.
#![allow(dead_code)] // each test file uses a part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_rdrop");

/// The `[vit]` table of the tiny ViT the run tests train (16 px, one block of width 32, the
/// digits' 10 classes): a second or two per run.
pub const TINY_VIT: &str = r#"[vit]
image_size = 16
patch_size = 4
hidden_size = 32
num_layers = 1
num_heads = 2
mlp_dim = 64
num_classes = 10
dropout = 0.1
"#;

/// rdrop-vit's test fixtures (HF folder, timm file, npz).
pub fn vit_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rdrop-vit/tests/fixtures")
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The binary, without the test hooks' and the launchers' variables of the environment the
/// tests run in; `cpu_ranks` turns on the hook that lets data-parallel ranks run on the CPU.
pub fn rdrop(args: &[&str], cpu_ranks: bool) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    for v in [
        "RDROP_TEST_STALL_CHECKPOINT",
        "RDROP_TEST_STEP_DELAY_MS",
        "RDROP_TEST_CPU_RANKS",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "RDROP_RENDEZVOUS_TIMEOUT_S",
        "RDROP_MASTER_PORT",
        "TORCHELASTIC_USE_AGENT_STORE",
    ] {
        c.env_remove(v);
    }
    if cpu_ranks {
        c.env("RDROP_TEST_CPU_RANKS", "1");
    }
    c
}

/// Runs `rdrop args` and asserts it succeeded (the stderr in the message).
pub fn run_ok(args: &[&str], cpu_ranks: bool) -> Output {
    let out = rdrop(args, cpu_ranks).output().unwrap();
    assert!(
        out.status.success(),
        "rdrop {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A checkpoint's (or `final/`'s) weights, by name.
pub fn load_weights(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let t = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    t.into_iter()
        .map(|(k, v): (String, Tensor)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// The lines of a run's `metrics.jsonl`, without the wall-clock field `images_per_s`.
pub fn load_metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("images_per_s");
            }
            v
        })
        .collect()
}

/// How many updates a run folder has logged so far (0 without a metrics file).
pub fn train_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("\"kind\":\"train\""))
                .count()
        })
        .unwrap_or(0)
}
