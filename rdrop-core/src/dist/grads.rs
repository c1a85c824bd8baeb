//! Summing the autograd trainer's gradients (candle tensors) over the ranks.
//!
//! The gradients present are flattened in variable order into one `f32` buffer on their device
//! (`cat` of the flattened, cast gradients), summed by the collective, and cut back into their
//! shapes and dtypes:
//! ```text
//! flat = [vec(g_0) ; vec(g_1) ; …]  (f32, n = Σ |g_i|)     flat ← Σ_ranks flat
//! g_i  = flat[o_i .. o_i + |g_i|].reshape(shape_i).to_dtype(dtype_i)
//! ```
//! CPU tensors go through [`Collective::all_reduce_sum`] (host); CUDA tensors, in builds with
//! rdrop-core's `cuda` feature, through [`Collective::all_reduce_sum_device`] in place on
//! candle's stream (NCCL); any other device is staged through the host. Every rank must hold
//! gradients for the same variables (true of a fixed network).

use candle_core::{DType, Device, Tensor};

use super::collective::Collective;
use crate::error::Result;

/// `grads ← Σ_ranks grads` (the `Some` entries; see the module docs).
pub fn all_reduce_grads(grads: &mut [Option<Tensor>], c: &dyn Collective) -> Result<()> {
    let present: Vec<&Tensor> = grads.iter().flatten().collect();
    let Some(first) = present.first() else {
        return Ok(());
    };
    let device = first.device().clone();
    let parts = present
        .iter()
        .map(|g| g.flatten_all()?.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let flat = Tensor::cat(&parts, 0)?;
    drop(parts);
    let flat = all_reduce_flat(flat, &device, c)?;
    let mut offset = 0;
    for g in grads.iter_mut().flatten() {
        let n = g.elem_count();
        *g = flat
            .narrow(0, offset, n)?
            .reshape(g.shape())?
            .to_dtype(g.dtype())?;
        offset += n;
    }
    Ok(())
}

/// Sums a fresh, contiguous 1-D `f32` tensor over the ranks.
fn all_reduce_flat(flat: Tensor, device: &Device, c: &dyn Collective) -> Result<Tensor> {
    if device.is_cpu() {
        let mut v = flat.to_vec1::<f32>()?;
        c.all_reduce_sum(&mut v)?;
        let n = v.len();
        return Ok(Tensor::from_vec(v, n, device)?);
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        cuda_in_place(&flat, c)?;
        return Ok(flat);
    }
    let mut v = flat.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    c.all_reduce_sum(&mut v)?;
    let n = v.len();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?.to_device(device)?)
}

/// NCCL's in-place all-reduce of `flat`'s device memory, enqueued on candle's stream (so it is
/// ordered after the backward that wrote the gradients and before any later reader). `flat` was
/// just made by `cat`: nothing else refers to its storage.
#[cfg(feature = "cuda")]
fn cuda_in_place(flat: &Tensor, c: &dyn Collective) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = flat.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*storage else {
        return Err(crate::error::CoreError::Config(
            "expected a CUDA tensor".into(),
        ));
    };
    let slice = cs.as_cuda_slice::<f32>()?;
    let stream = cs.device.cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    let start = (layout.start_offset() * std::mem::size_of::<f32>()) as u64;
    c.all_reduce_sum_device(
        ptr + start,
        flat.elem_count(),
        stream.cu_stream() as usize as u64,
    )?;
    Ok(())
}
