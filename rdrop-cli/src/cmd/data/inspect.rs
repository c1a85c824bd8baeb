//! `rdrop data inspect`: what a CIFAR archive or folder holds.

use std::path::PathBuf;

use rdrop_data::SplitSummary;

/// Arguments of `rdrop data inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// CIFAR-10/100 python archive (`.tar.gz`, read as a stream) or extracted folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Print `{"format", "train", "test", "fine_label_names", "coarse_label_names"}` as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let c = super::open(&args.data)?;
    let s = c.summary();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "{}: {} ({} fine classes{})",
        args.data.display(),
        match s.format {
            rdrop_data::Format::Cifar100 => "CIFAR-100",
            rdrop_data::Format::Cifar10 => "CIFAR-10",
        },
        s.fine_label_names.len(),
        if s.coarse_label_names.is_empty() {
            String::new()
        } else {
            format!(", {} coarse", s.coarse_label_names.len())
        }
    );
    println!("  classes: {}", preview_names(&s.fine_label_names));
    for (name, sp) in [("train", &s.train), ("test", &s.test)] {
        print_split(name, sp);
    }
    Ok(())
}

fn preview_names(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
    if names.len() > shown.len() {
        format!(
            "{}, … ({} more)",
            shown.join(", "),
            names.len() - shown.len()
        )
    } else {
        shown.join(", ")
    }
}

fn print_split(name: &str, s: &SplitSummary) {
    let (lo, hi) = (
        s.fine_hist.iter().min().copied().unwrap_or(0),
        s.fine_hist.iter().max().copied().unwrap_or(0),
    );
    println!(
        "  {name:5}: {} images, {lo}..{hi} per class, channel mean R {:.4} G {:.4} B {:.4}",
        s.n, s.channel_mean[0], s.channel_mean[1], s.channel_mean[2]
    );
    println!(
        "         first file {}, labels sha256 {}…, pixels sha256 {}…",
        s.first_filename.as_deref().unwrap_or("(none)"),
        &s.labels_sha256[..16],
        &s.pixels_sha256[..16]
    );
}
