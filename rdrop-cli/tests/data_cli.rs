//! `rdrop data inspect / bench / preview` on the rdrop-data fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rdrop-data/tests/fixtures")
}

fn rdrop(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rdrop"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn inspect_json_matches_python() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    for (which, path) in [
        ("cifar100", "cifar100/cifar-100-python.tar.gz"),
        ("cifar10", "cifar10/py2"),
    ] {
        let p = fixtures().join(path);
        let out = rdrop(&["data", "inspect", "--data", p.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        let e = &expected[which];
        // top-level keys, in this order (serde_json's Value sorts them, so look at the text)
        let text = String::from_utf8_lossy(&out.stdout);
        let order = [
            "format",
            "train",
            "test",
            "fine_label_names",
            "coarse_label_names",
        ];
        let pos: Vec<usize> = order
            .iter()
            .map(|k| text.find(&format!("\n  \"{k}\":")).unwrap())
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
        assert_eq!(got.as_object().unwrap().len(), order.len());
        assert_eq!(got["format"], e["format"]);
        assert_eq!(got["fine_label_names"], e["fine_label_names"]);
        assert_eq!(got["coarse_label_names"], e["coarse_label_names"]);
        for split in ["train", "test"] {
            for k in [
                "n",
                "fine_hist",
                "coarse_hist",
                "labels_sha256",
                "pixels_sha256",
                "first_filename",
            ] {
                assert_eq!(got[split][k], e[split][k], "{which} {split} {k}");
            }
        }
    }
}

#[test]
fn inspect_reports_bad_input_with_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let out = rdrop(&["data", "inspect", "--data", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing"), "{err}");
    let p = fixtures().join("cifar100/py2");
    let out = rdrop(&["data", "inspect", "--data", p.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("CIFAR-100"));
}

#[test]
fn bench_json_reports_throughput() {
    let p = fixtures().join("cifar100/py2");
    let out = rdrop(&[
        "data",
        "bench",
        "--data",
        p.to_str().unwrap(),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--batches",
        "5",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["images"], 20);
}

#[test]
fn preview_writes_a_png_grid() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("grid.png");
    let p = fixtures().join("cifar100/py2");
    let out = rdrop(&[
        "data",
        "preview",
        "--data",
        p.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--augment",
        "--n",
        "6",
        "--image-size",
        "40",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&png).unwrap().to_rgb8();
    // 6 images -> 3 columns × 2 rows of (max(40, 96) + 4) × (40 + 16 + 4) tiles, plus padding
    assert_eq!(img.dimensions(), (3 * 100 + 4, 2 * 60 + 4));
    // some caption pixels are dark (text was drawn below the first image)
    let dark = (0..100)
        .flat_map(|x| (44..60).map(move |y| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 100)
        .count();
    assert!(dark > 10, "no caption text found");
}
