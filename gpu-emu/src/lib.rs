//! rdrop-gpu-emu: an emulated CUDA stack on the CPU, so that rdrop's **unchanged** CUDA
//! binaries (the release `rdrop` and the GPU test binaries that `scripts/build-cuda.sh` builds)
//! run without a GPU, with memory checking and adversarial stream timing.
//!
//! The cdylib of this crate is the emulated `libcuda.so.1` (the driver API, `driver`); the
//! other libraries the binaries link or open (`libcublasLt.so.13`, `libcublas.so.13`,
//! `libcudart.so.13`, `libcurand.so.10`, `libnvrtc.so.13`, `libnccl.so.2`) are small shells
//! with the real sonames and symbol versions whose functions jump to this library's
//! `rdemu_*` exports (`build/shells.rs`). `rdrop-gpu-emu install DIR` lays them out.
//!
//! - [`config`]: the emulated machine (devices, names, compute capabilities, memory), from
//!   the environment;
//! - [`memory`]: device memory in host memory with guard pages, and the one range check;
//! - [`context`], [`stream`], [`lifecycle`]: devices, contexts, streams and events, each stream
//!   run in order by a host worker (with the seeded delay mode), and the contexts' retain,
//!   release and teardown;
//! - [`abi`], [`module`], [`launch`], [`fiber`]: the C ABI of the kernel modules, modules
//!   (cubin / PTX images mapped to the kernels compiled for the host from rdrop-kernels' `.cu`
//!   files), launches, the threads of a block as fibers with real barriers, shuffles, and the
//!   memory checks of every access;
//! - [`cublaslt`], [`nccl`], [`stubs`]: the libraries.
//!
//! What it cannot check is in this crate's README.
#![allow(unsafe_code)] // an FFI layer: every export takes raw pointers from C callers
#![allow(non_snake_case, non_camel_case_types, clippy::missing_safety_doc)]

pub mod abi;
pub mod config;
pub mod context;
pub mod cublaslt;
pub mod driver;
pub mod error;
pub mod fiber;
pub mod launch;
pub mod lifecycle;
pub mod memory;
pub mod module;
pub mod nccl;
pub mod stream;
pub mod stubs;
