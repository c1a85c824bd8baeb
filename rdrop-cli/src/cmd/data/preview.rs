//! `rdrop data preview`: a PNG grid of samples, captioned with class names, exactly as the
//! loader hands them to the model (test transform, or the training augmentation with
//! `--augment`), un-normalised for display.

use std::path::PathBuf;
use std::sync::Arc;

use plotters::prelude::*;
use rdrop_data::{Augment, Loader, LoaderConfig, Normalize, TrainTransform};

use crate::picture::{draw_png, FAMILY};

const CAPTION: u32 = 16;
const PAD: u32 = 4;

/// Which split to show.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitName {
    /// The training split.
    Train,
    /// The test split.
    Test,
}

/// Arguments of `rdrop data preview`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// CIFAR-10/100 archive or extracted folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Split to sample from.
    #[arg(long, value_enum, default_value_t = SplitName::Train)]
    pub split: SplitName,
    /// Apply the recipe's training augmentation (RandomResizedCrop, scale 0.05..1) instead of
    /// the test resize.
    #[arg(long)]
    pub augment: bool,
    /// Number of images (the first N of the split, in file order).
    #[arg(long, default_value_t = 64)]
    pub n: usize,
    /// Side of each image as the model sees it (the transform's output size).
    #[arg(long, default_value_t = 64)]
    pub image_size: usize,
    /// Seed of the augmentation.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    anyhow::ensure!(
        (8..=512).contains(&args.image_size),
        "--image-size must be within 8..=512"
    );
    let c = super::open(&args.data)?;
    let names = c.fine_label_names.clone();
    let split = match args.split {
        SplitName::Train => c.train,
        SplitName::Test => c.test,
    };
    let n = args.n.min(split.len());
    anyhow::ensure!(n > 0, "the split is empty");
    let normalize = Normalize::default();
    let cfg = LoaderConfig {
        batch_size: n,
        image_size: args.image_size,
        seed: args.seed,
        shuffle: false,
        drop_last: false,
        augment: if args.augment {
            Augment::Recipe(TrainTransform::default())
        } else {
            Augment::None
        },
        ..Default::default()
    };
    let batch = Loader::new(Arc::new(split), cfg)?.batch(0, 0)?;
    let s = args.image_size as u32;
    let cols = (n as f64).sqrt().ceil() as u32;
    let rows = (n as u32).div_ceil(cols);
    let tile_w = s.max(96) + PAD;
    let tile_h = s + CAPTION + PAD;
    let (w, h) = (cols * tile_w + PAD, rows * tile_h + PAD);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let plane = (s * s) as usize;
    for (k, img) in batch.images.chunks_exact(3 * plane).enumerate() {
        let (x0, y0) = tile_origin(k as u32, cols, tile_w, tile_h, s);
        for c in 0..3 {
            for (p, &v) in img[c * plane..(c + 1) * plane].iter().enumerate() {
                let (x, y) = (x0 + p as u32 % s, y0 + p as u32 / s);
                let byte = ((v * normalize.std[c] + normalize.mean[c]) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8;
                buf[((y * w + x) * 3) as usize + c] = byte;
            }
        }
    }
    draw_png(&args.out, buf, (w, h), |root| {
        let style = TextStyle::from((FAMILY, 12).into_font()).color(&BLACK);
        for (k, &label) in batch.labels.iter().enumerate() {
            let (_, y0) = tile_origin(k as u32, cols, tile_w, tile_h, s);
            let x0 = PAD + (k as u32 % cols) * tile_w;
            let mut name = names
                .get(label as usize)
                .cloned()
                .unwrap_or_else(|| format!("class {label}"));
            let max_chars = (tile_w / 7).max(4) as usize;
            if name.chars().count() > max_chars {
                name = name.chars().take(max_chars - 1).collect::<String>() + "…";
            }
            root.draw_text(&name, &style, (x0 as i32, (y0 + s + 2) as i32))
                .map_err(|e| anyhow::anyhow!("captions: {e}"))?;
        }
        Ok(())
    })?;
    println!(
        "wrote {} ({n} {} images, {}, {w}×{h} px)",
        args.out.display(),
        match args.split {
            SplitName::Train => "train",
            SplitName::Test => "test",
        },
        if args.augment {
            "augmented"
        } else {
            "test transform"
        }
    );
    Ok(())
}

fn tile_origin(k: u32, cols: u32, tile_w: u32, tile_h: u32, s: u32) -> (u32, u32) {
    let (cx, cy) = (k % cols, k / cols);
    (
        PAD + cx * tile_w + (tile_w - PAD - s) / 2,
        PAD + cy * tile_h,
    )
}
