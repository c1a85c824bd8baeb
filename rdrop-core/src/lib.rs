//! rdrop-core: the mathematics of R-Drop training, independent of the model and the data.
//!
//! R-Drop ([Liang et al., NeurIPS 2021](https://arxiv.org/abs/2106.14448)) feeds every sample
//! through the network twice with dropout and adds α × the bidirectional KL divergence between
//! the two predictions to their cross-entropy.
//!
//! - [`loss`]: the objective in its `mean` and `reference` conventions and their equivalence
//!   (`reference(α) = 2 · mean(m·α)` at micro-batch `m`);
//! - [`passes`]: the two stochastic passes, concatenated `[x; x]` or sequential;
//! - [`rng`]: dropout masks keyed by (seed, update, site, sample, pass) (Philox4x32-10);
//! - [`optim`]: SGD with (Nesterov) momentum and AdamW, PyTorch semantics, exportable state;
//! - [`clip`]: `clip_grad_norm_`; [`scaler`]: dynamic loss scaling for f16;
//! - [`schedule`]: warm-up + cosine/linear learning-rate multiplier `lr_lambda(k)`;
//! - [`flat`]: the same update over flat parameter/gradient/moment buffers (explicit engines);
//! - [`profile`]: where an update's time goes (op groups, FLOPs, bytes);
//! - [`trainer`]: one composed update (accumulation, scaling, clipping, schedule, step);
//! - [`state`], [`checkpoint`]: the training state and atomic checkpoint files;
//! - [`dist`]: data-parallel training (launch variables, rendezvous, collectives, sharding).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod atomic;
pub mod checkpoint;
pub mod clip;
pub mod dist;
pub mod error;
pub mod flat;
pub mod loss;
pub mod model;
pub mod optim;
pub mod passes;
pub mod profile;
pub mod rng;
pub mod run_folder;
pub mod scaler;
pub mod schedule;
pub mod split;
pub mod state;
pub mod trainer;

pub use checkpoint::{load_vars, save_vars};
pub use clip::{clip_grad_norm, global_grad_norm};
pub use error::{CoreError, Result};
pub use flat::{
    FlatLayout, FlatOptimizer, FlatRDropModel, FlatTrainer, FlatView, MicroLoss, MicroStep,
    UpdateBackend,
};
pub use loss::{mean_to_reference, rdrop_loss, reference_to_mean, LossConfig, LossMode, LossParts};
pub use model::RDropModel;
pub use optim::{OptimConfig, Optimizer, OptimizerKind, OptimizerState, WeightDecayScope};
pub use passes::{two_pass_logits, TwoPass};
pub use profile::{GroupTime, Profile, Stopwatch};
pub use rng::{DropoutContext, DropoutRng, RngState, RowKey};
pub use run_folder::RunFolder;
pub use scaler::{LossScaler, ScalerConfig, ScalerState};
pub use schedule::{lr_lambda, DecayKind, ScheduleConfig};
pub use split::UpdateSplit;
pub use state::TrainState;
pub use trainer::{Precision, StepStats, TrainConfig, Trainer};
