//! Golden tests against independent implementations (transformers' ViTForImageClassification,
//! timm's VisionTransformer and npz loader, scipy's zoom), fixtures written by
//! `scripts/gen_vit_fixtures.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rdrop_vit::layouts;
use rdrop_vit::model::cross_entropy;
use rdrop_vit::{load_model, resize_pos_embed, HeadStatus, LoadOptions, WeightsLayout};

fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn spec(p: &str) -> String {
    fx(p).to_string_lossy().into_owned()
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fx("io.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

fn eval_logits(spec: &str, opts: &LoadOptions) -> Tensor {
    let l = load_model(spec, opts).unwrap();
    l.model.forward_t(&io()["x"], false).unwrap()
}

#[test]
fn hf_layout_logits_match_transformers() {
    let l = load_model(&spec("hf"), &LoadOptions::default()).unwrap();
    assert_eq!(l.report.layout, WeightsLayout::HfClassifier);
    assert_eq!(l.report.head, HeadStatus::Loaded);
    assert_eq!(l.config.num_classes, 5);
    assert_eq!(l.config.layer_norm_eps, 1e-6);
    let got = l.model.forward_t(&io()["x"], false).unwrap();
    let d = max_diff(&got, &io()["logits"]);
    assert!(d < 1e-4, "max |Δlogits| = {d}");
}

#[test]
fn timm_layout_logits_match() {
    // No config: architecture from shapes, head count from the matching preset (`tiny`).
    let got = eval_logits(&spec("timm.safetensors"), &LoadOptions::default());
    let d = max_diff(&got, &io()["logits"]);
    assert!(d < 1e-4, "max |Δlogits| = {d}");
}

#[test]
fn google_npz_logits_match_and_pre_logits_is_skipped() {
    let l = load_model(&spec("google.npz"), &LoadOptions::default()).unwrap();
    assert_eq!(l.report.layout, WeightsLayout::GoogleNpz);
    assert!(l
        .report
        .skipped
        .iter()
        .any(|(n, _)| n == "pre_logits/kernel"));
    let got = l.model.forward_t(&io()["x"], false).unwrap();
    let d = max_diff(&got, &io()["logits"]);
    assert!(d < 1e-4, "max |Δlogits| = {d}");
}

#[test]
fn hf_base_model_layout_loads_with_a_new_zero_head() {
    let opts = LoadOptions {
        num_classes: Some(10),
        ..Default::default()
    };
    let l = load_model(&spec("hf_base"), &opts).unwrap();
    assert_eq!(l.report.layout, WeightsLayout::HfBase);
    assert!(matches!(l.report.head, HeadStatus::New(_)));
    assert!(l.model.head_is_zero().unwrap());
    assert!(l
        .report
        .skipped
        .iter()
        .any(|(n, _)| n.starts_with("pooler.")));
    let f = l.model.features(&io()["x"], false).unwrap();
    let d = max_diff(&f, &io()["cls_hidden"]);
    assert!(d < 1e-4, "max |Δfeatures| = {d}");
    let logits = l.model.forward_t(&io()["x"], false).unwrap();
    assert_eq!(logits.dims(), &[2, 10]);
    assert_eq!(max_abs(&logits), 0.0);
}

#[test]
fn gradients_match_transformers() {
    let l = load_model(&spec("hf"), &LoadOptions::default()).unwrap();
    let io = io();
    // Dropout rates are 0 in the fixture config: train mode equals PyTorch's.
    let logits = l.model.forward_t(&io["x"], true).unwrap();
    let loss = cross_entropy(&logits, &io["y"]).unwrap();
    let grads = loss.backward().unwrap();
    let want = candle_core::safetensors::load(fx("grads.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(want.len(), l.model.named_vars().len());
    for (name, var) in l.model.named_vars() {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let w = &want[&name];
        let scale = max_abs(w);
        let d = max_diff(g, w);
        if name.contains("attention.key.bias") {
            // Analytically zero (softmax is invariant to a per-query constant): both sides
            // hold only rounding noise.
            assert!(max_abs(g) < 1e-5 && scale < 1e-5, "{name}");
            continue;
        }
        assert!(scale > 0.0, "{name}");
        assert!(
            d <= 1e-4 * scale,
            "{name}: max |Δgrad| {d} vs max |grad| {scale}"
        );
    }
}

#[test]
fn every_parameter_gets_a_nonzero_gradient_with_dropout() {
    let opts = LoadOptions {
        dropout: Some(0.1),
        attention_dropout: Some(0.1),
        attention_output_dropout: Some(0.1),
        ..Default::default()
    };
    let l = load_model(&spec("hf"), &opts).unwrap();
    let io = io();
    let logits = l.model.forward_t(&io["x"], true).unwrap();
    let grads = cross_entropy(&logits, &io["y"])
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in l.model.named_vars() {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(max_abs(g) > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn position_embedding_resize_matches_scipy_zoom() {
    let pe = candle_core::safetensors::load(fx("posembed.safetensors"), &Device::Cpu).unwrap();
    for case in ["up", "down", "vit"] {
        let want = &pe[&format!("{case}.out")];
        let new_grid = ((want.dim(1).unwrap() - 1) as f64).sqrt() as usize;
        let got = resize_pos_embed(&pe[&format!("{case}.in")], new_grid).unwrap();
        assert_eq!(got.dims(), want.dims());
        let d = max_diff(&got, want);
        assert!(d < 1e-5, "{case}: {d}");
    }
}

#[test]
fn image_size_change_resizes_position_embeddings() {
    let opts = LoadOptions {
        image_size: Some(56),
        ..Default::default()
    };
    let l = load_model(&spec("hf"), &opts).unwrap();
    assert_eq!(l.report.pos_embed_resized, Some((4, 7)));
    assert_eq!(l.config.image_size, 56);
    let x = Tensor::zeros((1, 3, 56, 56), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(l.model.forward_t(&x, false).unwrap().dims(), &[1, 5]);
    // Image sizes that are not a multiple of the patch are refused.
    let bad = LoadOptions {
        image_size: Some(50),
        ..Default::default()
    };
    assert!(load_model(&spec("hf"), &bad).is_err());
}

#[test]
fn three_layouts_convert_to_identical_tensors() {
    let read = |p: &str| -> Vec<(String, Tensor)> {
        candle_core::safetensors::load(fx(p), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect()
    };
    let hf = layouts::from_hf(read("hf/model.safetensors")).tensors;
    let timm = layouts::from_timm(read("timm.safetensors"))
        .unwrap()
        .tensors;
    let npz = layouts::from_google_npz(Tensor::read_npz(fx("google.npz")).unwrap()).unwrap();
    assert_eq!(npz.num_heads, Some(4));
    for other in [&timm, &npz.tensors] {
        assert_eq!(other.len(), hf.len());
        for (n, t) in &hf {
            assert_eq!(max_diff(t, &other[n]), 0.0, "{n}");
        }
    }
}

#[test]
fn candle_transformers_vit_agrees_in_eval_mode() {
    // candle-transformers' (inference-only) ViT parses the same config.json and weights.
    let cfg: candle_transformers::models::vit::Config =
        serde_json::from_str(&std::fs::read_to_string(fx("hf/config.json")).unwrap()).unwrap();
    let ts = candle_core::safetensors::load(fx("hf/model.safetensors"), &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    let theirs = candle_transformers::models::vit::Model::new(&cfg, 5, vb).unwrap();
    let x = &io()["x"];
    let a = theirs.forward(x).unwrap();
    let b = eval_logits(&spec("hf"), &LoadOptions::default());
    assert!(max_diff(&a, &b) < 1e-4);
}
