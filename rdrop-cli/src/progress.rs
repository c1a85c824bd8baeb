//! Progress display: an indicatif bar (ETA, images/s, loss, lr, last top-1) on a terminal,
//! plain log lines on stderr otherwise (CI logs, `nohup`, pipes).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Training progress over `total` updates.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    /// Print anything at all.
    show: bool,
    total: u64,
    last_log: Instant,
    every: Duration,
    started: Instant,
    start_step: u64,
    last_top1: Option<f64>,
    last_base: String,
}

impl Progress {
    /// A bar when stderr is a terminal, else log lines at most every 5 s (and at the end);
    /// nothing at all unless `show` (the ranks other than 0 of a data-parallel run).
    pub fn new(start_step: u64, total: u64, show: bool) -> Self {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b.set_position(start_step);
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Self {
            bar,
            show,
            total,
            last_log: Instant::now() - Duration::from_secs(3600),
            every: Duration::from_secs(5),
            started: Instant::now(),
            start_step,
            last_top1: None,
            last_base: String::new(),
        }
    }

    /// After update `step`.
    pub fn update(&mut self, step: u64, images_per_s: f64, loss: f64, lr: f64) {
        self.last_base = format!("{images_per_s:.0} img/s loss {loss:.4} lr {lr:.2e}");
        let msg = self.message();
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                b.set_message(msg);
            }
            None if !self.show => {}
            None => {
                if self.last_log.elapsed() >= self.every || step == self.total {
                    self.last_log = Instant::now();
                    let done = step.saturating_sub(self.start_step) as f64;
                    let el = self.started.elapsed().as_secs_f64();
                    let eta = if done > 0.0 {
                        el / done * (self.total - step) as f64
                    } else {
                        0.0
                    };
                    eprintln!("step {step}/{} [{el:.0}s, eta {eta:.0}s] {msg}", self.total);
                }
            }
        }
    }

    fn message(&self) -> String {
        let top1 = self
            .last_top1
            .map(|t| format!(" top1 {:.2}%", 100.0 * t))
            .unwrap_or_default();
        format!("{}{top1}", self.last_base)
    }

    /// After an evaluation.
    pub fn eval(&mut self, step: u64, top1: f64, top5: f64, loss: f64) {
        self.last_top1 = Some(top1);
        if let Some(b) = &self.bar {
            b.set_message(self.message());
        }
        self.println(&format!(
            "eval at step {step}: top-1 {:.2}%  top-5 {:.2}%  loss {loss:.4}",
            100.0 * top1,
            100.0 * top5
        ));
    }

    /// A message that does not garble the bar.
    pub fn println(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None if !self.show => {}
            None => eprintln!("{s}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Files at least this large get a download display; smaller ones (configs) arrive silently.
const LARGE_DOWNLOAD: u64 = 8 << 20;

/// The progress of a hub download ([`rdrop_vit::hub::Progress`]): a byte bar (rate, ETA) on a
/// terminal, otherwise a line at the start, every 10 s, and at the end.
#[derive(Debug)]
pub struct DownloadProgress {
    /// Draw a bar when stderr is a terminal (false: plain lines only, for
    /// `HF_HUB_DISABLE_PROGRESS_BARS`).
    bars: bool,
    bar: Option<ProgressBar>,
    file: String,
    total: u64,
    done: u64,
    large: bool,
    started: Instant,
    last_log: Instant,
}

impl DownloadProgress {
    /// A display; `bars` false keeps to plain lines even on a terminal.
    pub fn new(bars: bool) -> Self {
        Self {
            bars: bars && std::io::stderr().is_terminal(),
            bar: None,
            file: String::new(),
            total: 0,
            done: 0,
            large: false,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }
}

fn megabytes(b: u64) -> f64 {
    b as f64 / 1e6
}

impl rdrop_vit::hub::Progress for DownloadProgress {
    fn start(&mut self, file: &str, total: u64) {
        self.file = file.to_string();
        self.total = total;
        self.done = 0;
        self.large = total >= LARGE_DOWNLOAD;
        self.started = Instant::now();
        self.last_log = Instant::now();
        if !self.large {
            return;
        }
        if self.bars {
            let b = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{msg} [{elapsed_precise}<{eta_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b.set_message(format!("downloading {file}"));
            self.bar = Some(b);
        } else {
            eprintln!("downloading {file} ({:.1} MB)", megabytes(total));
        }
    }

    fn advance(&mut self, done: u64) {
        self.done = done;
        match &self.bar {
            Some(b) => b.set_position(done),
            None if self.large && self.last_log.elapsed() >= Duration::from_secs(10) => {
                self.last_log = Instant::now();
                let s = self.started.elapsed().as_secs_f64().max(1e-9);
                eprintln!(
                    "downloading {}: {:.1}/{:.1} MB ({:.0}%, {:.1} MB/s)",
                    self.file,
                    megabytes(done),
                    megabytes(self.total),
                    100.0 * done as f64 / self.total.max(1) as f64,
                    megabytes(done) / s
                );
            }
            None => {}
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if self.large && self.done == self.total {
            eprintln!(
                "downloaded {} ({:.1} MB in {:.0} s)",
                self.file,
                megabytes(self.total),
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}
