//! The two stochastic forward passes of R-Drop (<https://arxiv.org/abs/2106.14448>).
//!
//! - `concat` (the paper; default): one forward of `[x; x]` `(2m, …)`, split into the first and
//!   second halves of the logits; one larger batch uses the accelerator better.
//! - `sequential` (the reference code): two forwards of `x`. Each graph is half the size, so the
//!   largest intermediate buffers are smaller.
//!
//! Dropout masks are keyed by `(seed, update, site, sample, pass)` ([`crate::rng`]): before each
//! forward the model is told which `(sample, pass)` each row is. Sample `i` of a micro-batch at
//! `offset` is sample `offset + i` of the update; the first half (or first forward) is pass 0,
//! the second pass 1. Both modes therefore apply the same masks and give the same logits up to
//! floating-point summation order (a batch of `2m` rows may be blocked differently by the
//! GEMMs than one of `m`).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::RDropModel;
use crate::rng::DropoutContext;

/// How the two passes are run (the explicit engine always runs one forward of `[x; x]`: with
/// masks keyed by (sample, pass) both give the same masks and the same objective).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum TwoPass {
    /// One forward of the concatenated `[x; x]` (the paper).
    #[default]
    Concat,
    /// Two forwards of `x` (the reference code; less peak memory on the autograd path).
    Sequential,
}

/// The logits `(p, q)`, each `(m, C)`, of two training-mode passes of `x` `(m, …)`, the
/// micro-batch at sample `offset` of update `update` (1-based; the masks' key).
pub fn two_pass_logits<M: RDropModel + ?Sized>(
    model: &M,
    x: &Tensor,
    mode: TwoPass,
    update: u32,
    offset: u32,
) -> Result<(Tensor, Tensor)> {
    let m = x.dim(0)?;
    let m32 = match u32::try_from(m)
        .ok()
        .filter(|&m| offset.checked_add(m).is_some())
    {
        Some(m) => m,
        None => candle_core::bail!(
            "micro-batch of {m} samples at offset {offset} exceeds the mask key's u32 sample index"
        ),
    };
    let rows = |pass| DropoutContext::pass_rows(offset, m32, pass);
    match mode {
        TwoPass::Concat => {
            model.set_dropout_context(update, [rows(0), rows(1)].concat());
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
            model.set_dropout_context(update, rows(0));
            let p = model.forward_t(x, true)?;
            model.set_dropout_context(update, rows(1));
            let q = model.forward_t(x, true)?;
            Ok((p, q))
        }
    }
}
