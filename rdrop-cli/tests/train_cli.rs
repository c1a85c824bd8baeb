//! End-to-end tests of `rdrop train` / `resume` / `predict` / `plot` through the binary, with a
//! tiny ViT on the embedded digits so that each run takes a second or two.
//!
//! - an interrupted run (Ctrl-C at a random step, or `kill -9` in the middle of a checkpoint
//!   write) resumed with `rdrop resume` ends with bit-identical weights and metrics;
//! - Ctrl-C writes a checkpoint and exits with 130 and the resume command (SIGTERM, SIGUSR1 and
//!   continuing with the same command: `restart_cli.rs`);
//! - checkpoints are atomic (the half-written one is never used);
//! - a NaN stops the run with an error naming the step, the last good checkpoint intact;
//! - `--weights` from an HF folder, a timm file, a Google npz and a run folder;
//! - clear CLI errors, non-zero exit and no panic for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod common;
use common::*;

fn rdrop(args: &[&str]) -> Command {
    common::rdrop(args, false)
}

fn run_ok(args: &[&str]) -> Output {
    common::run_ok(args, false)
}

fn fixtures() -> PathBuf {
    vit_fixtures()
}

#[test]
fn ctrl_c_checkpoints_and_resume_is_bit_identical() {
    let reference = reference_run();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("run");
    let stop_after = random_in(1, STEPS - 3);
    eprintln!("interrupting after update {stop_after}");
    let mut child = rdrop(&["train", "--config", s(&cfg), "--out", s(&out)])
        .env("RDROP_TEST_STEP_DELAY_MS", "150")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&mut child, "the first updates", || {
        train_lines(&out) as u64 >= stop_after
    });
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "exit code; stderr:\n{err}");
    assert!(err.contains("rdrop resume"), "no resume hint:\n{err}");
    // The interrupt wrote a checkpoint at the last finished update.
    let done = train_lines(&out) as u64;
    assert!(done < STEPS, "the run finished before the interrupt");
    assert!(
        out.join(format!("checkpoints/step-{done}/train_state.json"))
            .is_file(),
        "{err}"
    );
    assert!(!out.join("final").exists());
    run_ok(&["resume", s(&out)]);
    assert_same_run(&reference, &out);
}

#[test]
fn kill_9_during_a_checkpoint_write_then_resume_is_bit_identical() {
    let reference = reference_run();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("run");
    let stall = 2 * random_in(2, STEPS / 2 - 1); // an even step: a checkpoint step
    eprintln!("killing during the write of checkpoint step-{stall}");
    kill_during_checkpoint_write(&cfg, &out, stall);
    let ck = out.join("checkpoints");
    // The half-written checkpoint is not visible under its final name; the previous one is whole.
    assert!(!ck.join(format!("step-{stall}")).exists());
    let prev = ck.join(format!("step-{}", stall - 2));
    assert!(prev.join("model.safetensors").is_file() && prev.join("train_state.json").is_file());
    let tmp: Vec<_> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert_eq!(tmp.len(), 1, "expected the half-written temporary folder");
    // `train --resume` is the same as `resume`.
    run_ok(&["train", "--resume", s(&out)]);
    assert!(!ck.join(&tmp[0]).exists(), "stale temporary not cleaned");
    assert_same_run(&reference, &out);
}

#[test]
fn run_folder_layout_plot_predict_and_weights_from_a_run_folder() {
    let reference = reference_run();
    // config.toml round-trips and says what ran
    let cfg = std::fs::read_to_string(reference.join("config.toml")).unwrap();
    assert!(cfg.contains("steps = 16") && cfg.contains("[vit]"), "{cfg}");
    // keep-last 3 (+ best/ and final/), HF layout with config.json
    let ck: Vec<_> = std::fs::read_dir(reference.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut ck_sorted = ck.clone();
    ck_sorted.sort();
    assert_eq!(ck_sorted, vec!["step-12", "step-14", "step-16"]);
    for d in ["final", "best", "checkpoints/step-16"] {
        let cj: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(reference.join(d).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cj["architectures"][0], "ViTForImageClassification");
        assert_eq!(cj["id2label"]["3"], "three");
        let w = weight_bits(&reference.join(d));
        assert!(w.contains_key("classifier.weight") && w.contains_key("vit.embeddings.cls_token"));
    }
    assert!(reference.join("best/best.json").is_file());
    // metrics: a train line per update, eval lines every 4
    let m = load_metrics(&reference);
    let evals: Vec<_> = m.iter().filter(|l| l["kind"] == "eval").collect();
    assert_eq!(
        evals
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![4, 8, 12, 16]
    );
    for k in ["top1", "top5", "test_loss"] {
        assert!(evals[0][k].is_f64(), "{k}");
    }
    for k in [
        "step",
        "epoch",
        "lr",
        "loss",
        "ce",
        "kl",
        "grad_norm",
        "loss_scale",
        "skipped",
    ] {
        assert!(!m[0][k].is_null(), "{k} missing");
    }
    // curves.png written at the end; `rdrop plot` redraws it
    assert!(reference.join("curves.png").is_file());
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("c.png");
    run_ok(&["plot", s(&reference), "--output", s(&png)]);
    assert_eq!(image::image_dimensions(&png).unwrap(), (1400, 900));

    // predict: PNGs of three test digits through the run folder's model
    let data = rdrop_data::Cifar::from_tar_gz_reader(
        std::fs::File::open(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/digits-demo.tar.gz"),
        )
        .unwrap(),
        "demo",
    )
    .unwrap();
    let mut files = Vec::new();
    for i in 0..3 {
        let img = data.test.image(i);
        let rgb = image::RgbImage::from_fn(32, 32, |x, y| {
            let p = (y * 32 + x) as usize;
            image::Rgb([img[p], img[1024 + p], img[2048 + p]])
        });
        let f = dir.path().join(format!("digit{i}.png"));
        rgb.save(&f).unwrap();
        files.push(f);
    }
    let mut args = vec![
        "predict",
        "--weights",
        s(&reference),
        "--top",
        "3",
        "--json",
    ];
    args.extend(files.iter().map(|f| s(f)));
    let out = run_ok(&args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    for r in arr {
        let p = r["predictions"].as_array().unwrap();
        assert_eq!(p.len(), 3);
        let probs: Vec<f64> = p.iter().map(|g| g["prob"].as_f64().unwrap()).collect();
        assert!(probs.windows(2).all(|w| w[0] >= w[1]) && probs.iter().sum::<f64>() <= 1.0 + 1e-5);
        let label = p[0]["label"].as_str().unwrap();
        assert!(
            ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
                .contains(&label)
        );
    }
    let text = run_ok(&["predict", "--weights", s(&reference), s(&files[0])]);
    assert!(String::from_utf8_lossy(&text.stdout).contains('%'));

    // --weights from a run folder: fine-tunes from its final/ (head kept: same classes)
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("ft");
    let res = run_ok(&[
        "train",
        "--config",
        s(&cfg),
        "--weights",
        s(&reference),
        "--steps",
        "2",
        "--out",
        s(&out),
        "--json",
    ]);
    let sum: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(sum["steps"], 2);
    assert!(
        String::from_utf8_lossy(&res.stderr).contains("head: loaded"),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn weights_from_hf_timm_and_npz() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let fx = fixtures();
    for (name, spec, extra) in [
        ("hf", fx.join("hf"), vec![]),
        ("timm", fx.join("timm.safetensors"), vec!["--model", "tiny"]),
        ("npz", fx.join("google.npz"), vec!["--model", "tiny"]),
    ] {
        let out = dir.path().join(name);
        let mut args = vec![
            "train",
            "--config",
            s(&cfg),
            "--weights",
            s(&spec),
            "--steps",
            "2",
            "--out",
            s(&out),
            "--json",
        ];
        args.extend(extra);
        let res = run_ok(&args);
        let err = String::from_utf8_lossy(&res.stderr);
        // 5-class fixture heads are replaced for the 10 digits; 32 px position grid resized to 16 px
        assert!(err.contains("head: new"), "{name}: {err}");
        assert!(err.contains("position embeddings resized"), "{name}: {err}");
        let sum: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
        assert_eq!(sum["steps"], 2, "{name}");
        let cj: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("final/config.json")).unwrap())
                .unwrap();
        assert_eq!(cj["hidden_size"], 32, "{name}");
    }
}

#[test]
fn nan_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("nan");
    // A huge learning rate without clipping: the first update blows the weights up, the
    // second one's loss is NaN.
    let res = rdrop(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&out),
        "--lr",
        "1e30",
        "--clip-grad-norm",
        "0",
        "--warmup-steps",
        "0",
        "--optimizer",
        "sgd",
        "--save-every",
        "1",
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let step = err
        .split("at step ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no step in: {err}"));
    assert!(err.contains("non-finite"), "{err}");
    assert!(
        err.contains(&format!("checkpoints/step-{}", step - 1)),
        "{err}"
    );
    // The last good checkpoint is whole: weights load and are finite; the state loads.
    let ck = out.join(format!("checkpoints/step-{}", step - 1));
    let w = candle_core::safetensors::load(ck.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap();
    for (k, t) in w {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{k} not finite");
    }
    rdrop_core::TrainState::load(&ck).unwrap();
    assert!(!out.join(format!("checkpoints/step-{step}")).exists());
}

#[test]
fn cli_errors_are_clear_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("cifar-100-python.tar.gz");
    std::fs::write(&corrupt, b"\x1f\x8b\x08\x00 this is not really gzip").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["train".into(), "--preset".into(), "nope".into()],
            "unknown preset `nope`",
        ),
        (
            vec![
                "train".into(),
                "--preset".into(),
                "vit-src".into(),
                "--data".into(),
                "/nonexistent/cifar.tar.gz".into(),
                "--device".into(),
                "cpu".into(),
                "--precision".into(),
                "f32".into(),
            ],
            "dataset not found: /nonexistent/cifar.tar.gz",
        ),
        (
            vec![
                "train".into(),
                "--preset".into(),
                "demo".into(),
                "--data".into(),
                corrupt.display().to_string(),
                "--out".into(),
                dir.path().join("o").display().to_string(),
            ],
            "cifar-100-python.tar.gz",
        ),
        (
            vec![
                "train".into(),
                "--config".into(),
                "/nonexistent.toml".into(),
            ],
            "cannot read config file /nonexistent.toml",
        ),
        (
            vec!["resume".into(), dir.path().display().to_string()],
            "config.toml not found",
        ),
        (
            vec![
                "predict".into(),
                "--weights".into(),
                "/nonexistent".into(),
                "/nonexistent.png".into(),
            ],
            "image file not found",
        ),
        (
            vec!["plot".into(), dir.path().display().to_string()],
            "metrics.jsonl not found",
        ),
        (
            vec![
                "train".into(),
                "--preset".into(),
                "demo".into(),
                "--batch-size".into(),
                "48".into(),
                "--micro-batch".into(),
                "32".into(),
            ],
            "multiple of the micro-batch",
        ),
        (
            vec![
                "train".into(),
                "--preset".into(),
                "demo".into(),
                "--grad-bucket-mb=-1".into(),
                "--out".into(),
                dir.path().join("neg-bucket").display().to_string(),
            ],
            "grad_bucket_mb must be a number ≥ 0",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected `{want}` in:\n{err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // A configuration refused by the trainer's checks leaves no run folder behind.
    assert!(!dir.path().join("neg-bucket").exists());
}
