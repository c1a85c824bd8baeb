//! The activations one training forward saves, planned once per (architecture, batch rows).
//!
//! With `B` rows (an R-Drop micro-batch of `m` samples runs `B = 2m` rows), `T` tokens, width
//! `D`, MLP width `M`, `H` heads, `L` layers, `N = B·T`, the plan holds, in f32:
//! ```text
//! per layer:  x (N·D)  residual stream entering the block
//!             μ₁, r₁, μ₂, r₂ (N each)  LayerNorm statistics (the LN outputs are recomputed)
//!             qkv (3·N·D), P (B·H·T·T) softmax before dropout, attn (N·D) heads' output
//!             mid (N·D)  residual after attention, pre (N·M) fc1 before GELU,
//!             h (N·M) dropout(GELU(pre)) (fc2's input)
//!             masks, one byte an element where the rate is > 0: attention output (N·D),
//!             MLP hidden (N·M), MLP output (N·D)
//! once:       x_L (N·D), final LN of the class rows (B·D + 2B), logits (B·C), embeddings'
//!             mask (N·D bytes), patch rows (B·g²·C·p²),
//!             scratch: N·M + 6·N·D + 3·N·D + attention/LN scratch
//! ```
//! so `L·(N·(6D + 2M + 4) + B·H·T²)` floats plus `L·N·(2D + M)` mask bytes and the rest.
//! Attention-probability masks are regenerated from their Philox keys (`B·H·T²` bytes a
//! layer would be the largest mask). LayerNorm outputs are recomputed in the backward (one
//! cheap pass) instead of being stored.

use rdrop_kernels::attention::{attention_bwd_scratch_len, AttnDims};
use rdrop_kernels::layernorm::layernorm_bwd_scratch_len;

use crate::config::ViTConfig;

/// One block's saved activations.
#[derive(Debug)]
pub(crate) struct LayerActs {
    pub x: Vec<f32>,
    pub mean1: Vec<f32>,
    pub rstd1: Vec<f32>,
    pub qkv: Vec<f32>,
    pub probs: Vec<f32>,
    pub attn: Vec<f32>,
    pub mid: Vec<f32>,
    pub mean2: Vec<f32>,
    pub rstd2: Vec<f32>,
    pub pre: Vec<f32>,
    pub h: Vec<f32>,
    pub keep_attn_out: Vec<u8>,
    pub keep_hidden: Vec<u8>,
    pub keep_out: Vec<u8>,
}

/// Every buffer of a forward and backward at `rows` batch rows.
#[derive(Debug)]
pub(crate) struct Plan {
    pub rows: usize,
    /// Whether the plan can run a backward (every block's activations and the scratch).
    pub train: bool,
    pub layers: Vec<LayerActs>,
    /// Residual stream after the last block.
    pub x_out: Vec<f32>,
    /// Class-token rows of `x_out`, their final LayerNorm and its statistics.
    pub cls: Vec<f32>,
    pub lnf: Vec<f32>,
    pub meanf: Vec<f32>,
    pub rstdf: Vec<f32>,
    pub logits: Vec<f32>,
    /// The embeddings' dropout mask.
    pub keep_embed: Vec<u8>,
    /// im2col rows of the images.
    pub patches: Vec<f32>,
    // Scratch (forward and backward).
    pub tok: Vec<f32>,
    pub ln: Vec<f32>,
    pub proj: Vec<f32>,
    pub dres: Vec<f32>,
    pub dtmp: Vec<f32>,
    pub dln: Vec<f32>,
    pub dattn: Vec<f32>,
    pub dqkv: Vec<f32>,
    pub dhidden: Vec<f32>,
    pub dcls: Vec<f32>,
    pub dlogits: Vec<f32>,
    pub attn_scratch: Vec<f32>,
    pub ln_scratch: Vec<f32>,
}

/// The attention shape of `rows` rows of `cfg`.
pub(crate) fn attn_dims(cfg: &ViTConfig, rows: usize) -> AttnDims {
    AttnDims {
        batch: rows,
        tokens: cfg.num_tokens(),
        heads: cfg.num_heads,
        head_dim: cfg.head_dim(),
    }
}

impl Plan {
    /// Allocates every buffer for `rows` rows (the only allocation of a training step). An
    /// inference plan (`!train`) keeps one block's activations and no backward scratch.
    pub fn new(cfg: &ViTConfig, rows: usize, train: bool) -> Self {
        let (t, d, m, h, c) = (
            cfg.num_tokens(),
            cfg.hidden_size,
            cfg.mlp_dim,
            cfg.num_heads,
            cfg.num_classes,
        );
        let g2 = cfg.grid_size() * cfg.grid_size();
        let cpp = cfg.num_channels * cfg.patch_size * cfg.patch_size;
        let n = rows * t;
        let z = |k: usize| vec![0f32; k];
        let zb = |k: usize| vec![0f32; if train { k } else { 0 }];
        let slots = if train { cfg.num_layers } else { 1 };
        // A mask where the site drops something (training plans only).
        let mask = |k: usize, p: f64| vec![0u8; if train && p > 0.0 { k } else { 0 }];
        let layers = (0..slots)
            .map(|_| LayerActs {
                x: z(n * d),
                mean1: z(n),
                rstd1: z(n),
                qkv: z(3 * n * d),
                probs: z(rows * h * t * t),
                attn: z(n * d),
                mid: z(n * d),
                mean2: z(n),
                rstd2: z(n),
                pre: z(n * m),
                h: z(n * m),
                keep_attn_out: mask(n * d, cfg.attention_output_dropout),
                keep_hidden: mask(n * m, cfg.dropout),
                keep_out: mask(n * d, cfg.dropout),
            })
            .collect();
        Self {
            rows,
            train,
            layers,
            x_out: z(n * d),
            cls: z(rows * d),
            lnf: z(rows * d),
            meanf: z(rows),
            rstdf: z(rows),
            logits: z(rows * c),
            keep_embed: mask(n * d, cfg.dropout),
            patches: z(rows * g2 * cpp),
            tok: z(rows * g2 * d),
            ln: z(n * d),
            proj: z(n * d),
            dres: zb(n * d),
            dtmp: zb(n * d),
            dln: zb(n * d),
            dattn: zb(n * d),
            dqkv: zb(3 * n * d),
            dhidden: zb(n * m),
            dcls: zb(rows * d),
            dlogits: zb(rows * c),
            attn_scratch: zb(attention_bwd_scratch_len(attn_dims(cfg, rows))),
            ln_scratch: zb(layernorm_bwd_scratch_len(n, d).max(layernorm_bwd_scratch_len(rows, d))),
        }
    }

    /// Bytes held by the plan.
    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|a| {
                a.x.len()
                    + a.mean1.len()
                    + a.rstd1.len()
                    + a.qkv.len()
                    + a.probs.len()
                    + a.attn.len()
                    + a.mid.len()
                    + a.mean2.len()
                    + a.rstd2.len()
                    + a.pre.len()
                    + a.h.len()
            })
            .sum();
        let masks: usize = self
            .layers
            .iter()
            .map(|a| a.keep_attn_out.len() + a.keep_hidden.len() + a.keep_out.len())
            .sum::<usize>()
            + self.keep_embed.len();
        let once = [
            &self.x_out,
            &self.cls,
            &self.lnf,
            &self.meanf,
            &self.rstdf,
            &self.logits,
            &self.patches,
            &self.tok,
            &self.ln,
            &self.proj,
            &self.dres,
            &self.dtmp,
            &self.dln,
            &self.dattn,
            &self.dqkv,
            &self.dhidden,
            &self.dcls,
            &self.dlogits,
            &self.attn_scratch,
            &self.ln_scratch,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>();
        4 * (l + once) + masks
    }
}
