//! The checkpointable training state, for a bit-exact resume
//! (the reference code saved only the weights; <https://arxiv.org/abs/2106.14448>).
//!
//! A checkpoint directory holds:
//! - `train_state.json`: update count, data position (epoch, batch index), dropout RNG state
//!   (the seed and the mask generator's name: the masks' update number is the update count),
//!   loss scaler, the optimiser's per-parameter step counts, and a free `extra` value for the
//!   caller (history, best accuracy, …);
//! - `optimizer.safetensors`: the optimiser's state tensors, stored bit-for-bit;
//! - the model's weights are written by the caller, e.g. [`crate::checkpoint::save_vars`].
//!
//! Each file is written to a temporary name in the same directory, flushed, and renamed over
//! the old one, so a crash never leaves a half-written file; the JSON is written last.

use std::path::Path;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::atomic::write_bytes;
use crate::checkpoint::{load_tensors, save_tensors};
use crate::error::{CoreError, Result};
use crate::optim::OptimizerState;
use crate::rng::RngState;
use crate::scaler::ScalerState;

/// File name of the scalar state inside a checkpoint directory.
pub const STATE_FILE: &str = "train_state.json";
/// File name of the optimiser tensors inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Version of `train_state.json`. 2: dropout masks from keyed Philox (`rng = {seed,
/// generator}`); 1 (older rdrop): ChaCha8 masks indexed by a call counter (`rng = {seed, calls}`).
pub const FORMAT: u32 = 2;

/// Everything besides the weights that an exact resume needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Updates completed.
    pub step: u64,
    /// The caller's epoch.
    pub epoch: u64,
    /// The caller's position within the epoch (e.g. the next micro-batch index).
    pub batch_index: u64,
    /// The model's dropout RNG.
    pub rng: RngState,
    /// The loss scaler.
    pub scaler: ScalerState,
    /// The optimiser (its tensors are stored in `optimizer.safetensors`).
    pub optimizer: OptimizerState,
    /// Free-form data of the caller, saved and restored as is.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// Just the version, read before the rest (an older file's fields may not parse).
#[derive(Deserialize)]
struct Version {
    format: u32,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    #[serde(flatten)]
    state: TrainState,
}

impl TrainState {
    /// Writes `train_state.json` and `optimizer.safetensors` into `dir` (created if needed).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| CoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        save_tensors(&dir.join(OPTIMIZER_FILE), &self.optimizer.tensors)?;
        let path = dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&OnDisk {
            format: FORMAT,
            state: self.clone(),
        })
        .map_err(|source| CoreError::Json {
            path: path.clone(),
            source,
        })?;
        write_bytes(&path, &json)
    }

    /// Reads a state written by [`TrainState::save`]; tensors are loaded on the CPU (the
    /// optimiser moves them to its variables' device).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|source| CoreError::Io {
            path: path.clone(),
            source,
        })?;
        let json_err = |source| CoreError::Json {
            path: path.clone(),
            source,
        };
        let version: Version = serde_json::from_slice(&bytes).map_err(json_err)?;
        match version.format {
            FORMAT => {}
            1 => {
                return Err(CoreError::Checkpoint {
                    path,
                    msg: "written by an older rdrop (train-state format 1), whose dropout masks \
                          came from ChaCha8 streams indexed by a call counter; this version keys \
                          the masks by (seed, update, site, sample, pass) with Philox4x32-10, so \
                          the run cannot be continued bit-exactly. Finish it with the rdrop \
                          version that wrote it, or start a new run from its weights \
                          (`rdrop train --weights <checkpoint dir>`)"
                        .into(),
                });
            }
            other => {
                return Err(CoreError::Checkpoint {
                    path,
                    msg: format!("unsupported state format {other} (expected {FORMAT})"),
                });
            }
        }
        let disk: OnDisk = serde_json::from_slice(&bytes).map_err(json_err)?;
        if let Err(e) = disk.state.rng.check_generator() {
            return Err(CoreError::Checkpoint {
                path,
                msg: format!("{e}; the run cannot be continued bit-exactly"),
            });
        }
        let mut state = disk.state;
        state.optimizer.tensors = load_tensors(&dir.join(OPTIMIZER_FILE), &Device::Cpu)?;
        Ok(state)
    }
}
