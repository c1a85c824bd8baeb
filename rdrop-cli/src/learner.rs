//! The model and its trainer behind one interface, whichever engine runs them: the explicit
//! engine (on CPU in f32: `rdrop_vit::Engine` + `rdrop_core::FlatTrainer`; on CUDA in f32,
//! bf16 or f16: `rdrop_vit::engine::cuda::CudaEngine` + `CudaTrainer`; the default on both) or
//! the candle-autograd model (`VisionTransformer` + `rdrop_core::Trainer`, the reference, and
//! the path for reduced precision on CPU). All write the same checkpoints. In a data-parallel
//! run every trainer all-reduces through the rank's collective.

use std::sync::Arc;

use anyhow::Context;
use candle_core::Tensor;
use rdrop_core::dist::Collective;
use rdrop_core::{
    CoreError, FlatRDropModel, FlatTrainer, StepStats, TrainConfig, TrainState, Trainer,
};
#[cfg(feature = "cuda")]
use rdrop_vit::engine::cuda::{CudaEngine, CudaTrainer};
use rdrop_vit::{Engine, EngineKind, VisionTransformer};

use crate::device::{DeviceSpec, Precision};

/// Whether `kind` runs the explicit engine on `device` at `precision` (a clear error when an
/// explicit request cannot be honoured).
pub fn use_explicit(
    kind: EngineKind,
    device: &DeviceSpec,
    precision: Precision,
) -> anyhow::Result<bool> {
    kind.resolve(*device == DeviceSpec::Cpu, precision == Precision::F32)
        .map_err(|e| anyhow::anyhow!("--engine {kind}: {e}"))
}

enum Inner {
    Autograd {
        trainer: Trainer,
        /// The other ranks of a data-parallel run.
        collective: Option<Arc<dyn Collective>>,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        engine: Box<CudaEngine>,
        trainer: CudaTrainer,
        /// Whether `model` holds the engine's current parameters.
        synced: bool,
        /// The other ranks of a data-parallel run.
        collective: Option<Arc<dyn Collective>>,
    },
    Explicit {
        engine: Box<Engine>,
        trainer: FlatTrainer,
        /// Whether `model` holds the engine's current parameters.
        synced: bool,
        /// The other ranks of a data-parallel run.
        collective: Option<Arc<dyn Collective>>,
    },
}

/// A model being trained (or evaluated) by one of the two engines.
pub struct Learner {
    model: VisionTransformer,
    inner: Inner,
}

impl Learner {
    /// A learner at update 0; with a `collective`, one rank of a data-parallel run.
    pub fn new(
        model: VisionTransformer,
        tcfg: TrainConfig,
        explicit: bool,
        collective: Option<Arc<dyn Collective>>,
    ) -> anyhow::Result<Self> {
        if explicit && model.device().is_cuda() {
            let (inner, model) = cuda_inner(model, tcfg, None, collective)?;
            return Ok(Self { model, inner });
        }
        let inner = if explicit {
            let engine = Engine::from_model(&model).context("building the explicit engine")?;
            let trainer = FlatTrainer::new(tcfg, engine.layout().clone())
                .context("setting up the trainer")?;
            Inner::Explicit {
                engine: Box::new(engine),
                trainer,
                synced: true,
                collective,
            }
        } else {
            Inner::Autograd {
                trainer: Trainer::new(tcfg, model.named_vars())
                    .context("setting up the trainer")?,
                collective,
            }
        };
        Ok(Self { model, inner })
    }

    /// A learner resumed from a checkpoint's state (`model` holds its weights).
    pub fn restore(
        model: VisionTransformer,
        tcfg: TrainConfig,
        state: &TrainState,
        explicit: bool,
        collective: Option<Arc<dyn Collective>>,
    ) -> anyhow::Result<Self> {
        if explicit && model.device().is_cuda() {
            let (inner, model) = cuda_inner(model, tcfg, Some(state), collective)?;
            return Ok(Self { model, inner });
        }
        let inner = if explicit {
            // The engine takes the model's dropout state (its seed) with its weights.
            model.rng().set_state(&state.rng)?;
            let engine = Engine::from_model(&model).context("building the explicit engine")?;
            let trainer = FlatTrainer::restore(tcfg, engine.layout().clone(), state)
                .context("restoring the trainer")?;
            Inner::Explicit {
                engine: Box::new(engine),
                trainer,
                synced: true,
                collective,
            }
        } else {
            Inner::Autograd {
                trainer: Trainer::restore(tcfg, &model, state).context("restoring the trainer")?,
                collective,
            }
        };
        Ok(Self { model, inner })
    }

    /// The architecture.
    pub fn config(&self) -> &rdrop_vit::ViTConfig {
        self.model.config()
    }

    /// `explicit` or `autograd`.
    pub fn engine_name(&self) -> &'static str {
        match self.inner {
            Inner::Autograd { .. } => "autograd",
            Inner::Explicit { .. } => "explicit",
            #[cfg(feature = "cuda")]
            Inner::Cuda { .. } => "explicit",
        }
    }

    /// One update over `batches` (see `rdrop_core::Trainer::update`).
    pub fn update(&mut self, batches: &[(Tensor, Tensor)]) -> Result<StepStats, CoreError> {
        match &mut self.inner {
            Inner::Autograd {
                trainer,
                collective,
            } => match collective {
                Some(c) => trainer.update_distributed(&self.model, batches, c.as_ref()),
                None => trainer.update(&self.model, batches),
            },
            Inner::Explicit {
                engine,
                trainer,
                synced,
                collective,
            } => {
                *synced = false;
                match collective {
                    Some(c) => trainer.update_distributed(engine.as_mut(), batches, c.as_ref()),
                    None => trainer.update(engine.as_mut(), batches),
                }
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda {
                engine,
                trainer,
                synced,
                collective,
            } => {
                *synced = false;
                match collective {
                    Some(c) => trainer.update_distributed(engine.as_mut(), batches, c.as_ref()),
                    None => trainer.update(engine.as_mut(), batches),
                }
            }
        }
    }

    /// The gradient buckets of a data-parallel update at `bucket_mb` MiB (element counts, in
    /// the order they are summed during the backward); `None` when the gradients are summed in
    /// one all-reduce after the backward (the autograd engine, or `bucket_mb` 0).
    pub fn grad_buckets(&self, bucket_mb: f64) -> Option<Vec<usize>> {
        let (ready, len) = match &self.inner {
            Inner::Autograd { .. } => return None,
            Inner::Explicit { engine, .. } => (engine.grad_ready_cuts(), engine.layout().len()),
            #[cfg(feature = "cuda")]
            Inner::Cuda { engine, .. } => (engine.grad_ready_cuts(), engine.layout().len()),
        };
        let cuts = rdrop_core::dist::cuts_for(bucket_mb, &ready, len)?;
        Some(
            rdrop_core::dist::buckets(&cuts, len)
                .iter()
                .map(|r| r.len())
                .collect(),
        )
    }

    /// Starts (`true`) or stops recording where each update's time goes (the explicit
    /// engines; `false` when the engine cannot, the autograd model).
    pub fn set_profiling(&mut self, on: bool) -> bool {
        match &mut self.inner {
            Inner::Autograd { .. } => false,
            Inner::Explicit { trainer, .. } => {
                trainer.set_profiling(on);
                true
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda { trainer, .. } => {
                trainer.set_profiling(on);
                true
            }
        }
    }

    /// The op groups of the updates since the last take, summed (empty when not profiling).
    pub fn take_profile(&mut self) -> rdrop_core::Profile {
        match &mut self.inner {
            Inner::Autograd { .. } => rdrop_core::Profile::default(),
            Inner::Explicit { trainer, .. } => trainer.take_profile(),
            #[cfg(feature = "cuda")]
            Inner::Cuda { trainer, .. } => trainer.take_profile(),
        }
    }

    /// Bytes of the explicit engine's activation plan (`None` for autograd).
    pub fn plan_bytes(&self) -> Option<usize> {
        match &self.inner {
            Inner::Autograd { .. } => None,
            Inner::Explicit { engine, .. } => Some(engine.plan_bytes()),
            #[cfg(feature = "cuda")]
            Inner::Cuda { engine, .. } => Some(engine.plan_bytes()),
        }
    }

    /// Bytes the CUDA engine's activation plan will take at `micro_batch` samples (its formula,
    /// `rdrop_vit::engine::cuda::plan_bytes`, known before anything is allocated); `None` for
    /// the other engines.
    pub fn planned_bytes(&self, micro_batch: usize) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let Inner::Cuda { engine, .. } = &self.inner {
            let elem = match engine.precision() {
                rdrop_core::Precision::F32 => 4,
                _ => 2,
            };
            return Some(rdrop_vit::engine::cuda::plan_bytes(
                engine.config(),
                2 * micro_batch,
                elem,
                true,
            ));
        }
        let _ = micro_batch;
        None
    }

    /// The GPU the CUDA engine runs on, for the run's header: name, compute capability,
    /// memory and the kernel image the driver loaded (cubin or PTX JIT); `None` elsewhere.
    pub fn gpu_summary(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        if let Inner::Cuda { engine, .. } = &self.inner {
            let stream = engine.stream();
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
            return Some(format!(
                "{name} (compute capability {cc}, {gib}); kernels: {}",
                engine.kernel_image()
            ));
        }
        None
    }

    /// Updates completed.
    pub fn step(&self) -> u64 {
        match &self.inner {
            Inner::Autograd { trainer, .. } => trainer.step(),
            Inner::Explicit { trainer, .. } => trainer.step(),
            #[cfg(feature = "cuda")]
            Inner::Cuda { trainer, .. } => trainer.step(),
        }
    }

    /// The current loss scale (1 unless f16 on the autograd path).
    pub fn loss_scale(&self) -> f64 {
        match &self.inner {
            Inner::Autograd { trainer, .. } => trainer.loss_scale(),
            Inner::Explicit { .. } => 1.0,
            #[cfg(feature = "cuda")]
            Inner::Cuda { trainer, .. } => trainer.loss_scale(),
        }
    }

    /// The checkpointable state at data position (`epoch`, `index`).
    pub fn state(&self, epoch: u64, index: u64) -> anyhow::Result<TrainState> {
        Ok(match &self.inner {
            Inner::Autograd { trainer, .. } => trainer.state(&self.model, epoch, index),
            Inner::Explicit {
                engine, trainer, ..
            } => trainer.state(engine.as_ref(), epoch, index)?,
            #[cfg(feature = "cuda")]
            Inner::Cuda {
                engine, trainer, ..
            } => trainer.state(engine.as_ref(), epoch, index)?,
        })
    }

    /// Eval-mode logits `(B, classes)` in f32 for images `x`.
    pub fn logits(&mut self, x: &Tensor) -> anyhow::Result<Tensor> {
        Ok(match &mut self.inner {
            Inner::Autograd { .. } => self.model.forward_t(x, false)?,
            Inner::Explicit { engine, .. } => engine.forward_eval(x)?,
            #[cfg(feature = "cuda")]
            Inner::Cuda { engine, .. } => engine.forward_eval(x)?,
        })
    }

    /// The model with the current parameters (for saving).
    pub fn model(&mut self) -> anyhow::Result<&VisionTransformer> {
        match &mut self.inner {
            Inner::Explicit { engine, synced, .. } if !*synced => {
                engine.write_to(&self.model)?;
                *synced = true;
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda { engine, synced, .. } if !*synced => {
                engine.write_to(&self.model)?;
                *synced = true;
            }
            _ => {}
        }
        Ok(&self.model)
    }
}

/// The CUDA engine and its trainer for `model` (on a GPU), fresh or resumed from `state`, and
/// the model checkpoints are written from, moved to the CPU: the engine holds the weights on the
/// GPU, a second device copy would cost 4 bytes a parameter of GPU memory.
#[cfg(feature = "cuda")]
fn cuda_inner(
    model: VisionTransformer,
    tcfg: TrainConfig,
    state: Option<&TrainState>,
    collective: Option<Arc<dyn Collective>>,
) -> anyhow::Result<(Inner, VisionTransformer)> {
    let mut engine =
        CudaEngine::from_model(&model, tcfg.precision).context("building the CUDA engine")?;
    let trainer = match state {
        Some(s) => CudaTrainer::restore(tcfg, &mut engine, s).context("restoring the trainer")?,
        None => {
            CudaTrainer::new(tcfg, engine.layout().clone()).context("setting up the trainer")?
        }
    };
    let vm = candle_nn::VarMap::new();
    let vb =
        candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu);
    let host = VisionTransformer::new(
        model.config(),
        vb,
        rdrop_core::DropoutRng::new(engine.rng_state().seed),
    )
    .context("building the host copy of the model")?;
    engine
        .write_to(&host)
        .context("copying the weights to the host model")?;
    drop(model);
    Ok((
        Inner::Cuda {
            engine: Box::new(engine),
            trainer,
            synced: true,
            collective,
        },
        host,
    ))
}

/// Without the `cuda` feature there is no CUDA device to hold a model.
#[cfg(not(feature = "cuda"))]
fn cuda_inner(
    _model: VisionTransformer,
    _tcfg: TrainConfig,
    _state: Option<&TrainState>,
    _collective: Option<Arc<dyn Collective>>,
) -> anyhow::Result<(Inner, VisionTransformer)> {
    anyhow::bail!("this rdrop was built without CUDA (cargo feature `cuda`)")
}

/// The compute precision a model was set to (its forward dtype).
#[cfg(feature = "cuda")]
fn model_precision(model: &VisionTransformer) -> rdrop_core::Precision {
    match model.compute_dtype() {
        candle_core::DType::BF16 => rdrop_core::Precision::Bf16,
        candle_core::DType::F16 => rdrop_core::Precision::F16,
        _ => rdrop_core::Precision::F32,
    }
}

/// Eval-mode logits from either engine, for `rdrop eval` / `predict` (no trainer).
pub enum Predictor {
    /// The autograd model.
    Autograd(Box<VisionTransformer>),
    /// The explicit engine (a copy of the model's parameters).
    Explicit(Box<Engine>),
    /// The CUDA engine at the model's compute precision (a copy of its parameters).
    #[cfg(feature = "cuda")]
    Cuda(Box<CudaEngine>),
}

impl Predictor {
    /// A predictor for `model` on the engine `explicit` chooses.
    pub fn new(model: VisionTransformer, explicit: bool) -> anyhow::Result<Self> {
        #[cfg(feature = "cuda")]
        if explicit && model.device().is_cuda() {
            return Ok(Predictor::Cuda(Box::new(
                CudaEngine::from_model(&model, model_precision(&model))
                    .context("building the CUDA engine")?,
            )));
        }
        Ok(if explicit {
            Predictor::Explicit(Box::new(
                Engine::from_model(&model).context("building the explicit engine")?,
            ))
        } else {
            Predictor::Autograd(Box::new(model))
        })
    }

    /// Eval-mode logits `(B, classes)` for images `x`.
    pub fn logits(&mut self, x: &Tensor) -> anyhow::Result<Tensor> {
        Ok(match self {
            Predictor::Autograd(m) => m.forward_t(x, false)?,
            Predictor::Explicit(e) => e.forward_eval(x)?,
            #[cfg(feature = "cuda")]
            Predictor::Cuda(e) => e.forward_eval(x)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_the_default_on_cpu_in_f32_and_on_cuda() {
        let auto = EngineKind::default();
        assert!(use_explicit(auto, &DeviceSpec::Cpu, Precision::F32).unwrap());
        assert!(!use_explicit(auto, &DeviceSpec::Cpu, Precision::Bf16).unwrap());
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert!(
                use_explicit(auto, &DeviceSpec::Cuda(0), p).unwrap(),
                "{p:?}"
            );
            assert!(use_explicit(EngineKind::Explicit, &DeviceSpec::Cuda(0), p).unwrap());
            assert!(!use_explicit(EngineKind::Autograd, &DeviceSpec::Cuda(0), p).unwrap());
        }
        assert!(!use_explicit(EngineKind::Autograd, &DeviceSpec::Cpu, Precision::F32).unwrap());
        let e = use_explicit(EngineKind::Explicit, &DeviceSpec::Cpu, Precision::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--engine explicit") && e.contains("f32"), "{e}");
        // The default run configuration on CPU in f32 resolves to the engine too.
        let c = crate::config::RunConfig {
            device: DeviceSpec::Cpu,
            precision: Precision::F32.into(),
            ..crate::config::RunConfig::default()
        };
        assert!(use_explicit(c.engine, &c.device, c.compute_precision()).unwrap());
    }
}
