//! Checkpoint layouts of the same ViT, converted to one canonical naming: Hugging Face
//! `ViTForImageClassification` (`vit.embeddings.*`, `vit.encoder.layer.N.*`, `vit.layernorm.*`,
//! `classifier.*`), PyTorch `(out, in)` linear weights, `(D, C, p, p)` patch kernel.
//!
//! - HF `ViTModel` (what `google/vit-*-in21k` ships): no `vit.` prefix, a `pooler` (skipped).
//! - timm `VisionTransformer`: `blocks.N.attn.qkv` fused `(3D, D)` in q, k, v order.
//! - Google's original `.npz` (as ViT-pytorch / the R-Drop code loads it): HWIO conv kernel,
//!   `(in, out)` dense kernels, per-head q/k/v kernels `(D, H, D/H)` and out kernel `(H, D/H, D)`;
//!   `pre_logits` skipped.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};

/// Tensors by canonical name.
pub type Tensors = BTreeMap<String, Tensor>;

/// A conversion's result: canonical tensors, and the source tensors left out with the reason.
#[derive(Debug, Default)]
pub struct Converted {
    /// Canonical name → tensor.
    pub tensors: Tensors,
    /// `(source name, reason)` for each tensor not used.
    pub skipped: Vec<(String, String)>,
    /// Heads per block when the layout records it (npz per-head kernels).
    pub num_heads: Option<usize>,
}

/// Which layout a set of tensor names looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// `vit.*` + `classifier.*`.
    HfClassifier,
    /// `embeddings.*`, `encoder.*` without a prefix.
    HfBase,
    /// `blocks.N.*`, `patch_embed.*`.
    Timm,
    /// `Transformer/…`, `embedding/kernel`.
    GoogleNpz,
}

/// Guesses the layout from tensor names.
pub fn detect<'a>(mut names: impl Iterator<Item = &'a str> + Clone) -> Option<Detected> {
    if names.clone().any(|n| n.starts_with("vit.embeddings.")) {
        Some(Detected::HfClassifier)
    } else if names
        .clone()
        .any(|n| n.starts_with("embeddings.patch_embeddings"))
    {
        Some(Detected::HfBase)
    } else if names
        .clone()
        .any(|n| n.starts_with("patch_embed.") || n.starts_with("blocks."))
    {
        Some(Detected::Timm)
    } else if names.any(|n| n.ends_with("embedding/kernel")) {
        Some(Detected::GoogleNpz)
    } else {
        None
    }
}

/// HF layouts: adds the `vit.` prefix when missing; `pooler.*` skipped.
pub fn from_hf(src: Vec<(String, Tensor)>) -> Converted {
    let mut out = Converted::default();
    for (n, t) in src {
        let canon = if n.starts_with("vit.") || n.starts_with("classifier.") {
            n.clone()
        } else if n.starts_with("embeddings.")
            || n.starts_with("encoder.")
            || n.starts_with("layernorm.")
        {
            format!("vit.{n}")
        } else if n.starts_with("pooler.") || n.starts_with("vit.pooler.") {
            out.skipped
                .push((n, "pooler (not used by the classifier)".into()));
            continue;
        } else {
            out.skipped.push((n, "not a ViT classifier tensor".into()));
            continue;
        };
        if canon.starts_with("vit.pooler.") {
            out.skipped
                .push((n, "pooler (not used by the classifier)".into()));
            continue;
        }
        out.tensors.insert(canon, t);
    }
    out
}

/// timm `VisionTransformer` → canonical (splits the fused qkv).
pub fn from_timm(src: Vec<(String, Tensor)>) -> Result<Converted> {
    let mut out = Converted::default();
    for (n, t) in src {
        let simple = match n.as_str() {
            "cls_token" => Some("vit.embeddings.cls_token".to_string()),
            "pos_embed" => Some("vit.embeddings.position_embeddings".into()),
            "patch_embed.proj.weight" => {
                Some("vit.embeddings.patch_embeddings.projection.weight".into())
            }
            "patch_embed.proj.bias" => {
                Some("vit.embeddings.patch_embeddings.projection.bias".into())
            }
            "norm.weight" => Some("vit.layernorm.weight".into()),
            "norm.bias" => Some("vit.layernorm.bias".into()),
            "head.weight" => Some("classifier.weight".into()),
            "head.bias" => Some("classifier.bias".into()),
            _ => None,
        };
        if let Some(c) = simple {
            out.tensors.insert(c, t);
            continue;
        }
        let Some(rest) = n.strip_prefix("blocks.") else {
            let why = if n.starts_with("pre_logits") || n.starts_with("fc_norm") {
                "pre-logits / pooling layer (not in the reference model)"
            } else {
                "not a ViT classifier tensor"
            };
            out.skipped.push((n, why.into()));
            continue;
        };
        let Some((idx, tail)) = rest.split_once('.') else {
            out.skipped.push((n, "not a ViT classifier tensor".into()));
            continue;
        };
        let pre = format!("vit.encoder.layer.{idx}");
        let Some((module, kind)) = tail.rsplit_once('.') else {
            out.skipped.push((n, "not a ViT classifier tensor".into()));
            continue;
        };
        let target = match module {
            "norm1" => "layernorm_before",
            "norm2" => "layernorm_after",
            "attn.proj" => "attention.output.dense",
            "mlp.fc1" => "intermediate.dense",
            "mlp.fc2" => "output.dense",
            "attn.qkv" => {
                let d3 = t.dim(0)?;
                for (i, q) in ["query", "key", "value"].iter().enumerate() {
                    let part = t.narrow(0, i * d3 / 3, d3 / 3)?.contiguous()?;
                    out.tensors
                        .insert(format!("{pre}.attention.attention.{q}.{kind}"), part);
                }
                continue;
            }
            _ => {
                out.skipped.push((
                    n,
                    "not a ViT classifier tensor (ls/layer-scale or other variant?)".into(),
                ));
                continue;
            }
        };
        out.tensors.insert(format!("{pre}.{target}.{kind}"), t);
    }
    Ok(out)
}

/// Google's original `.npz` → canonical. Optional prefixes `opt/target/` and `params/` are
/// stripped.
pub fn from_google_npz(src: Vec<(String, Tensor)>) -> Result<Converted> {
    let mut out = Converted::default();
    for (raw, t) in src {
        let n = raw
            .strip_prefix("opt/target/")
            .or_else(|| raw.strip_prefix("params/"))
            .unwrap_or(&raw)
            .to_string();
        let tr = |t: &Tensor| t.t()?.contiguous();
        let simple = match n.as_str() {
            "cls" => Some(("vit.embeddings.cls_token".to_string(), t.clone())),
            "Transformer/posembed_input/pos_embedding" => {
                Some(("vit.embeddings.position_embeddings".into(), t.clone()))
            }
            // HWIO → OIHW.
            "embedding/kernel" => Some((
                "vit.embeddings.patch_embeddings.projection.weight".into(),
                t.permute((3, 2, 0, 1))?.contiguous()?,
            )),
            "embedding/bias" => Some((
                "vit.embeddings.patch_embeddings.projection.bias".into(),
                t.clone(),
            )),
            "Transformer/encoder_norm/scale" => Some(("vit.layernorm.weight".into(), t.clone())),
            "Transformer/encoder_norm/bias" => Some(("vit.layernorm.bias".into(), t.clone())),
            "head/kernel" => Some(("classifier.weight".into(), tr(&t)?)),
            "head/bias" => Some(("classifier.bias".into(), t.clone())),
            _ => None,
        };
        if let Some((c, v)) = simple {
            out.tensors.insert(c, v);
            continue;
        }
        if n.starts_with("pre_logits/") {
            out.skipped
                .push((raw, "pre_logits (ignored by the reference code)".into()));
            continue;
        }
        let Some(rest) = n.strip_prefix("Transformer/encoderblock_") else {
            out.skipped
                .push((raw, "not a ViT classifier tensor".into()));
            continue;
        };
        let Some((idx, tail)) = rest.split_once('/') else {
            out.skipped
                .push((raw, "not a ViT classifier tensor".into()));
            continue;
        };
        let pre = format!("vit.encoder.layer.{idx}");
        let (name, value) = match tail {
            "LayerNorm_0/scale" => (format!("{pre}.layernorm_before.weight"), t.clone()),
            "LayerNorm_0/bias" => (format!("{pre}.layernorm_before.bias"), t.clone()),
            "LayerNorm_2/scale" => (format!("{pre}.layernorm_after.weight"), t.clone()),
            "LayerNorm_2/bias" => (format!("{pre}.layernorm_after.bias"), t.clone()),
            "MlpBlock_3/Dense_0/kernel" => (format!("{pre}.intermediate.dense.weight"), tr(&t)?),
            "MlpBlock_3/Dense_0/bias" => (format!("{pre}.intermediate.dense.bias"), t.clone()),
            "MlpBlock_3/Dense_1/kernel" => (format!("{pre}.output.dense.weight"), tr(&t)?),
            "MlpBlock_3/Dense_1/bias" => (format!("{pre}.output.dense.bias"), t.clone()),
            "MultiHeadDotProductAttention_1/out/kernel" => {
                // (H, dh, D) → (D_in = H·dh, D_out) → (D_out, D_in).
                let (h, dh, d) = t.dims3()?;
                (
                    format!("{pre}.attention.output.dense.weight"),
                    tr(&t.reshape((h * dh, d))?)?,
                )
            }
            "MultiHeadDotProductAttention_1/out/bias" => {
                (format!("{pre}.attention.output.dense.bias"), t.clone())
            }
            other => {
                let q = ["query", "key", "value"]
                    .into_iter()
                    .find(|q| other.starts_with(&format!("MultiHeadDotProductAttention_1/{q}/")));
                match (q, other.rsplit('/').next()) {
                    (Some(q), Some("kernel")) => {
                        // (D, H, dh) → (D, D) → (out, in).
                        let (d, h, dh) = t.dims3()?;
                        out.num_heads = Some(h);
                        (
                            format!("{pre}.attention.attention.{q}.weight"),
                            tr(&t.reshape((d, h * dh))?)?,
                        )
                    }
                    (Some(q), Some("bias")) => (
                        format!("{pre}.attention.attention.{q}.bias"),
                        t.flatten_all()?,
                    ),
                    _ => {
                        out.skipped
                            .push((raw, "not a ViT classifier tensor".into()));
                        continue;
                    }
                }
            }
        };
        out.tensors.insert(name, value);
    }
    Ok(out)
}
