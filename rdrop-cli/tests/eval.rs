//! `rdrop eval` end to end: the same trained model in three layouts (HF folder, timm file,
//! Google npz) gives the metrics transformers computes (scripts/gen_eval_fixtures.py), and an
//! untrained head is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn eval(weights: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rdrop"))
        .arg("eval")
        .arg("--weights")
        .arg(weights)
        .arg("--data")
        .arg(root().join("rdrop-cli/assets/digits-demo.tar.gz"))
        .args(["--batch-size", "64", "--json", "--threads", "2"])
        .args(extra)
        .output()
        .unwrap()
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

#[test]
fn an_untrained_head_is_refused_with_the_reason() {
    // A ViTModel checkpoint (no classifier): the head would be new and zero.
    let out = eval(&root().join("rdrop-vit/tests/fixtures/hf_base"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing") && err.contains("zero"), "{err}");
}
