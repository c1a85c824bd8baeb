//! A run folder's metrics (its layout is [`rdrop_core::run_folder`]'s).
//!
//! `metrics.jsonl` holds one JSON object per line: `{"kind": "train", "step", "epoch", "lr",
//! "loss", "ce", "kl", "grad_norm", "images_per_s", "loss_scale", "skipped"}` per update and
//! `{"kind": "eval", "step", "epoch", "top1", "top5", "test_loss"}` per evaluation. On resume
//! the lines after the checkpoint's step are dropped, so an interrupted and resumed run ends
//! with the same lines as an uninterrupted one (up to the wall-clock `images_per_s`).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Metrics of one optimiser update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainLine {
    /// Update number (1-based).
    pub step: u64,
    /// Epoch of the update's last micro-batch (0-based).
    pub epoch: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Mean loss over the update's micro-batches.
    pub loss: f64,
    /// Mean cross-entropy term.
    pub ce: f64,
    /// Mean symmetric-KL term (before α).
    pub kl: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training images per second over this update (wall clock).
    pub images_per_s: f64,
    /// Loss scale (1 unless f16).
    pub loss_scale: f64,
    /// Whether the update was skipped (f16 overflow).
    pub skipped: bool,
}

/// Metrics of one evaluation on the test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLine {
    /// Update after which it ran.
    pub step: u64,
    /// Epoch at that point.
    pub epoch: u64,
    /// Top-1 accuracy in [0, 1].
    pub top1: f64,
    /// Top-5 accuracy in [0, 1].
    pub top5: f64,
    /// Mean cross-entropy.
    pub test_loss: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricLine {
    /// An update.
    Train(TrainLine),
    /// An evaluation.
    Eval(EvalLine),
}

impl MetricLine {
    /// The step the line belongs to.
    pub fn step(&self) -> u64 {
        match self {
            Self::Train(t) => t.step,
            Self::Eval(e) => e.step,
        }
    }
}

/// Reads every line of a `metrics.jsonl`; a malformed line is an error naming its number
/// (except a torn last line, which a crash mid-write can leave: it is ignored).
pub fn read_metrics(path: &Path) -> anyhow::Result<Vec<MetricLine>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let lines: Vec<String> = BufReader::new(f)
        .lines()
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::with_capacity(lines.len());
    let n = lines.len();
    for (i, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(l) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == n => break,
            Err(e) => anyhow::bail!("{}: line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Appends lines to `metrics.jsonl`, flushing each one.
#[derive(Debug)]
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// A fresh file (an existing one is replaced).
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Resume: keeps the lines up to and including `step` (atomically rewritten), then appends.
    pub fn resume(path: &Path, step: u64) -> anyhow::Result<Self> {
        let kept: Vec<MetricLine> = if path.exists() {
            read_metrics(path)?
                .into_iter()
                .filter(|m| m.step() <= step)
                .collect()
        } else {
            Vec::new()
        };
        let mut text = String::new();
        for m in &kept {
            text += &serde_json::to_string(m)?;
            text.push('\n');
        }
        rdrop_core::atomic::write_bytes(path, text.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Writes one line.
    pub fn write(&mut self, m: &MetricLine) -> anyhow::Result<()> {
        let s = serde_json::to_string(m)?;
        writeln!(self.file, "{s}")
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Forces the lines to disk (before a checkpoint is declared written).
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(step: u64) -> MetricLine {
        MetricLine::Train(TrainLine {
            step,
            epoch: 0,
            lr: 0.1,
            loss: 1.5,
            ce: 1.0,
            kl: 0.5,
            grad_norm: 2.0,
            images_per_s: 10.0,
            loss_scale: 1.0,
            skipped: false,
        })
    }

    #[test]
    fn write_read_and_truncate_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::create(&p).unwrap();
        for s in 1..=5 {
            w.write(&train(s)).unwrap();
        }
        w.write(&MetricLine::Eval(EvalLine {
            step: 5,
            epoch: 0,
            top1: 0.5,
            top5: 0.9,
            test_loss: 1.2,
        }))
        .unwrap();
        drop(w);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.lines().next().unwrap().contains("\"kind\":\"train\""));
        assert_eq!(read_metrics(&p).unwrap().len(), 6);
        // a torn last line is ignored
        std::fs::write(&p, text.clone() + "{\"kind\":\"tra").unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 6);
        let mut w = MetricsWriter::resume(&p, 3).unwrap();
        w.write(&train(4)).unwrap();
        let back = read_metrics(&p).unwrap();
        assert_eq!(
            back.iter().map(|m| m.step()).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        // a bad line in the middle is an error naming it
        std::fs::write(&p, "{}\n".to_string() + &text).unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
