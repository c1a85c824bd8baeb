//! The engine's flat parameter buffer: one `Vec<f32>` with a named view per checkpoint tensor
//! (Hugging Face `ViTForImageClassification` names), laid out so that each layer's query, key
//! and value weights (and biases) are adjacent: the fused `(3D, D)` projection the attention
//! needs is then a plain slice, with no concatenation on any forward.

use candle_core::{DType, Tensor};
use rdrop_core::FlatLayout;

use crate::config::ViTConfig;
use crate::error::{Result, VitError};
use crate::model::VisionTransformer;

/// Offsets of one encoder block's tensors in the flat buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerOffsets {
    pub ln1_w: usize,
    pub ln1_b: usize,
    /// query, key, value weights: `(3D, D)`.
    pub qkv_w: usize,
    /// query, key, value biases: `(3D)`.
    pub qkv_b: usize,
    pub out_w: usize,
    pub out_b: usize,
    pub ln2_w: usize,
    pub ln2_b: usize,
    pub fc1_w: usize,
    pub fc1_b: usize,
    pub fc2_w: usize,
    pub fc2_b: usize,
}

/// Offsets of every tensor of the ViT in the flat buffer.
#[derive(Debug, Clone)]
pub(crate) struct Offsets {
    pub cls: usize,
    pub pos: usize,
    pub patch_w: usize,
    pub patch_b: usize,
    pub layers: Vec<LayerOffsets>,
    pub lnf_w: usize,
    pub lnf_b: usize,
    pub head_w: usize,
    pub head_b: usize,
}

/// The layout of `cfg`'s parameters and the offsets the kernels use.
pub(crate) fn layout(cfg: &ViTConfig) -> (FlatLayout, Offsets) {
    let (d, m, c, p) = (
        cfg.hidden_size,
        cfg.mlp_dim,
        cfg.num_channels,
        cfg.patch_size,
    );
    let mut l = FlatLayout::new();
    let cls = l.push("vit.embeddings.cls_token", &[1, 1, d]);
    let pos = l.push(
        "vit.embeddings.position_embeddings",
        &[1, cfg.num_tokens(), d],
    );
    let patch_w = l.push(
        "vit.embeddings.patch_embeddings.projection.weight",
        &[d, c, p, p],
    );
    let patch_b = l.push("vit.embeddings.patch_embeddings.projection.bias", &[d]);
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let pre = format!("vit.encoder.layer.{i}");
            let a = format!("{pre}.attention.attention");
            let ln1_w = l.push(format!("{pre}.layernorm_before.weight"), &[d]);
            let ln1_b = l.push(format!("{pre}.layernorm_before.bias"), &[d]);
            let qkv_w = l.push(format!("{a}.query.weight"), &[d, d]);
            l.push(format!("{a}.key.weight"), &[d, d]);
            l.push(format!("{a}.value.weight"), &[d, d]);
            let qkv_b = l.push(format!("{a}.query.bias"), &[d]);
            l.push(format!("{a}.key.bias"), &[d]);
            l.push(format!("{a}.value.bias"), &[d]);
            let out_w = l.push(format!("{pre}.attention.output.dense.weight"), &[d, d]);
            let out_b = l.push(format!("{pre}.attention.output.dense.bias"), &[d]);
            let ln2_w = l.push(format!("{pre}.layernorm_after.weight"), &[d]);
            let ln2_b = l.push(format!("{pre}.layernorm_after.bias"), &[d]);
            let fc1_w = l.push(format!("{pre}.intermediate.dense.weight"), &[m, d]);
            let fc1_b = l.push(format!("{pre}.intermediate.dense.bias"), &[m]);
            let fc2_w = l.push(format!("{pre}.output.dense.weight"), &[d, m]);
            let fc2_b = l.push(format!("{pre}.output.dense.bias"), &[d]);
            LayerOffsets {
                ln1_w,
                ln1_b,
                qkv_w,
                qkv_b,
                out_w,
                out_b,
                ln2_w,
                ln2_b,
                fc1_w,
                fc1_b,
                fc2_w,
                fc2_b,
            }
        })
        .collect();
    let lnf_w = l.push("vit.layernorm.weight", &[d]);
    let lnf_b = l.push("vit.layernorm.bias", &[d]);
    let head_w = l.push("classifier.weight", &[cfg.num_classes, d]);
    let head_b = l.push("classifier.bias", &[cfg.num_classes]);
    (
        l,
        Offsets {
            cls,
            pos,
            patch_w,
            patch_b,
            layers,
            lnf_w,
            lnf_b,
            head_w,
            head_b,
        },
    )
}

/// Copies the model's parameters into `buf` (every view must exist in the model).
pub(crate) fn read_from_model(
    layout: &FlatLayout,
    model: &VisionTransformer,
    buf: &mut [f32],
) -> Result<()> {
    for v in layout.views() {
        let var = model.var(&v.name).ok_or_else(|| {
            VitError::Config(format!("the autograd model has no parameter {}", v.name))
        })?;
        if var.dims() != v.shape.as_slice() {
            return Err(VitError::Config(format!(
                "{}: shape {:?}, the engine expects {:?}",
                v.name,
                var.dims(),
                v.shape
            )));
        }
        let data = var
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        buf[v.range()].copy_from_slice(&data);
    }
    Ok(())
}

/// Writes `buf` into the model's parameters (for saving with the model's writers).
pub(crate) fn write_to_model(
    layout: &FlatLayout,
    buf: &[f32],
    model: &VisionTransformer,
) -> Result<()> {
    for v in layout.views() {
        let var = model.var(&v.name).ok_or_else(|| {
            VitError::Config(format!("the autograd model has no parameter {}", v.name))
        })?;
        let t = Tensor::from_slice(&buf[v.range()], v.shape.as_slice(), var.device())?;
        var.set(&t)?;
    }
    Ok(())
}
