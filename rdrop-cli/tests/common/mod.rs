//! Helpers shared by the CLI test files (each file is its own crate and says `mod common;`):
//! the binary with a clean environment, a tiny ViT for second-long runs, and readers of a run
//! folder.
#![allow(dead_code)] // each test file uses a part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

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
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS",
        "TORCHELASTIC_RUN_ID",
        "SLURM_RESTART_COUNT",
        "SLURM_JOB_ID",
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

/// A checkpoint's weights as bit patterns (bit-identical means equal here, NaN and -0 too).
pub fn weight_bits(dir: &Path) -> BTreeMap<String, Vec<u32>> {
    load_weights(dir)
        .into_iter()
        .map(|(k, v)| (k, v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// Updates of the tiny run ([`tiny_config`]).
pub const STEPS: u64 = 16;

/// A tiny run: 16 updates of 2 × 16 images at 16 px, eval every 4, checkpoint every 2.
pub fn tiny_config(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.toml");
    std::fs::write(
        &p,
        r#"preset = "demo"
steps = 16
batch_size = 32
micro_batch = 16
lr = 0.002
warmup_steps = 3
image_size = 16
eval_every = 4
eval_batch_size = 100
save_every = 2
keep_last = 3
threads = 2
"#
        .to_owned()
            + TINY_VIT,
    )
    .unwrap();
    p
}

/// A pseudo-random number from the clock (printed, so a failure can be reproduced).
pub fn random_in(lo: u64, hi: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    lo + n % (hi - lo + 1)
}

/// Two runs' final weights are equal to the bit.
pub fn assert_same_final_bits(a: &Path, b: &Path) {
    let (wa, wb) = (weight_bits(&a.join("final")), weight_bits(&b.join("final")));
    assert_eq!(wa.len(), wb.len());
    for (k, v) in &wa {
        assert!(wb[k] == *v, "final weights differ in {k}");
    }
}

/// `rdrop train --config CFG --out OUT` with its checkpoint write of `step` stalled halfway
/// (the test hook), killed with SIGKILL there: the run's newest whole checkpoint is the one
/// before.
pub fn kill_during_checkpoint_write(cfg: &Path, out: &Path, step: u64) {
    use std::io::{BufRead, BufReader};
    let mut child = rdrop(&["train", "--config", s(cfg), "--out", s(out)], false)
        .env("RDROP_TEST_STALL_CHECKPOINT", step.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let marker = format!("stalling checkpoint step-{step}");
    let seen = BufReader::new(stderr)
        .lines()
        .any(|l| l.unwrap().contains(&marker));
    assert!(seen, "the stall marker never appeared");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// Two runs of the tiny configuration ended the same: final weights to the bit, every metric
/// line (but the wall-clock speed) equal.
pub fn assert_same_run(a: &Path, b: &Path) {
    assert_same_final_bits(a, b);
    let (ma, mb) = (load_metrics(a), load_metrics(b));
    assert_eq!(ma.len(), mb.len(), "number of metric lines");
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x, y, "metrics differ");
    }
    assert_eq!(
        ma.iter().filter(|m| m["kind"] == "train").count() as u64,
        STEPS
    );
}

/// The uninterrupted reference run, shared by the resume tests (trained once per process).
pub fn reference_run() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let cfg = tiny_config(&dir);
        let out = dir.join("ref");
        run_ok(&["train", "--config", s(&cfg), "--out", s(&out)], false);
        out
    })
    .clone()
}

/// Waits until `cond` holds while `child` runs (panics if it exits first or after 120 s).
pub fn wait_for(child: &mut Child, what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("rdrop exited ({st}) before {what}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
