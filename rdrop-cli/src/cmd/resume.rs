//! `rdrop resume OUT`: continue a training run from its newest checkpoint (the same as
//! `rdrop train --resume OUT`). The run's own `OUT/config.toml` describes everything; on CPU in
//! f32 the resumed run ends bit-identical to one that was never interrupted.

use std::path::PathBuf;

/// Continue an interrupted `rdrop train` run from its newest checkpoint.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run folder (holds config.toml and checkpoints/).
    pub out: PathBuf,
    /// CPU threads (does not change the results).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    pub json: bool,
    /// Continue on N ranks on this node, one per GPU (any N that divides the batch into
    /// micro-batches: the data order stays the same). Not needed under torchrun or srun.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Under Slurm, after a SIGUSR1 stop has written its checkpoint, requeue the job
    /// (`scontrol requeue $SLURM_JOB_ID`).
    #[arg(long)]
    pub requeue: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::cmd::train::resume_run(
        &args.out,
        args.threads,
        args.json,
        args.nproc_per_node,
        args.requeue,
    )
}
