//! Data-parallel training: who is who ([`mod@env`]), the rendezvous and control plane
//! ([`rendezvous`]), the collective operations ([`collective`]: TCP, NCCL in [`nccl`], threads
//! in [`local`]) and the split of each global batch over the ranks ([`mod@shard`]).
//!
//! The update itself is [`crate::FlatTrainer::update_distributed`] (explicit engines) or
//! [`crate::Trainer::update_distributed`] (autograd; gradients summed by [`grads`]): each rank
//! computes the gradients of its share of the global batch, with dropout masks keyed by the
//! samples' global indices and loss weights of the global batch, the gradients are summed over
//! the ranks, and every rank applies the same step: the single-process update up to the order
//! of float sums.
//!
//! Wiring, per rank (every rank runs the same sequence of collective calls):
//! ```text
//! let spec  = WorldSpec::from_env()?;                      // torchrun / Slurm / single
//! let group = Group::join(&spec, DEFAULT_TIMEOUT)?;        // world 1: no socket
//! // CPU: use `group` as the Collective. CUDA: make device `spec.local_rank` current, then
//! let coll  = NcclCollective::init(group, Arc::new(Nccl::load()?))?;
//! let micro = micro_batch(batch_size, spec.world_size, accum)?;
//! for every global batch (the same order on every rank):
//!     rows = shard(batch_size, world, rank)                // cut into `accum` × `micro`
//!     trainer.update_distributed(&mut model, &micro_batches, &coll)?;
//! eval:       shard the eval set; all_reduce_f64([correct, count, loss_sum])
//! checkpoint: rank 0 writes (atomically); then coll.barrier()
//! the end:    coll.finish() (or group.finish()): a later disconnect is not a death
//! ```
//! A failed call ([`DistError::PeerDied`] and the rest) leaves the job unusable: report it and
//! exit; the last checkpoint resumes on any world size that divides the batch.

pub mod bucket;
pub mod collective;
pub mod env;
pub mod error;
pub mod grads;
pub mod local;
pub mod nccl;
pub mod rendezvous;
pub mod shard;

pub use bucket::{bucket_cuts, buckets, cap_elements, cuts_for};
pub use collective::Collective;
pub use env::{expand_hostlist, LaunchSource, WorldSpec, PORT_OVERRIDE};
pub use error::DistError;
pub use grads::all_reduce_grads;
pub use local::LocalCollective;
pub use nccl::{Nccl, NcclCollective};
pub use rendezvous::{Group, JoinOptions, DEFAULT_TIMEOUT};
pub use shard::{check_batch, micro_batch, shard};
