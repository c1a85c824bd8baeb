//! `rdrop`: fine-tune Vision Transformers with R-Drop
//! ([Liang et al., 2021](https://arxiv.org/abs/2106.14448)).
//!
//! One module per subcommand under `cmd/`; each exposes an `Args` (clap derive) and
//! `run(args) -> anyhow::Result<()>`. Errors are printed with their whole chain.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod config;
mod device;
mod evaluate;
mod hub;
mod launch;
mod learner;
mod metrics;
mod micro;
mod picture;
mod progress;
mod restart;
mod setup;
mod signals;
mod stream;
mod test_hooks;
mod world;

/// Fine-tune Vision Transformers with R-Drop (regularized dropout).
///
/// Each training sample goes through the network twice with dropout; the loss adds
/// α × the bidirectional KL divergence between the two predictions to their cross-entropy.
#[derive(Parser, Debug)]
#[command(name = "rdrop", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a ViT with R-Drop (presets: demo, vit-b16-cifar100, vit-src).
    Train(Box<cmd::train::Args>),
    /// Continue a training run from its newest checkpoint (same as `train --resume OUT`).
    Resume(cmd::resume::Args),
    /// Evaluate weights (HF folder / hub id, timm file, npz, run folder) on the test split.
    Eval(cmd::eval::Args),
    /// Classify image files (PNG/JPEG) with a trained model.
    Predict(cmd::predict::Args),
    /// Inspect, benchmark, preview or download the CIFAR datasets.
    #[command(subcommand)]
    Data(cmd::data::Command),
    /// Benchmarks on synthetic data: the training step (`bench train`, `--profile` for where its
    /// time goes), inference (`bench eval`) and the CPU GEMM's peak (`bench gemm`).
    #[command(subcommand)]
    Bench(cmd::bench::Command),
    /// Draw curves.png (loss, CE, KL, lr, test top-1) from a run folder's metrics.jsonl.
    Plot(cmd::plot::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => cmd::train::run(*a),
        Command::Resume(a) => cmd::resume::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Predict(a) => cmd::predict::run(a),
        Command::Data(c) => cmd::data::run(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Plot(a) => cmd::plot::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A stop on a signal is no error: the checkpoint is written.
            if let Some(i) = err.downcast_ref::<cmd::Interrupted>() {
                eprintln!("stopped: {i}");
                return ExitCode::from(i.stop.exit_code());
            }
            if let Some(f) = err.downcast_ref::<launch::RanksFailed>() {
                if f.stopped.is_some() {
                    eprintln!("stopped: {f}");
                    return ExitCode::from(f.exit_code());
                }
            }
            eprintln!("error: {}", error_chain(&err));
            if let Some(f) = err.downcast_ref::<launch::RanksFailed>() {
                return ExitCode::from(f.exit_code());
            }
            if launch::is_peer_death(&err) {
                return ExitCode::from(launch::PEER_DIED_EXIT);
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", skipping a cause whose text the message before it
/// already contains (the library errors print their source inline, as `thiserror` users expect).
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = without_backtrace(&text);
        if out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out
}

/// `text` without the backtrace that candle appends to its errors' messages when
/// `RUST_BACKTRACE` is set (a line `   0: <unknown>` and the frames after it): errors stay one
/// line.
fn without_backtrace(text: &str) -> &str {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if at > 0 && line.trim_start().starts_with("0: ") {
            return text[..at].trim_end();
        }
        at += line.len();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::{error_chain, without_backtrace};

    #[test]
    fn candles_backtraces_are_cut_from_messages() {
        let with = "no CUDA GPU found: DriverError(CUDA_ERROR_NO_DEVICE)\n   0: <unknown>\n   1: \
                    <unknown>\n  12: __libc_start_call_main\n             at ./csu/x.h:58:16\n";
        assert_eq!(
            without_backtrace(with),
            "no CUDA GPU found: DriverError(CUDA_ERROR_NO_DEVICE)"
        );
        assert_eq!(without_backtrace("plain"), "plain");
        assert_eq!(without_backtrace("a\nb: 0: c"), "a\nb: 0: c");
        let err = anyhow::anyhow!("{with}").context("opening cuda:0");
        assert_eq!(
            error_chain(&err),
            "opening cuda:0: no CUDA GPU found: DriverError(CUDA_ERROR_NO_DEVICE)"
        );
    }

    #[test]
    fn error_chain_skips_causes_already_printed() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(io)
            .context("x: No such file")
            .context("reading dataset x");
        assert_eq!(error_chain(&err), "reading dataset x: x: No such file");
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&err), "outer: inner");
    }
}
