//! `rdrop resume` (not implemented yet).

/// Arguments of `rdrop resume`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`rdrop resume` is not implemented yet")
}
