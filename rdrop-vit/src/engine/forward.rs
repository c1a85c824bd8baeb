//! The engine's forward: patch embedding, class token and position embeddings, `L` pre-LN
//! blocks, the final LayerNorm of the class tokens and the classifier, over planned buffers.
//! The arithmetic follows the autograd model (`crate::model`) op for op.

use rayon::prelude::*;
use rdrop_kernels::attention::attention_fwd;
use rdrop_kernels::dropout::{dropout_apply_keep, residual_dropout_add_keep, RowKey, Site};
use rdrop_kernels::layernorm::layernorm_fwd;
use rdrop_kernels::linear::{linear_fwd, linear_gelu_fwd};
use rdrop_kernels::patch::im2col;

use rdrop_core::Stopwatch;

use super::cost;
use super::params::{Embeddings, Layer, Offsets, Tensors};
use super::plan::{attn_dims, LayerActs, Plan};
use crate::config::ViTConfig;
use crate::sites;

/// Where the dropout masks of a forward come from (`None` sites: no dropout there).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Masks<'a> {
    pub seed: u64,
    pub update: u32,
    pub rows: &'a [RowKey],
    pub train: bool,
}

impl Masks<'_> {
    /// The site `s` with rate `p`, or `None` when it drops nothing.
    pub fn site(&self, s: u32, p: f64) -> Option<Site> {
        (self.train && p > 0.0).then_some(Site {
            seed: self.seed,
            update: self.update,
            site: s,
            p: p as f32,
        })
    }
}

/// `res += y`, or `res += mask ⊙ y` at a dropout site (recording the mask in `keep`).
pub(crate) fn residual_add(
    res: &mut [f32],
    keep: &mut [u8],
    y: &[f32],
    n: usize,
    site: Option<Site>,
    rows: &[RowKey],
) {
    match site {
        Some(s) => residual_dropout_add_keep(res, keep, y, n, &s, rows),
        None => res
            .par_chunks_mut(n.max(1))
            .zip(y.par_chunks(n.max(1)))
            .for_each(|(r, y)| r.iter_mut().zip(y).for_each(|(r, y)| *r += y)),
    }
}

/// Embeddings into `out` `(B, T, D)`: `[cls; patches·Wᵀ + b] + pos`, then dropout.
/// `plan.patches` must already hold the im2col rows of the `B` images.
pub(crate) fn embed(cfg: &ViTConfig, w: &Embeddings<&[f32]>, plan: &mut Plan, masks: &Masks) {
    let (b, t, d) = (plan.rows, cfg.num_tokens(), cfg.hidden_size);
    let g2 = t - 1;
    let cpp = cfg.num_channels * cfg.patch_size * cfg.patch_size;
    linear_fwd(
        &mut plan.tok,
        &plan.patches,
        w.projection.weight,
        Some(w.projection.bias),
        b * g2,
        cpp,
        d,
    );
    let (cls, pos) = (w.cls_token, w.position_embeddings);
    let Plan {
        layers,
        x_out,
        keep_embed,
        tok,
        ..
    } = plan;
    let out: &mut [f32] = match layers.first_mut() {
        Some(l) => &mut l.x,
        None => x_out,
    };
    let tok = &*tok;
    out.par_chunks_mut(t * d).enumerate().for_each(|(bi, x)| {
        for (j, v) in x[..d].iter_mut().enumerate() {
            *v = cls[j] + pos[j];
        }
        let src = &tok[bi * g2 * d..(bi + 1) * g2 * d];
        for ((v, s), q) in x[d..].iter_mut().zip(src).zip(&pos[d..]) {
            *v = s + q;
        }
    });
    if let Some(s) = masks.site(sites::EMBEDDINGS, cfg.dropout) {
        dropout_apply_keep(out, keep_embed, t * d, &s, masks.rows);
    }
}

/// The profile's charge for the patch embedding of `b` rows (im2col, the GEMM, class token,
/// positions and dropout; element width `e`).
pub(crate) fn embed_cost(cfg: &ViTConfig, b: usize, e: usize) -> cost::Cost {
    let (t, d) = (cfg.num_tokens(), cfg.hidden_size);
    let cpp = cfg.num_channels * cfg.patch_size * cfg.patch_size;
    let (f, by) = cost::gemm(b * (t - 1), cpp, d, e);
    let (f2, by2) = cost::elementwise(b * t * d, 2, 1, 4, 2.0, true);
    (f + f2, by + by2 + (b * (t - 1) * cpp * 4) as f64)
}

/// One block: `acts.x` → `out` (both `(B, T, D)`), saving what the backward needs in `acts`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block(
    cfg: &ViTConfig,
    l: usize,
    w: &Layer<&[f32]>,
    acts: &mut LayerActs,
    out: &mut [f32],
    ln: &mut [f32],
    proj: &mut [f32],
    rows: usize,
    masks: &Masks,
    sw: &mut Stopwatch,
) {
    let (t, d, m) = (cfg.num_tokens(), cfg.hidden_size, cfg.mlp_dim);
    let n = rows * t;
    let eps = cfg.layer_norm_eps as f32;
    let lap = |sw: &mut Stopwatch, g: &str, (f, b): cost::Cost| sw.lap(g, f, b);
    let (h, dh) = (cfg.num_heads, cfg.head_dim());
    layernorm_fwd(
        ln,
        &mut acts.mean1,
        &mut acts.rstd1,
        &acts.x,
        w.layernorm_before.weight,
        w.layernorm_before.bias,
        eps,
        d,
    );
    lap(sw, "layernorm", cost::layernorm(n, d, 4));
    linear_fwd(
        &mut acts.qkv,
        ln,
        w.query_key_value.weight,
        Some(w.query_key_value.bias),
        n,
        d,
        3 * d,
    );
    lap(sw, "qkv_gemm", cost::gemm(n, d, 3 * d, 4));
    let probs_site = masks.site(sites::attention_probs(l as u32), cfg.attention_dropout);
    attention_fwd(
        &mut acts.attn,
        &mut acts.probs,
        &acts.qkv,
        attn_dims(cfg, rows),
        probs_site.as_ref().map(|s| (s, masks.rows)),
    );
    lap(sw, "attention", cost::attention(rows, h, t, dh, 4));
    linear_fwd(
        proj,
        &acts.attn,
        w.attention_output.weight,
        Some(w.attention_output.bias),
        n,
        d,
        d,
    );
    lap(sw, "proj_gemm", cost::gemm(n, d, d, 4));
    acts.mid.copy_from_slice(&acts.x);
    let s = masks.site(
        sites::attention_output(l as u32),
        cfg.attention_output_dropout,
    );
    residual_add(
        &mut acts.mid,
        &mut acts.keep_attn_out,
        proj,
        t * d,
        s,
        masks.rows,
    );
    lap(sw, "residual", cost::elementwise(n * d, 3, 1, 4, 2.0, true));

    layernorm_fwd(
        ln,
        &mut acts.mean2,
        &mut acts.rstd2,
        &acts.mid,
        w.layernorm_after.weight,
        w.layernorm_after.bias,
        eps,
        d,
    );
    lap(sw, "layernorm", cost::layernorm(n, d, 4));
    linear_gelu_fwd(
        &mut acts.pre,
        &mut acts.h,
        ln,
        w.intermediate.weight,
        w.intermediate.bias,
        n,
        d,
        m,
    );
    // GELU runs in the GEMM's epilogue here: its time is the GEMM's, its work is counted
    // with the dropout.
    lap(sw, "mlp_gemm", cost::gemm(n, d, m, 4));
    if let Some(s) = masks.site(sites::mlp_hidden(l as u32), cfg.dropout) {
        dropout_apply_keep(&mut acts.h, &mut acts.keep_hidden, t * m, &s, masks.rows);
    }
    lap(
        sw,
        "gelu_dropout",
        cost::elementwise(n * m, 1, 2, 4, 20.0, true),
    );
    linear_fwd(proj, &acts.h, w.output.weight, Some(w.output.bias), n, m, d);
    lap(sw, "mlp_gemm", cost::gemm(n, m, d, 4));
    out.copy_from_slice(&acts.mid);
    let s = masks.site(sites::mlp_output(l as u32), cfg.dropout);
    residual_add(out, &mut acts.keep_out, proj, t * d, s, masks.rows);
    lap(sw, "residual", cost::elementwise(n * d, 3, 1, 4, 2.0, true));
}

/// The whole forward of `plan.rows` rows: logits in `plan.logits`. `img` holds the images
/// `(B, C, S, S)`, or with `duplicate` only the first half of them (R-Drop's `[x; x]`: the
/// second half's patch rows are copied). A plan with fewer layer slots than the model
/// (inference) reuses slot 0 for every block. Each op group ends a lap of `sw`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    cfg: &ViTConfig,
    p: &[f32],
    off: &Offsets,
    plan: &mut Plan,
    img: &[f32],
    duplicate: bool,
    masks: &Masks,
    sw: &mut Stopwatch,
) {
    let rows = plan.rows;
    let (t, d, c) = (cfg.num_tokens(), cfg.hidden_size, cfg.num_classes);
    let images = if duplicate { rows / 2 } else { rows };
    let half = images * (t - 1) * cfg.num_channels * cfg.patch_size * cfg.patch_size;
    im2col(
        &mut plan.patches[..half],
        img,
        images,
        cfg.num_channels,
        cfg.image_size,
        cfg.patch_size,
    );
    if duplicate {
        let (a, b) = plan.patches.split_at_mut(half);
        b.copy_from_slice(a);
    }
    embed(cfg, &off.embeddings.view(p), plan, masks);
    let (f, b) = embed_cost(cfg, rows, 4);
    sw.lap("patch_embed", f, b);
    let nl = cfg.num_layers;
    let slots = plan.layers.len();
    for l in 0..nl {
        let Plan {
            layers,
            x_out,
            ln,
            proj,
            ..
        } = plan;
        if slots == nl {
            let (head, tail) = layers.split_at_mut(l + 1);
            let out: &mut [f32] = match tail.first_mut() {
                Some(next) => &mut next.x,
                None => x_out,
            };
            block(
                cfg,
                l,
                &off.layers[l].view(p),
                &mut head[l],
                out,
                ln,
                proj,
                rows,
                masks,
                sw,
            );
        } else {
            block(
                cfg,
                l,
                &off.layers[l].view(p),
                &mut layers[0],
                x_out,
                ln,
                proj,
                rows,
                masks,
                sw,
            );
            if l + 1 < nl {
                layers[0].x.copy_from_slice(x_out);
            }
        }
    }
    let (lnf, head) = (off.layernorm.view(p), off.classifier.view(p));
    for (bi, row) in plan.cls.chunks_mut(d).enumerate() {
        row.copy_from_slice(&plan.x_out[bi * t * d..bi * t * d + d]);
    }
    layernorm_fwd(
        &mut plan.lnf,
        &mut plan.meanf,
        &mut plan.rstdf,
        &plan.cls,
        lnf.weight,
        lnf.bias,
        cfg.layer_norm_eps as f32,
        d,
    );
    linear_fwd(
        &mut plan.logits,
        &plan.lnf,
        head.weight,
        Some(head.bias),
        rows,
        d,
        c,
    );
    let (f, b) = head_cost(cfg, rows, 4);
    sw.lap("head", f, b);
}

/// The profile's charge for the head of `b` rows: the final LayerNorm of the class rows and
/// the classifier.
pub(crate) fn head_cost(cfg: &ViTConfig, b: usize, e: usize) -> cost::Cost {
    let (d, c) = (cfg.hidden_size, cfg.num_classes);
    let (f, by) = cost::layernorm(b, d, e);
    let (f2, by2) = cost::gemm(b, d, c, e);
    (f + f2, by + by2)
}
