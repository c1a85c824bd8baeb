//! `rdrop predict` (not implemented yet).

/// Arguments of `rdrop predict`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`rdrop predict` is not implemented yet")
}
