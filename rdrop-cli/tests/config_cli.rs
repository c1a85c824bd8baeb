//! The resolved run configuration through the binary: `rdrop train --dry-run` prints exactly
//! the `config.toml` a run writes (the recipe's dropout rates included), and a Hugging Face
//! folder's `config.json` decides the architecture under the default preset.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_rdrop");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rdrop-vit/tests/fixtures")
}

fn rdrop(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> Output {
    let out = rdrop(args);
    assert!(
        out.status.success(),
        "rdrop {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn toml_of(out: &Output) -> toml::Table {
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

fn rates(t: &toml::Table) -> (f64, f64, f64) {
    let v = t["vit"].as_table().unwrap();
    let f = |k: &str| v[k].as_float().unwrap();
    (
        f("dropout"),
        f("attention_dropout"),
        f("attention_output_dropout"),
    )
}

#[test]
fn dry_run_shows_the_recipe_dropouts_and_opens_nothing() {
    for preset in ["vit-b16-cifar100", "vit-src", "demo"] {
        // No --data, no weights download, no GPU: the default presets name CUDA and a hub id.
        let out = ok(&["train", "--preset", preset, "--dry-run"]);
        let t = toml_of(&out);
        assert_eq!(rates(&t), (0.1, 0.0, 0.0), "{preset}");
        let vit = t["vit"].as_table().unwrap();
        // The architecture only where it decides the model (random init: the demo).
        assert_eq!(
            vit.contains_key("hidden_size"),
            preset == "demo",
            "{preset}"
        );
    }
    let t = toml_of(&ok(&[
        "train",
        "--dry-run",
        "--dropout",
        "0.2",
        "--attention-dropout",
        "0.05",
    ]));
    assert_eq!(rates(&t), (0.2, 0.05, 0.05));
    assert!(!t.contains_key("dropout") && !t.contains_key("attention_dropout"));
    // Random init from a model preset shows that preset's architecture.
    let t = toml_of(&ok(&[
        "train",
        "--dry-run",
        "--weights",
        "",
        "--model",
        "vit-s16",
    ]));
    let vit = t["vit"].as_table().unwrap();
    assert_eq!(vit["hidden_size"].as_integer(), Some(384));
    assert_eq!(vit["num_heads"].as_integer(), Some(6));
    // Bad settings are still errors.
    let out = rdrop(&["train", "--dry-run", "--dropout", "1.5"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dropout must be in [0, 1)"), "{err}");
}

#[test]
fn dry_run_prints_the_config_toml_the_run_writes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let args = [
        "train",
        "--preset",
        "demo",
        "--steps",
        "1",
        "--eval-every",
        "0",
        "--attention-dropout",
        "0.02",
        "--out",
        s(&run),
    ];
    let dry = ok(&[&args[..], &["--dry-run"]].concat());
    assert!(!run.exists(), "--dry-run wrote {}", run.display());
    ok(&args);
    let written = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert_eq!(String::from_utf8_lossy(&dry.stdout), written);
    // The model was built with those rates.
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("final/config.json")).unwrap())
            .unwrap();
    assert_eq!(cj["hidden_dropout_prob"], 0.1);
    assert_eq!(cj["attention_probs_dropout_prob"], 0.02);
}

#[test]
fn an_hf_folder_of_another_architecture_trains_under_the_default_preset() {
    let dir = tempfile::tempdir().unwrap();
    let hf = fixtures().join("hf"); // ViT with hidden 32, 2 layers, 4 heads: not B/16
    let out = dir.path().join("run");
    let common = [
        "train",
        "--data",
        "builtin:digits",
        "--weights",
        s(&hf),
        "--steps",
        "1",
        "--batch-size",
        "16",
        "--image-size",
        "16",
        "--device",
        "cpu",
        "--precision",
        "f32",
        "--eval-every",
        "0",
        "--threads",
        "1",
    ];
    ok(&[&common[..], &["--out", s(&out)]].concat());
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/config.json")).unwrap())
            .unwrap();
    assert_eq!(cj["hidden_size"], 32);
    assert_eq!(cj["num_hidden_layers"], 2);
    // An explicit --model that contradicts config.json is an error naming both.
    let res = rdrop(
        &[
            &common[..],
            &["--model", "vit-b16", "--out", s(&dir.path().join("bad"))],
        ]
        .concat(),
    );
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("vit-b16") && err.contains("config.json") && err.contains("hidden 32"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `micro_batch = "auto"`: the recipe's default, written as such by `--dry-run`, which says how
/// it will be decided (no GPU here) or chooses it (the CPU); a fixed number and the reference
/// loss are checked against it.
#[test]
fn micro_batch_auto_is_the_recipe_default_and_dry_run_explains_it() {
    let out = ok(&["train", "--device", "cuda", "--dry-run"]);
    assert_eq!(toml_of(&out)["micro_batch"].as_str(), Some("auto"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "micro-batch auto: decided when the run opens cuda:0 (the largest divisor of 512 \
             whose activation plan fits"
        ),
        "{err}"
    );
    let out = ok(&[
        "train",
        "--device",
        "cpu",
        "--dry-run",
        "--batch-size",
        "96",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("micro-batch auto: 48 (the largest divisor of 96 up to 64"),
        "{err}"
    );
    let out = ok(&["train", "--dry-run", "--micro-batch", "32"]);
    assert_eq!(toml_of(&out)["micro_batch"].as_integer(), Some(32));
    let bad = rdrop(&["train", "--dry-run", "--loss-reduction", "reference"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--micro-batch N"));
    let bad = rdrop(&["train", "--dry-run", "--micro-batch", "lots"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("neither a number of images nor `auto`"));
}
