//! Data-parallel training: who is who ([`env`]), the rendezvous and control plane
//! ([`rendezvous`]), the collective operations ([`collective`]: TCP, NCCL in [`nccl`], threads
//! in [`local`]) and the split of each global batch over the ranks ([`shard`]).
//!
//! The update itself is [`crate::FlatTrainer::update_distributed`]: each rank computes the
//! gradients of its share of the global batch, with dropout masks keyed by the samples' global
//! indices and loss weights of the global batch, the flat gradients are summed over the ranks,
//! and every rank applies the same step: the single-process update up to the order of float
//! sums.

pub mod collective;
pub mod env;
pub mod error;
pub mod local;
pub mod nccl;
pub mod rendezvous;
pub mod shard;

pub use collective::Collective;
pub use env::{expand_hostlist, LaunchSource, WorldSpec};
pub use error::DistError;
pub use local::LocalCollective;
pub use nccl::{Nccl, NcclCollective};
pub use rendezvous::{Group, DEFAULT_TIMEOUT};
pub use shard::{check_batch, micro_batch, shard};
