//! The CUDA engine's activation plan: every device buffer a training (or inference) step at a
//! given (architecture, rows, compute dtype) needs, allocated once and reused by every step.
//!
//! With `B` rows (an R-Drop micro-batch of `m` samples runs `B = 2m` rows), `T` tokens, width
//! `D`, MLP width `M`, `H` heads, `L` layers, `C` classes, `N = B·T`, `A = B·H·T·T₈` attention
//! elements (`T₈ = ⌈T/8⌉·8`: each row of a `(T, T)` attention matrix padded to a 16-byte
//! multiple, so the attention GEMMs run on aligned rows and matrices; padding never read), `G = T − 1` patches of `K = C_in·P²` pixels, `s` bytes per element of the compute
//! type (4 for f32, 2 for bf16/f16), `[p]` = 1 when that dropout rate is > 0 (masks are only
//! kept by training plans), `tr` = 1 for a training plan:
//! ```text
//! saved, per layer:  x, mid (N·D f32 each)        residual stream entering the block / after attention
//!                    μ₁, r₁, μ₂, r₂ (N f32 each)   LayerNorm statistics (outputs recomputed)
//!                    q, k, v (N·D s each)          heads' layout (B, H, T, D/H)
//!                    P (A s)                       softmax before dropout
//!                    attn (N·D s)                  heads' output, merged
//!                    pre (N·M s)                   fc1 output before GELU (h is recomputed)
//!                    masks (bytes): N·D [p_attn_out] + N·M [p] + N·D [p] + A [p_attn]
//! once, f32:         x_L (N·D), class rows (B·D), their LN statistics (2B), logits (B·C),
//!                    images (B·C_in·S²); training: dlogits (B·C), dclass (B·D), dres (N·D),
//!                    column partials (⌈N/R⌉·max(2D, 3D, M, C), R = 32 rows a partial)
//! once, s:           class rows' LN (B·D), patch rows (B·G·K), patch tokens (B·G·D);
//!                    training: dlogits (B·C)
//! once, other:       embeddings' mask N·D [p] bytes; row keys 2B u32; training: labels B/2
//!                    u32, loss partials 4 + 3·B/2 f64
//! scratch, s:        ln, heads' output, proj (N·D each), qkv rows (3·N·D), h (N·M),
//!                    P ⊙ mask (A [p_attn], training: without dropout the A·V GEMM reads P);
//!                    training: dy, dln, dattn (N·D each), dq, dk, dv (N·D each), dh (N·M),
//!                    dA then dS in place (A)
//! ```
//! so each layer costs `4·(2ND + 4N) + s·(4ND + NM + A)` bytes plus its masks, and
//! [`plan_bytes`] is the closed form of the sum ([`PlanSpec::bytes`]; tested equal). An
//! inference plan keeps one layer slot. Parameters (f32 master, their `s` copy, f32 gradients,
//! optimiser moments) are not in the plan.

use crate::config::ViTConfig;

/// The padded row length `⌈T/8⌉·8` of the `(T, T)` attention matrices (probabilities, their
/// mask, `A`, `dA`/`dS`): 16 bytes in bf16/f16, 32 in f32.
pub fn attn_ld(tokens: usize) -> usize {
    tokens.div_ceil(8) * 8
}

/// Bytes of the cuBLASLt workspace the engine allocates once (32 MiB, Hopper's recommendation).
pub const GEMM_WORKSPACE_BYTES: usize = rdrop_kernels::gemm_shape::WORKSPACE_BYTES;

/// Rows of a column partial (bias gradient, LayerNorm `dγ, dβ`): the kernels' block.
pub const COLUMN_ROWS: usize = rdrop_kernels::layernorm::BWD_ROWS;

/// Element counts of one layer's saved activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// f32: x, mid (each).
    pub res: usize,
    /// f32: μ₁, r₁, μ₂, r₂ (each).
    pub stats: usize,
    /// T: q, k, v, merged attention output (each).
    pub nd: usize,
    /// T: softmax probabilities.
    pub probs: usize,
    /// T: fc1 output before GELU.
    pub pre: usize,
    /// Bytes: attention output, MLP hidden, MLP output, attention probabilities masks.
    pub masks: [usize; 4],
}

impl LayerSpec {
    /// Bytes of the slot with `elem`-byte compute elements.
    pub fn bytes(&self, elem: usize) -> usize {
        4 * (2 * self.res + 4 * self.stats)
            + elem * (4 * self.nd + self.probs + self.pre)
            + self.masks.iter().sum::<usize>()
    }
}

/// Every buffer of a plan, in elements (types as in the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSpec {
    /// Rows (`2m` for a training micro-batch of `m`).
    pub rows: usize,
    /// Whether the plan can run a backward.
    pub train: bool,
    /// Bytes of an element of the compute type.
    pub elem: usize,
    /// Saved activations: `L` layer slots when training, one for inference.
    pub layers: Vec<LayerSpec>,
    /// f32 buffers: x_L, class rows, mean, rstd, logits, images, dlogits, dclass, dres,
    /// column partials (the training ones 0 for inference).
    pub f32s: [usize; 10],
    /// T buffers: class rows' LN, patch rows, patch tokens, dlogits.
    pub once_t: [usize; 4],
    /// T scratch: ln, heads' output, proj, qkv rows, h, P ⊙ mask, dy, dln, dattn, dq, dk,
    /// dv, dh, dP.
    pub scratch_t: [usize; 14],
    /// Bytes: embeddings' mask.
    pub embed_mask: usize,
    /// u32: row keys, labels.
    pub u32s: [usize; 2],
    /// f64: loss partials.
    pub loss: usize,
}

fn on(p: f64) -> usize {
    usize::from(p > 0.0)
}

impl PlanSpec {
    /// The plan of `cfg` at `rows` rows and `elem`-byte compute elements.
    pub fn new(cfg: &ViTConfig, rows: usize, elem: usize, train: bool) -> Self {
        let (t, d, m, h, c) = (
            cfg.num_tokens(),
            cfg.hidden_size,
            cfg.mlp_dim,
            cfg.num_heads,
            cfg.num_classes,
        );
        let (b, n) = (rows, rows * t);
        let g = t - 1;
        let k = cfg.num_channels * cfg.patch_size * cfg.patch_size;
        let att = b * h * t * attn_ld(t);
        let tr = usize::from(train);
        let mask = |len: usize, p: f64| tr * on(p) * len;
        let layer = LayerSpec {
            res: n * d,
            stats: n,
            nd: n * d,
            probs: att,
            pre: n * m,
            masks: [
                mask(n * d, cfg.attention_output_dropout),
                mask(n * m, cfg.dropout),
                mask(n * d, cfg.dropout),
                mask(att, cfg.attention_dropout),
            ],
        };
        let slots = if train { cfg.num_layers } else { 1 };
        let images = b * cfg.num_channels * cfg.image_size * cfg.image_size;
        let cols = n.div_ceil(COLUMN_ROWS) * (2 * d).max(3 * d).max(m).max(c);
        Self {
            rows,
            train,
            elem,
            layers: vec![layer; slots],
            f32s: [
                n * d,
                b * d,
                b,
                b,
                b * c,
                images,
                tr * b * c,
                tr * b * d,
                tr * n * d,
                tr * cols,
            ],
            once_t: [b * d, b * g * k, b * g * d, tr * b * c],
            scratch_t: [
                n * d,
                n * d,
                n * d,
                3 * n * d,
                n * m,
                tr * on(cfg.attention_dropout) * att,
                tr * n * d,
                tr * n * d,
                tr * n * d,
                tr * n * d,
                tr * n * d,
                tr * n * d,
                tr * n * m,
                tr * att,
            ],
            embed_mask: mask(n * d, cfg.dropout),
            u32s: [2 * b, tr * (b / 2)],
            loss: tr * (4 + 3 * (b / 2)),
        }
    }

    /// Bytes the plan allocates (the device plan allocates exactly these buffers).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.bytes(self.elem))
            .sum::<usize>()
            + 4 * self.f32s.iter().sum::<usize>()
            + self.elem * (self.once_t.iter().sum::<usize>() + self.scratch_t.iter().sum::<usize>())
            + self.embed_mask
            + 4 * self.u32s.iter().sum::<usize>()
            + 8 * self.loss
    }
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

/// The device buffers of a [`PlanSpec`].
#[cfg(feature = "cuda")]
pub(crate) mod device {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

    use super::PlanSpec;
    use crate::error::{Result, VitError};

    /// One block's saved activations.
    #[derive(Debug)]
    pub(crate) struct LayerBufs<T> {
        pub x: CudaSlice<f32>,
        pub mid: CudaSlice<f32>,
        pub mean1: CudaSlice<f32>,
        pub rstd1: CudaSlice<f32>,
        pub mean2: CudaSlice<f32>,
        pub rstd2: CudaSlice<f32>,
        pub q: CudaSlice<T>,
        pub k: CudaSlice<T>,
        pub v: CudaSlice<T>,
        pub attn: CudaSlice<T>,
        pub probs: CudaSlice<T>,
        pub pre: CudaSlice<T>,
        pub keep_attn_out: CudaSlice<u8>,
        pub keep_hidden: CudaSlice<u8>,
        pub keep_out: CudaSlice<u8>,
        pub keep_probs: CudaSlice<u8>,
    }

    /// Every buffer of a forward and backward at `spec.rows` rows (names as in the module
    /// doc). A buffer the spec sizes 0 (a mask where nothing drops, the backward's buffers in
    /// an inference plan) holds one element: the kernels never read it.
    #[derive(Debug)]
    pub(crate) struct DevicePlan<T> {
        pub spec: PlanSpec,
        pub layers: Vec<LayerBufs<T>>,
        pub x_out: CudaSlice<f32>,
        pub cls: CudaSlice<f32>,
        pub meanf: CudaSlice<f32>,
        pub rstdf: CudaSlice<f32>,
        pub logits: CudaSlice<f32>,
        pub images: CudaSlice<f32>,
        pub dlogits: CudaSlice<f32>,
        pub dcls: CudaSlice<f32>,
        pub dres: CudaSlice<f32>,
        pub cols: CudaSlice<f32>,
        pub lnf: CudaSlice<T>,
        pub patches: CudaSlice<T>,
        pub tok: CudaSlice<T>,
        pub dlogits_t: CudaSlice<T>,
        pub ln: CudaSlice<T>,
        pub o: CudaSlice<T>,
        pub proj: CudaSlice<T>,
        pub qkv_rows: CudaSlice<T>,
        pub h: CudaSlice<T>,
        pub att: CudaSlice<T>,
        pub dy: CudaSlice<T>,
        pub dln: CudaSlice<T>,
        pub dattn: CudaSlice<T>,
        pub dq: CudaSlice<T>,
        pub dk: CudaSlice<T>,
        pub dv: CudaSlice<T>,
        pub dh: CudaSlice<T>,
        pub dp: CudaSlice<T>,
        pub keep_embed: CudaSlice<u8>,
        pub row_keys: CudaSlice<u32>,
        pub labels: CudaSlice<u32>,
        pub loss: CudaSlice<f64>,
    }

    fn zeros<X: DeviceRepr + ValidAsZeroBits>(
        stream: &Arc<CudaStream>,
        len: usize,
    ) -> Result<CudaSlice<X>> {
        stream
            .alloc_zeros::<X>(len.max(1))
            .map_err(|e| VitError::cuda(format!("allocating a plan buffer of {len} elements"), e))
    }

    impl<T: DeviceRepr + ValidAsZeroBits> DevicePlan<T> {
        /// Allocates every buffer of `spec` on `stream`.
        pub fn new(stream: &Arc<CudaStream>, spec: PlanSpec) -> Result<Self> {
            let z32 = |n| zeros::<f32>(stream, n);
            let zt = |n| zeros::<T>(stream, n);
            let z8 = |n| zeros::<u8>(stream, n);
            let layers = spec
                .layers
                .iter()
                .map(|l| {
                    Ok(LayerBufs {
                        x: z32(l.res)?,
                        mid: z32(l.res)?,
                        mean1: z32(l.stats)?,
                        rstd1: z32(l.stats)?,
                        mean2: z32(l.stats)?,
                        rstd2: z32(l.stats)?,
                        q: zt(l.nd)?,
                        k: zt(l.nd)?,
                        v: zt(l.nd)?,
                        attn: zt(l.nd)?,
                        probs: zt(l.probs)?,
                        pre: zt(l.pre)?,
                        keep_attn_out: z8(l.masks[0])?,
                        keep_hidden: z8(l.masks[1])?,
                        keep_out: z8(l.masks[2])?,
                        keep_probs: z8(l.masks[3])?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let [x_out, cls, meanf, rstdf, logits, images, dlogits, dcls, dres, cols] = spec.f32s;
            let [lnf, patches, tok, dlogits_t] = spec.once_t;
            let [ln, o, proj, qkv_rows, h, att, dy, dln, dattn, dq, dk, dv, dh, dp] =
                spec.scratch_t;
            Ok(Self {
                layers,
                x_out: z32(x_out)?,
                cls: z32(cls)?,
                meanf: z32(meanf)?,
                rstdf: z32(rstdf)?,
                logits: z32(logits)?,
                images: z32(images)?,
                dlogits: z32(dlogits)?,
                dcls: z32(dcls)?,
                dres: z32(dres)?,
                cols: z32(cols)?,
                lnf: zt(lnf)?,
                patches: zt(patches)?,
                tok: zt(tok)?,
                dlogits_t: zt(dlogits_t)?,
                ln: zt(ln)?,
                o: zt(o)?,
                proj: zt(proj)?,
                qkv_rows: zt(qkv_rows)?,
                h: zt(h)?,
                att: zt(att)?,
                dy: zt(dy)?,
                dln: zt(dln)?,
                dattn: zt(dattn)?,
                dq: zt(dq)?,
                dk: zt(dk)?,
                dv: zt(dv)?,
                dh: zt(dh)?,
                dp: zt(dp)?,
                keep_embed: z8(spec.embed_mask)?,
                row_keys: zeros::<u32>(stream, spec.u32s[0])?,
                labels: zeros::<u32>(stream, spec.u32s[1])?,
                loss: zeros::<f64>(stream, spec.loss)?,
                spec,
            })
        }

        /// Bytes actually allocated (the spec's, plus one element per empty buffer).
        pub fn allocated_bytes(&self) -> usize {
            let l: usize = self
                .layers
                .iter()
                .map(|a| {
                    a.x.num_bytes()
                        + a.mid.num_bytes()
                        + a.mean1.num_bytes()
                        + a.rstd1.num_bytes()
                        + a.mean2.num_bytes()
                        + a.rstd2.num_bytes()
                        + a.q.num_bytes()
                        + a.k.num_bytes()
                        + a.v.num_bytes()
                        + a.attn.num_bytes()
                        + a.probs.num_bytes()
                        + a.pre.num_bytes()
                        + a.keep_attn_out.num_bytes()
                        + a.keep_hidden.num_bytes()
                        + a.keep_out.num_bytes()
                        + a.keep_probs.num_bytes()
                })
                .sum();
            let f: usize = [
                &self.x_out,
                &self.cls,
                &self.meanf,
                &self.rstdf,
                &self.logits,
                &self.images,
                &self.dlogits,
                &self.dcls,
                &self.dres,
                &self.cols,
            ]
            .iter()
            .map(|b| b.num_bytes())
            .sum();
            let t: usize = [
                &self.lnf,
                &self.patches,
                &self.tok,
                &self.dlogits_t,
                &self.ln,
                &self.o,
                &self.proj,
                &self.qkv_rows,
                &self.h,
                &self.att,
                &self.dy,
                &self.dln,
                &self.dattn,
                &self.dq,
                &self.dk,
                &self.dv,
                &self.dh,
                &self.dp,
            ]
            .iter()
            .map(|b| b.num_bytes())
            .sum();
            l + f
                + t
                + self.keep_embed.num_bytes()
                + self.row_keys.num_bytes()
                + self.labels.num_bytes()
                + self.loss.num_bytes()
        }
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
