//! A dataset summary (`rdrop data inspect --json`): counts, histograms, channel means and
//! SHA-256 checksums that can be compared with what Python computes from the same files.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cifar::{Cifar, Format, Split, SIDE};

/// Summary of one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitSummary {
    /// Number of images.
    pub n: usize,
    /// Images per fine class (CIFAR-10: per class).
    pub fine_hist: Vec<usize>,
    /// Images per coarse class (empty for CIFAR-10).
    pub coarse_hist: Vec<usize>,
    /// Mean of pixel/255 per channel (R, G, B).
    pub channel_mean: [f64; 3],
    /// Hex SHA-256 of the fine labels, one byte each, in file order.
    pub labels_sha256: String,
    /// Hex SHA-256 of the N×3072 pixel bytes in file order.
    pub pixels_sha256: String,
    /// File name of the first image, if the file names them.
    pub first_filename: Option<String>,
}

/// Summary of a dataset (the JSON of `rdrop data inspect --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// `cifar100` or `cifar10`.
    pub format: Format,
    /// Training split.
    pub train: SplitSummary,
    /// Test split.
    pub test: SplitSummary,
    /// Fine class names.
    pub fine_label_names: Vec<String>,
    /// Coarse class names (empty for CIFAR-10).
    pub coarse_label_names: Vec<String>,
}

fn hist(labels: &[u16], classes: usize) -> Vec<usize> {
    let mut h = vec![0usize; classes];
    for &l in labels {
        if let Some(c) = h.get_mut(l as usize) {
            *c += 1;
        }
    }
    h
}

impl SplitSummary {
    /// Summarise a split.
    pub fn of(s: &Split) -> SplitSummary {
        let plane = SIDE * SIDE;
        let mut sums = [0u64; 3];
        for img in s.images.chunks_exact(3 * plane) {
            for (c, p) in img.chunks_exact(plane).enumerate() {
                sums[c] += p.iter().map(|&v| v as u64).sum::<u64>();
            }
        }
        let count = (s.len() * plane) as f64;
        let labels: Vec<u8> = s.fine_labels.iter().map(|&l| l as u8).collect();
        SplitSummary {
            n: s.len(),
            fine_hist: hist(&s.fine_labels, s.num_classes),
            coarse_hist: hist(&s.coarse_labels, s.num_coarse_classes),
            channel_mean: sums.map(|v| {
                if count > 0.0 {
                    v as f64 / 255.0 / count
                } else {
                    0.0
                }
            }),
            labels_sha256: hex::encode(Sha256::digest(&labels)),
            pixels_sha256: hex::encode(Sha256::digest(&s.images)),
            first_filename: s.filenames.first().cloned(),
        }
    }
}

impl Cifar {
    /// Counts, histograms, channel means and checksums of both splits.
    pub fn summary(&self) -> Summary {
        Summary {
            format: self.format,
            train: SplitSummary::of(&self.train),
            test: SplitSummary::of(&self.test),
            fine_label_names: self.fine_label_names.clone(),
            coarse_label_names: self.coarse_label_names.clone(),
        }
    }
}
