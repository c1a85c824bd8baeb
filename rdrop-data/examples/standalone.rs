//! rdrop-data on its own (builds with `--no-default-features`, no candle):
//!
//! ```text
//! cargo run -p rdrop-data --no-default-features --example standalone [-- PATH_TO_CIFAR]
//! ```
//!
//! Opens a CIFAR archive/folder if given (else uses random pixels), then runs one epoch of the
//! recipe's training augmentation and one pass of the test transform, printing what it got.

use std::sync::Arc;
use std::time::Instant;

use rdrop_data::{Cifar, Loader, LoaderConfig, Split};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (train, test, names) = match std::env::args().nth(1) {
        Some(path) => {
            let c = Cifar::open(path.as_ref())?;
            println!(
                "{path}: {} ({} train, {} test, {} classes)",
                c.format.name(),
                c.train.len(),
                c.test.len(),
                c.fine_label_names.len()
            );
            (c.train, c.test, c.fine_label_names)
        }
        None => {
            println!("no dataset given: 256 + 64 images of random pixels, 10 classes");
            let names = (0..10).map(|i| format!("class{i}")).collect();
            (Split::random(256, 10, 1), Split::random(64, 10, 2), names)
        }
    };
    let train = Arc::new(train);
    let cfg = LoaderConfig {
        threads: Some(2),
        ..LoaderConfig::train(64, 32, 42)
    };
    let loader = Loader::new(train.clone(), cfg)?;
    let t = Instant::now();
    let mut seen = 0;
    for (i, batch) in loader.epoch(0, 0).enumerate().take(8) {
        let batch = batch?;
        let mean = batch.images.iter().sum::<f32>() / batch.images.len() as f32;
        if i == 0 {
            println!(
                "batch 0: {} images of 3×{s}×{s}, first label {} ({}), mean value {mean:.3}",
                batch.len(),
                batch.labels[0],
                names[batch.labels[0] as usize],
                s = batch.image_size,
            );
        }
        seen += batch.len();
    }
    let dt = t.elapsed().as_secs_f64();
    println!("train: {seen} augmented images in {dt:.2}s");
    // Determinism: rebuilding batch 1 of epoch 0 gives the same bytes.
    assert_eq!(
        loader.batch(0, 1)?,
        loader.epoch(0, 1).next().ok_or("empty")??
    );
    let eval = Loader::new(Arc::new(test), LoaderConfig::test(64, 50))?;
    let n: usize = eval
        .epoch(0, 0)
        .map(|b| b.map(|b| b.len()))
        .sum::<Result<_, _>>()?;
    println!("test: {n} images in {} batches", eval.batches_per_epoch());
    Ok(())
}
