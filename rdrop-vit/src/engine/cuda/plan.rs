//! The CUDA engine's activation plan: every device buffer a training (or inference) step at a
//! given (architecture, rows, compute dtype) needs, allocated once and reused by every step.
//!
//! With `B` rows (an R-Drop micro-batch of `m` samples runs `B = 2m` rows), `T` tokens, width
//! `D`, MLP width `M`, `H` heads, `L` layers, `C` classes, `N = B·T`, `A = B·H·T·T₈` attention
//! elements (`T₈ = ⌈T/8⌉·8`: each row of a `(T, T)` attention matrix padded to a 16-byte
//! multiple, so the attention GEMMs run on aligned rows and matrices; padding never read),
//! `G = T − 1` patches of `K = C_in·P²` pixels, `s` bytes per element of the compute type (4
//! for f32, 2 for bf16/f16), `[p]` = 1 when that dropout rate is > 0 (masks are only kept by
//! training plans), `tr` = 1 for a training plan (the letters of
//! [`Dims`](crate::engine::plan::Dims)).
//!
//! The tables below ([`LayerSpec`] and [`PlanSpec`], and the device buffers they size) list
//! every buffer once, with its type and length: f32 for the residual stream, statistics,
//! logits, images and the backward's f32 buffers, `T` (the compute type) for GEMM operands and
//! saved activations, bytes for masks. Each layer costs `4·(2ND + 4N) + s·(4ND + NM + A)` bytes plus its masks, and [`plan_bytes`]
//! is the closed form of the sum ([`PlanSpec::bytes`]; tested equal). An inference plan keeps
//! one layer slot. Parameters (f32 master, their `s` copy, f32 gradients, optimiser moments)
//! are not in the plan.

#[cfg(feature = "cuda")]
use std::sync::Arc;

#[cfg(feature = "cuda")]
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use crate::config::ViTConfig;
#[cfg(feature = "cuda")]
use crate::engine::plan::Held;
use crate::engine::plan::{plan_table, Dims};
#[cfg(feature = "cuda")]
use crate::error::VitError;

pub use crate::engine::plan::attn_ld;

/// Bytes of the cuBLASLt workspace the engine allocates once (32 MiB, Hopper's recommendation).
pub const GEMM_WORKSPACE_BYTES: usize = rdrop_kernels::gemm_shape::WORKSPACE_BYTES;

/// Rows of a column partial (bias gradient, LayerNorm `dγ, dβ`): the kernels' block.
pub const COLUMN_ROWS: usize = rdrop_kernels::layernorm::BWD_ROWS;

plan_table! {
    storage [
        #[cfg(feature = "cuda")]
        CudaSlice<T> where [T: DeviceRepr + ValidAsZeroBits]
        alloc zeros(&Arc<CudaStream>) -> VitError
    ]

    /// Element counts of one layer's saved activations.
    pub struct LayerSpec {} sizes Dims { n, d, m, a, tr, pd, pa, po };
    /// One block's saved activations.
    struct LayerBufs {};
    buffers {
        /// Residual stream entering the block / after attention.
        x: f32 = n * d,
        mid: f32 = n * d,
        /// LayerNorm statistics (outputs recomputed).
        mean1: f32 = n,
        rstd1: f32 = n,
        mean2: f32 = n,
        rstd2: f32 = n,
        /// Heads' layout `(B, H, T, D/H)`.
        q: T = n * d,
        k: T = n * d,
        v: T = n * d,
        /// Heads' output, merged.
        attn: T = n * d,
        /// Softmax before dropout.
        probs: T = a,
        /// fc1 output before GELU (`h` is recomputed).
        pre: T = n * m,
        /// Masks: attention output, MLP hidden, MLP output, attention probabilities.
        keep_attn_out: u8 = tr * po * n * d,
        keep_hidden: u8 = tr * pd * n * m,
        keep_out: u8 = tr * pd * n * d,
        keep_probs: u8 = tr * pa * a,
    }

    /// Every buffer of a plan, in elements.
    pub struct PlanSpec {
        /// Rows (`2m` for a training micro-batch of `m`).
        rows: usize,
        /// Whether the plan can run a backward.
        train: bool,
        /// Bytes of an element of the compute type.
        elem: usize,
        /// Saved activations: `L` layer slots when training, one for inference.
        layers: Vec<LayerSpec>,
    } sizes Dims { b, n, d, m, c, g, k, img, a, tr, pd, pa };
    /// Every buffer of a forward and backward at `spec.rows` rows. A buffer the spec sizes
    /// 0 (a mask where nothing drops, the backward's buffers in an inference plan) holds one
    /// element: the kernels never read it.
    struct DevicePlan {
        spec: PlanSpec,
        layers: Vec<LayerBufs<T>>,
    };
    buffers {
        /// f32: residual stream after the last block, class rows, their LN statistics.
        x_out: f32 = n * d,
        cls: f32 = b * d,
        meanf: f32 = b,
        rstdf: f32 = b,
        logits: f32 = b * c,
        images: f32 = img,
        /// f32, training: dlogits, dclass, dres, column partials.
        dlogits: f32 = tr * b * c,
        dcls: f32 = tr * b * d,
        dres: f32 = tr * n * d,
        cols: f32 = tr * n.div_ceil(COLUMN_ROWS) * (2 * d).max(3 * d).max(m).max(c),
        /// T: class rows' LN, patch rows, patch tokens; training: dlogits.
        lnf: T = b * d,
        patches: T = b * g * k,
        tok: T = b * g * d,
        dlogits_t: T = tr * b * c,
        /// T scratch: ln, heads' output, proj, qkv rows, h, P ⊙ mask (training with attention
        /// dropout; without, the A·V GEMM reads P).
        ln: T = n * d,
        o: T = n * d,
        proj: T = n * d,
        qkv_rows: T = 3 * n * d,
        h: T = n * m,
        att: T = tr * pa * a,
        /// T scratch, training: dy, dln, dattn, dq, dk, dv, dh, dA then dS in place.
        dy: T = tr * n * d,
        dln: T = tr * n * d,
        dattn: T = tr * n * d,
        dq: T = tr * n * d,
        dk: T = tr * n * d,
        dv: T = tr * n * d,
        dh: T = tr * n * m,
        dp: T = tr * a,
        /// Bytes: the embeddings' mask.
        keep_embed: u8 = tr * pd * n * d,
        /// u32: row keys; training: labels.
        row_keys: u32 = 2 * b,
        labels: u32 = tr * (b / 2),
        /// f64, training: loss partials.
        loss: f64 = tr * (4 + 3 * (b / 2)),
    }
}

impl PlanSpec {
    /// The plan of `cfg` at `rows` rows and `elem`-byte compute elements.
    pub fn new(cfg: &ViTConfig, rows: usize, elem: usize, train: bool) -> Self {
        let dims = Dims::new(cfg, rows, train);
        let slots = if train { cfg.num_layers } else { 1 };
        let layers = vec![LayerSpec::sizes(&dims); slots];
        Self::sizes(&dims, rows, train, elem, layers)
    }

    /// Bytes the plan allocates (the device plan allocates exactly these buffers).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.buffer_bytes(self.elem))
            .sum::<usize>()
            + self.buffer_bytes(self.elem)
    }
}

fn on(p: f64) -> usize {
    usize::from(p > 0.0)
}

/// The closed form of [`PlanSpec::bytes`] (the module doc's formula): bytes of the CUDA
/// plan of `cfg` at `rows` rows, `elem`-byte compute elements, for training or inference.
pub fn plan_bytes(cfg: &ViTConfig, rows: usize, elem: usize, train: bool) -> usize {
    let (t, d, m, h, c) = (
        cfg.num_tokens(),
        cfg.hidden_size,
        cfg.mlp_dim,
        cfg.num_heads,
        cfg.num_classes,
    );
    let (b, s) = (rows, elem);
    let n = b * t;
    let a = b * h * t * attn_ld(t);
    let k = cfg.num_channels * cfg.patch_size * cfg.patch_size;
    let tr = usize::from(train);
    let (pd, pa, po) = (
        on(cfg.dropout),
        on(cfg.attention_dropout),
        on(cfg.attention_output_dropout),
    );
    let per_layer = 4 * (2 * n * d + 4 * n)
        + s * (4 * n * d + n * m + a)
        + tr * (po * n * d + pd * (n * m + n * d) + pa * a);
    let layers = if train { cfg.num_layers } else { 1 };
    let img = b * cfg.num_channels * cfg.image_size * cfg.image_size;
    let cols = n.div_ceil(COLUMN_ROWS) * (3 * d).max(m).max(c);
    let f32s = n * d + b * d + 2 * b + b * c + img + tr * (b * c + b * d + n * d + cols);
    let ts = b * d + (t - 1) * b * (k + d) + tr * b * c;
    let scratch = 6 * n * d + n * m + tr * (pa * a + 6 * n * d + n * m + a);
    let other = tr * pd * n * d + 4 * (2 * b + tr * (b / 2)) + 8 * tr * (4 + 3 * (b / 2));
    layers * per_layer + 4 * f32s + s * (ts + scratch) + other
}

/// A zeroed device buffer of `len` elements (at least one) on `stream` (for [`plan_table`]).
#[cfg(feature = "cuda")]
fn zeros<X: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<X>, VitError> {
    stream
        .alloc_zeros::<X>(len.max(1))
        .map_err(|e| VitError::cuda(format!("allocating a plan buffer of {len} elements"), e))
}

#[cfg(feature = "cuda")]
impl<X> Held for CudaSlice<X> {
    fn held(&self) -> usize {
        self.num_bytes()
    }
}

#[cfg(feature = "cuda")]
impl<T: DeviceRepr + ValidAsZeroBits> DevicePlan<T> {
    /// Allocates every buffer of `spec` on `stream`.
    pub fn new(stream: &Arc<CudaStream>, spec: PlanSpec) -> Result<Self, VitError> {
        let layers = spec
            .layers
            .iter()
            .map(|l| LayerBufs::alloc(stream, l))
            .collect::<Result<Vec<_>, _>>()?;
        Self::alloc(stream, &spec.clone(), spec, layers)
    }

    /// Bytes actually allocated (the spec's, plus one element per empty buffer).
    pub fn allocated_bytes(&self) -> usize {
        self.held() + self.layers.iter().map(LayerBufs::held).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vit(d: usize, layers: usize, heads: usize, img: usize, patch: usize) -> ViTConfig {
        ViTConfig {
            image_size: img,
            patch_size: patch,
            hidden_size: d,
            num_heads: heads,
            num_layers: layers,
            mlp_dim: 4 * d,
            num_classes: 10,
            ..ViTConfig::default()
        }
    }

    #[test]
    fn the_formula_is_the_sum_of_the_buffers() {
        for mut cfg in [
            vit(32, 2, 4, 32, 8),
            vit(192, 12, 3, 224, 16),
            vit(768, 12, 12, 224, 16),
        ] {
            for (p, pa, po) in [(0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.1, 0.1, 0.1)] {
                cfg.dropout = p;
                cfg.attention_dropout = pa;
                cfg.attention_output_dropout = po;
                for rows in [2, 6, 128] {
                    for elem in [2, 4] {
                        for train in [true, false] {
                            let spec = PlanSpec::new(&cfg, rows, elem, train);
                            assert_eq!(
                                spec.bytes(),
                                plan_bytes(&cfg, rows, elem, train),
                                "d {} rows {rows} elem {elem} train {train} p {p} {pa} {po}",
                                cfg.hidden_size
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn vit_b16_at_micro_batch_64_in_bf16() {
        // The recipe: hidden dropout 0.1, attention dropouts 0; R-Drop micro-batch 64 = 128 rows.
        let mut cfg = vit(768, 12, 12, 224, 16);
        cfg.dropout = 0.1;
        cfg.attention_dropout = 0.0;
        cfg.attention_output_dropout = 0.0;
        let b = plan_bytes(&cfg, 128, 2, true);
        let (n, d, m, att) = (128 * 197, 768, 3072, 128 * 12 * 197 * 200);
        // The saved activations dominate: per layer 4·(2ND+4N) + 2·(4ND+NM+BHT²) + NM + ND.
        let saved = 12 * (4 * (2 * n * d + 4 * n) + 2 * (4 * n * d + n * m + att) + n * m + n * d);
        assert!(b > saved && b < saved + (2 << 30), "{b} vs {saved}");
        // f32 compute costs more than bf16; inference far less than training.
        assert!(plan_bytes(&cfg, 128, 4, true) > b);
        assert!(plan_bytes(&cfg, 128, 2, false) * 4 < b);
        // Twice the rows, about twice the bytes.
        let b2 = plan_bytes(&cfg, 256, 2, true);
        assert!(b2 > 2 * b - (1 << 30) && b2 <= 2 * b, "{b2} vs {b}");
    }
}
