//! `rdrop data download`: fetch the official CIFAR archive with a progress bar, verify its MD5,
//! and only then move it into place (nothing is left behind on failure).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use md5::{Digest, Md5};

/// Which dataset.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataset {
    /// CIFAR-100 python version (161 MB).
    Cifar100,
    /// CIFAR-10 python version (163 MB).
    Cifar10,
}

impl Dataset {
    /// (file name, official URL, MD5).
    pub fn official(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Dataset::Cifar100 => (
                "cifar-100-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
            ),
            Dataset::Cifar10 => (
                "cifar-10-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
            ),
        }
    }
}

/// Arguments of `rdrop data download`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Folder to save the archive in (created if needed).
    #[arg(long, default_value = "data")]
    pub to: PathBuf,
    /// Which dataset.
    #[arg(long, value_enum, default_value_t = Dataset::Cifar100)]
    pub dataset: Dataset,
    /// Download from this URL instead (a mirror); the MD5 is still checked.
    #[arg(long)]
    pub url: Option<String>,
    /// Expected MD5 (hex) instead of the official one (for a mirror serving another file).
    #[arg(long)]
    pub md5: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (name, url, md5) = args.dataset.official();
    let url = args.url.as_deref().unwrap_or(url);
    let want = args.md5.as_deref().unwrap_or(md5).to_ascii_lowercase();
    std::fs::create_dir_all(&args.to)
        .with_context(|| format!("cannot create {}", args.to.display()))?;
    let dest = args.to.join(name);
    if dest.is_file() && file_md5(&dest)? == want {
        println!("{} is already there (MD5 {want})", dest.display());
        return Ok(());
    }
    // Streamed into a temporary sibling, moved into place only once the MD5 matches.
    let mut bytes = 0;
    let result = rdrop_core::atomic::write_file(&dest, |part| -> anyhow::Result<()> {
        bytes = fetch(url, part, &want)?;
        Ok(())
    });
    match result {
        Ok(()) => {
            println!(
                "saved {} ({bytes} bytes, MD5 {want} verified)",
                dest.display()
            );
            Ok(())
        }
        Err(e) => Err(e.context(format!("download of {url} failed; nothing was saved"))),
    }
}

fn file_md5(p: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut h = Md5::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// Stream `url` into `part`, hashing as it goes; returns the byte count.
fn fetch(url: &str, part: &Path, want: &str) -> anyhow::Result<u64> {
    let resp = ureq::get(url)
        .call()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("request failed")?;
    let total: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let bar = {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total.unwrap_or(0));
            if let Ok(s) = indicatif::ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ) {
                b.set_style(s);
            }
            b
        })
    };
    let mut out =
        std::fs::File::create(part).with_context(|| format!("cannot write {}", part.display()))?;
    let mut reader = resp.into_reader();
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = reader
            .read(&mut buf)
            .context("connection lost while downloading")?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        out.write_all(&buf[..k])
            .with_context(|| format!("cannot write {}", part.display()))?;
        n += k as u64;
        if let Some(b) = &bar {
            b.set_position(n);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out.sync_all().ok();
    if let Some(t) = total {
        if n != t {
            bail!("connection cut: received {n} of {t} bytes");
        }
    }
    let got = hex::encode(h.finalize());
    if got != want {
        bail!("MD5 checksum mismatch: got {got}, expected {want} (corrupted or wrong file)");
    }
    Ok(n)
}
