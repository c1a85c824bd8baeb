//! `rdrop eval` end to end: the same trained model in three layouts (HF folder, timm file,
//! Google npz) gives the metrics transformers computes (scripts/gen_eval_fixtures.py), an
//! untrained head is refused, and `builtin:digits` names the embedded demo archive.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn eval(weights: &Path, extra: &[&str]) -> std::process::Output {
    eval_ranks(weights, extra, false)
}

/// `rdrop eval` of `weights` on the digits; `cpu_ranks`: with the test hook that lets ranks run
/// on the CPU.
fn eval_ranks(weights: &Path, extra: &[&str], cpu_ranks: bool) -> std::process::Output {
    let digits = root().join("rdrop-cli/assets/digits-demo.tar.gz");
    eval_on(weights, digits.as_os_str(), extra, cpu_ranks)
}

/// `rdrop eval` of `weights` on `data`.
fn eval_on(weights: &Path, data: &OsStr, extra: &[&str], cpu_ranks: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rdrop"));
    cmd.arg("eval")
        .arg("--weights")
        .arg(weights)
        .arg("--data")
        .arg(data)
        .args(["--batch-size", "64", "--json", "--threads", "1"])
        .args(extra);
    if cpu_ranks {
        cmd.env("RDROP_TEST_CPU_RANKS", "1");
    }
    cmd.output().unwrap()
}

#[test]
fn three_layouts_give_the_same_metrics_as_transformers() {
    let fx = root().join("rdrop-cli/tests/fixtures/eval-digits");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    // timm files do not record the head count, and no preset has this architecture.
    let specs = [
        (root().join("scripts/fixtures/gpu-check-vit"), &[][..]),
        (fx.join("timm.safetensors"), &["--num-heads", "4"][..]),
        (fx.join("google.npz"), &[][..]),
    ];
    let mut top1s = Vec::new();
    for (s, extra) in &specs {
        let out = eval(s, extra);
        assert!(
            out.status.success(),
            "{}: {}",
            s.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["n"], want["n"]);
        for k in ["top1", "top5"] {
            let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
            assert!(
                (g - w).abs() < 1e-6,
                "{}: {k} {g} vs transformers {w}",
                s.display()
            );
        }
        let (g, w) = (
            got["loss"].as_f64().unwrap(),
            want["loss"].as_f64().unwrap(),
        );
        assert!((g - w).abs() < 1e-4, "{}: loss {g} vs {w}", s.display());
        top1s.push(got["top1"].as_f64().unwrap());
    }
    assert!(top1s.iter().all(|t| *t == top1s[0]));
}

/// `--data builtin:digits` is the embedded demo archive, as for `rdrop train`: the same
/// metrics as the archive's file.
#[test]
fn builtin_digits_is_the_embedded_archive() {
    let weights = root().join("scripts/fixtures/gpu-check-vit");
    let builtin = eval_on(&weights, OsStr::new("builtin:digits"), &[], false);
    assert!(
        builtin.status.success(),
        "{}",
        String::from_utf8_lossy(&builtin.stderr)
    );
    let file = eval(&weights, &[]);
    assert!(file.status.success());
    assert_eq!(
        String::from_utf8_lossy(&builtin.stdout),
        String::from_utf8_lossy(&file.stdout)
    );
}

#[test]
fn an_untrained_head_is_refused_with_the_reason() {
    // A ViTModel checkpoint (no classifier): the head would be new and zero.
    let out = eval(&root().join("rdrop-vit/tests/fixtures/hf_base"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing") && err.contains("zero"), "{err}");
}

/// Data parallel eval on CPU ranks (the test hook): 2 and 3 ranks (the 5 test batches split
/// 3 + 2 and 2 + 2 + 1) give transformers' metrics, with one line of output from rank 0.
#[test]
fn ranks_split_the_test_batches_and_give_the_same_metrics() {
    let fx = root().join("rdrop-cli/tests/fixtures/eval-digits");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let one = eval(&root().join("scripts/fixtures/gpu-check-vit"), &[]);
    assert!(one.status.success());
    let one: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    for n in ["2", "3"] {
        let weights = root().join("scripts/fixtures/gpu-check-vit");
        let out = eval_ranks(&weights, &["--nproc-per-node", n], true);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{n} ranks: {stderr}");
        assert_eq!(stdout.lines().count(), 1, "{n} ranks: {stdout}");
        let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(got["n"], want["n"], "{n} ranks");
        for k in ["top1", "top5"] {
            let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
            assert!(
                (g - w).abs() < 1e-6,
                "{n} ranks: {k} {g} vs transformers {w}"
            );
            assert_eq!(got[k], one[k], "{n} ranks: {k} differs from one process");
        }
        let (g, w) = (
            got["loss"].as_f64().unwrap(),
            want["loss"].as_f64().unwrap(),
        );
        assert!((g - w).abs() < 1e-4, "{n} ranks: loss {g} vs {w}");
        // The loss sums differ only in the order of the additions.
        let l1 = one["loss"].as_f64().unwrap();
        assert!(
            (g - l1).abs() <= 1e-9 * l1.abs().max(1.0),
            "{n} ranks: loss {g} vs {l1}"
        );
    }
}

/// Several ranks on the CPU without the test hook, and --dump-logits with ranks, are refused.
#[test]
fn eval_ranks_refusals_say_why() {
    let out = eval(
        &root().join("scripts/fixtures/gpu-check-vit"),
        &["--nproc-per-node", "2", "--device", "cpu"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cpu with 2 ranks"), "{err}");
    let out = eval_ranks(
        &root().join("scripts/fixtures/gpu-check-vit"),
        &["--nproc-per-node", "2", "--dump-logits", "/tmp/never.npy"],
        true,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dump-logits"), "{err}");
}
