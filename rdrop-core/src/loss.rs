//! The R-Drop objective ([Liang et al. 2021](https://arxiv.org/abs/2106.14448), eq. 3).
//!
//! For the logits `p`, `q` (`(m, C)`) of two stochastic forward passes of the same `m`
//! samples, their log-probabilities `lp = log_softmax(p)`, `lq = log_softmax(q)`, and labels
//! `y` (`(m,)`, `u32`):
//!
//! ```text
//! CE(p, y)    = 1/m · Σ_i −lp[i, y_i]                         (label smoothing ε:
//!               (1−ε)·(−lp[i, y_i]) + ε · 1/C · Σ_c −lp[i, c]  inside the sum, as PyTorch)
//! KL_i(P‖Q)   = Σ_c P[i,c] · (lp[i,c] − lq[i,c])
//! KL_i(P‖Q) + KL_i(Q‖P) = Σ_c (P[i,c] − Q[i,c]) · (lp[i,c] − lq[i,c])   (symmetric KL)
//! ```
//!
//! Both modes have the form `loss = ce + α · kl`; [`LossParts`] returns `ce` and `kl` as defined
//! here so that they can be logged separately.
//!
//! **`mean`** (default; independent of micro-batch size and of gradient accumulation):
//! ```text
//! ce = ½ (CE(p,y) + CE(q,y))
//! kl = ½ · 1/m · Σ_i (KL_i(P‖Q) + KL_i(Q‖P))        (summed over classes, averaged over samples)
//! ```
//!
//! **`reference`** (the R-Drop ViT code, `models/modeling.py`, per micro-batch):
//! ```text
//! ce = CE(p,y) + CE(q,y)
//! kl = Σ_i (KL_i(P‖Q) + KL_i(Q‖P))                   (summed over samples AND classes)
//! ```
//! i.e. `F.cross_entropy(p, y) + F.cross_entropy(q, y) + α · (F.kl_div(log_softmax(p),
//! softmax(q), reduction='none').sum() + F.kl_div(log_softmax(q), softmax(p), reduction='none').sum())`.
//!
//! **Equivalence.** At micro-batch size `m`, since `Σ_i = m · mean_i`,
//! ```text
//! reference(α) = 2 · mean(α' = m · α)
//! ```
//! So the reference recipe (α = 0.3, micro-batch 32) is the `mean` objective with α' = 9.6,
//! scaled by 2. With gradient-norm clipping active (the recipe clips at 1.0), the factor 2 is
//! irrelevant once the norm exceeds the threshold; otherwise it doubles the effective learning
//! rate (plain and momentum SGD are linear in the gradient; weight decay then changes the
//! balance; AdamW is invariant to it up to ε). [`reference_to_mean`] and [`mean_to_reference`]
//! convert. In the reference code the strength of the KL term therefore changes with the
//! micro-batch size; in `mean` mode it does not.
//!
//! The authors' README shows a third normalisation, `0.5 · (CE_p + CE_q) + α · (Σ KL(P‖Q) +
//! Σ KL(Q‖P)) / 2` (KL summed over the micro-batch): that is exactly `mean(α' = m · α)`, with no
//! factor 2, so it is expressible as `mean` with `alpha = reference_to_mean(α, m).0`.
//!
//! With gradient accumulation over `A` micro-batches the trainer weights each micro-batch's
//! loss by `1/A` in `reference` mode (the reference's `loss / gradient_accumulation_steps`) and
//! by `n_j / Σ n` in `mean` mode, so a `mean` update is the mean over all of its samples.
//!
//! Everything is computed from log-softmax (no `log(0)`), and gradients flow through both
//! distributions (no detach), as in the reference code.

use candle_core::{DType, Result, Tensor, D};

/// One configuration for every implementation of the loss (this module on tensors, the
/// engines' kernels); defined beside the kernels, the lowest layer.
pub use rdrop_kernels::loss::{LossConfig, LossMode};

/// The loss and its two terms, as 0-dim tensors in the logits' dtype: `loss = ce + α · kl`.
#[derive(Debug, Clone)]
pub struct LossParts {
    /// The objective to differentiate.
    pub loss: Tensor,
    /// The cross-entropy term (see the module docs for each mode's definition).
    pub ce: Tensor,
    /// The symmetric KL term, before multiplication by α.
    pub kl: Tensor,
}

/// `(alpha', factor)` such that `reference(alpha) = factor · mean(alpha')` at micro-batch
/// size `m`: `alpha' = m · alpha`, `factor = 2`.
pub fn reference_to_mean(alpha: f64, micro_batch: usize) -> (f64, f64) {
    (alpha * micro_batch as f64, 2.0)
}

/// The inverse of [`reference_to_mean`]: the reference α whose objective at micro-batch `m`
/// is `2 · mean(alpha)`, i.e. `alpha / m`.
pub fn mean_to_reference(alpha: f64, micro_batch: usize) -> f64 {
    alpha / micro_batch.max(1) as f64
}

/// `log_softmax` over the last dimension, `(m, C) → (m, C)`. The max is subtracted as a
/// constant (detached), so the gradient is exactly `g − softmax · Σg` with no noise from the
/// max's own gradient path.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    diff.broadcast_sub(&lse)
}

/// Cross-entropy averaged over samples from log-probabilities `lp` `(m, C)` and labels `y`
/// `(m,)` (`u32`/`i64`), with PyTorch's label smoothing: returns a 0-dim tensor.
pub fn cross_entropy_from_log_probs(
    lp: &Tensor,
    y: &Tensor,
    label_smoothing: f64,
) -> Result<Tensor> {
    let (m, c) = lp.dims2()?;
    if y.dims() != [m] {
        candle_core::bail!("labels have shape {:?}, expected [{m}]", y.dims())
    }
    let picked = lp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?; // (m,)
    let nll = picked.neg()?;
    let per_sample = if label_smoothing > 0.0 {
        let smooth = lp.sum(D::Minus1)?.affine(-1.0 / c as f64, 0.0)?;
        (nll.affine(1.0 - label_smoothing, 0.0)? + smooth.affine(label_smoothing, 0.0)?)?
    } else {
        nll
    };
    per_sample.mean_all()
}

/// Mean cross-entropy of `logits (m, C)` against class indices `y (m,)` (`u32`/`i64`):
/// `mean_i(logsumexp(logits_i) − logits_i[y_i])`, a 0-dim tensor. The workspace's one
/// cross-entropy: the R-Drop loss, the model's tests and the evaluations all use it.
pub fn cross_entropy(logits: &Tensor, y: &Tensor) -> Result<Tensor> {
    cross_entropy_from_log_probs(&log_softmax(logits)?, y, 0.0)
}

/// Per-sample symmetric KL `KL_i(P‖Q) + KL_i(Q‖P) = Σ_c (P − Q)(lp − lq)`, `(m, C) → (m,)`.
pub fn symmetric_kl_per_sample(lp: &Tensor, lq: &Tensor) -> Result<Tensor> {
    let dp = (lp.exp()? - lq.exp()?)?;
    let dl = (lp - lq)?;
    (dp * dl)?.sum(D::Minus1)
}

/// The R-Drop loss for logits `p`, `q` `(m, C)` of two dropout passes and labels `y` `(m,)`.
/// Any float dtype; use f32 (or f64) logits. See the module docs for the formulas.
pub fn rdrop_loss(p: &Tensor, q: &Tensor, y: &Tensor, cfg: &LossConfig) -> Result<LossParts> {
    if p.dims() != q.dims() {
        candle_core::bail!(
            "R-Drop logits differ in shape: {:?} vs {:?}",
            p.dims(),
            q.dims()
        )
    }
    if !(0.0..1.0).contains(&cfg.label_smoothing) {
        candle_core::bail!(
            "label smoothing must be in [0, 1), got {}",
            cfg.label_smoothing
        )
    }
    let y = match y.dtype() {
        DType::U32 | DType::I64 => y.clone(),
        _ => y.to_dtype(DType::U32)?,
    };
    let lp = log_softmax(p)?;
    let lq = log_softmax(q)?;
    let ce_p = cross_entropy_from_log_probs(&lp, &y, cfg.label_smoothing)?;
    let ce_q = cross_entropy_from_log_probs(&lq, &y, cfg.label_smoothing)?;
    let skl = symmetric_kl_per_sample(&lp, &lq)?;
    let (ce, kl) = match cfg.mode {
        LossMode::Mean => (
            (ce_p + ce_q)?.affine(0.5, 0.0)?,
            skl.mean_all()?.affine(0.5, 0.0)?,
        ),
        LossMode::Reference => ((ce_p + ce_q)?, skl.sum_all()?),
    };
    let loss = (&ce + kl.affine(cfg.alpha, 0.0)?)?;
    Ok(LossParts { loss, ce, kl })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equivalence_reference_is_twice_mean_with_scaled_alpha() -> Result<()> {
        let dev = Device::Cpu;
        let m = 6;
        let p = Tensor::randn(0f64, 1.5, (m, 5), &dev)?;
        let q = Tensor::randn(0f64, 1.5, (m, 5), &dev)?;
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0], &dev)?;
        let r = rdrop_loss(
            &p,
            &q,
            &y,
            &LossConfig {
                alpha: 0.3,
                mode: LossMode::Reference,
                label_smoothing: 0.0,
            },
        )?;
        let (a2, f) = reference_to_mean(0.3, m);
        let mm = rdrop_loss(
            &p,
            &q,
            &y,
            &LossConfig {
                alpha: a2,
                mode: LossMode::Mean,
                label_smoothing: 0.0,
            },
        )?;
        let lr = r.loss.to_scalar::<f64>()?;
        let lm = mm.loss.to_scalar::<f64>()?;
        assert!((lr - f * lm).abs() < 1e-12, "{lr} vs {f}·{lm}");
        assert!((mean_to_reference(a2, m) - 0.3).abs() < 1e-15);
        Ok(())
    }

    #[test]
    fn identical_passes_have_zero_kl_and_plain_ce() -> Result<()> {
        let dev = Device::Cpu;
        let p = Tensor::new(&[[2.0f64, 0.0, -1.0], [0.5, 0.5, 3.0]], &dev)?;
        let y = Tensor::new(&[0u32, 2], &dev)?;
        let parts = rdrop_loss(&p, &p, &y, &LossConfig::default())?;
        assert!(parts.kl.to_scalar::<f64>()?.abs() < 1e-15);
        let lse0 = (2f64.exp() + 1.0 + (-1f64).exp()).ln();
        let lse1 = (2.0 * 0.5f64.exp() + 3f64.exp()).ln();
        let want = ((lse0 - 2.0) + (lse1 - 3.0)) / 2.0;
        assert!((parts.ce.to_scalar::<f64>()? - want).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn rejects_bad_shapes_and_smoothing() -> Result<()> {
        let dev = Device::Cpu;
        let p = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let q = Tensor::zeros((3, 3), DType::F32, &dev)?;
        let y = Tensor::new(&[0u32, 1], &dev)?;
        assert!(rdrop_loss(&p, &q, &y, &LossConfig::default()).is_err());
        let cfg = LossConfig {
            label_smoothing: 1.0,
            ..Default::default()
        };
        assert!(rdrop_loss(&p, &p, &y, &cfg).is_err());
        let y3 = Tensor::new(&[0u32, 1, 2], &dev)?;
        assert!(rdrop_loss(&p, &p, &y3, &LossConfig::default()).is_err());
        Ok(())
    }
}
