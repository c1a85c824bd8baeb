//! The R-Drop objective and its gradient w.r.t. both passes' logits, in one pass over the rows,
//! exactly as `rdrop_core::loss` defines it (PyTorch's `F.cross_entropy` with label smoothing
//! and `F.kl_div`, checked against PyTorch fixtures).
//!
//! For logits `p`, `q` `(m, C)`, labels `y` `(m,)`, `lp = log_softmax(p)` (max subtracted),
//! `P = exp(lp)`, label smoothing `ε`, target `t = (1−ε)·onehot(y) + ε/C`:
//! ```text
//! ce_i(p) = Σ_c −t_c · lp_c                 ∂ce_i/∂p = P − t
//! D_i     = Σ_c (P_c − Q_c)(lp_c − lq_c)    ∂D_i/∂p = P ⊙ (lp − lq − KL(P‖Q)) + P − Q
//!                                           ∂D_i/∂q = Q ⊙ (lq − lp − KL(Q‖P)) + Q − P
//! Mean:      ce = 1/(2m) Σ_i (ce_i(p) + ce_i(q))     kl = 1/(2m) Σ_i D_i
//! Reference: ce = 1/m    Σ_i (ce_i(p) + ce_i(q))     kl = Σ_i D_i
//! loss = ce + α · kl
//! ```
//! Everything is computed in f64 (the logits are few); gradients are stored as f32.

/// How the terms are reduced over samples (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LossMode {
    /// `½(CE_p + CE_q) + α · ½ mean_i(KL_i(P‖Q) + KL_i(Q‖P))`.
    #[default]
    Mean,
    /// `CE_p + CE_q + α · Σ_i (KL_i(P‖Q) + KL_i(Q‖P))`, as the R-Drop ViT code.
    Reference,
}

/// Configuration of the R-Drop loss, for every implementation of it (this crate's CPU and CUDA
/// kernels, `rdrop_core::rdrop_loss` on tensors). `Default` is the paper's ViT recipe
/// (α = 0.3, `mean`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Weight α of the KL term (0 disables R-Drop's regulariser; the two passes still run).
    pub alpha: f64,
    /// Reduction convention.
    pub mode: LossMode,
    /// Label smoothing ε in `[0, 1)` (PyTorch's `F.cross_entropy(label_smoothing=ε)`).
    pub label_smoothing: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            alpha: 0.3,
            mode: LossMode::Mean,
            label_smoothing: 0.0,
        }
    }
}

/// The loss and its two terms: `loss = ce + α · kl` (definitions in the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossValue {
    /// The objective.
    pub loss: f64,
    /// The cross-entropy term.
    pub ce: f64,
    /// The symmetric KL term before multiplication by α.
    pub kl: f64,
}

/// Bad input to [`rdrop_loss`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LossError {
    /// A label is not a class index.
    #[error("R-Drop loss: label {label} of sample {sample} is not below the {classes} classes")]
    LabelOutOfRange {
        /// Sample index.
        sample: usize,
        /// The label.
        label: u32,
        /// Number of classes.
        classes: usize,
    },
    /// Label smoothing outside `[0, 1)`.
    #[error("R-Drop loss: label smoothing must be in [0, 1), got {0}")]
    BadLabelSmoothing(f64),
}

fn validate(labels: &[u32], classes: usize, cfg: &LossConfig) -> Result<(), LossError> {
    if !(0.0..1.0).contains(&cfg.label_smoothing) {
        return Err(LossError::BadLabelSmoothing(cfg.label_smoothing));
    }
    if let Some((sample, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        return Err(LossError::LabelOutOfRange {
            sample,
            label,
            classes,
        });
    }
    Ok(())
}

/// `(max, log Σ exp(x − max))` of a row, in f64.
#[inline]
fn max_lse(x: &[f32]) -> (f64, f64) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    (max, z.ln())
}

/// The R-Drop loss of logits `p`, `q` `(m, C)` and `labels` `(m,)`; writes
/// `dp = weight · ∂loss/∂p` and `dq = weight · ∂loss/∂q` `(m, C)` (overwritten).
///
/// # Errors
/// [`LossError`] if a label is `≥ classes` or the label smoothing is outside `[0, 1)`
/// (nothing is written then).
///
/// # Panics
/// If `classes == 0` or the buffers are not `(m, C)` / `(m,)`.
#[allow(clippy::too_many_arguments)]
pub fn rdrop_loss(
    dp: &mut [f32],
    dq: &mut [f32],
    p: &[f32],
    q: &[f32],
    labels: &[u32],
    classes: usize,
    cfg: &LossConfig,
    weight: f32,
) -> Result<LossValue, LossError> {
    check(dp, dq, p, q, labels, classes);
    validate(labels, classes, cfg)?;
    let (m, c) = (labels.len(), classes);
    let (ce_w, kl_w) = weights(m, cfg);
    let eps = cfg.label_smoothing;
    let (mut ce_sum, mut kl_sum) = (0f64, 0f64);
    let w = weight as f64;
    for (i, &y) in labels.iter().enumerate() {
        let r = i * c..(i + 1) * c;
        let (pr, qr) = (&p[r.clone()], &q[r.clone()]);
        let (pm, pl) = max_lse(pr);
        let (qm, ql) = max_lse(qr);
        // Pass 1: the row's CE terms and KL(P‖Q), KL(Q‖P).
        let (mut kl_pq, mut kl_qp, mut sum_lp, mut sum_lq) = (0f64, 0f64, 0f64, 0f64);
        for (&a, &b) in pr.iter().zip(qr) {
            let lp = a as f64 - pm - pl;
            let lq = b as f64 - qm - ql;
            kl_pq += lp.exp() * (lp - lq);
            kl_qp += lq.exp() * (lq - lp);
            sum_lp += lp;
            sum_lq += lq;
        }
        let y = y as usize;
        let lp_y = pr[y] as f64 - pm - pl;
        let lq_y = qr[y] as f64 - qm - ql;
        let smooth = eps / c as f64;
        ce_sum += (1.0 - eps) * -(lp_y + lq_y) - smooth * (sum_lp + sum_lq);
        kl_sum += kl_pq + kl_qp;
        // Pass 2: the gradients.
        let (gp, gq) = (&mut dp[r.clone()], &mut dq[r]);
        for (j, (((&a, &b), gp), gq)) in pr.iter().zip(qr).zip(gp).zip(gq).enumerate() {
            let lp = a as f64 - pm - pl;
            let lq = b as f64 - qm - ql;
            let (pp, qq) = (lp.exp(), lq.exp());
            let t = if j == y { 1.0 - eps + smooth } else { smooth };
            let dd_p = pp * (lp - lq - kl_pq) + pp - qq;
            let dd_q = qq * (lq - lp - kl_qp) + qq - pp;
            *gp = (w * (ce_w * (pp - t) + cfg.alpha * kl_w * dd_p)) as f32;
            *gq = (w * (ce_w * (qq - t) + cfg.alpha * kl_w * dd_q)) as f32;
        }
    }
    let (ce, kl) = (ce_w * ce_sum, kl_w * kl_sum);
    Ok(LossValue {
        loss: ce + cfg.alpha * kl,
        ce,
        kl,
    })
}

/// The per-sample weights of `Σ_i (ce_i(p) + ce_i(q))` and `Σ_i D_i`.
fn weights(m: usize, cfg: &LossConfig) -> (f64, f64) {
    let m = m.max(1) as f64;
    match cfg.mode {
        LossMode::Mean => (0.5 / m, 0.5 / m),
        LossMode::Reference => (1.0 / m, 1.0),
    }
}

fn check(dp: &[f32], dq: &[f32], p: &[f32], q: &[f32], labels: &[u32], classes: usize) {
    assert!(classes > 0, "R-Drop loss: no classes");
    let n = labels.len() * classes;
    assert!(
        dp.len() == n && dq.len() == n && p.len() == n && q.len() == n,
        "R-Drop loss: buffers are not (m, C) with m = labels.len()"
    );
}

/// Plain twin of [`rdrop_loss`]: builds `log_softmax`, CE and KL term by term (PyTorch's
/// formulation: `F.cross_entropy` + `F.kl_div`) and the gradient as the sum of each term's.
///
/// # Errors
/// As [`rdrop_loss`].
///
/// # Panics
/// As [`rdrop_loss`].
#[allow(clippy::too_many_arguments)]
pub fn rdrop_loss_reference(
    dp: &mut [f32],
    dq: &mut [f32],
    p: &[f32],
    q: &[f32],
    labels: &[u32],
    classes: usize,
    cfg: &LossConfig,
    weight: f32,
) -> Result<LossValue, LossError> {
    check(dp, dq, p, q, labels, classes);
    validate(labels, classes, cfg)?;
    let (m, c) = (labels.len(), classes);
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let max = x
            .iter()
            .map(|&v| v as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        x.iter().map(|&v| v as f64 - max - lse).collect()
    };
    let eps = cfg.label_smoothing;
    let (mut ce_p, mut ce_q, mut skl) = (0.0, 0.0, 0.0);
    let mut gce_p = vec![0.0; m * c];
    let mut gce_q = vec![0.0; m * c];
    let mut gkl_p = vec![0.0; m * c];
    let mut gkl_q = vec![0.0; m * c];
    for i in 0..m {
        let lp = log_softmax(&p[i * c..(i + 1) * c]);
        let lq = log_softmax(&q[i * c..(i + 1) * c]);
        let pp: Vec<f64> = lp.iter().map(|v| v.exp()).collect();
        let qq: Vec<f64> = lq.iter().map(|v| v.exp()).collect();
        let target: Vec<f64> = (0..c)
            .map(|j| (1.0 - eps) * f64::from(j == labels[i] as usize) + eps / c as f64)
            .collect();
        for j in 0..c {
            ce_p -= target[j] * lp[j];
            ce_q -= target[j] * lq[j];
            // F.kl_div(lp, Q) + F.kl_div(lq, P) = Σ Q (lq − lp) + P (lp − lq)
            skl += qq[j] * (lq[j] - lp[j]) + pp[j] * (lp[j] - lq[j]);
        }
        let kpq: f64 = (0..c).map(|j| pp[j] * (lp[j] - lq[j])).sum();
        let kqp: f64 = (0..c).map(|j| qq[j] * (lq[j] - lp[j])).sum();
        for j in 0..c {
            gce_p[i * c + j] = pp[j] - target[j];
            gce_q[i * c + j] = qq[j] - target[j];
            gkl_p[i * c + j] = pp[j] * (lp[j] - lq[j] - kpq) + pp[j] - qq[j];
            gkl_q[i * c + j] = qq[j] * (lq[j] - lp[j] - kqp) + qq[j] - pp[j];
        }
    }
    let mf = m.max(1) as f64;
    let (ce, kl, ce_w, kl_w) = match cfg.mode {
        LossMode::Mean => (
            0.5 * (ce_p / mf + ce_q / mf),
            0.5 * skl / mf,
            0.5 / mf,
            0.5 / mf,
        ),
        LossMode::Reference => (ce_p / mf + ce_q / mf, skl, 1.0 / mf, 1.0),
    };
    let w = weight as f64;
    for k in 0..m * c {
        dp[k] = (w * (ce_w * gce_p[k] + cfg.alpha * kl_w * gkl_p[k])) as f32;
        dq[k] = (w * (ce_w * gce_q[k] + cfg.alpha * kl_w * gkl_q[k])) as f32;
    }
    Ok(LossValue {
        loss: ce + cfg.alpha * kl,
        ce,
        kl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn matrix(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect()
    }

    type LossFn = fn(
        &mut [f32],
        &mut [f32],
        &[f32],
        &[f32],
        &[u32],
        usize,
        &LossConfig,
        f32,
    ) -> Result<LossValue, LossError>;

    /// PyTorch's values and logit gradients (`rdrop-core/tests/fixtures/loss.json`, from
    /// `scripts/gen_core_fixtures.py`), for both the fast kernel and its twin.
    #[test]
    fn matches_pytorch_fixture() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../rdrop-core/tests/fixtures/loss.json"
        );
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let p: Vec<f32> = matrix(&doc["p"]).iter().map(|&v| v as f32).collect();
        let q: Vec<f32> = matrix(&doc["q"]).iter().map(|&v| v as f32).collect();
        let y: Vec<u32> = doc["y"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let (m, c) = (y.len(), p.len() / y.len());
        let cases = doc["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 4);
        for f in [rdrop_loss as LossFn, rdrop_loss_reference as LossFn] {
            for case in cases {
                let cfg = LossConfig {
                    alpha: case["alpha"].as_f64().unwrap(),
                    mode: match case["mode"].as_str().unwrap() {
                        "mean" => LossMode::Mean,
                        _ => LossMode::Reference,
                    },
                    label_smoothing: case["label_smoothing"].as_f64().unwrap(),
                };
                let weight = 0.75f32;
                let mut dp = vec![f32::NAN; m * c];
                let mut dq = vec![f32::NAN; m * c];
                let v = f(&mut dp, &mut dq, &p, &q, &y, c, &cfg, weight).unwrap();
                for (name, got) in [("loss", v.loss), ("ce", v.ce), ("kl", v.kl)] {
                    let want = case[name].as_f64().unwrap();
                    assert!((got - want).abs() < 1e-6, "{cfg:?} {name}: {got} vs {want}");
                }
                for (name, got) in [("grad_p", &dp), ("grad_q", &dq)] {
                    let want = matrix(&case[name]);
                    let d = got
                        .iter()
                        .zip(&want)
                        .map(|(&g, &w)| (g as f64 - weight as f64 * w).abs())
                        .fold(0.0, f64::max);
                    assert!(d < 1e-6, "{cfg:?} {name}: max |diff| {d}");
                }
            }
        }
    }

    /// Central differences of the loss value w.r.t. each logit (f64 inside; logits shifted
    /// by exactly representable steps).
    #[test]
    fn gradient_matches_finite_differences() {
        let (m, c) = (3, 5);
        let p: Vec<f32> = (0..m * c)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let q: Vec<f32> = (0..m * c)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.25)
            .collect();
        let y = [1u32, 4, 0];
        for mode in [LossMode::Mean, LossMode::Reference] {
            let cfg = LossConfig {
                alpha: 0.7,
                mode,
                label_smoothing: 0.1,
            };
            let (mut dp, mut dq) = (vec![0f32; m * c], vec![0f32; m * c]);
            rdrop_loss(&mut dp, &mut dq, &p, &q, &y, c, &cfg, 1.0).unwrap();
            let value = |p: &[f32], q: &[f32]| {
                let (mut a, mut b) = (vec![0f32; m * c], vec![0f32; m * c]);
                rdrop_loss(&mut a, &mut b, p, q, &y, c, &cfg, 1.0)
                    .unwrap()
                    .loss
            };
            let h = 1.0 / 1024.0;
            for k in 0..m * c {
                for (which, g) in [(0, &dp), (1, &dq)] {
                    let (mut pu, mut qu) = (p.clone(), q.clone());
                    let (mut pd, mut qd) = (p.clone(), q.clone());
                    if which == 0 {
                        pu[k] += h;
                        pd[k] -= h;
                    } else {
                        qu[k] += h;
                        qd[k] -= h;
                    }
                    let fd = (value(&pu, &qu) - value(&pd, &qd)) / (2.0 * h as f64);
                    assert!(
                        (fd - g[k] as f64).abs() < 2e-6,
                        "{mode:?} {which} {k}: fd {fd} vs {}",
                        g[k]
                    );
                }
            }
        }
    }

    #[test]
    fn bad_labels_and_smoothing_are_errors() {
        let (p, mut d1, mut d2) = (vec![0f32; 6], vec![0f32; 6], vec![0f32; 6]);
        let cfg = LossConfig {
            alpha: 0.3,
            mode: LossMode::Mean,
            label_smoothing: 0.0,
        };
        let e = rdrop_loss(&mut d1, &mut d2, &p, &p, &[0, 3], 3, &cfg, 1.0).unwrap_err();
        assert_eq!(
            e,
            LossError::LabelOutOfRange {
                sample: 1,
                label: 3,
                classes: 3
            }
        );
        let bad = LossConfig {
            label_smoothing: 1.0,
            ..cfg
        };
        assert!(matches!(
            rdrop_loss(&mut d1, &mut d2, &p, &p, &[0, 1], 3, &bad, 1.0),
            Err(LossError::BadLabelSmoothing(_))
        ));
        // Identical passes: zero KL, gradients of the two passes equal.
        let v = rdrop_loss(&mut d1, &mut d2, &p, &p, &[0, 2], 3, &cfg, 1.0).unwrap();
        assert_eq!(v.kl, 0.0);
        assert!((v.ce - 3f64.ln()).abs() < 1e-12);
        assert_eq!(d1, d2);
    }
}
