//! Dropout in train mode: rate and 1/(1−p) scaling; eval mode bit-identical across calls.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::DropoutRng;
use rdrop_vit::{ViTConfig, VisionTransformer};

#[test]
fn embedding_dropout_rate_and_scaling() {
    let p = 0.3;
    let cfg = ViTConfig {
        dropout: p,
        ..ViTConfig::preset("tiny").unwrap()
    };
    let vm = VarMap::new();
    let m = VisionTransformer::new(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        DropoutRng::new(9),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (16, 3, 32, 32), &Device::Cpu).unwrap();
    let eval: Vec<f32> = m
        .embeddings(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let eval2: Vec<f32> = m
        .embeddings(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(eval, eval2);
    let train: Vec<f32> = m
        .embeddings(&x, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut dropped, mut n) = (0usize, 0usize);
    for (t, e) in train.iter().zip(&eval) {
        if *e == 0.0 {
            continue;
        }
        n += 1;
        if *t == 0.0 {
            dropped += 1;
        } else {
            assert!(
                (t - e / (1.0 - p as f32)).abs() <= 1e-5 * e.abs().max(1.0),
                "{t} vs {e}"
            );
        }
    }
    let rate = dropped as f64 / n as f64;
    assert!(n > 8000 && (rate - p).abs() < 0.02, "rate {rate} over {n}");
    // Whole-model eval forward is bit-identical across calls, train forward is not.
    let a: Vec<f32> = m
        .features(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = m
        .features(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
    let c: Vec<f32> = m
        .features(&x, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(a, c);
}
