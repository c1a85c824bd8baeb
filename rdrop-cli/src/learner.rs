//! The model and its trainer behind one interface, whichever engine runs them: an explicit
//! engine (`rdrop_vit::engine::explicit`: the CPU engine in f32, the CUDA engine in f32, bf16 or
//! f16; the default on both) with `rdrop_core::FlatTrainer`, or the candle-autograd model
//! (`VisionTransformer` + `rdrop_core::Trainer`, the reference, and the path for reduced
//! precision on CPU). All write the same checkpoints. In a data-parallel run every trainer
//! all-reduces through the rank's collective.

use std::sync::Arc;

use anyhow::Context;
use candle_core::Tensor;
use rdrop_core::dist::Collective;
use rdrop_core::{CoreError, FlatTrainer, StepStats, TrainConfig, TrainState, Trainer};
use rdrop_vit::engine::explicit::{self, ExplicitEngine};
use rdrop_vit::VisionTransformer;

enum Inner {
    Autograd(Trainer),
    Explicit {
        engine: Box<dyn ExplicitEngine>,
        trainer: FlatTrainer,
        /// Whether `model` holds the engine's current parameters.
        synced: bool,
    },
}

/// A model being trained (or evaluated) by one of the engines.
pub struct Learner {
    model: VisionTransformer,
    inner: Inner,
    /// The other ranks of a data-parallel run.
    collective: Option<Arc<dyn Collective>>,
}

impl Learner {
    /// A learner at update 0; with a `collective`, one rank of a data-parallel run.
    pub fn new(
        model: VisionTransformer,
        tcfg: TrainConfig,
        explicit: bool,
        collective: Option<Arc<dyn Collective>>,
    ) -> anyhow::Result<Self> {
        Self::build(model, tcfg, None, explicit, collective)
    }

    /// A learner resumed from a checkpoint's state (`model` holds its weights).
    pub fn restore(
        model: VisionTransformer,
        tcfg: TrainConfig,
        state: &TrainState,
        explicit: bool,
        collective: Option<Arc<dyn Collective>>,
    ) -> anyhow::Result<Self> {
        Self::build(model, tcfg, Some(state), explicit, collective)
    }

    fn build(
        model: VisionTransformer,
        tcfg: TrainConfig,
        state: Option<&TrainState>,
        explicit: bool,
        collective: Option<Arc<dyn Collective>>,
    ) -> anyhow::Result<Self> {
        if !explicit {
            let trainer = match state {
                Some(s) => Trainer::restore(tcfg, &model, s).context("restoring the trainer")?,
                None => Trainer::new(tcfg, model.named_vars()).context("setting up the trainer")?,
            };
            return Ok(Self {
                model,
                inner: Inner::Autograd(trainer),
                collective,
            });
        }
        let mut engine =
            explicit::for_model(&model, tcfg.precision).context("building the explicit engine")?;
        let trainer = match state {
            Some(s) => {
                FlatTrainer::restore(tcfg, engine.as_mut(), s).context("restoring the trainer")?
            }
            None => FlatTrainer::new(tcfg, engine.as_ref()).context("setting up the trainer")?,
        };
        let model = if engine.on_gpu() {
            host_copy(model, engine.as_ref())?
        } else {
            model
        };
        Ok(Self {
            model,
            inner: Inner::Explicit {
                engine,
                trainer,
                synced: true,
            },
            collective,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &rdrop_vit::ViTConfig {
        self.model.config()
    }

    /// `explicit` or `autograd`.
    pub fn engine_name(&self) -> &'static str {
        match self.inner {
            Inner::Autograd(_) => "autograd",
            Inner::Explicit { .. } => "explicit",
        }
    }

    /// One update over `batches` (see `rdrop_core::Trainer::update`).
    pub fn update(&mut self, batches: &[(Tensor, Tensor)]) -> Result<StepStats, CoreError> {
        let c = self.collective.as_deref();
        match &mut self.inner {
            Inner::Autograd(trainer) => match c {
                Some(c) => trainer.update_distributed(&self.model, batches, c),
                None => trainer.update(&self.model, batches),
            },
            Inner::Explicit {
                engine,
                trainer,
                synced,
            } => {
                *synced = false;
                match c {
                    Some(c) => trainer.update_distributed(engine.as_mut(), batches, c),
                    None => trainer.update(engine.as_mut(), batches),
                }
            }
        }
    }

    /// The gradient buckets of a data-parallel update at `bucket_mb` MiB (element counts, in
    /// the order they are summed during the backward); `None` when the gradients are summed in
    /// one all-reduce after the backward (the autograd engine, or `bucket_mb` 0).
    pub fn grad_buckets(&self, bucket_mb: f64) -> Option<Vec<usize>> {
        let Inner::Explicit { engine, .. } = &self.inner else {
            return None;
        };
        let len = engine.layout().len();
        let cuts = rdrop_core::dist::cuts_for(bucket_mb, &engine.grad_ready_cuts(), len)?;
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
            Inner::Autograd(_) => false,
            Inner::Explicit { trainer, .. } => {
                trainer.set_profiling(on);
                true
            }
        }
    }

    /// The op groups of the updates since the last take, summed (empty when not profiling).
    pub fn take_profile(&mut self) -> rdrop_core::Profile {
        match &mut self.inner {
            Inner::Autograd(_) => rdrop_core::Profile::default(),
            Inner::Explicit { trainer, .. } => trainer.take_profile(),
        }
    }

    /// Bytes of the explicit engine's activation plan (`None` for autograd).
    pub fn plan_bytes(&self) -> Option<usize> {
        match &self.inner {
            Inner::Autograd(_) => None,
            Inner::Explicit { engine, .. } => Some(engine.plan_bytes()),
        }
    }

    /// Bytes the CUDA engine's activation plan will take at `micro_batch` samples (its formula,
    /// `rdrop_vit::engine::cuda::plan_bytes`, known before anything is allocated); `None` for
    /// the other engines.
    pub fn planned_bytes(&self, micro_batch: usize) -> Option<usize> {
        match &self.inner {
            Inner::Autograd(_) => None,
            Inner::Explicit { engine, .. } => engine.planned_bytes(micro_batch),
        }
    }

    /// The GPU the CUDA engine runs on, for the run's header: name, compute capability,
    /// memory and the kernel image the driver loaded (cubin or PTX JIT); `None` elsewhere.
    pub fn gpu_summary(&self) -> Option<String> {
        match &self.inner {
            Inner::Autograd(_) => None,
            Inner::Explicit { engine, .. } => engine.gpu_summary(),
        }
    }

    /// Updates completed.
    pub fn step(&self) -> u64 {
        match &self.inner {
            Inner::Autograd(trainer) => trainer.step(),
            Inner::Explicit { trainer, .. } => trainer.step(),
        }
    }

    /// The current loss scale (1 unless f16).
    pub fn loss_scale(&self) -> f64 {
        match &self.inner {
            Inner::Autograd(trainer) => trainer.loss_scale(),
            Inner::Explicit { trainer, .. } => trainer.loss_scale(),
        }
    }

    /// The checkpointable state at data position (`epoch`, `index`).
    pub fn state(&self, epoch: u64, index: u64) -> anyhow::Result<TrainState> {
        Ok(match &self.inner {
            Inner::Autograd(trainer) => trainer.state(&self.model, epoch, index),
            Inner::Explicit {
                engine, trainer, ..
            } => trainer.state(engine.as_ref(), epoch, index)?,
        })
    }

    /// Eval-mode logits `(B, classes)` in f32 for images `x`.
    pub fn logits(&mut self, x: &Tensor) -> anyhow::Result<Tensor> {
        Ok(match &mut self.inner {
            Inner::Autograd(_) => self.model.forward_t(x, false)?,
            Inner::Explicit { engine, .. } => engine.forward_eval(x)?,
        })
    }

    /// The model with the current parameters (for saving).
    pub fn model(&mut self) -> anyhow::Result<&VisionTransformer> {
        if let Inner::Explicit { engine, synced, .. } = &mut self.inner {
            if !*synced {
                engine.write_to(&self.model)?;
                *synced = true;
            }
        }
        Ok(&self.model)
    }
}

/// The model checkpoints are written from, on the CPU, for an engine on a GPU (which holds the
/// weights there: a second device copy would cost 4 bytes a parameter of GPU memory).
fn host_copy(
    model: VisionTransformer,
    engine: &dyn ExplicitEngine,
) -> anyhow::Result<VisionTransformer> {
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
    Ok(host)
}

/// Eval-mode logits from either engine, for `rdrop eval` / `predict` (no trainer).
pub enum Predictor {
    /// The autograd model.
    Autograd(Box<VisionTransformer>),
    /// An explicit engine (a copy of the model's parameters; on a GPU at the model's compute
    /// precision).
    Explicit(Box<dyn ExplicitEngine>),
}

impl Predictor {
    /// A predictor for `model` on the engine `explicit` chooses.
    pub fn new(model: VisionTransformer, explicit: bool) -> anyhow::Result<Self> {
        Ok(if explicit {
            Predictor::Explicit(
                explicit::for_inference(&model).context("building the explicit engine")?,
            )
        } else {
            Predictor::Autograd(Box::new(model))
        })
    }

    /// Eval-mode logits `(B, classes)` for images `x`.
    pub fn logits(&mut self, x: &Tensor) -> anyhow::Result<Tensor> {
        Ok(match self {
            Predictor::Autograd(m) => m.forward_t(x, false)?,
            Predictor::Explicit(e) => e.forward_eval(x)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::device::{use_explicit, Precision};

    #[test]
    fn the_default_run_configuration_on_cpu_in_f32_runs_the_engine() {
        let c = crate::config::RunConfig {
            device: crate::device::DeviceSpec::Cpu,
            precision: Precision::F32.into(),
            ..crate::config::RunConfig::default()
        };
        assert!(use_explicit(c.engine, &c.device, c.compute_precision()).unwrap());
    }
}
