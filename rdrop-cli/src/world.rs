//! This process's place in a data-parallel run, from the CLI's side: whether to launch ranks
//! (`--nproc-per-node N`, [`crate::launch`]) or to be one (started by that launcher, torchrun or
//! Slurm: [`WorldSpec::from_env`]), the refusals that say why a world cannot run, the rank's
//! device, and its connection to the other ranks (the collective the trainer all-reduces with,
//! the barrier at checkpoints).
//!
//! A world of `W` ranks splits every global batch: `batch_size = W × micro_batch ×
//! accumulation`, rank `r` on `cuda:LOCAL_RANK`. On CUDA builds the collective is NCCL (its
//! id handed out through the TCP rendezvous); debug and `--features test-hooks` builds also let
//! `RDROP_TEST_CPU_RANKS=1` run ranks on the CPU with the TCP rendezvous as the collective, so
//! that CI tests the whole path.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdrop_core::dist::{Collective, Group, LaunchSource, WorldSpec};

use crate::config::RunConfig;
use crate::device::DeviceSpec;
use crate::test_hooks;

/// What this process does.
#[derive(Debug)]
pub enum Role {
    /// Start this many local ranks and watch them.
    Launch(usize),
    /// Run as this rank (rank 0 of 1 when nothing launched it).
    Rank(WorldSpec),
}

/// Decides the role from `--nproc-per-node` and the launcher variables. A process started by
/// a launcher joins as its rank; `--nproc-per-node` then must agree with the launcher's count
/// of ranks on this node (the launcher passes the flag on with the other arguments).
pub fn role(nproc_per_node: Option<usize>) -> anyhow::Result<Role> {
    let spec = WorldSpec::from_env().context("reading the launcher's variables")?;
    role_of(nproc_per_node, spec)
}

fn role_of(nproc_per_node: Option<usize>, spec: WorldSpec) -> anyhow::Result<Role> {
    if nproc_per_node == Some(0) {
        anyhow::bail!("--nproc-per-node must be at least 1");
    }
    if spec.source != LaunchSource::Single {
        if let Some(n) = nproc_per_node {
            anyhow::ensure!(
                n == spec.local_world_size,
                "--nproc-per-node {n}, but {} started {} rank(s) on this node: drop \
                 --nproc-per-node when a launcher starts the ranks",
                launcher_name(spec.source),
                spec.local_world_size
            );
        }
        return Ok(Role::Rank(spec));
    }
    Ok(match nproc_per_node {
        Some(n) if n > 1 => Role::Launch(n),
        _ => Role::Rank(spec),
    })
}

fn launcher_name(s: LaunchSource) -> &'static str {
    match s {
        LaunchSource::Single => "nothing",
        LaunchSource::Torchrun => "torchrun",
        LaunchSource::Slurm => "Slurm",
    }
}

/// Whether ranks may run on the CPU: only through the test hook.
fn cpu_ranks_allowed() -> bool {
    test_hooks::cpu_ranks()
}

/// Refuses a world of `world` ranks (`local` on this node) that cannot run `cfg`, saying why.
/// One rank is always fine. `hardware` false skips the checks of this machine (the CUDA build
/// and the GPU count), for `--dry-run`.
pub fn check(cfg: &RunConfig, world: usize, local: usize, hardware: bool) -> anyhow::Result<()> {
    if world <= 1 {
        return Ok(());
    }
    // `auto` picks a divisor of the per-rank batch: the batch must split over the ranks.
    let micro = cfg.micro_batch.fixed().unwrap_or(1);
    let accum = cfg.batch_size / (world * micro);
    rdrop_core::dist::check_batch(cfg.batch_size, world, micro, accum.max(1)).map_err(|_| {
        anyhow::anyhow!(
            "batch size {} is not divisible by {world} ranks × micro-batch {} = {}: every \
             rank takes micro-batches of the same size (batch_size = ranks × micro_batch × \
             accumulation); change --batch-size, --micro-batch or the number of ranks",
            cfg.batch_size,
            cfg.micro_batch,
            world * micro
        )
    })?;
    check_ranks(cfg.device, world, local, hardware)
}

/// The part of [`check`] that does not depend on the batch (also `rdrop eval`'s): several
/// ranks run on GPUs only, on a CUDA build with a GPU per local rank.
pub fn check_ranks(
    device: DeviceSpec,
    world: usize,
    local: usize,
    hardware: bool,
) -> anyhow::Result<()> {
    if world <= 1 {
        return Ok(());
    }
    if device == DeviceSpec::Cpu && !cpu_ranks_allowed() {
        anyhow::bail!(
            "--device cpu with {world} ranks: data parallel runs on GPUs through NCCL, one rank \
             per GPU; use --device cuda, or one process (no --nproc-per-node) on the CPU"
        );
    }
    if !hardware {
        return Ok(());
    }
    if device != DeviceSpec::Cpu {
        if !cfg!(feature = "cuda") {
            anyhow::bail!(
                "{world} ranks requested, but data parallel runs on GPUs through NCCL; this \
                 rdrop was built without CUDA (rebuild with --features cuda: \
                 scripts/build-cuda.sh)"
            );
        }
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        enough_gpus(local, gpu_count()?, visible.as_deref())?;
    }
    Ok(())
}

/// One GPU per rank: `local` ranks on this node need `gpus ≥ local` visible GPUs, unless the
/// launcher bound each process to its own GPU (`visible`, `CUDA_VISIBLE_DEVICES`, names one).
fn enough_gpus(local: usize, gpus: usize, visible: Option<&str>) -> anyhow::Result<()> {
    anyhow::ensure!(
        gpus >= local || (gpus == 1 && names_one_gpu(visible)),
        "{local} ranks on this node but {gpus} GPU(s) visible (one rank per GPU; \
         CUDA_VISIBLE_DEVICES={}): start at most {gpus} ranks per node",
        visible.unwrap_or("unset")
    );
    Ok(())
}

/// `CUDA_VISIBLE_DEVICES` names a single device.
fn names_one_gpu(visible: Option<&str>) -> bool {
    visible.is_some_and(|v| !v.trim().is_empty() && !v.contains(','))
}

/// The launcher gave this process one GPU (`CUDA_VISIBLE_DEVICES` names a single device, as
/// Slurm's `--gpus-per-task=1` does): the rank uses `cuda:0`, whatever its local rank.
fn bound_to_one_gpu() -> bool {
    names_one_gpu(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref())
}

/// GPUs the driver shows this process.
#[cfg(feature = "cuda")]
fn gpu_count() -> anyhow::Result<usize> {
    let n = candle_core::cuda::cudarc::driver::CudaContext::device_count()
        .map_err(|e| anyhow::anyhow!("counting the CUDA GPUs: {e:?}"))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(not(feature = "cuda"))]
fn gpu_count() -> anyhow::Result<usize> {
    Ok(0)
}

/// The device rank `spec` trains on: `cuda:LOCAL_RANK` for a CUDA run of several ranks
/// (`cuda:0` when the launcher bound one GPU to the process), else the configured one.
pub fn device(cfg: &RunConfig, spec: &WorldSpec) -> DeviceSpec {
    rank_device(cfg.device, spec)
}

/// [`device`] for a configured device `d`.
pub fn rank_device(d: DeviceSpec, spec: &WorldSpec) -> DeviceSpec {
    match d {
        DeviceSpec::Cuda(_) if spec.is_distributed() => {
            if bound_to_one_gpu() {
                DeviceSpec::Cuda(0)
            } else {
                DeviceSpec::Cuda(spec.local_rank)
            }
        }
        d => d,
    }
}

/// How long a rank waits for the others at the rendezvous (`RDROP_RENDEZVOUS_TIMEOUT_S`,
/// default 300 s).
pub fn rendezvous_timeout() -> anyhow::Result<Duration> {
    match std::env::var("RDROP_RENDEZVOUS_TIMEOUT_S") {
        Ok(v) => {
            let s: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| *s > 0.0)
                .with_context(|| {
                    format!(
                        "RDROP_RENDEZVOUS_TIMEOUT_S={v:?}: expected a positive number of seconds"
                    )
                })?;
            Ok(Duration::from_secs_f64(s))
        }
        Err(_) => Ok(Duration::from_secs(300)),
    }
}

/// A rank's connection to the others (none for one process).
pub struct World {
    /// Rank, world size, local rank, rendezvous address.
    pub spec: WorldSpec,
    link: Option<Link>,
}

/// The collective of a rank: the TCP group itself (CPU ranks, test hook) or NCCL over it.
enum Link {
    Tcp(Arc<Group>),
    /// The communicator and the device it is bound to (held open with it).
    #[cfg(feature = "cuda")]
    Nccl(Arc<rdrop_core::dist::NcclCollective>, candle_core::Device),
}

impl Link {
    fn collective(&self) -> Arc<dyn Collective> {
        match self {
            Link::Tcp(g) => g.clone(),
            #[cfg(feature = "cuda")]
            Link::Nccl(n, _) => n.clone(),
        }
    }

    /// The goodbye (after which this rank's exit is not taken for a death).
    fn finish(self) -> Result<(), rdrop_core::dist::DistError> {
        match self {
            Link::Tcp(g) => g.finish(),
            #[cfg(feature = "cuda")]
            // the device is dropped after the communicator is destroyed
            Link::Nccl(n, _device) => match Arc::try_unwrap(n) {
                Ok(n) => n.finish(),
                Err(n) => n.group().finish(),
            },
        }
    }
}

impl World {
    /// Joins the other ranks of `spec` (after [`check`]): the TCP rendezvous, then the
    /// collective: NCCL on CUDA builds for a CUDA run, the rendezvous itself on the CPU (test
    /// hook). A process that a launcher started takes this path even in a world of one (a
    /// group of one opens no socket; NCCL makes a communicator of one rank), so that the
    /// distributed path runs on a single GPU; without a launcher there is no collective.
    pub fn join(spec: WorldSpec, cfg: &RunConfig) -> anyhow::Result<Self> {
        let d = device(cfg, &spec);
        Self::join_on(spec, d)
    }

    /// [`World::join`] for a rank on device `d` (from [`rank_device`]).
    pub fn join_on(spec: WorldSpec, d: DeviceSpec) -> anyhow::Result<Self> {
        if spec.source == LaunchSource::Single {
            return Ok(Self { spec, link: None });
        }
        let group = Group::join(&spec, rendezvous_timeout()?)
            .context("joining the other ranks (RDROP_RENDEZVOUS_TIMEOUT_S: how long to wait)")?;
        let link = match d {
            DeviceSpec::Cpu => Link::Tcp(Arc::new(group)),
            DeviceSpec::Cuda(ordinal) => nccl(group, ordinal)?,
        };
        Ok(Self {
            spec,
            link: Some(link),
        })
    }

    /// Ranks in the run.
    pub fn size(&self) -> usize {
        self.spec.world_size
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.spec.rank
    }

    /// Rank 0: the one that writes the run folder and prints.
    pub fn is_lead(&self) -> bool {
        self.spec.rank == 0
    }

    /// What the trainer all-reduces with (none for one process).
    pub fn collective(&self) -> Option<Arc<dyn Collective>> {
        self.link.as_ref().map(Link::collective)
    }

    /// Waits until every rank is here (nothing for one process).
    pub fn barrier(&self) -> anyhow::Result<()> {
        if let Some(l) = &self.link {
            l.collective()
                .barrier()
                .with_context(|| format!("rank {}: waiting for the other ranks", self.rank()))?;
        }
        Ok(())
    }

    /// `v ← Σ_ranks v`, in rank order (unchanged for one process).
    pub fn sum(&self, v: &mut [f64]) -> anyhow::Result<()> {
        if let Some(l) = &self.link {
            l.collective()
                .all_reduce_f64(v)
                .with_context(|| format!("rank {}: reducing over the ranks", self.rank()))?;
        }
        Ok(())
    }

    /// Says goodbye to the others after a finished run (so that this rank leaving is not
    /// taken for a death).
    pub fn finish(self) -> anyhow::Result<()> {
        if let Some(l) = self.link {
            l.finish()
                .with_context(|| format!("rank {}: leaving the rendezvous", self.spec.rank))?;
        }
        Ok(())
    }

    /// What carries the reductions: `nccl`, `tcp` (the rendezvous, CPU ranks) or `none` (no
    /// launcher).
    pub fn collective_name(&self) -> &'static str {
        match &self.link {
            None => "none",
            Some(Link::Tcp(_)) => "tcp",
            #[cfg(feature = "cuda")]
            Some(Link::Nccl(..)) => "nccl",
        }
    }

    /// A line for the run's announcement, e.g. `2 ranks (torchrun), this is rank 0`.
    pub fn describe(&self) -> String {
        let s = &self.spec;
        format!(
            "{} rank{} ({} on this node, started as {} does), rank {} on this process",
            s.world_size,
            if s.world_size == 1 { "" } else { "s" },
            s.local_world_size,
            launcher_name(s.source),
            s.rank
        )
    }
}

/// The NCCL collective of this rank on `cuda:ordinal` (CUDA builds): rank 0's id goes out
/// through the group; NCCL binds the communicator to the device current on this thread, which
/// opening the device makes it.
#[cfg(feature = "cuda")]
fn nccl(group: Group, ordinal: usize) -> anyhow::Result<Link> {
    let rank = group.rank();
    // The device stays open as long as the communicator: dropping it would release the
    // device's primary context (destroying it when nothing else holds it) right before NCCL
    // binds to the current context.
    let device = DeviceSpec::Cuda(ordinal).open()?;
    let lib =
        rdrop_core::dist::Nccl::load().with_context(|| format!("rank {rank}: loading NCCL"))?;
    let c = rdrop_core::dist::NcclCollective::init(group, Arc::new(lib))
        .with_context(|| format!("rank {rank}: setting up NCCL on cuda:{ordinal}"))?;
    Ok(Link::Nccl(Arc::new(c), device))
}

#[cfg(not(feature = "cuda"))]
fn nccl(group: Group, ordinal: usize) -> anyhow::Result<Link> {
    anyhow::bail!(
        "rank {}: data parallel on cuda:{ordinal} needs a CUDA build (scripts/build-cuda.sh)",
        group.rank()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn torchrun(rank: usize, n: usize) -> WorldSpec {
        WorldSpec {
            rank,
            world_size: n,
            local_rank: rank,
            local_world_size: n,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            source: LaunchSource::Torchrun,
        }
    }

    #[test]
    fn roles() {
        let single = WorldSpec::single();
        assert!(matches!(
            role_of(Some(4), single.clone()).unwrap(),
            Role::Launch(4)
        ));
        assert!(
            matches!(role_of(Some(1), single.clone()).unwrap(), Role::Rank(s) if s.world_size == 1)
        );
        assert!(matches!(
            role_of(None, single.clone()).unwrap(),
            Role::Rank(_)
        ));
        assert!(role_of(Some(0), single).is_err());
        // Started by a launcher: join, whether or not the flag was passed on.
        assert!(matches!(role_of(Some(2), torchrun(1, 2)).unwrap(), Role::Rank(s) if s.rank == 1));
        assert!(matches!(
            role_of(None, torchrun(1, 2)).unwrap(),
            Role::Rank(_)
        ));
        let e = role_of(Some(8), torchrun(0, 2)).unwrap_err().to_string();
        assert!(
            e.contains("--nproc-per-node 8") && e.contains("2 rank"),
            "{e}"
        );
    }

    fn demo(batch: usize, micro: usize) -> RunConfig {
        RunConfig {
            batch_size: batch,
            micro_batch: crate::config::MicroBatch::Fixed(micro),
            ..RunConfig::preset("demo").unwrap()
        }
    }

    #[test]
    fn refusals_say_why() {
        assert!(check(&demo(64, 64), 1, 1, true).is_ok());
        let e = check(&demo(64, 64), 2, 2, true).unwrap_err().to_string();
        assert!(
            e.contains("not divisible by 2 ranks × micro-batch 64"),
            "{e}"
        );
        let e = check(&demo(96, 32), 2, 2, true).unwrap_err().to_string();
        assert!(e.contains("not divisible"), "{e}");
        if !cpu_ranks_allowed() {
            let e = check(&demo(64, 32), 2, 2, true).unwrap_err().to_string();
            assert!(e.contains("--device cpu") && e.contains("NCCL"), "{e}");
        }
        let mut c = demo(64, 32);
        c.device = DeviceSpec::Cuda(0);
        #[cfg(not(feature = "cuda"))]
        {
            let e = check(&c, 2, 2, true).unwrap_err().to_string();
            assert!(e.contains("this rdrop was built without CUDA"), "{e}");
        }
        // --dry-run skips what depends on this machine.
        assert!(check(&c, 2, 2, false).is_ok());
    }

    #[test]
    fn each_rank_takes_its_local_gpu() {
        let mut c = demo(64, 32);
        c.device = DeviceSpec::Cuda(0);
        if std::env::var_os("CUDA_VISIBLE_DEVICES").is_none() {
            assert_eq!(device(&c, &torchrun(1, 2)), DeviceSpec::Cuda(1));
        }
        assert_eq!(device(&c, &WorldSpec::single()), DeviceSpec::Cuda(0));
        c.device = DeviceSpec::Cpu;
        assert_eq!(device(&c, &torchrun(1, 2)), DeviceSpec::Cpu);
    }

    #[test]
    fn fewer_gpus_than_local_ranks_are_refused() {
        // 8 ranks on a node with 4 GPUs: refused, saying how many and what is visible.
        let e = enough_gpus(8, 4, Some("0,1,2,3")).unwrap_err().to_string();
        assert!(
            e.contains("8 ranks on this node but 4 GPU(s) visible"),
            "{e}"
        );
        assert!(e.contains("CUDA_VISIBLE_DEVICES=0,1,2,3"), "{e}");
        assert!(e.contains("at most 4 ranks per node"), "{e}");
        let e = enough_gpus(2, 0, None).unwrap_err().to_string();
        assert!(
            e.contains("0 GPU(s) visible") && e.contains("=unset"),
            "{e}"
        );
        // Enough GPUs, or each process bound to its own GPU by the launcher (srun
        // --gpus-per-task 1): fine.
        enough_gpus(4, 4, None).unwrap();
        enough_gpus(2, 8, Some("")).unwrap();
        enough_gpus(4, 1, Some("3")).unwrap();
        assert!(enough_gpus(4, 1, Some(" ")).is_err());
        assert!(enough_gpus(4, 2, Some("2,3")).is_err());
    }
}
