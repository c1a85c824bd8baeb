//! What rdrop-core needs of a model: a stochastic forward and its trainable variables.
//! Implemented by `rdrop_vit::VisionTransformer`; tests implement it for a small MLP.

use candle_core::{Result, Tensor, Var};

use crate::rng::RngState;

/// A model trainable with R-Drop.
pub trait RDropModel {
    /// Logits `(N, classes)` for a batch `x`. `train = true` enables dropout, so two calls
    /// on the same input differ; `train = false` is deterministic.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// Every trainable variable with its stable (checkpoint) name, in a fixed order.
    fn named_vars(&self) -> Vec<(String, Var)>;

    /// State of the dropout RNG (saved in checkpoints for bit-exact resume).
    fn rng_state(&self) -> RngState;

    /// Restores the dropout RNG.
    fn set_rng_state(&self, state: RngState);
}
