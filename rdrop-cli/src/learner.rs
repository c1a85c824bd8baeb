//! The model and its trainer behind one interface, whichever engine runs them: the explicit
//! engine (`rdrop_vit::Engine` + `rdrop_core::FlatTrainer`, the default on CPU in f32) or the
//! candle-autograd model (`VisionTransformer` + `rdrop_core::Trainer`, the reference, and the
//! path on CUDA and in reduced precision). Both write the same checkpoints. In a data-parallel
//! run either trainer all-reduces through the rank's collective.

use std::sync::Arc;

use anyhow::Context;
use candle_core::Tensor;
use rdrop_core::dist::Collective;
use rdrop_core::{
    CoreError, FlatRDropModel, FlatTrainer, StepStats, TrainConfig, TrainState, Trainer,
};
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
    /// A learner at update 0; with a `collective`, one rank of a data-parallel run (explicit
    /// engine only).
    pub fn new(
        model: VisionTransformer,
        tcfg: TrainConfig,
        explicit: bool,
        collective: Option<Arc<dyn Collective>>,
    ) -> anyhow::Result<Self> {
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
        }
    }

    /// Updates completed.
    pub fn step(&self) -> u64 {
        match &self.inner {
            Inner::Autograd { trainer, .. } => trainer.step(),
            Inner::Explicit { trainer, .. } => trainer.step(),
        }
    }

    /// The current loss scale (1 unless f16 on the autograd path).
    pub fn loss_scale(&self) -> f64 {
        match &self.inner {
            Inner::Autograd { trainer, .. } => trainer.loss_scale(),
            Inner::Explicit { .. } => 1.0,
        }
    }

    /// The checkpointable state at data position (`epoch`, `index`).
    pub fn state(&self, epoch: u64, index: u64) -> anyhow::Result<TrainState> {
        Ok(match &self.inner {
            Inner::Autograd { trainer, .. } => trainer.state(&self.model, epoch, index),
            Inner::Explicit {
                engine, trainer, ..
            } => trainer.state(engine.as_ref(), epoch, index)?,
        })
    }

    /// Eval-mode logits `(B, classes)` in f32 for images `x`.
    pub fn logits(&mut self, x: &Tensor) -> anyhow::Result<Tensor> {
        Ok(match &mut self.inner {
            Inner::Autograd { .. } => self.model.forward_t(x, false)?,
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

/// Eval-mode logits from either engine, for `rdrop eval` / `predict` (no trainer).
pub enum Predictor {
    /// The autograd model.
    Autograd(Box<VisionTransformer>),
    /// The explicit engine (a copy of the model's parameters).
    Explicit(Box<Engine>),
}

impl Predictor {
    /// A predictor for `model` on the engine `explicit` chooses.
    pub fn new(model: VisionTransformer, explicit: bool) -> anyhow::Result<Self> {
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_the_default_on_cpu_in_f32_only() {
        let auto = EngineKind::default();
        assert!(use_explicit(auto, &DeviceSpec::Cpu, Precision::F32).unwrap());
        assert!(!use_explicit(auto, &DeviceSpec::Cuda(0), Precision::Bf16).unwrap());
        assert!(!use_explicit(EngineKind::Autograd, &DeviceSpec::Cpu, Precision::F32).unwrap());
        let e = use_explicit(EngineKind::Explicit, &DeviceSpec::Cuda(0), Precision::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--engine explicit") && e.contains("CPU"), "{e}");
        // The default run configuration on CPU in f32 resolves to the engine too.
        let c = crate::config::RunConfig {
            device: DeviceSpec::Cpu,
            precision: Precision::F32,
            ..crate::config::RunConfig::default()
        };
        assert!(use_explicit(c.engine, &c.device, c.precision).unwrap());
    }
}
