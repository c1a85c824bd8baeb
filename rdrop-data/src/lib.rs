//! # rdrop-data
//!
//! The data half of [rdrop](https://arxiv.org/abs/2106.14448) (R-Drop: Regularized Dropout
//! for Neural Networks, Liang et al. 2021), usable on its own:
//!
//! - [`Cifar`]: CIFAR-100 / CIFAR-10 "python version" archives read as a `.tar.gz` stream or
//!   an extracted folder, decoded by a pickle reader that executes nothing ([`pickle`]);
//! - [`TrainTransform`] / [`TestTransform`]: the R-Drop ViT recipe's augmentation with
//!   torchvision semantics, resized exactly as Pillow does ([`resize`]);
//! - [`Loader`]: deterministic batches (a pure function of seed, epoch and batch index),
//!   augmented in parallel with rayon and prepared ahead on a background thread; with the
//!   default `candle` feature, [`Batch::to_tensors`] gives candle tensors.
//!
//! ```
//! use std::sync::Arc;
//! use rdrop_data::{Loader, LoaderConfig, Split};
//!
//! // 100 random 32×32 images in 10 classes (a real run uses `Cifar::open(path)?.train`).
//! let split = Arc::new(Split::random(100, 10, 0));
//! let loader = Loader::new(split, LoaderConfig::train(64, 16, 42))?;
//! assert_eq!(loader.batches_per_epoch(), 6); // drop_last
//! let batches: Vec<_> = loader.epoch(0, 0).collect::<Result<_, _>>()?;
//! assert_eq!(batches[0].images.len(), 16 * 3 * 64 * 64);
//! // the same (seed, epoch, batch) always gives the same bytes
//! assert_eq!(loader.batch(0, 3)?, batches[3]);
//! # Ok::<(), rdrop_data::DataError>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

pub mod cifar;
pub mod error;
pub mod loader;
pub mod pickle;
pub mod resize;
pub mod summary;
pub mod transform;

pub use cifar::{Cifar, Format, Split, IMAGE_BYTES, SIDE};
pub use error::{DataError, Result};
pub use loader::{Augment, Batch, EpochIter, Loader, LoaderConfig};
pub use summary::{SplitSummary, Summary};
pub use transform::{CropBox, Normalize, Prepared, TestTransform, TrainTransform};
