//! The activations one training forward saves, planned once per (architecture, batch rows).
//!
//! With `B` rows (an R-Drop micro-batch of `m` samples runs `B = 2m` rows), `T` tokens, width
//! `D`, MLP width `M`, `H` heads, `L` layers, `N = B·T`, the plan holds, in f32:
//! ```text
//! per layer:  x (N·D)  residual stream entering the block
//!             μ₁, r₁, μ₂, r₂ (N each)  LayerNorm statistics (the LN outputs are recomputed)
//!             qkv (3·N·D), P (B·H·T·T) softmax before dropout, attn (N·D) heads' output
//!             mid (N·D)  residual after attention, pre (N·M) fc1 before GELU
//! once:       x_L (N·D), final LN of the class rows (B·D + 2B), logits (B·C),
//!             patch rows (B·g²·C·p²), scratch: 2·N·M + 4·N·D + 3·N·D + attention/LN scratch
//! ```
//! so `L·(N·(6D + M + 4) + B·H·T²) + …` floats. Dropout masks are never stored: they are
//! regenerated from their Philox keys. GELU outputs and LayerNorm outputs are recomputed in
//! the backward (one cheap elementwise pass each) instead of being stored.

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
    /// im2col rows of the images.
    pub patches: Vec<f32>,
    // Scratch (forward and backward).
    pub tok: Vec<f32>,
    pub ln: Vec<f32>,
    pub proj: Vec<f32>,
    pub hidden: Vec<f32>,
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
            patches: z(rows * g2 * cpp),
            tok: z(rows * g2 * d),
            ln: z(n * d),
            proj: z(n * d),
            hidden: z(n * m),
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
            })
            .sum();
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
            &self.hidden,
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
        4 * (l + once)
    }
}
