//! `rdrop eval` (not implemented yet).

/// Arguments of `rdrop eval`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`rdrop eval` is not implemented yet")
}
