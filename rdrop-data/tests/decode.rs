//! Decoding every pickle variant of the fixtures (written by scripts/gen_data_fixtures.py with
//! Python's pickle/numpy, and by scripts/write_py2_pickle.py opcode by opcode for the 2009
//! layout) must give what Python computed (tests/fixtures/expected.json).

use std::path::{Path, PathBuf};

use rdrop_data::cifar::{decode_file, Decoded};
use rdrop_data::{Cifar, DataError, Format, Split};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected(which: &str) -> Value {
    let s = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str::<Value>(&s).unwrap()[which].clone()
}

fn check_split(s: &Split, e: &Value) {
    assert_eq!(s.len() as u64, e["n"].as_u64().unwrap());
    let fine: Vec<u64> = s.fine_labels.iter().map(|&l| l as u64).collect();
    let want: Vec<u64> = e["fine_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(fine, want);
    let coarse: Vec<u64> = s.coarse_labels.iter().map(|&l| l as u64).collect();
    let want: Vec<u64> = e["coarse_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(coarse, want);
    let files: Vec<&str> = e["filenames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(s.filenames, files);
    assert_eq!(
        hex::encode(Sha256::digest(&s.images)),
        e["pixels_sha256"].as_str().unwrap()
    );
}

fn check(c: &Cifar, which: &str) {
    let e = expected(which);
    assert_eq!(c.format.name(), e["format"].as_str().unwrap());
    check_split(&c.train, &e["train"]);
    check_split(&c.test, &e["test"]);
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(c.fine_label_names, names(&e["fine_label_names"]));
    assert_eq!(c.coarse_label_names, names(&e["coarse_label_names"]));
    assert_eq!(c.train.num_classes(), c.fine_label_names.len());
    assert_eq!(c.num_classes(), c.fine_label_names.len());
}

#[test]
fn every_cifar100_pickle_variant_decodes_identically() {
    let mut variants = vec!["py2".to_string()];
    for p in 2..=5 {
        for np in 1..=2 {
            variants.push(format!("py3-p{p}-np{np}"));
        }
    }
    for v in &variants {
        let c = Cifar::open(&fixtures().join("cifar100").join(v))
            .unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(c.format, Format::Cifar100);
        check(&c, "cifar100");
    }
}

#[test]
fn cifar100_archive_streamed_from_file_and_memory() {
    let path = fixtures().join("cifar100/cifar-100-python.tar.gz");
    check(&Cifar::open(&path).unwrap(), "cifar100");
    let bytes = std::fs::read(&path).unwrap();
    let c = Cifar::from_tar_gz_reader(&bytes[..], "embedded").unwrap();
    check(&c, "cifar100");
}

#[test]
fn cifar10_folder_and_archive() {
    let c = Cifar::open(&fixtures().join("cifar10/py2")).unwrap();
    assert_eq!(c.format, Format::Cifar10);
    assert!(c.test.coarse_labels.is_empty());
    check(&c, "cifar10");
    check(
        &Cifar::open(&fixtures().join("cifar10/cifar-10-python.tar.gz")).unwrap(),
        "cifar10",
    );
}

#[test]
fn parent_of_extracted_folder_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("cifar-100-python");
    std::fs::create_dir(&sub).unwrap();
    for f in ["train", "test", "meta"] {
        std::fs::copy(fixtures().join("cifar100/py2").join(f), sub.join(f)).unwrap();
    }
    check(&Cifar::open(dir.path()).unwrap(), "cifar100");
}

fn py2(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("cifar100/py2").join(name)).unwrap()
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let i = hay
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    [&hay[..i], to, &hay[i + from.len()..]].concat()
}

/// A CIFAR-100 folder whose `name` file holds `bytes`.
fn folder_with(name: &str, bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["train", "test", "meta"] {
        std::fs::write(dir.path().join(f), py2(f)).unwrap();
    }
    std::fs::write(dir.path().join(name), bytes).unwrap();
    dir
}

fn open_err(name: &str, bytes: &[u8]) -> String {
    let dir = folder_with(name, bytes);
    let e = Cifar::open(dir.path()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(name), "error does not name the file: {msg}");
    msg
}

#[test]
fn folder_without_the_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train"), py2("train")).unwrap();
    let e = Cifar::open(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::NotCifar { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("test") && msg.contains("meta"), "{msg}");
    let e = Cifar::open(&dir.path().join("nope")).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn truncated_pickle_is_a_typed_error() {
    let t = py2("train");
    let msg = open_err("train", &t[..t.len() / 2]);
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn wrong_dtype_is_rejected() {
    let t = replace(&py2("train"), b"U\x02u1", b"U\x02i8");
    let msg = open_err("train", &t);
    assert!(msg.contains("dtype i8"), "{msg}");
}

#[test]
fn wrong_shape_is_rejected() {
    // shape (8, 3072) -> (8, 3071): M\x00\x0c is 3072
    let t = replace(&py2("train"), b"M\x00\x0c", b"M\xff\x0b");
    let msg = open_err("train", &t);
    assert!(msg.contains("shape"), "{msg}");
}

#[test]
fn label_out_of_range_is_rejected() {
    let t = py2("train");
    let key = t.windows(11).position(|w| w == b"fine_labels").unwrap();
    let first = key + t[key..].windows(2).position(|w| w == b"(K").unwrap() + 2;
    assert_eq!(t[first], 99);
    let mut bad = t.clone();
    bad[first] = 100;
    let msg = open_err("train", &bad);
    assert!(msg.contains("out of range") && msg.contains("100"), "{msg}");
}

#[test]
fn unknown_global_is_named_and_not_run() {
    let t = replace(&py2("train"), b"cnumpy\nndarray\n", b"cposix\nsystem\n");
    let msg = open_err("train", &t);
    assert!(msg.contains("posix.system"), "{msg}");
}

#[test]
fn truncated_archive_is_a_typed_error() {
    let bytes = std::fs::read(fixtures().join("cifar100/cifar-100-python.tar.gz")).unwrap();
    for cut in [10, bytes.len() / 3, bytes.len() - 30] {
        let e = Cifar::from_tar_gz_reader(&bytes[..cut], "cut.tar.gz").unwrap_err();
        assert!(e.to_string().contains("cut.tar.gz"), "{e}");
    }
}

#[test]
fn decode_file_tells_batches_from_meta() {
    match decode_file(&py2("meta"), "meta").unwrap() {
        Decoded::Meta { fine, coarse } => assert_eq!((fine.len(), coarse.len()), (100, 20)),
        other => panic!("{other:?}"),
    }
    match decode_file(&py2("test"), "test").unwrap() {
        Decoded::Batch(b) => assert_eq!(b.images.len(), b.fine.len() * 3072),
        other => panic!("{other:?}"),
    }
}

/// Random byte mutations and truncations of valid files: Ok or Err, never a panic or a hang.
#[test]
fn mutations_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let sources = [
        py2("train"),
        py2("meta"),
        std::fs::read(fixtures().join("cifar100/py3-p2-np1/test")).unwrap(),
        std::fs::read(fixtures().join("cifar100/py3-p5-np2/test")).unwrap(),
        std::fs::read(fixtures().join("cifar100/py3-p4-np1/meta")).unwrap(),
    ];
    let start = std::time::Instant::now();
    let (mut ok, mut err) = (0, 0);
    for round in 0..3000 {
        let src = &sources[round % sources.len()];
        let mut b = src.clone();
        match rng.gen_range(0..4) {
            0 => b.truncate(rng.gen_range(0..b.len())),
            1 => {
                for _ in 0..rng.gen_range(1..8) {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
            }
            2 => {
                // mutate the structural head of the file (opcodes rather than pixels)
                let head = b.len().min(400);
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..head);
                    b[i] = rng.gen();
                }
            }
            _ => {
                let i = rng.gen_range(0..b.len());
                let n = rng.gen_range(1..16).min(b.len() - i);
                b.drain(i..i + n);
            }
        }
        match decode_file(&b, "mutant") {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    // tar.gz truncations and corruptions
    let tgz = std::fs::read(fixtures().join("cifar10/cifar-10-python.tar.gz")).unwrap();
    for _ in 0..100 {
        let mut b = tgz.clone();
        let i = rng.gen_range(0..b.len());
        b[i] ^= 1 << rng.gen_range(0..8);
        b.truncate(rng.gen_range(i..=b.len()));
        let _ = Cifar::from_tar_gz_reader(&b[..], "mutant.tar.gz");
    }
    assert!(err > 1000, "most mutants should fail ({ok} ok, {err} err)");
    assert!(start.elapsed().as_secs() < 60, "mutation test too slow");
}

#[test]
fn summary_matches_numpy() {
    for (which, path) in [
        ("cifar100", "cifar100/py3-p4-np2"),
        ("cifar10", "cifar10/cifar-10-python.tar.gz"),
    ] {
        let s = Cifar::open(&fixtures().join(path)).unwrap().summary();
        let e = expected(which);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["format"], e["format"]);
        for split in ["train", "test"] {
            let (got, want) = (&json[split], &e[split]);
            for k in [
                "n",
                "fine_hist",
                "coarse_hist",
                "labels_sha256",
                "pixels_sha256",
                "first_filename",
            ] {
                assert_eq!(got[k], want[k], "{which} {split} {k}");
            }
            for c in 0..3 {
                let (g, w) = (
                    got["channel_mean"][c].as_f64().unwrap(),
                    want["channel_mean"][c].as_f64().unwrap(),
                );
                assert!((g - w).abs() < 1e-12, "{which} {split} mean {g} vs {w}");
            }
        }
    }
}
