//! Deterministic, parallel batch loader.
//!
//! Batch `b` of epoch `e` is a pure function of `(seed, e, b)`: the epoch's order is a
//! Fisher–Yates shuffle driven by ChaCha8 keyed with `(seed, e)`, and each sample's
//! augmentation draws from its own ChaCha8 stream keyed with `(seed, e, dataset index)`.
//! So the bytes do not depend on the thread count, and a run resumed at `(e, b)` sees exactly
//! the batches an uninterrupted run would have seen. Augmentation runs on rayon (a private pool
//! of `threads` workers, or the global pool); whole batches are prepared ahead on a background
//! thread into a bounded queue of depth `prefetch`.

use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cifar::Split;
use crate::error::{DataError, Result};
use crate::resize::Scratch;
use crate::transform::{Prepared, TestTransform, TrainTransform};

/// Which transform the loader applies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// The training augmentation (`RandomResizedCrop`, ...).
    Recipe(TrainTransform),
    /// The test transform (resize the whole image) with the default normalisation.
    None,
    /// The test transform with a chosen normalisation.
    Test(TestTransform),
}

/// Loader settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Output side S (overrides the transform's own `image_size`).
    pub image_size: usize,
    /// Seed of the shuffles and augmentations.
    pub seed: u64,
    /// Shuffle each epoch (train) or keep file order (eval).
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Transform.
    pub augment: Augment,
    /// Batches prepared ahead (bounded queue depth; 0 = hand over one at a time).
    pub prefetch: usize,
    /// rayon workers (None: the global pool).
    pub threads: Option<usize>,
}

impl Default for LoaderConfig {
    /// The recipe's training loader: micro-batch 32, 384 px, seed 42, shuffled, recipe
    /// augmentation.
    fn default() -> Self {
        LoaderConfig {
            batch_size: 32,
            image_size: 384,
            seed: 42,
            shuffle: true,
            drop_last: true,
            augment: Augment::Recipe(TrainTransform::default()),
            prefetch: 4,
            threads: None,
        }
    }
}

impl LoaderConfig {
    /// Training loader: shuffled, `drop_last`, recipe augmentation at `image_size`.
    pub fn train(image_size: usize, batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            image_size,
            seed,
            ..Default::default()
        }
    }

    /// Evaluation loader: file order, every image (no `drop_last`), test transform.
    pub fn test(image_size: usize, batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            image_size,
            shuffle: false,
            drop_last: false,
            augment: Augment::None,
            ..Default::default()
        }
    }
}

/// One batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Epoch it belongs to.
    pub epoch: u64,
    /// Index within the epoch.
    pub index: usize,
    /// Side S of each image.
    pub image_size: usize,
    /// N×3×S×S f32, CHW per image.
    pub images: Vec<f32>,
    /// Fine labels, N.
    pub labels: Vec<u32>,
    /// Dataset index of each image, N.
    pub indices: Vec<u32>,
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `(images (N,3,S,S) in `dtype`, labels (N,) u32)` on `device`. The conversion to
    /// `dtype` happens on the CPU before the copy to the device.
    #[cfg(feature = "candle")]
    pub fn to_tensors(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
        use candle_core::{Device, Tensor};
        let s = self.image_size;
        let x = Tensor::from_slice(&self.images, (self.len(), 3, s, s), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let y = Tensor::from_slice(&self.labels, self.len(), device)?;
        Ok((x, y))
    }
}

fn key(seed: u64, epoch: u64, index: u64, tag: &[u8; 8]) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&seed.to_le_bytes());
    k[8..16].copy_from_slice(&epoch.to_le_bytes());
    k[16..24].copy_from_slice(&index.to_le_bytes());
    k[24..].copy_from_slice(tag);
    k
}

/// The augmentation RNG of dataset image `index` in `epoch`.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    ChaCha8Rng::from_seed(key(seed, epoch, index, b"rdrop:ag"))
}

/// The order of the `n` images in `epoch` (identity when not shuffling).
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    if shuffle {
        order.shuffle(&mut ChaCha8Rng::from_seed(key(seed, epoch, 0, b"rdrop:sh")));
    }
    order
}

struct Shared {
    split: Arc<Split>,
    cfg: LoaderConfig,
    prepared: Prepared,
    pool: Option<rayon::ThreadPool>,
    /// Image buffers handed back with [`Loader::recycle`] (saves page faults on big batches).
    spare: std::sync::Mutex<Vec<Vec<f32>>>,
}

impl Shared {
    /// A buffer of `n` f32 (contents unspecified: every value is overwritten).
    fn buffer(&self, n: usize) -> Vec<f32> {
        let spare = self.spare.lock().ok().and_then(|mut s| s.pop());
        match spare {
            Some(v) if v.len() == n => v,
            Some(mut v) => {
                v.clear();
                v.resize(n, 0.0);
                v
            }
            None => vec![0f32; n],
        }
    }

    fn batch(&self, order: &[u32], epoch: u64, index: usize) -> Result<Batch> {
        let b = self.cfg.batch_size;
        let start = index * b;
        let end = (start + b).min(order.len());
        if start >= end {
            return Err(DataError::Config(format!(
                "batch {index} is past the end of the epoch ({} images)",
                order.len()
            )));
        }
        let indices = order[start..end].to_vec();
        let per = self.prepared.output_len();
        let mut images = self.buffer(indices.len() * per);
        let work = |images: &mut Vec<f32>| {
            images
                .par_chunks_mut(per)
                .zip(indices.par_iter())
                .for_each_init(Scratch::default, |scratch, (out, &i)| {
                    let mut rng = sample_rng(self.cfg.seed, epoch, i as u64);
                    let img = self.split.image(i as usize);
                    self.prepared.apply_into(img, &mut rng, scratch, out);
                })
        };
        match &self.pool {
            Some(p) => p.install(|| work(&mut images)),
            None => work(&mut images),
        }
        let labels = indices
            .iter()
            .map(|&i| self.split.fine_labels[i as usize] as u32)
            .collect();
        Ok(Batch {
            epoch,
            index,
            image_size: self.cfg.image_size,
            images,
            labels,
            indices,
        })
    }
}

/// Deterministic batch loader over one split.
pub struct Loader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("images", &self.shared.split.len())
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

impl Loader {
    /// A loader over `split`. Errors on batch size 0, image size 0, an empty split, or a
    /// thread pool that cannot start.
    pub fn new(split: Arc<Split>, cfg: LoaderConfig) -> Result<Loader> {
        if cfg.batch_size == 0 {
            return Err(DataError::Config("batch size must be at least 1".into()));
        }
        if cfg.image_size == 0 {
            return Err(DataError::Config("image size must be at least 1".into()));
        }
        if split.is_empty() {
            return Err(DataError::Config("the split holds no image".into()));
        }
        split.check("loader split")?;
        let prepared = match cfg.augment {
            Augment::Recipe(t) => Prepared::train(&TrainTransform {
                image_size: cfg.image_size,
                ..t
            }),
            Augment::None => Prepared::test(&TestTransform {
                image_size: cfg.image_size,
                ..Default::default()
            }),
            Augment::Test(t) => Prepared::test(&TestTransform {
                image_size: cfg.image_size,
                ..t
            }),
        };
        let pool = match cfg.threads {
            Some(t) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t.max(1))
                    .thread_name(|i| format!("rdrop-data-{i}"))
                    .build()
                    .map_err(|e| DataError::Loader(format!("cannot start {t} threads: {e}")))?,
            ),
            None => None,
        };
        Ok(Loader {
            shared: Arc::new(Shared {
                split,
                cfg,
                prepared,
                pool,
                spare: std::sync::Mutex::new(Vec::new()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.shared.cfg
    }

    /// Images in the split.
    pub fn num_images(&self) -> usize {
        self.shared.split.len()
    }

    /// Batches per epoch (`⌊n/B⌋` with `drop_last`, else `⌈n/B⌉`).
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.shared.split.len(), self.shared.cfg.batch_size);
        if self.shared.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Order of the images in `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<u32> {
        let c = &self.shared.cfg;
        epoch_order(self.shared.split.len(), c.seed, epoch, c.shuffle)
    }

    /// Hand a used batch back so that its image buffer is reused for a later batch (optional:
    /// it avoids fresh allocations and their page faults, 38 MB per batch of 64 at 224 px).
    pub fn recycle(&self, batch: Batch) {
        if let Ok(mut s) = self.shared.spare.lock() {
            if s.len() < self.shared.cfg.prefetch + 2 {
                s.push(batch.images);
            }
        }
    }

    /// Build batch `index` of `epoch` on the calling thread (plus the rayon pool).
    pub fn batch(&self, epoch: u64, index: usize) -> Result<Batch> {
        if index >= self.batches_per_epoch() {
            return Err(DataError::Config(format!(
                "batch {index} of {} per epoch",
                self.batches_per_epoch()
            )));
        }
        self.shared.batch(&self.order(epoch), epoch, index)
    }

    /// Iterate over the batches of `epoch` from `start_batch` on, prepared ahead on a
    /// background thread. Dropping the iterator stops the thread.
    pub fn epoch(&self, epoch: u64, start_batch: usize) -> EpochIter {
        let total = self.batches_per_epoch();
        let start = start_batch.min(total);
        let (tx, rx) = crossbeam_channel::bounded(self.shared.cfg.prefetch);
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name("rdrop-data-prefetch".into())
            .spawn(move || {
                let order = epoch_order(
                    shared.split.len(),
                    shared.cfg.seed,
                    epoch,
                    shared.cfg.shuffle,
                );
                for index in start..total {
                    let b = shared.batch(&order, epoch, index);
                    let stop = b.is_err();
                    if tx.send(b).is_err() || stop {
                        break;
                    }
                }
            });
        match handle {
            Ok(h) => EpochIter {
                rx: Some(rx),
                handle: Some(h),
                remaining: total - start,
                start_error: None,
            },
            Err(e) => EpochIter {
                rx: None,
                handle: None,
                remaining: total - start,
                start_error: Some(e.to_string()),
            },
        }
    }
}

/// Iterator over one epoch's batches (see [`Loader::epoch`]).
pub struct EpochIter {
    rx: Option<crossbeam_channel::Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
    remaining: usize,
    start_error: Option<String>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let got = self.rx.as_ref().and_then(|rx| rx.recv().ok());
        match got {
            Some(b) => {
                self.remaining = if b.is_ok() { self.remaining - 1 } else { 0 };
                Some(b)
            }
            None => {
                self.remaining = 0;
                let why = match self.handle.take().map(|h| h.join()) {
                    Some(Err(_)) => "the background thread panicked".to_string(),
                    Some(Ok(())) => "the background thread stopped early".to_string(),
                    None => format!(
                        "the background thread could not start: {}",
                        self.start_error.as_deref().unwrap_or("unknown reason")
                    ),
                };
                Some(Err(DataError::Loader(why)))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the receiver makes the producer's next send fail, so it exits.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
