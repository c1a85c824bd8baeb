//! Typed errors: every variant names the file (or archive member) and the problem.

use std::path::PathBuf;

/// Anything that can go wrong reading a CIFAR dataset or preparing batches.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file or folder could not be read at all.
    #[error("{path}: {source}")]
    Io {
        /// File or folder being read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The `.tar.gz` stream is damaged (bad gzip data, bad tar header, cut short).
    #[error("{archive}: damaged or truncated archive: {message}")]
    Archive {
        /// Archive name (path, or the name given to `from_tar_gz_reader`).
        archive: String,
        /// What went wrong.
        message: String,
    },
    /// A pickle file is malformed or uses something outside the allow-list.
    #[error("{file}: pickle error at byte {offset}: {message}")]
    Pickle {
        /// The pickle file (or archive member).
        file: String,
        /// Byte offset of the opcode that failed.
        offset: usize,
        /// What went wrong.
        message: String,
    },
    /// The pickle decoded, but its contents are not a CIFAR batch (missing key, wrong
    /// dtype or shape, label out of range, ...).
    #[error("{file}: {message}")]
    Content {
        /// The pickle file (or archive member).
        file: String,
        /// What is wrong with it.
        message: String,
    },
    /// Neither the CIFAR-100 nor the CIFAR-10 set of files was found.
    #[error("{location}: not a CIFAR-10/100 dataset: {message}")]
    NotCifar {
        /// Folder or archive.
        location: String,
        /// What was found / missing.
        message: String,
    },
    /// A configuration value cannot work (batch size 0, image size 0, empty split, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The background loader thread stopped unexpectedly.
    #[error("loader thread failed: {0}")]
    Loader(String),
}

impl DataError {
    pub(crate) fn content(file: &str, message: impl Into<String>) -> Self {
        DataError::Content {
            file: file.to_string(),
            message: message.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
