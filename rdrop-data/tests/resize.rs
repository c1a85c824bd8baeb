//! Resize parity with Pillow / torchvision (golden outputs from scripts/gen_data_fixtures.py).

use std::path::{Path, PathBuf};

use rdrop_data::resize::{resize_box, Scratch};
use rdrop_data::{CropBox, Normalize, Prepared, TestTransform, TrainTransform};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Golden {
    images: Vec<Vec<u8>>, // CHW
    cases: Vec<Value>,
    blob: Vec<u8>,
}

fn golden() -> Golden {
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("resize.json")).unwrap())
            .unwrap();
    let images = j["images_hwc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let hwc = hex::decode(h.as_str().unwrap()).unwrap();
            let mut chw = vec![0u8; 3072];
            for (i, px) in hwc.chunks(3).enumerate() {
                for c in 0..3 {
                    chw[c * 1024 + i] = px[c];
                }
            }
            chw
        })
        .collect();
    Golden {
        images,
        cases: j["cases"].as_array().unwrap().clone(),
        blob: std::fs::read(fixtures().join("resize.bin")).unwrap(),
    }
}

fn want<'a>(g: &'a Golden, c: &Value) -> &'a [u8] {
    let off = c["offset"].as_u64().unwrap() as usize;
    let n = 3 * (c["out_w"].as_u64().unwrap() * c["out_h"].as_u64().unwrap()) as usize;
    &g.blob[off..off + n]
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

fn u(c: &Value, k: &str) -> usize {
    c[k].as_u64().unwrap() as usize
}

#[test]
fn pillow_resize_with_box_matches() {
    let g = golden();
    let mut n = 0;
    for c in g.cases.iter().filter(|c| c["kind"] == "box") {
        let b: Vec<f32> = c["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let img = &g.images[u(c, "image")];
        let out = resize_box(
            img,
            3,
            32,
            32,
            [b[0], b[1], b[2], b[3]],
            u(c, "out_w"),
            u(c, "out_h"),
        )
        .unwrap();
        let d = max_diff(&out, want(&g, c));
        assert!(d <= 1, "case {c}: max diff {d}/255");
        // Bit-exact unless both sides shrink (Pillow's pass order there: see `vertical_first`)
        if u(c, "out_w") as f32 >= b[2] - b[0] || u(c, "out_h") as f32 >= b[3] - b[1] {
            assert_eq!(d, 0, "case {c}: expected bit-exact integer arithmetic");
        }
        n += 1;
    }
    assert!(n >= 8);
}

/// Map an f32 output back to bytes through the normalisation table.
fn to_bytes(out: &[f32], lut: &[[f32; 256]; 3], s: usize) -> Vec<u8> {
    out.chunks(s * s)
        .enumerate()
        .flat_map(|(c, plane)| {
            plane.iter().map(move |v| {
                lut[c]
                    .iter()
                    .position(|x| x == v)
                    .unwrap_or_else(|| panic!("{v} is not a normalised byte")) as u8
            })
        })
        .collect()
}

#[test]
fn torchvision_resized_crop_matches() {
    let g = golden();
    let lut = Normalize::default().lut();
    let mut n = 0;
    for c in g.cases.iter().filter(|c| c["kind"] == "crop") {
        let s = u(c, "size");
        let p = Prepared::train(&TrainTransform {
            image_size: s,
            ..Default::default()
        });
        let crop = CropBox {
            top: u(c, "top"),
            left: u(c, "left"),
            height: u(c, "height"),
            width: u(c, "width"),
        };
        let mut out = vec![0f32; 3 * s * s];
        p.apply_crop(
            &g.images[u(c, "image")],
            crop,
            false,
            &mut Scratch::default(),
            &mut out,
        );
        let d = max_diff(&to_bytes(&out, &lut, s), want(&g, c));
        assert!(d <= 1, "case {c}: max diff {d}/255");
        if s >= crop.width || s >= crop.height {
            assert_eq!(d, 0, "case {c}: expected bit-exact integer arithmetic");
        }
        n += 1;
    }
    assert!(n >= 7);
}

#[test]
fn torchvision_test_resize_matches() {
    let g = golden();
    let lut = Normalize::default().lut();
    for c in g.cases.iter().filter(|c| c["kind"] == "test") {
        let s = u(c, "size");
        let out = TestTransform {
            image_size: s,
            ..Default::default()
        }
        .apply(&g.images[u(c, "image")]);
        let d = max_diff(&to_bytes(&out, &lut, s), want(&g, c));
        assert!(d <= 1, "case {c}: max diff {d}/255");
    }
}

#[test]
fn flip_mirrors_rows() {
    let g = golden();
    let p = Prepared::train(&TrainTransform {
        image_size: 20,
        ..Default::default()
    });
    let crop = CropBox {
        top: 2,
        left: 3,
        height: 17,
        width: 25,
    };
    let (mut a, mut b) = (vec![0f32; 1200], vec![0f32; 1200]);
    p.apply_crop(&g.images[0], crop, false, &mut Scratch::default(), &mut a);
    p.apply_crop(&g.images[0], crop, true, &mut Scratch::default(), &mut b);
    for (ra, rb) in a.chunks(20).zip(b.chunks(20)) {
        let rev: Vec<f32> = ra.iter().rev().copied().collect();
        assert_eq!(rev, rb);
    }
}

#[test]
fn normalisation_matches_torchvision_bit_for_bit() {
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("normalize.json")).unwrap())
            .unwrap();
    for (name, norm) in [
        ("default", Normalize::default()),
        ("imagenet", Normalize::IMAGENET),
    ] {
        let lut = norm.lut();
        let vals = j[name]["values"].as_array().unwrap();
        for c in 0..3 {
            let row = vals[c].as_array().unwrap();
            for v in 0..256 {
                let bits = row[v].as_u64().unwrap() as u32;
                assert_eq!(lut[c][v].to_bits(), bits, "{name} channel {c} value {v}");
            }
        }
    }
}
