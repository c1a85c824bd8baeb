//! `rdrop plot OUT`: draws `OUT/curves.png` from `OUT/metrics.jsonl` — training loss, its CE
//! and KL terms, the learning rate, and test top-1 against the update step. Also called at the
//! end of `rdrop train`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use rdrop_core::RunFolder;

use crate::metrics::{read_metrics, MetricLine};
use crate::picture::{draw_png, FAMILY};

/// The picture's size in pixels.
const SIZE: (u32, u32) = (1400, 900);

/// Arguments of `rdrop plot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run folder (holds metrics.jsonl).
    pub out: PathBuf,
    /// Output file (default: OUT/curves.png).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = RunFolder::new(&args.out);
    let out = args.output.unwrap_or_else(|| dir.curves());
    let n = plot_run(&dir, &out)?;
    println!("wrote {} ({n} metric lines)", out.display());
    Ok(())
}

/// Reads `dir/metrics.jsonl` and writes the curves to `out`; returns the number of lines used.
pub fn plot_run(dir: &RunFolder, out: &Path) -> anyhow::Result<usize> {
    let path = dir.metrics();
    anyhow::ensure!(
        path.is_file(),
        "{} not found: is {} a run folder of `rdrop train`?",
        path.display(),
        dir.root.display()
    );
    let lines = read_metrics(&path)?;
    anyhow::ensure!(!lines.is_empty(), "{} holds no metrics yet", path.display());
    let title = format!("rdrop run {}", dir.root.display());
    draw(&lines, out, &title)?;
    Ok(lines.len())
}

struct Series {
    name: &'static str,
    points: Vec<(f64, f64)>,
    color: RGBColor,
}

/// Exponential moving average (smoothing for the noisy per-update loss).
fn ema(points: &[(f64, f64)], beta: f64) -> Vec<(f64, f64)> {
    let mut acc = None;
    points
        .iter()
        .map(|&(x, y)| {
            let v = match acc {
                None => y,
                Some(a) => beta * a + (1.0 - beta) * y,
            };
            acc = Some(v);
            (x, v)
        })
        .collect()
}

/// Draws the 2×2 panels to a PNG.
pub fn draw(lines: &[MetricLine], out: &Path, title: &str) -> anyhow::Result<()> {
    let mut loss = Vec::new();
    let mut ce = Vec::new();
    let mut kl = Vec::new();
    let mut lr = Vec::new();
    let mut top1 = Vec::new();
    for l in lines {
        match l {
            MetricLine::Train(t) if !t.skipped => {
                let x = t.step as f64;
                loss.push((x, t.loss));
                ce.push((x, t.ce));
                kl.push((x, t.kl));
                lr.push((x, t.lr));
            }
            MetricLine::Train(_) => {}
            MetricLine::Eval(e) => top1.push((e.step as f64, 100.0 * e.top1)),
        }
    }
    let x_max = lines.iter().map(|l| l.step()).max().unwrap_or(1).max(1) as f64;
    let beta = if loss.len() > 50 { 0.9 } else { 0.0 };
    let grey = RGBColor(170, 190, 230);
    let spec: [(&str, Vec<Series>); 4] = [
        (
            "training loss (per update)",
            vec![
                Series {
                    name: "loss",
                    points: loss.clone(),
                    color: grey,
                },
                Series {
                    name: "loss (EMA)",
                    points: ema(&loss, beta),
                    color: BLUE,
                },
            ],
        ),
        (
            "loss terms: CE and symmetric KL (before α)",
            vec![
                Series {
                    name: "CE",
                    points: ema(&ce, beta),
                    color: RGBColor(200, 60, 0),
                },
                Series {
                    name: "KL",
                    points: ema(&kl, beta),
                    color: RGBColor(0, 140, 60),
                },
            ],
        ),
        (
            "learning rate",
            vec![Series {
                name: "lr",
                points: lr,
                color: MAGENTA,
            }],
        ),
        (
            "test top-1 (%)",
            vec![Series {
                name: "top-1",
                points: top1,
                color: BLACK,
            }],
        ),
    ];
    let (w, h) = SIZE;
    draw_png(out, vec![255; (w * h * 3) as usize], SIZE, |root| {
        let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
        let root = root.titled(title, (FAMILY, 24)).map_err(|e| err(&e))?;
        let panels = root.split_evenly((2, 2));
        for (area, (caption, series)) in panels.iter().zip(spec) {
            panel(area, caption, &series, x_max).map_err(|e| err(&e))?;
        }
        Ok(())
    })
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    series: &[Series],
    x_max: f64,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .collect();
    let (mut lo, mut hi) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
            (a.min(y), b.max(y))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let pad = 0.05 * (hi - lo);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| {
            let span = hi - lo;
            if v.abs() > 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
                format!("{v:.1e}")
            } else if span >= 10.0 {
                format!("{v:.0}")
            } else if span >= 1.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.2}")
            }
        })
        .draw()?;
    let mut any = false;
    for s in series {
        if s.points.is_empty() {
            continue;
        }
        any = true;
        let color = s.color;
        let style = ShapeStyle::from(&color).stroke_width(2);
        if s.points.len() == 1 || s.name == "top-1" {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?
                .label(s.name)
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
            chart.draw_series(LineSeries::new(s.points.iter().copied(), style))?;
        } else {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))?
                .label(s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if any {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    } else {
        area.draw(&Text::new(
            "no data yet",
            (
                area.dim_in_pixel().0 as i32 / 2 - 40,
                area.dim_in_pixel().1 as i32 / 2,
            ),
            (FAMILY, 16),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{EvalLine, MetricsWriter, TrainLine};

    #[test]
    fn draws_a_png_from_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunFolder::new(dir.path());
        let mut w = MetricsWriter::create(&run.metrics()).unwrap();
        for s in 1..=120u64 {
            w.write(&MetricLine::Train(TrainLine {
                step: s,
                epoch: s / 40,
                lr: 1e-3 * (s as f64 / 120.0),
                loss: 2.3 / (1.0 + s as f64 / 20.0),
                ce: 2.0 / (1.0 + s as f64 / 20.0),
                kl: 0.3,
                grad_norm: 1.0,
                images_per_s: 100.0,
                loss_scale: 1.0,
                skipped: false,
            }))
            .unwrap();
            if s % 40 == 0 {
                w.write(&MetricLine::Eval(EvalLine {
                    step: s,
                    epoch: s / 40,
                    top1: s as f64 / 130.0,
                    top5: 1.0,
                    test_loss: 0.5,
                }))
                .unwrap();
            }
        }
        drop(w);
        let out = run.curves();
        assert_eq!(plot_run(&run, &out).unwrap(), 123);
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1400, 900));
        // Not blank: many non-white pixels, and some coloured (the curves), some dark (text).
        let non_white = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(non_white > 20_000, "{non_white}");
        assert!(
            img.pixels().any(|p| p.0 == [0, 0, 255]),
            "no blue loss curve"
        );
        // An empty folder is a clear error.
        let empty = tempfile::tempdir().unwrap();
        let e = plot_run(&RunFolder::new(empty.path()), &empty.path().join("c.png")).unwrap_err();
        assert!(e.to_string().contains("metrics.jsonl not found"), "{e}");
    }
}
