//! The explicit engine against its references: transformers' logits (fixture of
//! `scripts/gen_vit_fixtures.py`) and the candle-autograd model's logits and gradients of the
//! R-Drop loss, on the `tiny` and `cpu-small` shapes and one with an even token count (26),
//! with dropout 0 and 0.1 (the same Philox masks in both engines).
//!
//! Tolerances: logits within 1e-5 of the logit scale (max |Δ| / max |logit|); each parameter's
//! gradient within 1e-4 of that gradient's scale (max |Δ| / max |g|).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::{rdrop_loss, DropoutRng, FlatRDropModel, LossConfig, LossMode, MicroStep};
use rdrop_vit::{load_model, Engine, LoadOptions, ViTConfig, VisionTransformer};

fn model(cfg: &ViTConfig, seed: u64) -> (VisionTransformer, VarMap) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = VisionTransformer::new(cfg, vb, DropoutRng::new(seed)).unwrap();
    // A non-zero head and non-trivial LayerNorm/bias values, so that every gradient is
    // exercised (the fresh model has a zero head, unit LayerNorms and zero biases).
    for (i, (name, v)) in m.named_vars().into_iter().enumerate() {
        let is_ln = name.contains("layernorm");
        let is_head = name.starts_with("classifier");
        if is_ln || is_head || name.ends_with(".bias") {
            let base = if is_ln && name.ends_with("weight") {
                1.0
            } else {
                0.0
            };
            let noise = Tensor::randn(0f32, 0.2, v.shape(), &Device::Cpu).unwrap();
            let t = (noise + base).unwrap();
            v.set(&t).unwrap();
        }
        let _ = i;
    }
    (m, vm)
}

fn images(b: usize, cfg: &ViTConfig) -> Tensor {
    Tensor::randn(
        0f32,
        1.0,
        (b, cfg.num_channels, cfg.image_size, cfg.image_size),
        &Device::Cpu,
    )
    .unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a − b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn odd_cfg() -> ViTConfig {
    ViTConfig {
        image_size: 20,
        patch_size: 4,
        hidden_size: 48,
        num_layers: 2,
        num_heads: 3,
        mlp_dim: 80,
        num_classes: 7,
        ..ViTConfig::default()
    }
}

fn with_dropout(cfg: ViTConfig, p: f64) -> ViTConfig {
    ViTConfig {
        dropout: p,
        attention_dropout: p,
        attention_output_dropout: p,
        ..cfg
    }
}

fn check_logits(cfg: &ViTConfig) {
    let (m, _) = model(cfg, 3);
    let x = images(5, cfg);
    let want = to_vec(&m.forward_t(&x, false).unwrap());
    let mut e = Engine::from_model(&m).unwrap();
    let got = to_vec(&e.forward_eval(&x).unwrap());
    let r = rel(&got, &want);
    assert!(r <= 1e-5, "eval logits: relative error {r}");
}

#[test]
fn eval_logits_match_autograd() {
    check_logits(&ViTConfig::preset("tiny").unwrap());
    check_logits(&ViTConfig::preset("cpu-small").unwrap());
    check_logits(&odd_cfg());
}

#[test]
fn eval_logits_match_transformers() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let l = load_model(&fx.join("hf").to_string_lossy(), &LoadOptions::default()).unwrap();
    let io = candle_core::safetensors::load(fx.join("io.safetensors"), &Device::Cpu).unwrap();
    let mut e = Engine::from_model(&l.model).unwrap();
    let got = to_vec(&e.forward_eval(&io["x"]).unwrap());
    let want = to_vec(&io["logits"]);
    let d = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d < 1e-4, "max |Δlogits| vs transformers = {d}");
}

/// One R-Drop micro-batch through both engines: the autograd model's gradient of
/// `weight · rdrop_loss` against the engine's accumulated gradients.
fn check_grads(cfg: &ViTConfig, mode: LossMode, smoothing: f64) {
    let (m, _) = model(cfg, 11);
    let b = 4;
    let x = images(b, cfg);
    let y = Tensor::from_vec(
        (0..b as u32)
            .map(|i| i % cfg.num_classes as u32)
            .collect::<Vec<_>>(),
        b,
        &Device::Cpu,
    )
    .unwrap();
    let loss_cfg = LossConfig {
        alpha: 0.7,
        mode,
        label_smoothing: smoothing,
    };
    let (update, first, weight) = (3u64, 8usize, 0.5f64);

    // Autograd: one forward of [x; x] with the engine's row keys.
    let rows: Vec<rdrop_core::RowKey> = (0..2)
        .flat_map(|pass| {
            (0..b).map(move |i| rdrop_core::RowKey {
                sample: (first + i) as u32,
                pass,
            })
        })
        .collect();
    m.rng().set_context(update as u32, rows);
    let xx = Tensor::cat(&[&x, &x], 0).unwrap();
    let logits = m.forward_t(&xx, true).unwrap();
    let (p, q) = (
        logits.narrow(0, 0, b).unwrap(),
        logits.narrow(0, b, b).unwrap(),
    );
    let parts = rdrop_loss(&p, &q, &y, &loss_cfg).unwrap();
    let grads = parts.loss.affine(weight, 0.0).unwrap().backward().unwrap();

    let mut e = Engine::from_model(&m).unwrap();
    e.zero_grads();
    let ml = e
        .accumulate(&MicroStep {
            x: &x,
            y: &y,
            update,
            first_sample: first,
            loss: &loss_cfg,
            weight,
        })
        .unwrap();
    let want_loss = parts.loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (ml.loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
        "loss {} vs autograd {want_loss}",
        ml.loss
    );
    let flat = e.grads().to_vec();
    let layout = e.layout().clone();
    // The gradient of the key bias is exactly zero in theory (softmax is invariant to a
    // per-row constant); both engines give rounding noise there, so each tensor's scale is
    // floored at 1e-3 of the largest gradient of the model.
    let global = flat.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = (0f32, String::new());
    for v in layout.views() {
        let var = m.var(&v.name).unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("autograd: no gradient for {}", v.name));
        let want = to_vec(g);
        let got = &flat[v.range()];
        assert!(
            got.iter().any(|&x| x != 0.0),
            "engine: zero gradient for {}",
            v.name
        );
        assert!(got.iter().all(|x| x.is_finite()), "{}: not finite", v.name);
        let scale = want.iter().fold(1e-3 * global, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let r = diff / scale;
        if r > worst.0 {
            worst = (r, v.name.clone());
        }
    }
    eprintln!("worst gradient: {} at {}", worst.0, worst.1);
    assert!(
        worst.0 <= 1e-4,
        "gradient of {} off by {} (relative)",
        worst.1,
        worst.0
    );
}

#[test]
fn gradients_match_autograd_without_dropout() {
    for cfg in [
        ViTConfig::preset("tiny").unwrap(),
        ViTConfig::preset("cpu-small").unwrap(),
        odd_cfg(),
    ] {
        check_grads(&with_dropout(cfg, 0.0), LossMode::Mean, 0.0);
    }
}

#[test]
fn gradients_match_autograd_with_dropout() {
    for cfg in [
        ViTConfig::preset("tiny").unwrap(),
        ViTConfig::preset("cpu-small").unwrap(),
        odd_cfg(),
    ] {
        check_grads(&with_dropout(cfg, 0.1), LossMode::Mean, 0.0);
    }
    check_grads(
        &with_dropout(ViTConfig::preset("tiny").unwrap(), 0.1),
        LossMode::Reference,
        0.1,
    );
}

/// Profiling only watches: the same gradients to the bit, and a profile whose GEMM work is
/// the closed form `2·N·D·3D` per layer for the QKV projection (twice that backward).
#[test]
fn profiling_changes_nothing_and_counts_the_work() {
    let cfg = with_dropout(ViTConfig::preset("tiny").unwrap(), 0.1);
    let (m, _) = model(&cfg, 5);
    let b = 3;
    let x = images(b, &cfg);
    let y = Tensor::from_vec(vec![0u32, 1, 2], b, &Device::Cpu).unwrap();
    let loss = LossConfig::default();
    let mut grads = Vec::new();
    for on in [false, true] {
        let mut e = Engine::from_model(&m).unwrap();
        e.set_profiling(on);
        e.accumulate(&MicroStep {
            x: &x,
            y: &y,
            update: 1,
            first_sample: 0,
            loss: &loss,
            weight: 1.0,
        })
        .unwrap();
        grads.push(e.grads().to_vec());
        let p = e.take_profile();
        if !on {
            assert!(p.groups.is_empty());
            continue;
        }
        let n = (2 * b * cfg.num_tokens()) as f64;
        let d = cfg.hidden_size as f64;
        let qkv = 2.0 * n * d * 3.0 * d * cfg.num_layers as f64;
        let get = |g: &str| p.groups.iter().find(|x| x.group == g).unwrap().clone();
        assert_eq!(get("qkv_gemm").flops, qkv);
        assert_eq!(get("qkv_gemm_bwd").flops, 2.0 * qkv);
        assert!(get("loss").bytes > 0.0 && get("patch_embed_bwd").ms >= 0.0);
        assert!(e.take_profile().groups.is_empty(), "taken");
    }
    assert!(
        grads[0]
            .iter()
            .zip(&grads[1])
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "profiling changed a gradient"
    );
}
