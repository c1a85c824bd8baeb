//! `rdrop data` subcommands: inspect, bench, preview, download (one module each).

pub mod bench;
pub mod download;
pub mod inspect;
pub mod preview;

/// Inspect, benchmark, preview or download the CIFAR datasets.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Summarise a CIFAR-10/100 archive or folder: sizes, class histograms, channel means,
    /// SHA-256 of labels and pixels (`--json` for scripts).
    Inspect(inspect::Args),
    /// Measure the training input pipeline (augmentation + batching, decoding excluded) in
    /// images/s; random pixels unless `--data` is given.
    Bench(bench::Args),
    /// Write a PNG grid of samples captioned with their class names, as the model sees them.
    Preview(preview::Args),
    /// Download the official CIFAR archive and verify its MD5.
    Download(download::Args),
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Preview(a) => preview::run(a),
        Command::Download(a) => download::run(a),
    }
}

/// Open a dataset with a spinner on a terminal (the 161 MB archive takes a few seconds).
pub(crate) fn open(path: &std::path::Path) -> anyhow::Result<rdrop_data::Cifar> {
    use anyhow::Context;
    use std::io::IsTerminal;
    let spinner = std::io::stderr().is_terminal().then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!("decoding {}", path.display()));
        s.enable_steady_tick(std::time::Duration::from_millis(120));
        s
    });
    let r = rdrop_data::Cifar::open(path)
        .with_context(|| format!("cannot read the dataset at {}", path.display()));
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    r
}
