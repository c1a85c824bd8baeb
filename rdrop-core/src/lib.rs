//! rdrop-core: the mathematics of R-Drop training, independent of the model and the data.
//!
//! R-Drop ([Liang et al., NeurIPS 2021](https://arxiv.org/abs/2106.14448)) feeds every sample
//! through the network twice with dropout and adds α × the bidirectional KL divergence between
//! the two predictions to their cross-entropy.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod model;
pub mod rng;

pub use model::RDropModel;
pub use rng::{DropoutRng, RngState};
