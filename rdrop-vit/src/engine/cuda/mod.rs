//! The explicit engine on CUDA: the CPU engine's forward and hand-derived backward
//! (`super::forward`, `super::backward`) op for op, over device buffers, with the same flat
//! layout (`super::params`), the same dropout masks (Philox keyed by the same row keys, in
//! `rdrop_kernels::cuda`) and GEMMs through cuBLASLt (`gemm`).
//!
//! - [`plan`]: the device activation plan and its byte formula, and [`gemm_shape`]: the
//!   attention's batched GEMMs (both compiled in every build, so the CLI can print a CUDA
//!   plan's size and CI tests the formula and the shapes);
//! - [`fit`]: the largest micro-batch whose plan fits a GPU's free memory;
//! - with the `cuda` feature: `gemm` (cuBLASLt with cached plans, `rdrop_kernels::cuda::gemm`),
//!   `forward`, `backward`,
//!   `CudaEngine` (parameters, gradients, optimiser state and the plan on the device) and
//!   `backend` (the engine as `rdrop_core::UpdateBackend`: `rdrop_core::FlatTrainer` runs its
//!   update, f16 loss scaling included).
//!
//! Precision: f32 master weights and gradients, the residual stream, LayerNorm and softmax
//! statistics in f32; GEMM operands and saved activations in the compute type (f32, bf16, f16).

#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
pub(crate) mod backward;
#[cfg(feature = "cuda")]
mod engine;
pub mod fit;
#[cfg(feature = "cuda")]
pub(crate) mod forward;
/// cuBLASLt, in the kernels crate with the rest of the compute.
#[cfg(feature = "cuda")]
pub use rdrop_kernels::cuda::gemm;
pub mod gemm_shape;
#[cfg(feature = "cuda")]
pub(crate) mod laps;
pub mod plan;

#[cfg(feature = "cuda")]
pub use backward::BucketReady;
#[cfg(feature = "cuda")]
pub use engine::CudaEngine;
pub use fit::{largest_micro_batch, Fit};
pub use plan::{plan_bytes, PlanSpec};
