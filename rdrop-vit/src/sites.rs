//! The ViT's dropout sites: the `site` of the mask key `(seed, update, site, sample, pass)`
//! ([`rdrop_core::rng`]). Shared by the autograd model and the explicit engine, so that both
//! apply the same masks.
//!
//! ```text
//! site 0                   embeddings (after + position embeddings)      per sample (T, D)
//! layer l:  1 + 4l + 0     attention probabilities (after softmax)       per sample (H, T, T)
//!           1 + 4l + 1     attention output projection                   per sample (T, D)
//!           1 + 4l + 2     MLP hidden, after fc1's GELU                  per sample (T, M)
//!           1 + 4l + 3     MLP output, after fc2                         per sample (T, D)
//! ```
//! `T` tokens (class token first), `D` width, `H` heads, `M` MLP width. A sample's mask element
//! `i` is its row-major index in that per-sample shape.

use crate::config::ViTConfig;

/// The embeddings' dropout (rate `dropout`).
pub const EMBEDDINGS: u32 = 0;
/// Sites per encoder layer.
pub const PER_LAYER: u32 = 4;
/// Offset in a layer: attention probabilities (rate `attention_dropout`).
pub const ATTENTION_PROBS: u32 = 0;
/// Offset in a layer: attention output projection (rate `attention_output_dropout`).
pub const ATTENTION_OUTPUT: u32 = 1;
/// Offset in a layer: after fc1's GELU (rate `dropout`).
pub const MLP_HIDDEN: u32 = 2;
/// Offset in a layer: after fc2 (rate `dropout`).
pub const MLP_OUTPUT: u32 = 3;

/// The site of `offset` (one of the constants above) in encoder layer `layer` (0-based):
/// `1 + 4·layer + offset`.
pub const fn layer_site(layer: u32, offset: u32) -> u32 {
    1 + PER_LAYER * layer + offset
}

/// Attention probabilities of layer `layer`.
pub const fn attention_probs(layer: u32) -> u32 {
    layer_site(layer, ATTENTION_PROBS)
}

/// Attention output projection of layer `layer`.
pub const fn attention_output(layer: u32) -> u32 {
    layer_site(layer, ATTENTION_OUTPUT)
}

/// After fc1's GELU in layer `layer`.
pub const fn mlp_hidden(layer: u32) -> u32 {
    layer_site(layer, MLP_HIDDEN)
}

/// After fc2 in layer `layer`.
pub const fn mlp_output(layer: u32) -> u32 {
    layer_site(layer, MLP_OUTPUT)
}

/// Number of sites of a model with `num_layers` layers: `1 + 4·num_layers`.
pub const fn count(num_layers: u32) -> u32 {
    1 + PER_LAYER * num_layers
}

/// The per-sample shape of the activation at `site` (see the module table), or `None` when
/// the model has no such site.
pub fn per_sample_dims(cfg: &ViTConfig, site: u32) -> Option<Vec<usize>> {
    let (t, d, h, m) = (
        cfg.num_tokens(),
        cfg.hidden_size,
        cfg.num_heads,
        cfg.mlp_dim,
    );
    if site == EMBEDDINGS {
        return Some(vec![t, d]);
    }
    let layers = u32::try_from(cfg.num_layers).ok()?;
    if site >= count(layers) {
        return None;
    }
    Some(match (site - 1) % PER_LAYER {
        ATTENTION_PROBS => vec![h, t, t],
        MLP_HIDDEN => vec![t, m],
        _ => vec![t, d],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering() {
        assert_eq!(attention_probs(0), 1);
        assert_eq!(attention_output(0), 2);
        assert_eq!(mlp_hidden(0), 3);
        assert_eq!(mlp_output(0), 4);
        assert_eq!(attention_probs(2), 9);
        assert_eq!(mlp_output(11), 48);
        assert_eq!(count(12), 49);
        let cfg = ViTConfig::preset("tiny").unwrap();
        let (t, d) = (cfg.num_tokens(), cfg.hidden_size);
        let last = count(cfg.num_layers as u32) - 1;
        assert_eq!(per_sample_dims(&cfg, 0), Some(vec![t, d]));
        assert_eq!(
            per_sample_dims(&cfg, attention_probs(1)),
            Some(vec![cfg.num_heads, t, t])
        );
        assert_eq!(
            per_sample_dims(&cfg, mlp_hidden(0)),
            Some(vec![t, cfg.mlp_dim])
        );
        assert_eq!(per_sample_dims(&cfg, last), Some(vec![t, d]));
        assert_eq!(per_sample_dims(&cfg, last + 1), None);
    }
}
