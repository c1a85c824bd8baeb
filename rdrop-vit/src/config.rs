//! ViT architecture and dropout configuration, named presets, and the Hugging Face
//! `config.json` mapping.
//!
//! The default is the R-Drop recipe's model (arXiv 2106.14448; reference code `vit_src`):
//! ViT-B/16 at 384 px, 100 classes (CIFAR-100), dropout 0.1 after the position embeddings and
//! both MLP linears, attention dropouts 0.0, LayerNorm eps 1e-6.

use serde::{Deserialize, Serialize};

use crate::error::{Result, VitError};

/// Architecture, dropout rates and numerics of a Vision Transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ViTConfig {
    /// Input side in pixels (square); a multiple of `patch_size`.
    pub image_size: usize,
    /// Patch side in pixels (the patch embedding is a stride-`patch_size` convolution).
    pub patch_size: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Token width D.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Attention heads (D must be divisible by it).
    pub num_heads: usize,
    /// Hidden width of the MLP.
    pub mlp_dim: usize,
    /// Classifier outputs.
    pub num_classes: usize,
    /// Dropout after adding the position embeddings and after each MLP linear (recipe 0.1).
    pub dropout: f64,
    /// Dropout on the attention probabilities (recipe 0.0).
    pub attention_dropout: f64,
    /// Dropout after the attention output projection (recipe 0.0).
    pub attention_output_dropout: f64,
    /// LayerNorm epsilon (1e-6 for Google/timm weights and the recipe; HF configs say 1e-12).
    pub layer_norm_eps: f64,
}

impl Default for ViTConfig {
    fn default() -> Self {
        Self {
            image_size: 384,
            patch_size: 16,
            num_channels: 3,
            hidden_size: 768,
            num_layers: 12,
            num_heads: 12,
            mlp_dim: 3072,
            num_classes: 100,
            dropout: 0.1,
            attention_dropout: 0.0,
            attention_output_dropout: 0.0,
            layer_norm_eps: 1e-6,
        }
    }
}

/// Names accepted by [`ViTConfig::preset`].
pub const PRESETS: &[&str] = &[
    "vit-ti16",
    "vit-s16",
    "vit-b16",
    "vit-b32",
    "vit-l16",
    "cpu-small",
    "tiny",
];

impl ViTConfig {
    fn arch(patch: usize, dim: usize, depth: usize, heads: usize, mlp: usize) -> Self {
        Self {
            image_size: 224,
            patch_size: patch,
            hidden_size: dim,
            num_layers: depth,
            num_heads: heads,
            mlp_dim: mlp,
            ..Self::default()
        }
    }

    /// A named preset: `vit-ti16`, `vit-s16`, `vit-b16`, `vit-b32`, `vit-l16` (224 px, 100
    /// classes, recipe dropouts), `cpu-small` (32 px, patch 4, D 192, 6 layers, 3 heads, MLP 768)
    /// and `tiny` (32 px, patch 8, D 32, 2 layers, 4 heads, MLP 64: tests).
    pub fn preset(name: &str) -> Result<Self> {
        let c = match name
            .to_ascii_lowercase()
            .replace(['_', '/', '-'], "")
            .as_str()
        {
            "vitti16" => Self::arch(16, 192, 12, 3, 768),
            "vits16" => Self::arch(16, 384, 12, 6, 1536),
            "vitb16" => Self::arch(16, 768, 12, 12, 3072),
            "vitb32" => Self::arch(32, 768, 12, 12, 3072),
            "vitl16" => Self::arch(16, 1024, 24, 16, 4096),
            "cpusmall" => Self {
                image_size: 32,
                ..Self::arch(4, 192, 6, 3, 768)
            },
            "tiny" => Self {
                image_size: 32,
                num_classes: 5,
                ..Self::arch(8, 32, 2, 4, 64)
            },
            _ => {
                return Err(VitError::Config(format!(
                    "unknown preset `{name}` (known: {})",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(c)
    }

    /// Patches per side.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Tokens per image: patches + the class token.
    pub fn num_tokens(&self) -> usize {
        self.grid_size() * self.grid_size() + 1
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Number of scalar parameters (as timm counts them for the same architecture).
    pub fn num_params(&self) -> usize {
        let (d, m, c) = (self.hidden_size, self.mlp_dim, self.num_classes);
        let p2c = self.patch_size * self.patch_size * self.num_channels;
        let embed = d * p2c + d + d + self.num_tokens() * d;
        let block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d);
        embed + self.num_layers * block + 2 * d + c * d + c
    }

    /// Checks that the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VitError::Config(m));
        if self.image_size == 0 || self.image_size.checked_rem(self.patch_size) != Some(0) {
            return bad(format!(
                "image size {} is not a positive multiple of the patch size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.hidden_size == 0 || self.hidden_size.checked_rem(self.num_heads) != Some(0) {
            return bad(format!(
                "hidden size {} is not divisible by {} heads",
                self.hidden_size, self.num_heads
            ));
        }
        if self.num_layers == 0
            || self.mlp_dim == 0
            || self.num_classes == 0
            || self.num_channels == 0
        {
            return bad("layers, MLP width, classes and channels must be positive".into());
        }
        for (n, p) in [
            ("dropout", self.dropout),
            ("attention_dropout", self.attention_dropout),
            ("attention_output_dropout", self.attention_output_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{n} must be in [0, 1), got {p}"));
            }
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return bad(format!(
                "layer_norm_eps must be positive, got {}",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }

    /// Reads a Hugging Face ViT `config.json` (ViTModel or ViTForImageClassification). HF's
    /// `hidden_dropout_prob` maps to `dropout` and `attention_output_dropout`,
    /// `attention_probs_dropout_prob` to `attention_dropout`; `num_classes` comes from
    /// `id2label` / `num_labels` (0 when the file has none). A `rdrop` block written by
    /// [`ViTConfig::to_hf_json`] takes precedence (it keeps our three dropout rates).
    pub fn from_hf_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        if let Some(ours) = v.get("rdrop").and_then(|r| r.get("config")) {
            return serde_json::from_value(ours.clone())
                .map_err(|e| format!("`rdrop.config`: {e}"));
        }
        let num = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let flt = |k: &str| v.get(k).and_then(|x| x.as_f64());
        let need = |k: &str| num(k).ok_or_else(|| format!("missing integer field `{k}`"));
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "gelu" {
                return Err(format!(
                    "hidden_act `{act}` is not supported (only exact `gelu`)"
                ));
            }
        }
        if v.get("qkv_bias").and_then(|b| b.as_bool()) == Some(false) {
            return Err("qkv_bias = false is not supported".into());
        }
        let num_classes = v
            .get("id2label")
            .and_then(|m| m.as_object())
            .map(|m| m.len())
            .or_else(|| num("num_labels"))
            .unwrap_or(0);
        let hidden_dropout = flt("hidden_dropout_prob").unwrap_or(0.0);
        Ok(Self {
            image_size: need("image_size")?,
            patch_size: need("patch_size")?,
            num_channels: num("num_channels").unwrap_or(3),
            hidden_size: need("hidden_size")?,
            num_layers: need("num_hidden_layers")?,
            num_heads: need("num_attention_heads")?,
            mlp_dim: need("intermediate_size")?,
            num_classes,
            dropout: hidden_dropout,
            attention_dropout: flt("attention_probs_dropout_prob").unwrap_or(0.0),
            attention_output_dropout: hidden_dropout,
            layer_norm_eps: flt("layer_norm_eps").unwrap_or(1e-12),
        })
    }

    /// A `config.json` for Hugging Face `ViTForImageClassification` (so `transformers` loads the
    /// saved model), with our exact configuration under `rdrop.config`. `class_names`, when
    /// given, fill `id2label` / `label2id`.
    pub fn to_hf_json(&self, class_names: Option<&[String]>) -> serde_json::Value {
        let name = |i: usize| match class_names.and_then(|n| n.get(i)) {
            Some(n) => n.clone(),
            None => format!("LABEL_{i}"),
        };
        let id2label: serde_json::Map<String, serde_json::Value> = (0..self.num_classes)
            .map(|i| (i.to_string(), name(i).into()))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> =
            (0..self.num_classes).map(|i| (name(i), i.into())).collect();
        serde_json::json!({
            "architectures": ["ViTForImageClassification"],
            "model_type": "vit",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.mlp_dim,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "layer_norm_eps": self.layer_norm_eps,
            "qkv_bias": true,
            "initializer_range": 0.02,
            "encoder_stride": self.patch_size,
            "id2label": id2label,
            "label2id": label2id,
            "rdrop": { "config": self },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_b16_counts_like_timm() {
        for p in PRESETS {
            ViTConfig::preset(p).unwrap().validate().unwrap();
        }
        // timm vit_base_patch16_224 with 1000 classes: 86,567,656 parameters.
        let c = ViTConfig {
            num_classes: 1000,
            ..ViTConfig::preset("vit-b16").unwrap()
        };
        assert_eq!(c.num_params(), 86_567_656);
        assert!(ViTConfig::preset("vit-x").is_err());
        assert_eq!(ViTConfig::default().image_size, 384);
    }

    #[test]
    fn validate_rejects_bad_sizes() {
        let mut c = ViTConfig::preset("tiny").unwrap();
        c.image_size = 30;
        assert!(c.validate().is_err());
        let mut c = ViTConfig::preset("tiny").unwrap();
        c.num_heads = 5;
        assert!(c.validate().is_err());
        let mut c = ViTConfig::preset("tiny").unwrap();
        c.dropout = 1.0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn hf_json_round_trip() {
        let c = ViTConfig {
            dropout: 0.1,
            attention_output_dropout: 0.05,
            ..ViTConfig::preset("tiny").unwrap()
        };
        let names: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
        let j = c.to_hf_json(Some(&names));
        assert_eq!(j["id2label"]["3"], "c3");
        assert_eq!(ViTConfig::from_hf_json(&j).unwrap(), c);
        // Without our block, HF semantics apply.
        let mut j2 = j.clone();
        j2.as_object_mut().unwrap().remove("rdrop");
        let c2 = ViTConfig::from_hf_json(&j2).unwrap();
        assert_eq!(c2.attention_output_dropout, 0.1);
        assert_eq!(c2.num_classes, 5);
    }
}
