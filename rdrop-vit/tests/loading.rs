//! Weight resolution and loading: run folders, the hub cache, saving, errors, and the real
//! in21k ViT-B/16 names and shapes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rdrop_vit::{load_model, save_hf, HeadStatus, LoadOptions, ViTConfig, VitError, WeightsLayout};

fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn x() -> Tensor {
    candle_core::safetensors::load(fx("io.safetensors"), &Device::Cpu).unwrap()["x"].clone()
}

fn logits(spec: &Path, opts: &LoadOptions) -> Vec<f32> {
    let l = load_model(&spec.to_string_lossy(), opts).unwrap();
    l.model
        .forward_t(&x(), false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn save_hf_round_trips_and_run_folders_resolve() {
    let opts = LoadOptions::default();
    let want = logits(&fx("hf"), &opts);
    let l = load_model(&fx("timm.safetensors").to_string_lossy(), &opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let names: Vec<String> = (0..5).map(|i| format!("class {i}")).collect();
    save_hf(&l.model, &run.join("checkpoints/step-5"), None).unwrap();
    save_hf(&l.model, &run.join("checkpoints/step-12"), Some(&names)).unwrap();
    // Newest checkpoint when there is neither final/ nor best/.
    let r = load_model(&run.to_string_lossy(), &opts).unwrap();
    assert_eq!(r.report.layout, WeightsLayout::Rdrop);
    assert!(r.report.path.starts_with(run.join("checkpoints/step-12")));
    assert_eq!(r.class_names.as_deref(), Some(&names[..]));
    assert_eq!(r.config, l.config);
    let got: Vec<f32> = r
        .model
        .forward_t(&x(), false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4);
    }
    save_hf(&l.model, &run.join("best"), None).unwrap();
    let r = load_model(&run.to_string_lossy(), &opts).unwrap();
    assert!(r.report.path.starts_with(run.join("best")));
    save_hf(&l.model, &run.join("final"), None).unwrap();
    let r = load_model(&run.to_string_lossy(), &opts).unwrap();
    assert!(r.report.path.starts_with(run.join("final")));
    // No temporary files left behind.
    let left: Vec<_> = std::fs::read_dir(run.join("final"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    // Our config.json is a ViTForImageClassification config.
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("final/config.json")).unwrap())
            .unwrap();
    assert_eq!(j["architectures"][0], "ViTForImageClassification");
    assert_eq!(j["layer_norm_eps"], 1e-6);
}

#[test]
fn hub_repo_ids_resolve_from_a_standard_cache_folder() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--someorg--tiny-vit");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    copy_dir(&fx("hf"), &repo.join("snapshots/0123abcd"));
    let opts = LoadOptions {
        hub_cache: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    let got = logits(Path::new("someorg/tiny-vit"), &opts);
    assert_eq!(got, logits(&fx("hf"), &LoadOptions::default()));
}

#[test]
fn head_of_another_size_or_reset_is_new_and_zero() {
    let l = load_model(
        &fx("hf").to_string_lossy(),
        &LoadOptions {
            num_classes: Some(7),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(l.report.head, HeadStatus::New(ref why) if why.contains("5 classes")));
    assert!(l.model.head_is_zero().unwrap());
    let l = load_model(
        &fx("hf").to_string_lossy(),
        &LoadOptions {
            num_classes: Some(5),
            reset_head: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(l.report.head, HeadStatus::New(_)));
    assert!(l.model.head_is_zero().unwrap());
    // A checkpoint without a head needs the number of classes.
    assert!(load_model(&fx("hf_base").to_string_lossy(), &LoadOptions::default()).is_err());
}

fn write_modified(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut t = candle_core::safetensors::load(fx("hf/model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut t);
    let d = dir.join("m");
    std::fs::create_dir_all(&d).unwrap();
    candle_core::safetensors::save(&t, d.join("model.safetensors")).unwrap();
    std::fs::copy(fx("hf/config.json"), d.join("config.json")).unwrap();
    d
}

#[test]
fn shape_mismatch_and_missing_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let name = "vit.encoder.layer.1.intermediate.dense.bias";
    let d = write_modified(dir.path(), |t| {
        t.insert(
            name.into(),
            Tensor::zeros(63, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_model(&d.to_string_lossy(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, VitError::Shape { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(name) && msg.contains("[63]") && msg.contains("[64]"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    let name = "vit.encoder.layer.0.attention.output.dense.weight";
    let d = write_modified(dir.path(), |t| {
        t.remove(name);
    });
    let msg = load_model(&d.to_string_lossy(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing") && msg.contains(name), "{msg}");
}

#[test]
fn preset_mismatch_is_an_error_and_unknown_specs_are_explained() {
    let err = load_model(
        &fx("timm.safetensors").to_string_lossy(),
        &LoadOptions {
            preset: Some("vit-b16".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("hidden size 768"), "{err}");
    let ok = load_model(
        &fx("google.npz").to_string_lossy(),
        &LoadOptions {
            preset: Some("tiny".into()),
            ..Default::default()
        },
    );
    assert!(ok.is_ok());
    let err = load_model("/no/such/file.safetensors", &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no such file"), "{err}");
}

/// A config.json decides the architecture: a run preset's model (`fallback_preset`) applies
/// only to files without one, and an explicit preset that contradicts it names both.
#[test]
fn config_json_decides_and_an_explicit_preset_must_agree() {
    let hf = fx("hf").to_string_lossy().to_string();
    let l = load_model(
        &hf,
        &LoadOptions {
            fallback_preset: Some("vit-b16".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        (
            l.config.hidden_size,
            l.config.num_layers,
            l.config.num_heads
        ),
        (32, 2, 4)
    );
    let err = load_model(
        &hf,
        &LoadOptions {
            preset: Some("vit-b16".into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("vit-b16")
            && err.contains("hidden 768")
            && err.contains("hidden 32")
            && err.contains("config.json"),
        "{err}"
    );
    // Without a config.json the fallback is checked against the shapes.
    let err = load_model(
        &fx("timm.safetensors").to_string_lossy(),
        &LoadOptions {
            fallback_preset: Some("vit-b16".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("hidden size 768"), "{err}");
}

/// The names and shapes of `google/vit-base-patch16-224-in21k` (HF ViTModel layout, with
/// pooler) and of `timm/vit_base_patch16_224.orig_in21k`, with random values.
fn in21k_hf(d: usize, layers: usize, mlp: usize) -> HashMap<String, Tensor> {
    let dev = &Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 0.02, s, dev).unwrap();
    let mut t = HashMap::new();
    t.insert("embeddings.cls_token".to_string(), r(&[1, 1, d]));
    t.insert("embeddings.position_embeddings".into(), r(&[1, 197, d]));
    t.insert(
        "embeddings.patch_embeddings.projection.weight".into(),
        r(&[d, 3, 16, 16]),
    );
    t.insert(
        "embeddings.patch_embeddings.projection.bias".into(),
        r(&[d]),
    );
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        for (m, o, n) in [
            ("attention.attention.query", d, d),
            ("attention.attention.key", d, d),
            ("attention.attention.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", mlp, d),
            ("output.dense", d, mlp),
        ] {
            t.insert(format!("{p}.{m}.weight"), r(&[o, n]));
            t.insert(format!("{p}.{m}.bias"), r(&[o]));
        }
        for m in ["layernorm_before", "layernorm_after"] {
            t.insert(format!("{p}.{m}.weight"), r(&[d]));
            t.insert(format!("{p}.{m}.bias"), r(&[d]));
        }
    }
    t.insert("layernorm.weight".into(), r(&[d]));
    t.insert("layernorm.bias".into(), r(&[d]));
    t.insert("pooler.dense.weight".into(), r(&[d, d]));
    t.insert("pooler.dense.bias".into(), r(&[d]));
    t
}

#[test]
fn in21k_vit_b16_names_and_shapes_load_with_timm_parameter_count() {
    let dir = tempfile::tempdir().unwrap();
    let t = in21k_hf(768, 12, 3072);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    // The config.json of google/vit-base-patch16-224-in21k.
    let cfg = serde_json::json!({
        "architectures": ["ViTModel"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "hidden_size": 768, "image_size": 224, "initializer_range": 0.02,
        "intermediate_size": 3072, "layer_norm_eps": 1e-12, "model_type": "vit", "num_attention_heads": 12,
        "num_channels": 3, "num_hidden_layers": 12, "patch_size": 16, "qkv_bias": true
    });
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let opts = LoadOptions {
        num_classes: Some(100),
        layer_norm_eps: Some(1e-6),
        dropout: Some(0.1),
        ..Default::default()
    };
    let l = load_model(&dir.path().to_string_lossy(), &opts).unwrap();
    assert_eq!(l.report.layout, WeightsLayout::HfBase);
    let n: usize = l
        .model
        .named_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    // timm.create_model("vit_base_patch16_224", num_classes=100): 85,875,556 parameters.
    assert_eq!(n, 85_875_556);
    let want = ViTConfig {
        image_size: 224,
        ..ViTConfig::default()
    };
    assert_eq!(l.config, want);
    assert_eq!(l.report.loaded.len(), 4 + 12 * 16 + 2);
    assert_eq!(l.report.skipped.len(), 2); // pooler weight and bias
    let pos = &t["embeddings.position_embeddings"];
    let loaded = l.model.var("vit.embeddings.position_embeddings").unwrap();
    assert_eq!(
        (pos - loaded.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // Without the override, the HF eps 1e-12 is used and reported.
    drop(l);
    let l = load_model(
        &dir.path().to_string_lossy(),
        &LoadOptions {
            num_classes: Some(100),
            image_size: Some(384),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(l.config.layer_norm_eps, 1e-12);
    assert!(l.report.notes.iter().any(|n| n.contains("1e-12")));
    assert_eq!(l.report.pos_embed_resized, Some((14, 24)));
}
