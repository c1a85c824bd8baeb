//! Either explicit engine behind one interface: the CPU [`Engine`] or, with the `cuda` feature,
//! the [`super::cuda`] engine, chosen by the model's device. Both train through
//! `rdrop_core::FlatTrainer` ([`UpdateBackend`]); this adds what a program needs beside the
//! update (inference, saving, sizes).

use candle_core::{DType, Tensor};
use rdrop_core::{Precision, UpdateBackend};

use super::Engine;
use crate::error::Result;
use crate::model::VisionTransformer;

/// An explicit engine: the update's backend plus inference and the copy back to a model.
pub trait ExplicitEngine: UpdateBackend {
    /// Logits `(B, classes)` in f32 of images `x (B, C, S, S)` in eval mode (no dropout).
    fn forward_eval(&mut self, x: &Tensor) -> Result<Tensor>;
    /// Writes the engine's parameters into `model` (to save it with the model's writers).
    fn write_to(&self, model: &VisionTransformer) -> Result<()>;
    /// Bytes of activations and scratch currently planned.
    fn plan_bytes(&self) -> usize;
    /// Bytes the activation plan will take at `micro_batch` samples, known before anything is
    /// allocated (the CUDA engine's formula, [`super::cuda::plan_bytes`]); `None` where the
    /// engine does not plan ahead.
    fn planned_bytes(&self, _micro_batch: usize) -> Option<usize> {
        None
    }
    /// The GPU it runs on, for a run's header: name, compute capability, memory and the kernel
    /// image the driver loaded (cubin or PTX JIT); `None` on CPU.
    fn gpu_summary(&self) -> Option<String> {
        None
    }
    /// Whether its buffers live on a GPU (the model it was built from may then be dropped).
    fn on_gpu(&self) -> bool {
        false
    }
}

/// The explicit engine for `model`'s device, computing in `precision` on a GPU (the CPU engine
/// computes in f32; its trainer rejects other precisions).
pub fn for_model(
    model: &VisionTransformer,
    precision: Precision,
) -> Result<Box<dyn ExplicitEngine>> {
    if model.device().is_cuda() {
        return cuda_engine(model, precision);
    }
    Ok(Box::new(Engine::from_model(model)?))
}

/// The explicit engine for inference with `model`, at the model's compute precision.
pub fn for_inference(model: &VisionTransformer) -> Result<Box<dyn ExplicitEngine>> {
    let precision = match model.compute_dtype() {
        DType::BF16 => Precision::Bf16,
        DType::F16 => Precision::F16,
        _ => Precision::F32,
    };
    for_model(model, precision)
}

#[cfg(feature = "cuda")]
fn cuda_engine(model: &VisionTransformer, precision: Precision) -> Result<Box<dyn ExplicitEngine>> {
    Ok(Box::new(super::cuda::CudaEngine::from_model(
        model, precision,
    )?))
}

/// Without the `cuda` feature there is no CUDA device to hold a model.
#[cfg(not(feature = "cuda"))]
fn cuda_engine(
    _model: &VisionTransformer,
    _precision: Precision,
) -> Result<Box<dyn ExplicitEngine>> {
    Err(crate::VitError::Config(
        "this rdrop was built without CUDA (cargo feature `cuda`)".into(),
    ))
}

impl ExplicitEngine for Engine {
    fn forward_eval(&mut self, x: &Tensor) -> Result<Tensor> {
        Engine::forward_eval(self, x)
    }

    fn write_to(&self, model: &VisionTransformer) -> Result<()> {
        Engine::write_to(self, model)
    }

    fn plan_bytes(&self) -> usize {
        Engine::plan_bytes(self)
    }
}

#[cfg(feature = "cuda")]
impl ExplicitEngine for super::cuda::CudaEngine {
    fn forward_eval(&mut self, x: &Tensor) -> Result<Tensor> {
        super::cuda::CudaEngine::forward_eval(self, x)
    }

    fn write_to(&self, model: &VisionTransformer) -> Result<()> {
        super::cuda::CudaEngine::write_to(self, model)
    }

    fn plan_bytes(&self) -> usize {
        super::cuda::CudaEngine::plan_bytes(self)
    }

    fn planned_bytes(&self, micro_batch: usize) -> Option<usize> {
        let elem = self.precision().dtype().size_in_bytes();
        Some(super::cuda::plan_bytes(
            self.config(),
            2 * micro_batch,
            elem,
            true,
        ))
    }

    fn gpu_summary(&self) -> Option<String> {
        let stream = self.stream();
        let ctx = stream.context();
        let name = ctx.name().unwrap_or_else(|_| "?".into());
        let cc = ctx
            .compute_capability()
            .map(|(a, b)| format!("{a}.{b}"))
            .unwrap_or_else(|_| "?".into());
        let gib = ctx
            .total_mem()
            .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
            .unwrap_or_else(|_| "?".into());
        Some(format!(
            "{name} (compute capability {cc}, {gib}); kernels: {}",
            self.kernel_image()
        ))
    }

    fn on_gpu(&self) -> bool {
        true
    }
}
