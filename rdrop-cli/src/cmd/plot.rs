//! `rdrop plot` (not implemented yet).

/// Arguments of `rdrop plot`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`rdrop plot` is not implemented yet")
}
