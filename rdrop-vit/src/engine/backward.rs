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
use super::params::{Layer, Offsets, Tensors};
use super::plan::{attn_dims, Plan};
use crate::config::ViTConfig;
use crate::sites;

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
    let mut v = vec![off.layernorm.weight.start];
    v.extend(off.layers.iter().rev().map(Layer::start));
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
        let (w, g) = (off.classifier.view(p), off.classifier.view_mut(grads));
        linear_bwd(
            Some(&mut plan.dcls),
            false,
            g.weight,
            Some(g.bias),
            &plan.dlogits,
            &plan.lnf,
            w.weight,
            rows,
            d,
            c,
        );
        let dx = &mut plan.dtmp[..rows * d];
        dx.fill(0.0);
        let (w, g) = (off.layernorm.view(p), off.layernorm.view_mut(grads));
        layernorm_bwd(
            dx,
            g.weight,
            g.bias,
            &mut plan.ln_scratch,
            &plan.dcls,
            &plan.cls,
            &plan.meanf,
            &plan.rstdf,
            w.weight,
            d,
        );
        plan.dres.fill(0.0);
        for (bi, row) in dx.chunks(d).enumerate() {
            plan.dres[bi * td..bi * td + d].copy_from_slice(row);
        }
    }
    let (f, b) = head_cost(cfg, rows, 4);
    sw.lap("head_bwd", 2.0 * f, 2.0 * b);
    release(&mut grads, off.layernorm.weight.start, &mut cuts, ready);

    for l in (0..cfg.num_layers).rev() {
        let o = &off.layers[l];
        let (w, g) = (o.view(p), o.view_mut(grads));
        let acts = &mut plan.layers[l];
        // x_{l+1} = mid + drop(fc2(h)),  h = drop(gelu(pre)),  pre = fc1(LN2(mid))
        let p_hidden = hidden_p(cfg, masks);
        apply_keep_to(&mut plan.dtmp, &plan.dres, &acts.keep_out, p_hidden);
        lap(
            sw,
            "residual_bwd",
            cost::elementwise(n * d, 1, 1, 4, 1.0, true),
        );
        linear_bwd(
            Some(&mut plan.dhidden),
            false,
            g.output.weight,
            Some(g.output.bias),
            &plan.dtmp,
            &acts.h,
            w.output.weight,
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
            w.layernorm_after.weight,
            w.layernorm_after.bias,
            eps,
            d,
        );
        lap(sw, "layernorm_bwd", cost::layernorm(n, d, 4));
        linear_bwd(
            Some(&mut plan.dln),
            false,
            g.intermediate.weight,
            Some(g.intermediate.bias),
            &plan.dhidden,
            &plan.ln,
            w.intermediate.weight,
            n,
            d,
            m,
        );
        lap(sw, "mlp_gemm_bwd", cost::gemm_bwd(n, d, m, 4, true));
        layernorm_bwd(
            &mut plan.dres,
            g.layernorm_after.weight,
            g.layernorm_after.bias,
            &mut plan.ln_scratch,
            &plan.dln,
            &acts.mid,
            &acts.mean2,
            &acts.rstd2,
            w.layernorm_after.weight,
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
        linear_bwd(
            Some(&mut plan.dattn),
            false,
            g.attention_output.weight,
            Some(g.attention_output.bias),
            &plan.dtmp,
            &acts.attn,
            w.attention_output.weight,
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
            w.layernorm_before.weight,
            w.layernorm_before.bias,
            eps,
            d,
        );
        lap(sw, "layernorm_bwd", cost::layernorm(n, d, 4));
        linear_bwd(
            Some(&mut plan.dln),
            false,
            g.query_key_value.weight,
            Some(g.query_key_value.bias),
            &plan.dqkv,
            &plan.ln,
            w.query_key_value.weight,
            n,
            d,
            3 * d,
        );
        lap(sw, "qkv_gemm_bwd", cost::gemm_bwd(n, d, 3 * d, 4, true));
        layernorm_bwd(
            &mut plan.dres,
            g.layernorm_before.weight,
            g.layernorm_before.bias,
            &mut plan.ln_scratch,
            &plan.dln,
            &acts.x,
            &acts.mean1,
            &acts.rstd1,
            w.layernorm_before.weight,
            d,
        );
        lap(sw, "layernorm_bwd", cost::layernorm_bwd(n, d, 4));
        release(&mut grads, o.start(), &mut cuts, ready);
    }

    // Embeddings: x0 = drop([cls; tok] + pos).
    apply_keep(&mut plan.dres, &plan.keep_embed, hidden_p(cfg, masks));
    let dres = &plan.dres;
    let (w, g) = (off.embeddings.view(p), off.embeddings.view_mut(grads));
    {
        // Σ over the batch in a fixed order (thread-count independent): split the (T·D)
        // columns, never the batch.
        let (dcls, dpos) = (g.cls_token, g.position_embeddings);
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
    linear_bwd(
        None,
        false,
        g.projection.weight,
        Some(g.projection.bias),
        &plan.tok,
        &plan.patches,
        w.projection.weight,
        rows * g2,
        cpp,
        d,
    );
    let (f, b) = embed_cost(cfg, rows, 4);
    sw.lap("patch_embed_bwd", f, b);
    release(&mut grads, 0, &mut cuts, ready);
}
