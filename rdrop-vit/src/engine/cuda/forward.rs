//! The CUDA engine's forward, op for op the CPU engine's (`super::super::forward`): patch
//! embedding, class token and position embeddings, `L` pre-LN blocks, the final LayerNorm of
//! the class tokens and the classifier. Residual stream and statistics in f32, GEMM operands
//! in `T`; dropout masks from the same Philox keys (`Masks::site`), recorded for the backward.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
use rdrop_kernels::cuda::{Compute, CudaKernels, Dropout};

use super::gemm::{Gemm, RowGemm};
use super::gemm_shape::AttnShapes;
use super::laps::EventLaps;
use super::plan::{DevicePlan, LayerBufs};
use crate::config::ViTConfig;
use crate::engine::cost::{self, Cost};
use crate::engine::forward::Masks;
use crate::engine::params::{Layer, Offsets, Tensors, WeightBias};
use crate::error::{Result, VitError};
use crate::sites;

/// What every op of a pass reads: kernels, cuBLASLt, f32 master parameters and their `T`
/// copy, the architecture, the masks' key and the rows' keys.
pub(crate) struct Ctx<'a, T> {
    pub k: &'a CudaKernels,
    pub gemm: &'a mut Gemm,
    pub p: &'a CudaSlice<f32>,
    pub pt: &'a CudaSlice<T>,
    pub cfg: &'a ViTConfig,
    pub masks: &'a Masks<'a>,
    pub rows: usize,
    /// The step profile's events (a no-op unless profiling).
    pub laps: &'a mut EventLaps,
}

impl<'a, T: Compute> Ctx<'a, T> {
    /// The tensors of `x` in the f32 master parameters (LayerNorms, embeddings, f32 biases).
    pub fn master<X: Tensors>(&self, x: &X) -> X::Of<CudaView<'a, f32>> {
        let p: &'a CudaSlice<f32> = self.p;
        x.map(&mut |r| p.slice(r.clone()))
    }

    /// The tensors of `x` in the compute-type copy (GEMM operands).
    pub fn compute<X: Tensors>(&self, x: &X) -> X::Of<CudaView<'a, T>> {
        let pt: &'a CudaSlice<T> = self.pt;
        x.map(&mut |r| pt.slice(r.clone()))
    }

    /// Ends the profile's current lap: the ops enqueued since the last are `group`.
    pub fn lap(&mut self, group: &'static str, cost: Cost) -> Result<()> {
        self.laps.lap(group, cost)
    }

    /// Dropout at site `site` with probability `p` (none outside training), keyed by `keys`.
    pub fn dropout<'k>(&self, site: u32, p: f64, keys: &'k CudaSlice<u32>) -> Dropout<'k> {
        let site = self.masks.site(site, p);
        Dropout {
            site,
            row_keys: keys,
        }
    }

    /// Bytes of a compute-type element.
    pub fn e(&self) -> usize {
        std::mem::size_of::<T>()
    }
}

/// `y (n, o) = x (n, i) · W (o, i)ᵀ [+ b]` (W, b views of the `T` copy, or f32 for an f32 `y`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear<T: Compute, C: Compute>(
    gemm: &mut Gemm,
    y: &mut impl DevicePtrMut<C>,
    x: &impl DevicePtr<T>,
    w: &CudaView<'_, T>,
    b: Option<&CudaView<'_, C>>,
    n: usize,
    i: usize,
    o: usize,
) -> Result<()> {
    gemm.matmul(&RowGemm::new(n, o, i, false, true), x, w, y, b, 1.0, 0.0)?;
    Ok(())
}

/// One block: `acts.x` → `out` (both `(B, T, D)` f32), saving what the backward needs.
#[allow(clippy::too_many_arguments)]
fn block<T: Compute>(
    c: &mut Ctx<'_, T>,
    l: usize,
    o: &Layer,
    acts: &mut LayerBufs<T>,
    out: &mut CudaSlice<f32>,
    s: &mut Scratch<'_, T>,
    keys: &CudaSlice<u32>,
) -> Result<()> {
    let cfg = c.cfg;
    let (t, d, m, h) = (
        cfg.num_tokens(),
        cfg.hidden_size,
        cfg.mlp_dim,
        cfg.num_heads,
    );
    let (b, dh) = (c.rows, cfg.head_dim());
    let n = b * t;
    let eps = cfg.layer_norm_eps as f32;
    let k = c.k;
    let e = c.e();
    let (master, pt) = (c.master(o), c.compute(o));
    let ln = &master.layernorm_before;
    let stats = [&mut acts.mean1, &mut acts.rstd1];
    k.layernorm_fwd::<T>(s.ln, stats, &acts.x, [&ln.weight, &ln.bias], eps, [n, d])?;
    c.lap("layernorm", cost::layernorm(n, d, e))?;
    let WeightBias { weight: w, bias } = pt.query_key_value;
    linear(c.gemm, s.qkv_rows, &*s.ln, &w, Some(&bias), n, d, 3 * d)?;
    c.lap("qkv_gemm", cost::gemm(n, d, 3 * d, e))?;
    let qkv = [&mut acts.q, &mut acts.k, &mut acts.v];
    k.qkv_split::<T>(qkv, &*s.qkv_rows, [b, t, h, dh])?;
    attention_fwd(c, l, acts, s, keys)?;
    k.attn_merge::<T>(&mut acts.attn, &*s.o, [b, t, h, dh])?;
    c.lap("attention", cost::attention(b, h, t, dh, e))?;
    let WeightBias { weight: w, bias } = pt.attention_output;
    linear(c.gemm, s.proj, &acts.attn, &w, Some(&bias), n, d, d)?;
    c.lap("proj_gemm", cost::gemm(n, d, d, e))?;
    let p = cfg.attention_output_dropout;
    let drop = c.dropout(sites::attention_output(l as u32), p, keys);
    let keep = &mut acts.keep_attn_out;
    k.residual_dropout_add::<T>(&mut acts.mid, keep, &acts.x, &*s.proj, drop, [b, t * d])?;
    c.lap("residual", cost::elementwise(n * d, 2, 1, 4, 2.0, true))?;

    let ln = &master.layernorm_after;
    let stats = [&mut acts.mean2, &mut acts.rstd2];
    k.layernorm_fwd::<T>(s.ln, stats, &acts.mid, [&ln.weight, &ln.bias], eps, [n, d])?;
    c.lap("layernorm", cost::layernorm(n, d, e))?;
    let WeightBias { weight: w, bias } = pt.intermediate;
    linear(c.gemm, &mut acts.pre, &*s.ln, &w, Some(&bias), n, d, m)?;
    c.lap("mlp_gemm", cost::gemm(n, d, m, e))?;
    let drop = c.dropout(sites::mlp_hidden(l as u32), cfg.dropout, keys);
    k.gelu_dropout_fwd::<T>(s.h, &mut acts.keep_hidden, &acts.pre, drop, [b, t * m])?;
    c.lap(
        "gelu_dropout",
        cost::elementwise(n * m, 1, 1, e, 20.0, true),
    )?;
    let WeightBias { weight: w, bias } = pt.output;
    linear(c.gemm, s.proj, &*s.h, &w, Some(&bias), n, m, d)?;
    c.lap("mlp_gemm", cost::gemm(n, m, d, e))?;
    let drop = c.dropout(sites::mlp_output(l as u32), cfg.dropout, keys);
    k.residual_dropout_add::<T>(
        out,
        &mut acts.keep_out,
        &acts.mid,
        &*s.proj,
        drop,
        [b, t * d],
    )?;
    c.lap("residual", cost::elementwise(n * d, 2, 1, 4, 2.0, true))?;
    Ok(())
}

/// Scores, softmax with dropout and the heads' output of one block, in `s.o` `(B, H, T, Dh)`:
/// `S = q·kᵀ/√Dh` (batched over `B·H`), `P = softmax(S)` (saved), `A = P ⊙ mask` (in `s.att`;
/// `A = P` without attention dropout), `o = A·v`.
fn attention_fwd<T: Compute>(
    c: &mut Ctx<'_, T>,
    l: usize,
    acts: &mut LayerBufs<T>,
    s: &mut Scratch<'_, T>,
    keys: &CudaSlice<u32>,
) -> Result<()> {
    let cfg = c.cfg;
    let (t, h, dh) = (cfg.num_tokens(), cfg.num_heads, cfg.head_dim());
    let g = AttnShapes::new(cfg, c.rows);
    // The 1/√Dh scale in the GEMM (as the CPU engine): S stays small in f16.
    let scale = 1.0 / (dh as f32).sqrt();
    c.gemm
        .matmul::<T, T>(&g.qk(), &acts.q, &acts.k, &mut acts.probs, None, scale, 0.0)?;
    let drop = c.dropout(
        sites::attention_probs(l as u32),
        cfg.attention_dropout,
        keys,
    );
    let probs = [&mut acts.probs, &mut *s.att];
    let dims = [c.rows, h, t, g.ld];
    c.k.softmax_dropout_fwd_ld::<T>(probs, &mut acts.keep_probs, 1.0, drop, dims)?;
    // Without attention dropout the kernel leaves `att` alone: A = P.
    let a: &CudaSlice<T> = if drop.on() { &*s.att } else { &acts.probs };
    c.gemm
        .matmul::<T, T>(&g.sx(false), a, &acts.v, s.o, None, 1.0, 0.0)?;
    Ok(())
}

/// The forward's scratch buffers (borrowed from the plan).
pub(crate) struct Scratch<'a, T> {
    pub ln: &'a mut CudaSlice<T>,
    pub qkv_rows: &'a mut CudaSlice<T>,
    pub o: &'a mut CudaSlice<T>,
    pub proj: &'a mut CudaSlice<T>,
    pub h: &'a mut CudaSlice<T>,
    pub att: &'a mut CudaSlice<T>,
}

/// The whole forward of `plan.spec.rows` rows: logits (f32) in `plan.logits`. `plan.images`
/// holds `images` images `(images, C, S, S)` and `plan.row_keys` the rows' keys; with
/// `duplicate` (R-Drop's `[x; x]`, `rows = 2·images`) the second half's patch rows are a copy
/// of the first's. A plan with one layer slot (inference) reuses it for every block.
pub(crate) fn forward<T: Compute>(
    c: &mut Ctx<'_, T>,
    off: &Offsets,
    plan: &mut DevicePlan<T>,
    images: usize,
    duplicate: bool,
) -> Result<()> {
    let cfg = c.cfg;
    let rows = c.rows;
    if plan.spec.rows != rows || images * if duplicate { 2 } else { 1 } != rows {
        return Err(VitError::cuda(
            "CUDA forward",
            format!("{images} images for a plan of {} rows", plan.spec.rows),
        ));
    }
    let (t, d, classes) = (cfg.num_tokens(), cfg.hidden_size, cfg.num_classes);
    let (ch, side, ps) = (cfg.num_channels, cfg.image_size, cfg.patch_size);
    let g2 = t - 1;
    let cpp = ch * ps * ps;
    let DevicePlan {
        layers,
        x_out,
        cls,
        meanf,
        rstdf,
        logits,
        images: img,
        patches,
        tok,
        lnf,
        ln,
        o,
        proj,
        qkv_rows,
        h,
        att,
        keep_embed,
        row_keys,
        ..
    } = plan;
    let half = images * g2 * cpp;
    let img = img.slice(..images * ch * side * side);
    c.k.im2col::<T>(&mut patches.slice_mut(..half), &img, [images, ch, side, ps])?;
    if duplicate {
        let (a, mut b) = patches.split_at_mut(half);
        c.k.stream()
            .memcpy_dtod(&a, &mut b)
            .map_err(|e| VitError::cuda("copying the second pass's patch rows", e))?;
    }
    let WeightBias { weight: w, bias } = c.compute(&off.embeddings.projection);
    linear(c.gemm, tok, &*patches, &w, Some(&bias), rows * g2, cpp, d)?;
    let drop = c.dropout(sites::EMBEDDINGS, cfg.dropout, row_keys);
    let first = match layers.first_mut() {
        Some(l) => &mut l.x,
        None => return Err(VitError::cuda("CUDA forward", "a plan without layer slots")),
    };
    let emb = c.master(&off.embeddings);
    let emb = [&emb.cls_token, &emb.position_embeddings];
    c.k.embed_fwd::<T>(first, keep_embed, &*tok, emb, drop, [rows, t, d])?;
    let (f, by) = crate::engine::forward::embed_cost(cfg, rows, c.e());
    c.lap("patch_embed", (f, by))?;
    let mut s = Scratch {
        ln,
        qkv_rows,
        o,
        proj,
        h,
        att,
    };
    let nl = cfg.num_layers;
    let slots = layers.len();
    for l in 0..nl {
        if slots == nl {
            let (head, tail) = layers.split_at_mut(l + 1);
            let out = match tail.first_mut() {
                Some(next) => &mut next.x,
                None => &mut *x_out,
            };
            block(c, l, &off.layers[l], &mut head[l], out, &mut s, row_keys)?;
        } else {
            block(
                c,
                l,
                &off.layers[l],
                &mut layers[0],
                x_out,
                &mut s,
                row_keys,
            )?;
            if l + 1 < nl {
                c.k.stream()
                    .memcpy_dtod(&*x_out, &mut layers[0].x)
                    .map_err(|e| VitError::cuda("copying the residual stream", e))?;
            }
        }
    }
    c.k.cls_gather(cls, &*x_out, [rows, t, d])?;
    let norm = c.master(&off.layernorm);
    let eps = cfg.layer_norm_eps as f32;
    let norm = [&norm.weight, &norm.bias];
    c.k.layernorm_fwd::<T>(lnf, [meanf, rstdf], &*cls, norm, eps, [rows, d])?;
    // f32 logits: the classifier's bias from the f32 master.
    let (w, bias) = (
        c.compute(&off.classifier).weight,
        c.master(&off.classifier).bias,
    );
    linear::<T, f32>(c.gemm, logits, &*lnf, &w, Some(&bias), rows, d, classes)?;
    let head = crate::engine::forward::head_cost(cfg, rows, c.e());
    c.lap("head", head)?;
    Ok(())
}
