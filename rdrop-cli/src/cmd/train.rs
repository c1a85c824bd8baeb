//! `rdrop train` (not implemented yet).

/// Arguments of `rdrop train`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`rdrop train` is not implemented yet")
}
