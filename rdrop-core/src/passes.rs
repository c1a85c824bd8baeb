//! The two stochastic forward passes of R-Drop (<https://arxiv.org/abs/2106.14448>).
//!
//! - `concat` (the paper; default): one forward of `[x; x]` `(2m, …)`, split into the first and
//!   second halves of the logits. Dropout masks are drawn per row, so the two halves see
//!   independent masks; one larger batch uses the accelerator better.
//! - `sequential` (the reference code): two forwards of `x`. Each graph is half the size, so the
//!   largest intermediate buffers are smaller.
//!
//! Both give the same objective; with dropout 0 they give the same loss and gradients.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::RDropModel;

/// How the two passes are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TwoPass {
    /// One forward of the concatenated `[x; x]`.
    #[default]
    Concat,
    /// Two forwards of `x`.
    Sequential,
}

/// The logits `(p, q)`, each `(m, C)`, of two training-mode passes of `x` `(m, …)`.
pub fn two_pass_logits<M: RDropModel + ?Sized>(
    model: &M,
    x: &Tensor,
    mode: TwoPass,
) -> Result<(Tensor, Tensor)> {
    match mode {
        TwoPass::Concat => {
            let m = x.dim(0)?;
            let xx = Tensor::cat(&[x, x], 0)?;
            let logits = model.forward_t(&xx, true)?;
            if logits.dim(0)? != 2 * m {
                candle_core::bail!(
                    "model returned {} rows for a batch of {}",
                    logits.dim(0)?,
                    2 * m
                )
            }
            Ok((logits.narrow(0, 0, m)?, logits.narrow(0, m, m)?))
        }
        TwoPass::Sequential => {
            let p = model.forward_t(x, true)?;
            let q = model.forward_t(x, true)?;
            Ok((p, q))
        }
    }
}
