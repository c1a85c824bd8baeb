//! Errors of rdrop-vit: each names the file or tensor and the problem.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, VitError>;

/// What can go wrong building, loading or saving a ViT.
#[derive(Debug, thiserror::Error)]
pub enum VitError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Writing a file atomically failed (rdrop-core's helper).
    #[error(transparent)]
    Core(#[from] rdrop_core::CoreError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be parsed.
    #[error("{path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A CUDA driver, cuBLASLt or kernel call of the CUDA engine failed.
    #[error("CUDA engine: {op}: {msg}")]
    Cuda {
        /// What was being done (e.g. `cuBLASLt matmul 1576×2304×768 bf16`).
        op: String,
        /// The error it returned.
        msg: String,
    },
    /// A configuration is invalid.
    #[error("invalid ViT configuration: {0}")]
    Config(String),
    /// A checkpoint tensor has the wrong shape.
    #[error("{source_name}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        /// The weights file.
        source_name: String,
        /// The tensor's (canonical) name.
        name: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape the model needs.
        expected: Vec<usize>,
    },
    /// Tensors the model needs are not in the checkpoint.
    #[error("{source_name}: missing tensors: {}", names.join(", "))]
    Missing {
        /// The weights file.
        source_name: String,
        /// Canonical names of the missing tensors.
        names: Vec<String>,
    },
    /// The weights spec could not be resolved to files.
    #[error("weights `{spec}`: {msg}")]
    Spec {
        /// What the user passed.
        spec: String,
        /// Why it failed.
        msg: String,
    },
    /// A hub file is not in the local cache and cannot be downloaded.
    #[error("hub repo `{repo}`: file `{file}` {msg}")]
    Hub {
        /// `org/name`.
        repo: String,
        /// The file in the repo.
        file: String,
        /// Why it is unavailable.
        msg: String,
    },
}

/// The one conversion into rdrop-core's error, for the trait implementations the trainers
/// call: tensor errors stay tensor errors, core errors come back unwrapped, the rest keep
/// their message.
impl From<VitError> for rdrop_core::CoreError {
    fn from(e: VitError) -> Self {
        match e {
            VitError::Candle(c) => Self::Candle(c),
            VitError::Core(c) => c,
            other => Self::Config(other.to_string()),
        }
    }
}

impl VitError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    #[allow(dead_code)] // used by the CUDA engine only
    pub(crate) fn cuda(op: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Cuda {
            op: op.into(),
            msg: e.to_string(),
        }
    }

    pub(crate) fn parse(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Parse {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
