//! The engine's hand-derived backward (formulas in docs/engine.md and in each kernel's
//! documentation): from `∂loss/∂logits` in `plan.dlogits` to every parameter's gradient,
//! accumulated (`+=`) into the flat gradient buffer. The embedding, attention-output and MLP
//! dropout masks are the bytes the forward recorded; the attention-probability mask is
//! regenerated from its Philox key. LayerNorm outputs are recomputed from the saved input and
//! statistics; GELU's derivative is taken at the saved `pre`.

use rayon::prelude::*;
use rdrop_kernels::attention::attention_bwd;
use rdrop_kernels::dropout::{apply_keep, apply_keep_to};
use rdrop_kernels::gelu::gelu_bwd_inplace;
use rdrop_kernels::layernorm::{layernorm_bwd, layernorm_fwd};
use rdrop_kernels::linear::linear_bwd;

use rdrop_core::Stopwatch;

use super::cost;
use super::forward::{embed_cost, head_cost, Masks};
use super::params::Offsets;
use super::plan::{attn_dims, Plan};
use crate::config::ViTConfig;
use crate::sites;

/// Two disjoint mutable views `[a, a + na)` and `[b, b + nb)` of `g`, with `a + na <= b`.
fn pair(g: &mut [f32], a: usize, na: usize, b: usize, nb: usize) -> (&mut [f32], &mut [f32]) {
    let (lo, hi) = g.split_at_mut(b);
    (&mut lo[a..a + na], &mut hi[..nb])
}

/// The hidden dropout rate as the forward applied it (0 outside training).
fn hidden_p(cfg: &ViTConfig, masks: &Masks) -> f32 {
    if masks.train {
        cfg.dropout as f32
    } else {
        0.0
    }
}

/// The offsets at which [`backward`] has finished every gradient above, in order: the final
/// LayerNorm (classifier and final LayerNorm done), each block's first tensor from the last
/// block down, then 0 (`rdrop_core::FlatRDropModel::grad_ready_cuts`).
pub(crate) fn ready_cuts(off: &Offsets) -> Vec<usize> {
    let mut v = vec![off.lnf_w];
    v.extend(off.layers.iter().rev().map(|o| o.ln1_w));
    v.push(0);
    v
}

/// Hands `g[at..]` to `ready` when `at` is the next of `cuts`, keeping `g[..at]`: the backward
/// never writes above `at` again.
fn release<'g>(
    g: &mut &'g mut [f32],
    at: usize,
    cuts: &mut &[usize],
    ready: &mut dyn FnMut(&'g mut [f32]),
) {
    if cuts.first() == Some(&at) && at <= g.len() {
        let (lo, hi) = std::mem::take(g).split_at_mut(at);
        *g = lo;
        *cuts = &cuts[1..];
        ready(hi);
    }
}

/// Backward of the forward that filled `plan` (same `masks`), adding into `grads`. Each time it
/// passes one of `cuts` (a subset of [`ready_cuts`], in its order) it hands the finished
/// gradients above it, `grads[cut .. previous cut)`, to `ready` (data parallel: the all-reduce
/// of that bucket overlaps the rest of the backward).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<'g>(
    cfg: &ViTConfig,
    p: &[f32],
    grads: &'g mut [f32],
    off: &Offsets,
    plan: &mut Plan,
    masks: &Masks,
    mut cuts: &[usize],
    ready: &mut dyn FnMut(&'g mut [f32]),
    sw: &mut Stopwatch,
) {
    let lap = |sw: &mut Stopwatch, g: &str, (f, b): cost::Cost| sw.lap(g, f, b);
    let mut grads = grads;
    let rows = plan.rows;
    let (t, d, m, c) = (
        cfg.num_tokens(),
        cfg.hidden_size,
        cfg.mlp_dim,
        cfg.num_classes,
    );
    let n = rows * t;
    let eps = cfg.layer_norm_eps as f32;
    let td = t * d;
    let (h, dh) = (cfg.num_heads, cfg.head_dim());

    // Classifier and final LayerNorm (class rows only).
    {
        let (dw, db) = pair(grads, off.head_w, c * d, off.head_b, c);
        linear_bwd(
            Some(&mut plan.dcls),
            false,
            dw,
            Some(db),
            &plan.dlogits,
            &plan.lnf,
            &p[off.head_w..off.head_w + c * d],
            rows,
            d,
            c,
        );
        let dx = &mut plan.dtmp[..rows * d];
        dx.fill(0.0);
        let (dg, db) = pair(grads, off.lnf_w, d, off.lnf_b, d);
        layernorm_bwd(
            dx,
            dg,
            db,
            &mut plan.ln_scratch,
            &plan.dcls,
            &plan.cls,
            &plan.meanf,
            &plan.rstdf,
            &p[off.lnf_w..off.lnf_w + d],
            d,
        );
        plan.dres.fill(0.0);
        for (bi, row) in dx.chunks(d).enumerate() {
            plan.dres[bi * td..bi * td + d].copy_from_slice(row);
        }
    }
    let (f, b) = head_cost(cfg, rows, 4);
    sw.lap("head_bwd", 2.0 * f, 2.0 * b);
    release(&mut grads, off.lnf_w, &mut cuts, ready);

    for l in (0..cfg.num_layers).rev() {
        let o = &off.layers[l];
        let acts = &mut plan.layers[l];
        // x_{l+1} = mid + drop(fc2(h)),  h = drop(gelu(pre)),  pre = fc1(LN2(mid))
        let p_hidden = hidden_p(cfg, masks);
        apply_keep_to(&mut plan.dtmp, &plan.dres, &acts.keep_out, p_hidden);
        lap(
            sw,
            "residual_bwd",
            cost::elementwise(n * d, 1, 1, 4, 1.0, true),
        );
        let (dw, db) = pair(grads, o.fc2_w, d * m, o.fc2_b, d);
        linear_bwd(
            Some(&mut plan.dhidden),
            false,
            dw,
            Some(db),
            &plan.dtmp,
            &acts.h,
            &p[o.fc2_w..o.fc2_w + d * m],
            n,
            m,
            d,
        );
        lap(sw, "mlp_gemm_bwd", cost::gemm_bwd(n, m, d, 4, true));
        apply_keep(&mut plan.dhidden, &acts.keep_hidden, p_hidden);
        gelu_bwd_inplace(&mut plan.dhidden, &acts.pre);
        lap(
            sw,
            "gelu_dropout_bwd",
            cost::elementwise(n * m, 2, 1, 4, 25.0, true),
        );
        layernorm_fwd(
            &mut plan.ln,
            &mut acts.mean2,
            &mut acts.rstd2,
            &acts.mid,
            &p[o.ln2_w..o.ln2_w + d],
            &p[o.ln2_b..o.ln2_b + d],
            eps,
            d,
        );
        lap(sw, "layernorm_bwd", cost::layernorm(n, d, 4));
        let (dw, db) = pair(grads, o.fc1_w, m * d, o.fc1_b, m);
        linear_bwd(
            Some(&mut plan.dln),
            false,
            dw,
            Some(db),
            &plan.dhidden,
            &plan.ln,
            &p[o.fc1_w..o.fc1_w + m * d],
            n,
            d,
            m,
        );
        lap(sw, "mlp_gemm_bwd", cost::gemm_bwd(n, d, m, 4, true));
        let (dg, db) = pair(grads, o.ln2_w, d, o.ln2_b, d);
        layernorm_bwd(
            &mut plan.dres,
            dg,
            db,
            &mut plan.ln_scratch,
            &plan.dln,
            &acts.mid,
            &acts.mean2,
            &acts.rstd2,
            &p[o.ln2_w..o.ln2_w + d],
            d,
        );
        lap(sw, "layernorm_bwd", cost::layernorm_bwd(n, d, 4));

        // mid = x + drop(out(attn)),  attn = attention(qkv(LN1(x)))
        let p_out = if masks.train {
            cfg.attention_output_dropout as f32
        } else {
            0.0
        };
        apply_keep_to(&mut plan.dtmp, &plan.dres, &acts.keep_attn_out, p_out);
        lap(
            sw,
            "residual_bwd",
            cost::elementwise(n * d, 1, 1, 4, 1.0, true),
        );
        let (dw, db) = pair(grads, o.out_w, d * d, o.out_b, d);
        linear_bwd(
            Some(&mut plan.dattn),
            false,
            dw,
            Some(db),
            &plan.dtmp,
            &acts.attn,
            &p[o.out_w..o.out_w + d * d],
            n,
            d,
            d,
        );
        lap(sw, "proj_gemm_bwd", cost::gemm_bwd(n, d, d, 4, true));
        let probs_site = masks.site(sites::attention_probs(l as u32), cfg.attention_dropout);
        attention_bwd(
            &mut plan.dqkv,
            &mut plan.attn_scratch,
            &plan.dattn,
            &acts.qkv,
            &acts.probs,
            attn_dims(cfg, rows),
            probs_site.as_ref().map(|s| (s, masks.rows)),
        );
        lap(sw, "attention_bwd", cost::attention_bwd(rows, h, t, dh, 4));
        layernorm_fwd(
            &mut plan.ln,
            &mut acts.mean1,
            &mut acts.rstd1,
            &acts.x,
            &p[o.ln1_w..o.ln1_w + d],
            &p[o.ln1_b..o.ln1_b + d],
            eps,
            d,
        );
        lap(sw, "layernorm_bwd", cost::layernorm(n, d, 4));
        let (dw, db) = pair(grads, o.qkv_w, 3 * d * d, o.qkv_b, 3 * d);
        linear_bwd(
            Some(&mut plan.dln),
            false,
            dw,
            Some(db),
            &plan.dqkv,
            &plan.ln,
            &p[o.qkv_w..o.qkv_w + 3 * d * d],
            n,
            d,
            3 * d,
        );
        lap(sw, "qkv_gemm_bwd", cost::gemm_bwd(n, d, 3 * d, 4, true));
        let (dg, db) = pair(grads, o.ln1_w, d, o.ln1_b, d);
        layernorm_bwd(
            &mut plan.dres,
            dg,
            db,
            &mut plan.ln_scratch,
            &plan.dln,
            &acts.x,
            &acts.mean1,
            &acts.rstd1,
            &p[o.ln1_w..o.ln1_w + d],
            d,
        );
        lap(sw, "layernorm_bwd", cost::layernorm_bwd(n, d, 4));
        release(&mut grads, o.ln1_w, &mut cuts, ready);
    }

    // Embeddings: x0 = drop([cls; tok] + pos).
    apply_keep(&mut plan.dres, &plan.keep_embed, hidden_p(cfg, masks));
    let dres = &plan.dres;
    {
        // Σ over the batch in a fixed order (thread-count independent): split the (T·D)
        // columns, never the batch.
        let (dcls, dpos) = pair(grads, off.cls, d, off.pos, td);
        dpos.par_chunks_mut(1024)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let base = ci * 1024;
                for bi in 0..rows {
                    let src = &dres[bi * td + base..bi * td + base + chunk.len()];
                    for (g, s) in chunk.iter_mut().zip(src) {
                        *g += s;
                    }
                }
            });
        for bi in 0..rows {
            for (g, s) in dcls.iter_mut().zip(&dres[bi * td..bi * td + d]) {
                *g += s;
            }
        }
    }
    let g2 = t - 1;
    plan.tok
        .par_chunks_mut(g2 * d)
        .enumerate()
        .for_each(|(bi, tk)| tk.copy_from_slice(&dres[bi * td + d..(bi + 1) * td]));
    let cpp = cfg.num_channels * cfg.patch_size * cfg.patch_size;
    let (dw, db) = pair(grads, off.patch_w, d * cpp, off.patch_b, d);
    linear_bwd(
        None,
        false,
        dw,
        Some(db),
        &plan.tok,
        &plan.patches,
        &p[off.patch_w..off.patch_w + d * cpp],
        rows * g2,
        cpp,
        d,
    );
    let (f, b) = embed_cost(cfg, rows, 4);
    sw.lap("patch_embed_bwd", f, b);
    release(&mut grads, 0, &mut cuts, ready);
}
