//! `rdrop bench` subcommands (not implemented yet).

#[derive(clap::Subcommand, Debug)]
pub enum Command {}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {}
}
