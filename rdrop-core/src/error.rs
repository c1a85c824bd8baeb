//! Errors of rdrop-core's training machinery.

use std::path::PathBuf;

/// An error from a training update or a checkpoint operation.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The loss (or the gradient norm) of an update is inf/NaN in f32/bf16 training, where no
    /// loss scaler can absorb it: the run should stop.
    #[error("non-finite {what} ({value}) at update {step}")]
    NonFinite {
        /// The update (1-based) that produced it.
        step: u64,
        /// `"loss"` or `"gradient norm"`.
        what: &'static str,
        /// The value seen.
        value: f64,
    },
    /// A data-parallel operation failed (rendezvous, collective, a peer died).
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// An invalid configuration.
    #[error("invalid training configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON state file is malformed.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A checkpoint does not fit the model or the configuration.
    #[error("{path}: {msg}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What does not fit.
        msg: String,
    },
}

/// Result alias of rdrop-core's training machinery.
pub type Result<T> = std::result::Result<T, CoreError>;
