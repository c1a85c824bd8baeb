//! The collective operations a data-parallel update needs, whatever carries them: TCP between
//! processes ([`super::Group`]), NCCL between GPUs ([`super::NcclCollective`]) or threads in one
//! process ([`super::LocalCollective`], tests).
//!
//! Every implementation gives every rank bit-identical results, so that the ranks apply the
//! same update. Calls are collective: every rank makes the same calls in the same order.

use super::error::DistError;

/// Sum-reductions and a barrier over the ranks of a job.
pub trait Collective: Send + Sync {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// `buf ← Σ_ranks buf` element-wise on host `f32` buffers (same length on every rank).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError>;

    /// In-place sum over ranks of `len` `f32`s at device pointer `ptr` (a `CUdeviceptr`),
    /// enqueued on `stream` (a `CUstream`): the result is ready when the stream reaches it.
    /// Only NCCL implements it.
    fn all_reduce_sum_device(&self, ptr: u64, len: usize, stream: u64) -> Result<(), DistError> {
        let _ = (ptr, len, stream);
        Err(DistError::Unsupported(
            "device all-reduce needs the NCCL collective (a CUDA build)".into(),
        ))
    }

    /// `v ← Σ_ranks v` on host `f64`s (metrics), summed in rank order: `((v₀ + v₁) + v₂) + …`.
    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<(), DistError>;

    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<(), DistError>;
}
