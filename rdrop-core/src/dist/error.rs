//! Errors of data-parallel training: launcher variables, the rendezvous, dead peers, NCCL.

use std::time::Duration;

/// An error of the data-parallel machinery. Every variant names what a user needs to act: the
/// variable and its value, the rank and the address, the rank that died, the library.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launcher variable (torchrun's or Slurm's) is missing.
    #[error("{launcher} launch: environment variable {var} is not set ({why})")]
    MissingVar {
        /// The variable.
        var: String,
        /// `"torchrun"` or `"Slurm"`.
        launcher: &'static str,
        /// Why it is needed.
        why: String,
    },
    /// A launcher variable has a value that cannot be used.
    #[error("environment variable {var}={value:?}: {problem}")]
    BadVar {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Rank 0 could not listen on the rendezvous port.
    #[error(
        "rank 0: cannot listen for the rendezvous on {addr}: {source} (another job or \
         torchrun's agent may hold the port: set RDROP_MASTER_PORT to a free one on every rank)"
    )]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A rank could not reach rank 0 before the timeout.
    #[error(
        "rank {rank}: could not connect to rank 0 at {addr} within {waited:?} (last error: \
         {last}); is rank 0 running, and is the address reachable from this host?"
    )]
    Connect {
        /// This rank.
        rank: usize,
        /// Rank 0's address.
        addr: String,
        /// How long it tried.
        waited: Duration,
        /// The last connection error.
        last: String,
    },
    /// Not every rank joined before the timeout.
    #[error(
        "rank {rank}: rendezvous at {addr} timed out after {waited:?}: rank(s) {missing:?} of \
         {world} never joined"
    )]
    Timeout {
        /// The rank reporting it.
        rank: usize,
        /// The rendezvous address.
        addr: String,
        /// The ranks that did not join.
        missing: Vec<usize>,
        /// The world size.
        world: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// The rendezvous refused a rank (world-size or rank mismatch, duplicate rank, another
    /// protocol version), or was aborted because of such a refusal.
    #[error("rank {rank}: rendezvous at {addr} refused: {reason}")]
    Refused {
        /// The rank reporting it.
        rank: usize,
        /// The rendezvous address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A socket operation of the control plane failed.
    #[error("rank {rank}: {op} with {addr}: {source}")]
    Io {
        /// The rank reporting it.
        rank: usize,
        /// The peer's address.
        addr: String,
        /// What it was doing.
        op: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The ranks disagree about the sequence of collective calls or sent a malformed message.
    #[error("rank {rank}: control-plane protocol error: {msg}")]
    Protocol {
        /// The rank reporting it.
        rank: usize,
        /// What was wrong.
        msg: String,
    },
    /// Another rank stopped without saying goodbye (killed, crashed, or its host went away).
    #[error("rank {rank} died ({how}); stopping this rank too")]
    PeerDied {
        /// The rank that died.
        rank: usize,
        /// How it was seen (e.g. "its connection to rank 0 closed").
        how: String,
    },
    /// The NCCL library could not be loaded.
    #[error(
        "cannot load NCCL ({library}): {message}. Install NCCL 2 (e.g. the nvidia-nccl-cu12 \
         wheel or the libnccl2 package) and put libnccl.so.2 on LD_LIBRARY_PATH, or point \
         RDROP_NCCL_LIBRARY at it"
    )]
    NcclMissing {
        /// The library name or path tried.
        library: String,
        /// The loader's message.
        message: String,
    },
    /// An NCCL call failed.
    #[error("NCCL {op} failed: {message} (ncclResult_t {code})")]
    Nccl {
        /// The call.
        op: &'static str,
        /// Its `ncclResult_t`.
        code: i32,
        /// `ncclGetErrorString` of it.
        message: String,
    },
    /// The batch size does not split over the ranks and the accumulation steps.
    #[error(
        "batch size {batch_size} must equal world size × micro-batch × accumulation steps \
         ({world} × micro × {accum}); {problem}"
    )]
    BatchSplit {
        /// The global batch size.
        batch_size: usize,
        /// The world size.
        world: usize,
        /// The accumulation steps.
        accum: usize,
        /// What does not fit.
        problem: String,
    },
    /// The operation is not available on this collective or build.
    #[error("unsupported: {0}")]
    Unsupported(String),
}
