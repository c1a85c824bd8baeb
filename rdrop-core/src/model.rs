//! What rdrop-core needs of a model: a stochastic forward and its trainable variables.
//! Implemented by `rdrop_vit::VisionTransformer`; tests implement it for a small MLP.

use candle_core::{Result, Tensor, Var};

use crate::rng::{RngState, RowKey};

/// A model trainable with R-Drop.
pub trait RDropModel {
    /// Logits `(N, classes)` for a batch `x`. `train = true` enables dropout, so two calls
    /// on the same input differ; `train = false` is deterministic.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// Every trainable variable with its stable (checkpoint) name, in a fixed order.
    fn named_vars(&self) -> Vec<(String, Var)>;

    /// State of the dropout RNG (saved in checkpoints for bit-exact resume).
    fn rng_state(&self) -> RngState;

    /// Restores the dropout RNG; errors if `state` belongs to another mask generator.
    fn set_rng_state(&self, state: &RngState) -> Result<()>;

    /// The dropout key of the next train-mode forward: the `update` being computed and, for
    /// each row of its batch, the sample's index in the update's global batch and its R-Drop
    /// pass ([`crate::DropoutRng::set_context`]).
    fn set_dropout_context(&self, update: u32, rows: Vec<RowKey>);
}
