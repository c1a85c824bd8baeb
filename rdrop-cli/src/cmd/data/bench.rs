//! `rdrop data bench`: throughput of the training input pipeline (augmentation + batching).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rdrop_data::{Loader, LoaderConfig, Split};

/// Arguments of `rdrop data bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset to read (its train split); random 32×32 pixels (50,000 images) when absent.
    /// Decoding is not timed.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output side S (RandomResizedCrop to S×S).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Batches to time (after one warm-up batch).
    #[arg(long, default_value_t = 100)]
    pub batches: usize,
    /// Augmentation threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Batches prepared ahead.
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    /// Print `{"images_per_s", ...}` as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.batches > 0, "--batches must be at least 1");
    let (split, source) = match &args.data {
        Some(p) => (super::open(p)?.train, p.display().to_string()),
        None => (Split::random(50_000, 100, 0), "random".to_string()),
    };
    let cfg = LoaderConfig {
        threads: args.threads,
        prefetch: args.prefetch,
        ..LoaderConfig::train(args.image_size, args.batch_size, 0)
    };
    let loader = Loader::new(Arc::new(split), cfg).context("cannot build the loader")?;
    let per_epoch = loader.batches_per_epoch();
    anyhow::ensure!(per_epoch > 0, "the split is smaller than one batch");
    let bar = crate_progress(args.batches as u64);
    let mut epoch = 0u64;
    let mut iter = loader.epoch(epoch, 0);
    let mut next = || -> anyhow::Result<rdrop_data::Batch> {
        loop {
            if let Some(b) = iter.next() {
                return Ok(b?);
            }
            epoch += 1;
            iter = loader.epoch(epoch, 0);
        }
    };
    next()?; // warm-up: thread start, first allocation
    let t = Instant::now();
    let mut images = 0usize;
    for _ in 0..args.batches {
        let b = next()?;
        images += b.len();
        loader.recycle(b); // as a training loop does once the batch is on the device
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let ips = images as f64 / secs;
    let threads = args.threads.unwrap_or_else(rayon::current_num_threads);
    if args.json {
        let v = serde_json::json!({
            "images_per_s": ips,
            "images": images,
            "seconds": secs,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "threads": threads,
            "source": source,
        });
        println!("{v}");
    } else {
        println!(
            "{ips:.0} images/s ({images} images of 3×{s}×{s} in {secs:.2}s, batch {}, {threads} threads, {source})",
            args.batch_size,
            s = args.image_size
        );
    }
    Ok(())
}

fn crate_progress(n: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(n);
        if let Ok(s) =
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} batches {per_sec}")
        {
            b.set_style(s);
        }
        b
    })
}
