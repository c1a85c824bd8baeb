//! rdrop-kernels: the operations of an explicit (hand-derived) forward and backward, on flat,
//! row-major `f32` slices. The crate knows nothing of the ViT: `rdrop-vit` composes these into
//! its engine. Every fast kernel has a plain `reference` twin beside it, and tests hold the two
//! together (and hold each backward against finite differences of its forward).
//!
//! Conventions:
//! - shapes are given as `usize` arguments and documented per function; a size mismatch is a
//!   programming error and panics (the engine plans every buffer once);
//! - backward kernels **accumulate** (`+=`) into parameter gradients and into gradients of
//!   the residual stream, and overwrite everything else (documented per function);
//! - a dropout mask is a pure function of its [`philox`] key: a backward either regenerates it
//!   from the key (the attention probabilities') or reads the bytes (one an element) that the
//!   forward's `*_keep` kernel recorded (the residual and MLP sites'); docs/engine.md.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod arch;
pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "twin")]
pub mod cuda_twin;
pub mod dropout;
pub mod gelu;
pub mod gemm_shape;
pub mod layernorm;
pub mod linear;
pub mod loss;
pub mod optim;
pub mod patch;
pub mod philox;
