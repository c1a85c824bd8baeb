//! The R-Drop ViT recipe's image transforms, with torchvision semantics on 32×32 CIFAR images.
//!
//! - train: `RandomResizedCrop((S, S), scale=(0.05, 1.0), ratio=(3/4, 4/3))` → (optional
//!   horizontal flip, off in the recipe) → `ToTensor` (/255) → `Normalize(0.5, 0.5)`;
//! - test: `Resize((S, S))` → `ToTensor` → `Normalize`.
//!
//! torchvision runs these on PIL images: the crop is cut out, then resized with Pillow's
//! bilinear filter (antialiased when shrinking) to 8-bit, then divided by 255. [`crate::resize`]
//! reproduces Pillow's integer arithmetic exactly, and [`Normalize::lut`] reproduces
//! `ToTensor` + `Normalize` in f32 bit for bit.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::cifar::SIDE;
use crate::resize::{resize_plane, vertical_first, Scratch, Taps};

/// Per-channel normalisation `(x/255 − mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Per-channel mean (R, G, B) subtracted after /255.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl Default for Normalize {
    /// The recipe: mean 0.5, std 0.5 (maps [0, 1] to [−1, 1]).
    fn default() -> Self {
        Normalize {
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }
}

impl Normalize {
    /// ImageNet statistics (timm/torchvision's default for ImageNet-1k models).
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };

    /// Lookup table `lut[c][v] = (v as f32 / 255 − mean[c]) / std[c]`, computed in f32 in the
    /// same order as torchvision's `ToTensor` + `Normalize`.
    pub fn lut(&self) -> [[f32; 256]; 3] {
        let mut t = [[0f32; 256]; 3];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = (v as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        t
    }
}

/// The training augmentation (`RandomResizedCrop` + optional flip + normalisation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainTransform {
    /// Output side S (the loader's `image_size` overrides it).
    pub image_size: usize,
    /// Range of the crop's area as a fraction of the image.
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio w/h (sampled log-uniformly).
    pub ratio: (f64, f64),
    /// Random horizontal flip with probability ½ after the crop (off in the recipe).
    pub hflip: bool,
    /// Normalisation after /255.
    pub normalize: Normalize,
}

impl Default for TrainTransform {
    /// The recipe (`vit_src/utils/data_utils.py`): 384 px, scale (0.05, 1), ratio (3/4, 4/3),
    /// no flip, mean/std 0.5.
    fn default() -> Self {
        TrainTransform {
            image_size: 384,
            scale: (0.05, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: false,
            normalize: Normalize::default(),
        }
    }
}

/// The evaluation transform (`Resize((S, S))` + normalisation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TestTransform {
    /// Output side S.
    pub image_size: usize,
    /// Normalisation after /255.
    pub normalize: Normalize,
}

impl Default for TestTransform {
    fn default() -> Self {
        TestTransform {
            image_size: 384,
            normalize: Normalize::default(),
        }
    }
}

/// A crop window in pixels (torchvision's `i, j, h, w`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    /// First row (`i`).
    pub top: usize,
    /// First column (`j`).
    pub left: usize,
    /// Rows (`h`).
    pub height: usize,
    /// Columns (`w`).
    pub width: usize,
}

/// torchvision's `RandomResizedCrop.get_params` for an image of `height × width`.
///
/// Up to 10 attempts: area `A·U(scale)`, aspect `exp(U(ln ratio))`,
/// `w = round(√(area·aspect))`, `h = round(√(area/aspect))` (round half to even, as Python's
/// `round`); accepted if `0 < w ≤ width` and `0 < h ≤ height`, then `i ~ U{0..height−h}`,
/// `j ~ U{0..width−w}`. Otherwise the centre-crop fallback: the whole image clipped to the
/// ratio range.
pub fn sample_crop<R: Rng + ?Sized>(
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut R,
) -> CropBox {
    let area = (height * width) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    let uniform = |rng: &mut R, a: f64, b: f64| a + (b - a) * rng.gen::<f64>();
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
            let (w, h) = (w as usize, h as usize);
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (rmin, rmax) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < rmin {
        (
            width,
            ((width as f64 / rmin).round_ties_even() as usize).clamp(1, height),
        )
    } else if in_ratio > rmax {
        (
            ((height as f64 * rmax).round_ties_even() as usize).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// A transform made ready to run: taps for every crop size and the normalisation table.
#[derive(Debug, Clone)]
pub struct Prepared {
    size: usize,
    normalize: Normalize,
    /// `taps[n − 1]`: resample n input pixels (whole window) to `size`.
    taps: Vec<Taps>,
    train: Option<TrainTransform>,
}

impl Prepared {
    /// Prepare the training transform for 32×32 inputs.
    pub fn train(t: &TrainTransform) -> Prepared {
        Self::build(t.image_size, t.normalize, Some(*t))
    }

    /// Prepare the test transform for 32×32 inputs.
    pub fn test(t: &TestTransform) -> Prepared {
        Self::build(t.image_size, t.normalize, None)
    }

    fn build(size: usize, normalize: Normalize, train: Option<TrainTransform>) -> Prepared {
        let taps = (1..=SIDE)
            .map(|n| Taps::bilinear(n, 0.0, n as f32, size))
            .collect();
        Prepared {
            size,
            normalize,
            taps,
            train,
        }
    }

    /// Output side S.
    pub fn image_size(&self) -> usize {
        self.size
    }

    /// f32 values per output image (3·S·S).
    pub fn output_len(&self) -> usize {
        3 * self.size * self.size
    }

    /// Transform one 3×32×32 CHW u8 image into `out` (3×S×S CHW f32). The train transform
    /// draws its crop (and flip) from `rng`; the test transform ignores it.
    pub fn apply_into<R: Rng + ?Sized>(
        &self,
        img: &[u8],
        rng: &mut R,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let (crop, flip) = match &self.train {
            Some(t) => {
                let c = sample_crop(SIDE, SIDE, t.scale, t.ratio, rng);
                (c, t.hflip && rng.gen_bool(0.5))
            }
            None => (
                CropBox {
                    top: 0,
                    left: 0,
                    height: SIDE,
                    width: SIDE,
                },
                false,
            ),
        };
        self.apply_crop(img, crop, flip, scratch, out);
    }

    /// Crop `crop` out of a 3×32×32 image, resize to S×S, optionally flip, normalise.
    pub fn apply_crop(
        &self,
        img: &[u8],
        crop: CropBox,
        flip: bool,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let s = self.size;
        let tx = &self.taps[crop.width.clamp(1, SIDE) - 1];
        let ty = &self.taps[crop.height.clamp(1, SIDE) - 1];
        for (c, dst) in out.chunks_exact_mut(s * s).enumerate().take(3) {
            let (mean, std) = (self.normalize.mean[c], self.normalize.std[c]);
            let plane = &img[c * SIDE * SIDE..(c + 1) * SIDE * SIDE];
            let vf = vertical_first(crop.width, crop.height, s, s);
            resize_plane(
                plane,
                SIDE,
                crop.left,
                crop.top,
                tx,
                ty,
                vf,
                scratch,
                dst,
                // the same f32 operations as `Normalize::lut` (bit-identical), but vectorisable
                move |v| (v as f32 / 255.0 - mean) / std,
            );
            if flip {
                dst.chunks_exact_mut(s).for_each(|row| row.reverse());
            }
        }
    }
}

impl TrainTransform {
    /// Transform one 3×32×32 CHW u8 image into a 3×S×S CHW f32 vector.
    /// (The loader uses [`Prepared`] to avoid rebuilding the taps per image.)
    pub fn apply<R: Rng + ?Sized>(&self, img: &[u8], rng: &mut R) -> Vec<f32> {
        let p = Prepared::train(self);
        let mut out = vec![0f32; p.output_len()];
        p.apply_into(img, rng, &mut Scratch::default(), &mut out);
        out
    }
}

impl TestTransform {
    /// Transform one 3×32×32 CHW u8 image into a 3×S×S CHW f32 vector.
    pub fn apply(&self, img: &[u8]) -> Vec<f32> {
        let p = Prepared::test(self);
        let mut out = vec![0f32; p.output_len()];
        let mut rng = rand::rngs::mock::StepRng::new(0, 0);
        p.apply_into(img, &mut rng, &mut Scratch::default(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crops_stay_inside_and_respect_ranges() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..2000 {
            let c = sample_crop(32, 32, (0.05, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(c.width >= 1 && c.height >= 1);
            assert!(c.left + c.width <= 32 && c.top + c.height <= 32);
        }
    }

    #[test]
    fn impossible_scale_falls_back_to_centre_crop() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let c = sample_crop(32, 32, (2.0, 3.0), (0.75, 4.0 / 3.0), &mut rng);
        assert_eq!((c.top, c.left, c.height, c.width), (0, 0, 32, 32));
        // wide image, ratio range below its aspect: clip the width
        let c = sample_crop(10, 40, (2.0, 3.0), (0.75, 4.0 / 3.0), &mut rng);
        assert_eq!((c.height, c.width, c.left), (10, 13, 13));
    }

    #[test]
    fn lut_matches_formula() {
        let l = Normalize::default().lut();
        assert_eq!(l[0][0], -1.0);
        assert_eq!(l[1][255], 1.0);
        assert!((l[2][128] - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-7);
    }
}
