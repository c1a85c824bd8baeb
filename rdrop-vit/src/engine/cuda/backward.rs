//! The CUDA engine's backward, op for op the CPU engine's (`super::super::backward`): from
//! `∂loss/∂logits` (f32, `plan.dlogits`) to every parameter's gradient, added (`+=`) into the
//! flat f32 gradient buffer. Masks are the forward's recorded bytes; LayerNorm outputs and
//! `h = mask ⊙ GELU(pre)` are recomputed from saved inputs (the same kernels, the same masks).
//!
//! For a linear `y (n, o) = x (n, i)·Wᵀ + b`: `dW (o, i) += dyᵀ·x` (T operands, f32 output,
//! β = 1), `db += Σ_rows dy` (deterministic column sums), `dx (n, i) = dy·W`.

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr};
use rdrop_kernels::cuda::Compute;

use super::forward::Ctx;
use super::gemm::RowGemm;
use super::gemm_shape::AttnShapes;
use super::plan::DevicePlan;
use crate::engine::cost;
use crate::engine::forward::{embed_cost, head_cost};
use crate::engine::params::{Offsets, WeightBias};
use crate::error::{Result, VitError};

/// Runs `f` on the gradient views of the adjacent tensors `a` and `b` (a weight and its
/// bias, the class token and the position embeddings).
fn with_pair<R>(
    g: &mut CudaSlice<f32>,
    a: &Range<usize>,
    b: &Range<usize>,
    f: impl for<'v> FnOnce(&mut CudaViewMut<'v, f32>, &mut CudaViewMut<'v, f32>) -> Result<R>,
) -> Result<R> {
    if a.end != b.start || b.end > g.len() {
        return Err(VitError::cuda(
            "CUDA backward",
            format!("gradient views {a:?} and {b:?} are not adjacent"),
        ));
    }
    let mut span = g.slice_mut(a.start..b.end);
    let (mut x, mut y) = span.split_at_mut(a.len());
    f(&mut x, &mut y)
}

/// Runs `f` on the gradient views of `t`'s weight and bias.
fn with_grads<R>(
    g: &mut CudaSlice<f32>,
    t: &WeightBias,
    f: impl FnOnce(WeightBias<&mut CudaViewMut<'_, f32>>) -> Result<R>,
) -> Result<R> {
    with_pair(g, &t.weight, &t.bias, |weight, bias| {
        f(WeightBias { weight, bias })
    })
}

/// `dW += dyᵀ·x`, `db += Σ dy`, `dx = dy·W` (when `dx` is given) for the linear `t` (see the
/// module doc).
#[allow(clippy::too_many_arguments)]
fn linear_bwd<T: Compute>(
    c: &mut Ctx<'_, T>,
    grads: &mut CudaSlice<f32>,
    cols: &mut CudaSlice<f32>,
    dx: Option<&mut CudaSlice<T>>,
    dy: &impl DevicePtr<T>,
    x: &impl DevicePtr<T>,
    t: &WeightBias,
    n: usize,
    i: usize,
    o: usize,
) -> Result<()> {
    with_grads(grads, t, |g| {
        c.gemm.matmul::<T, f32>(
            &RowGemm::new(o, i, n, true, false),
            dy,
            x,
            g.weight,
            None,
            1.0,
            1.0,
        )?;
        Ok(c.k.bias_grad::<T>(g.bias, cols, dy, [n, o])?)
    })?;
    if let Some(dx) = dx {
        c.gemm.matmul::<T, T>(
            &RowGemm::new(n, i, o, false, false),
            dy,
            &c.compute(t).weight,
            dx,
            None,
            1.0,
            0.0,
        )?;
    }
    Ok(())
}

/// Called with each finished bucket of the gradient buffer (element range), after the kernels
/// that wrote its last values were enqueued on the engine's stream (data parallel: record an
/// event there and sum the range on another stream once it fires).
pub type BucketReady<'a> =
    dyn FnMut(std::ops::Range<usize>) -> std::result::Result<(), rdrop_core::CoreError> + 'a;

/// Hands `[at, end)` to `ready` when `at` is the next of `cuts`: nothing enqueued later
/// writes there.
fn release(
    at: usize,
    end: &mut usize,
    cuts: &mut &[usize],
    ready: &mut BucketReady<'_>,
) -> Result<()> {
    if cuts.first() == Some(&at) && at <= *end {
        ready(at..*end)?;
        *end = at;
        *cuts = &cuts[1..];
    }
    Ok(())
}

/// Backward of the forward that filled `plan` (same masks), adding into `grads`. Passing each
/// of `cuts` (a subset of the CPU engine's `ready_cuts`, in its order) it hands the finished
/// range above it to `ready`, as the CPU backward does.
pub(crate) fn backward<T: Compute>(
    c: &mut Ctx<'_, T>,
    off: &Offsets,
    plan: &mut DevicePlan<T>,
    grads: &mut CudaSlice<f32>,
    mut cuts: &[usize],
    ready: &mut BucketReady<'_>,
) -> Result<()> {
    let cfg = c.cfg;
    // The buffer's end: the classifier's bias is the layout's last tensor (engine::params).
    let mut end = off.classifier.bias.end;
    let rows = c.rows;
    let (t, d, m, h, classes) = (
        cfg.num_tokens(),
        cfg.hidden_size,
        cfg.mlp_dim,
        cfg.num_heads,
        cfg.num_classes,
    );
    let dh = cfg.head_dim();
    let n = rows * t;
    let eps = cfg.layer_norm_eps as f32;
    let e = c.e();
    let train = c.masks.train;
    let rate = |p: f64| if train { p as f32 } else { 0.0 };
    let (p_hidden, p_out, p_probs) = (
        rate(cfg.dropout),
        rate(cfg.attention_output_dropout),
        rate(cfg.attention_dropout),
    );
    let DevicePlan {
        layers,
        cls,
        meanf,
        rstdf,
        dlogits,
        dcls,
        dres,
        cols,
        lnf,
        patches,
        tok,
        dlogits_t,
        ln,
        o,
        qkv_rows,
        h: hbuf,
        att,
        dy,
        dln,
        dattn,
        dq,
        dk,
        dv,
        dh: dhid,
        dp,
        keep_embed,
        ..
    } = plan;
    let k = c.k;

    // Classifier (f32 dlogits cast to T for the GEMMs) and the final LayerNorm.
    k.cast_from_f32::<T>(dlogits_t, &*dlogits)?;
    let mut dlnf = dln.slice_mut(..rows * d);
    linear_bwd(
        c,
        grads,
        cols,
        None,
        &*dlogits_t,
        &*lnf,
        &off.classifier,
        rows,
        d,
        classes,
    )?;
    {
        c.gemm.matmul::<T, T>(
            &RowGemm::new(rows, d, classes, false, false),
            &*dlogits_t,
            &c.compute(&off.classifier).weight,
            &mut dlnf,
            None,
            1.0,
            0.0,
        )?;
    }
    let lnf_w = c.master(&off.layernorm).weight;
    with_grads(grads, &off.layernorm, |g| {
        let (dw, stats) = ([g.weight, g.bias], [&*meanf, &*rstdf]);
        Ok(k.layernorm_bwd::<T>(
            dcls,
            dw,
            cols,
            &dlnf,
            &*cls,
            &lnf_w,
            stats,
            [rows, d],
            false,
        )?)
    })?;
    k.cls_scatter_grad(dres, &*dcls, [rows, t, d])?;
    let (f, b) = head_cost(cfg, rows, e);
    c.lap("head_bwd", (2.0 * f, 2.0 * b))?;
    release(off.layernorm.weight.start, &mut end, &mut cuts, ready)?;

    for l in (0..cfg.num_layers).rev() {
        let o_ = &off.layers[l];
        let master = c.master(o_);
        let acts = &mut layers[l];
        // x_{l+1} = mid + drop(fc2(h)),  h = drop(gelu(pre)),  pre = fc1(LN2(mid))
        k.dropout_grad::<T>(dy, &*dres, &acts.keep_out, p_hidden)?;
        c.lap("residual_bwd", cost::elementwise(n * d, 1, 1, e, 1.0, true))?;
        // h = mask ⊙ GELU(pre) again, from the recorded mask (no Philox).
        k.gelu_apply_keep::<T>(hbuf, &acts.pre, &acts.keep_hidden, p_hidden)?;
        c.lap(
            "gelu_dropout_bwd",
            cost::elementwise(n * m, 1, 1, e, 20.0, true),
        )?;
        linear_bwd(
            c,
            grads,
            cols,
            Some(&mut *dhid),
            &*dy,
            &*hbuf,
            &o_.output,
            n,
            m,
            d,
        )?;
        c.lap("mlp_gemm_bwd", cost::gemm_bwd(n, m, d, e, true))?;
        k.gelu_dropout_bwd_inplace::<T>(dhid, &acts.pre, &acts.keep_hidden, p_hidden)?;
        c.lap(
            "gelu_dropout_bwd",
            cost::elementwise(n * m, 2, 1, e, 25.0, true),
        )?;
        let (lw, stats) = (&master.layernorm_after, [&mut acts.mean2, &mut acts.rstd2]);
        k.layernorm_fwd::<T>(ln, stats, &acts.mid, [&lw.weight, &lw.bias], eps, [n, d])?;
        c.lap("layernorm_bwd", cost::layernorm(n, d, e))?;
        linear_bwd(
            c,
            grads,
            cols,
            Some(&mut *dln),
            &*dhid,
            &*ln,
            &o_.intermediate,
            n,
            d,
            m,
        )?;
        c.lap("mlp_gemm_bwd", cost::gemm_bwd(n, d, m, e, true))?;
        with_grads(grads, &o_.layernorm_after, |g| {
            let (dw, stats) = ([g.weight, g.bias], [&acts.mean2, &acts.rstd2]);
            let w = &master.layernorm_after.weight;
            Ok(k.layernorm_bwd::<T>(dres, dw, cols, &*dln, &acts.mid, w, stats, [n, d], true)?)
        })?;
        c.lap("layernorm_bwd", cost::layernorm_bwd(n, d, e))?;

        // mid = x + drop(out(attn)),  attn = merge(A·v),  A = drop(softmax(q·kᵀ/√Dh))
        k.dropout_grad::<T>(dy, &*dres, &acts.keep_attn_out, p_out)?;
        c.lap("residual_bwd", cost::elementwise(n * d, 1, 1, e, 1.0, true))?;
        linear_bwd(
            c,
            grads,
            cols,
            Some(&mut *dattn),
            &*dy,
            &acts.attn,
            &o_.attention_output,
            n,
            d,
            d,
        )?;
        c.lap("proj_gemm_bwd", cost::gemm_bwd(n, d, d, e, true))?;
        k.attn_split_grad::<T>(o, &*dattn, [rows, t, h, dh])?;
        let g = AttnShapes::new(cfg, rows);
        // A again (P ⊙ mask), or P itself without attention dropout.
        if p_probs > 0.0 {
            k.apply_keep::<T>(att, &acts.probs, &acts.keep_probs, p_probs)?;
        }
        {
            let a_src: &CudaSlice<T> = if p_probs > 0.0 { &*att } else { &acts.probs };
            // dv = Aᵀ·do
            c.gemm
                .matmul::<T, T>(&g.sx(true), a_src, &*o, dv, None, 1.0, 0.0)?;
        }
        // dA = do·vᵀ
        c.gemm
            .matmul::<T, T>(&g.qk(), &*o, &acts.v, dp, None, 1.0, 0.0)?;
        let scale = 1.0 / (dh as f32).sqrt();
        // dS (scale included) in place over dA.
        let (probs, keep, dims) = (&acts.probs, &acts.keep_probs, [rows, h, t, g.ld]);
        k.softmax_dropout_bwd_inplace_ld::<T>(dp, probs, keep, p_probs, scale, dims)?;
        // dq = dS·k,  dk = dSᵀ·q
        c.gemm
            .matmul::<T, T>(&g.sx(false), &*dp, &acts.k, dq, None, 1.0, 0.0)?;
        c.gemm
            .matmul::<T, T>(&g.sx(true), &*dp, &acts.q, dk, None, 1.0, 0.0)?;
        k.qkv_merge_grad::<T>(qkv_rows, [&*dq, &*dk, &*dv], [rows, t, h, dh])?;
        c.lap("attention_bwd", cost::attention_bwd(rows, h, t, dh, e))?;
        let (lw, stats) = (&master.layernorm_before, [&mut acts.mean1, &mut acts.rstd1]);
        k.layernorm_fwd::<T>(ln, stats, &acts.x, [&lw.weight, &lw.bias], eps, [n, d])?;
        c.lap("layernorm_bwd", cost::layernorm(n, d, e))?;
        linear_bwd(
            c,
            grads,
            cols,
            Some(&mut *dln),
            &*qkv_rows,
            &*ln,
            &o_.query_key_value,
            n,
            d,
            3 * d,
        )?;
        c.lap("qkv_gemm_bwd", cost::gemm_bwd(n, d, 3 * d, e, true))?;
        with_grads(grads, &o_.layernorm_before, |g| {
            let (dw, stats) = ([g.weight, g.bias], [&acts.mean1, &acts.rstd1]);
            let w = &master.layernorm_before.weight;
            Ok(k.layernorm_bwd::<T>(dres, dw, cols, &*dln, &acts.x, w, stats, [n, d], true)?)
        })?;
        c.lap("layernorm_bwd", cost::layernorm_bwd(n, d, e))?;
        release(o_.start(), &mut end, &mut cuts, ready)?;
    }

    // Embeddings: x0 = drop([cls; tok] + pos); tok = patches·Wᵀ + b.
    let g2 = t - 1;
    let emb = &off.embeddings;
    let (ct, pe) = (&emb.cls_token, &emb.position_embeddings);
    with_pair(grads, ct, pe, |dcls_p, dpos| {
        let keep = &*keep_embed;
        Ok(k.embed_bwd::<T>(tok, dcls_p, dpos, &*dres, keep, p_hidden, [rows, t, d])?)
    })?;
    let cpp = cfg.num_channels * cfg.patch_size * cfg.patch_size;
    linear_bwd(
        c,
        grads,
        cols,
        None,
        &*tok,
        &*patches,
        &emb.projection,
        rows * g2,
        cpp,
        d,
    )?;
    c.lap("patch_embed_bwd", embed_cost(cfg, rows, e))?;
    release(0, &mut end, &mut cuts, ready)?;
    // A cut never reached would leave its bucket unsummed on this rank: the ranks would
    // diverge silently.
    if !cuts.is_empty() {
        return Err(VitError::cuda(
            "CUDA backward",
            format!("gradient bucket cuts {cuts:?} are not block boundaries"),
        ));
    }
    Ok(())
}
