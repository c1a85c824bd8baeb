//! CUDA checks (build with `--features cuda`; on a machine without a GPU each test prints why it
//! did nothing): f32 logits and gradients against transformers' fixtures, bf16/f16 compute with
//! f32 master weights and f32 gradients, and dropout masks equal to the CPU's (keyed Philox,
//! generated on the host).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rdrop_vit::model::cross_entropy;
use rdrop_vit::{load_model, LoadOptions};

fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA device, skipping: {e}");
            None
        }
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    max_abs(&(a - b).unwrap())
}

fn io(dev: &Device) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fx("io.safetensors"), dev).unwrap()
}

#[test]
fn cuda_f32_bf16_f16_logits_and_gradients() {
    let Some(dev) = gpu() else { return };
    let io = io(&dev);
    let want_grads = candle_core::safetensors::load(fx("grads.safetensors"), &Device::Cpu).unwrap();
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let opts = LoadOptions {
            device: dev.clone(),
            ..Default::default()
        };
        let mut l = load_model(&fx("hf").to_string_lossy(), &opts).unwrap();
        l.model.set_compute_dtype(dt).unwrap();
        let logits = l.model.forward_t(&io["x"], true).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let (tol_l, tol_g) = if dt == DType::F32 {
            (1e-4, 1e-3)
        } else {
            (0.15, 0.1)
        };
        let d = diff(&logits, &io["logits"]);
        assert!(d < tol_l, "{dt:?}: logits differ by {d}");
        let grads = cross_entropy(&logits, &io["y"])
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in l.model.named_vars() {
            let g = grads
                .get(&var)
                .unwrap_or_else(|| panic!("{dt:?}: no gradient for {name}"));
            assert_eq!(g.dtype(), DType::F32, "{name}");
            if name.contains("attention.key.bias") {
                continue; // analytically zero
            }
            let w = &want_grads[&name];
            let (d, s) = (diff(g, w), max_abs(w));
            assert!(max_abs(g) > 0.0, "{dt:?}: zero gradient for {name}");
            assert!(d <= tol_g * s, "{dt:?} {name}: |Δgrad| {d} vs {s}");
        }
    }
}

#[test]
fn cuda_dropout_masks_equal_the_cpu_masks() {
    let Some(dev) = gpu() else { return };
    let opts = LoadOptions {
        device: dev.clone(),
        dropout: Some(0.1),
        attention_dropout: Some(0.1),
        ..Default::default()
    };
    let l = load_model(&fx("hf").to_string_lossy(), &opts).unwrap();
    let x = &io(&dev)["x"];
    let e1 = l.model.forward_t(x, false).unwrap();
    let e2 = l.model.forward_t(x, false).unwrap();
    assert_eq!(diff(&e1, &e2), 0.0);
    let t1 = l.model.forward_t(x, true).unwrap();
    let t2 = l.model.forward_t(x, true).unwrap();
    assert!(diff(&t1, &t2) > 0.0, "automatic contexts differ");
    let b = x.dim(0).unwrap() as u32;
    let rows = rdrop_core::DropoutContext::pass_rows(0, b, 1);
    rdrop_core::RDropModel::set_dropout_context(&l.model, 3, rows.clone());
    let t3 = l.model.forward_t(x, true).unwrap();
    rdrop_core::RDropModel::set_dropout_context(&l.model, 3, rows.clone());
    let t4 = l.model.forward_t(x, true).unwrap();
    assert_eq!(diff(&t3, &t4), 0.0, "same key, same logits");
    // The mask uploaded to the GPU is the CPU's, bit for bit.
    let rng = l.model.rng();
    rng.set_context(3, rows);
    rng.begin_forward(b as usize, true).unwrap();
    let shape = (b as usize, 4, 197, 197);
    let on_gpu = rng.mask(shape, 0.1, 1, DType::F32, &dev).unwrap();
    let on_cpu = rng.mask(shape, 0.1, 1, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(diff(&on_gpu.to_device(&Device::Cpu).unwrap(), &on_cpu), 0.0);
}
