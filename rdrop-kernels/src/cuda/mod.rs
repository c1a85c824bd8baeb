//! The explicit engine's compute on CUDA (feature `cuda`): the GEMMs through cuBLASLt
//! ([`gemm`]) and the kernels. Each op is a `.cu` file (its kernels) beside a `.rs` file (its
//! launchers, methods of [`CudaKernels`]): `embed`, `heads`, `layernorm`, `softmax`, `gelu`,
//! `dropout`, `columns`, `cast`, `loss`, `optim`. build.rs compiles every `.cu` with nvcc
//! into a fat binary (a cubin per architecture, [`CUBIN_ARCHS`], and the PTX of the lowest,
//! [`PTX_ARCH`]); [`CudaKernels::new`] loads them on the caller's
//! stream (the engine's, where [`gemm`] runs too, so kernels and GEMMs are ordered) and a
//! launcher looks its kernel up by name on first use. Launchers push their arguments through
//! one typed builder (`launch::Launch`), which checks each buffer's length as it pushes it.
//!
//! Conventions (as the CPU kernels'; docs/engine.md has the formulas and the precision rules):
//! - buffers are row-major; inputs are `&impl DevicePtr<X>`, outputs `&mut impl DevicePtrMut<X>`
//!   (a `CudaSlice`, `CudaView` or `CudaViewMut`: sub-views of flat buffers work);
//! - `T: Compute` is the GEMM-side storage type (f32, bf16, f16); the residual stream,
//!   LayerNorm/softmax statistics, gradients of parameters and optimiser state are f32;
//! - every length is checked on the host before the launch: a mismatch is a
//!   [`CudaKernelError::Length`] naming the kernel and the buffer, never an out-of-bounds
//!   launch; dims must fit in `i32`. Dimensions come as one array in the order the
//!   launcher's shapes name them (`[rows, n]`, `[B, Tk, D]`), buffers of one role as arrays
//!   (`[q, k, v]`, `[mean, rstd]`);
//! - dropout ([`Dropout`]): element `i` of sample row `r` is kept iff `philox(i / 4, sample,
//!   site << 1 | pass, update; seed)[i % 4] ≥ drop_threshold(p)`, bit for bit as
//!   [`crate::dropout`]. Forwards record the mask as bytes (`keep`, 1 = kept) and backwards
//!   read it (`p` given so that `p == 0` skips it);
//! - nothing uses float atomics: every reduction runs in a fixed order (results are
//!   deterministic run to run); backwards that say "+=" accumulate, the rest overwrite.
//!
//! The per-element and per-row math is `src/cuda/math.cuh`, whose host build is tested against
//! the Rust kernels in `tests/cuda_twin.rs` (bitwise for masks, GELU, LayerNorm and softmax rows,
//! SGD/AdamW elements).
#![allow(unsafe_code)] // kernel launches (cudarc's `launch` is unsafe): launch.rs, with its SAFETY note

mod cast;
mod columns;
mod dropout;
mod embed;
mod gelu;
pub mod gemm;
mod heads;
mod launch;
mod layernorm;
mod loss;
mod optim;
mod softmax;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The cudarc this crate is built with (its `driver` types are the launchers' buffers).
pub use cudarc;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice};
pub use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, DriverError};
use cudarc::nvrtc::Ptx;

use crate::arch::no_image;
pub use crate::arch::{kernel_image, KernelImage};
use crate::dropout::Site;
use launch::Launch;

/// Errors of the CUDA kernels.
#[derive(Debug, thiserror::Error)]
pub enum CudaKernelError {
    /// The driver refused a module load or a launch.
    #[error("CUDA kernels: driver error: {0}")]
    Driver(#[from] DriverError),
    /// A buffer does not have the length the dimensions give.
    #[error("CUDA kernel {kernel}: {buffer} has {got} elements, expected {want}")]
    Length {
        /// The kernel.
        kernel: &'static str,
        /// The argument.
        buffer: &'static str,
        /// Its length.
        got: usize,
        /// The length the dimensions give (the least one, for scratch buffers).
        want: usize,
    },
    /// Dimensions that are invalid or too large for the kernels' 32-bit indexing.
    #[error("CUDA kernel {kernel}: {message}")]
    Shape {
        /// The kernel.
        kernel: &'static str,
        /// What is wrong.
        message: String,
    },
    /// This build has no kernel image the GPU can run (the message says how to build one).
    #[error("CUDA kernels: {0}")]
    NoImage(String),
    /// A cuBLASLt call failed, or a GEMM's operands do not fit its shape.
    #[error("CUDA GEMM: {what}: {message}")]
    Gemm {
        /// The call and the GEMM (e.g. `cuBLASLt matmul 1576×2304×768 Bf16→Bf16`).
        what: String,
        /// What went wrong.
        message: String,
    },
    /// A kernel is missing from the embedded modules (a build problem).
    #[error("CUDA kernels: function {0} is not in any module")]
    Missing(String),
}

/// Result of the launchers.
pub type Result<T, E = CudaKernelError> = std::result::Result<T, E>;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// The GEMM-side storage type of activations: `f32`, `bf16` or `f16` (the kernels are C++
/// templates instantiated with suffixes `_f32`, `_bf16`, `_f16`; cuBLASLt takes all three).
pub trait Compute:
    sealed::Sealed + cudarc::driver::DeviceRepr + Copy + Send + Sync + 'static
{
    /// Kernel-name suffix.
    const NAME: &'static str;
    /// Its GEMM element type.
    const DT: gemm::Dt;
}
impl Compute for f32 {
    const NAME: &'static str = "f32";
    const DT: gemm::Dt = gemm::Dt::F32;
}
impl Compute for half::bf16 {
    const NAME: &'static str = "bf16";
    const DT: gemm::Dt = gemm::Dt::Bf16;
}
impl Compute for half::f16 {
    const NAME: &'static str = "f16";
    const DT: gemm::Dt = gemm::Dt::F16;
}

include!(concat!(env!("OUT_DIR"), "/archs.rs"));
// `MODULES`: each `.cu` as (name, PTX of PTX_ARCH, fat binary), as build.rs found them.
include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// Rows of a column partial (bias gradient, LayerNorm dγ/dβ): crate::layernorm::BWD_ROWS.
pub const COLUMN_ROWS: usize = crate::layernorm::BWD_ROWS;
/// Blocks of [`CudaKernels::sum_squares`]'s first pass (its scratch length).
pub const SUM_SQUARES_BLOCKS: usize = 1024;
/// Header of [`CudaKernels::rdrop_loss`]'s output: `[loss, ce, kl, bad_labels]`.
pub const LOSS_HEADER: usize = 4;

/// The optional compute copy of the parameters written by the update kernels.
pub type CudaViewMutT<'a, T> = cudarc::driver::CudaViewMut<'a, T>;

/// Dropout in a forward: the site (`None` or `p == 0`: no dropout, the mask not written and
/// the keys not read, so both may be empty) and the rows' keys, a `[sample, pass]` pair per
/// sample row (`crate::dropout::RowKey`).
#[derive(Debug, Clone, Copy)]
pub struct Dropout<'a> {
    /// The site's key and probability.
    pub site: Option<Site>,
    /// `2·rows` u32.
    pub row_keys: &'a CudaSlice<u32>,
}

impl Dropout<'_> {
    /// Whether the site drops anything.
    pub fn on(&self) -> bool {
        self.site.is_some_and(|s| s.p != 0.0)
    }
}

/// The loaded kernel modules, launched on one stream.
#[derive(Debug)]
pub struct CudaKernels {
    stream: Arc<CudaStream>,
    /// One per entry of `MODULES`.
    modules: Vec<Arc<CudaModule>>,
    /// The kernels looked up so far, by launcher name and type suffix (no string is built
    /// on a launch once its kernel is known).
    funcs: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    /// The image the driver runs on this GPU.
    image: KernelImage,
}

/// The module of `MODULES` whose PTX defines kernel `name`.
fn module_of(name: &str) -> Option<usize> {
    let entry = format!(".entry {name}(");
    MODULES.iter().position(|(_, ptx, _)| ptx.contains(&entry))
}

impl CudaKernels {
    /// Loads the kernel modules into the stream's context (the driver picks each fat
    /// binary's cubin for the GPU, or JIT-compiles its PTX).
    ///
    /// # Errors
    /// [`CudaKernelError::NoImage`] for a GPU this build has no image for,
    /// [`CudaKernelError::Driver`] if the driver refuses a module.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        let (major, minor) = ctx.compute_capability()?;
        let (major, minor) = (major.max(0) as u32, minor.max(0) as u32);
        let image = kernel_image(CUBIN_ARCHS, PTX_ARCH, major, minor).ok_or_else(|| {
            CudaKernelError::NoImage(no_image(CUBIN_ARCHS, PTX_ARCH, major, minor))
        })?;
        let modules = MODULES
            .iter()
            .map(|(_, _, fatbin)| ctx.load_module(Ptx::from_binary(fatbin.to_vec())))
            .collect::<Result<_, _>>()?;
        let funcs = Mutex::default();
        Ok(Self {
            stream,
            modules,
            funcs,
            image,
        })
    }

    /// The image the driver loaded for this GPU (a cubin, or the PTX it JIT-compiled).
    pub fn image(&self) -> KernelImage {
        self.image
    }

    /// The stream every kernel launches on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Kernel function `{kernel}_{suffix}` (`kernel` when `suffix` is empty), looked up in
    /// its module on first use.
    fn function(&self, kernel: &'static str, suffix: &'static str) -> Result<CudaFunction> {
        let mut funcs = self.funcs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = funcs.get(&(kernel, suffix)) {
            return Ok(f.clone());
        }
        let name = if suffix.is_empty() {
            kernel.to_string()
        } else {
            format!("{kernel}_{suffix}")
        };
        let m = module_of(&name).ok_or_else(|| CudaKernelError::Missing(name.clone()))?;
        let f = self.modules[m]
            .load_function(&name)
            .map_err(|_| CudaKernelError::Missing(name))?;
        funcs.insert((kernel, suffix), f.clone());
        Ok(f)
    }

    /// A launch of the `T` instance of templated kernel `kernel` (function `{kernel}_{T}`).
    fn typed<T: Compute>(&self, kernel: &'static str) -> Launch<'_> {
        Launch::new(self, kernel, self.function(kernel, T::NAME))
    }

    /// A launch of kernel `kernel`, which is not templated.
    fn plain(&self, kernel: &'static str) -> Launch<'_> {
        Launch::new(self, kernel, self.function(kernel, ""))
    }
}

/// `Π dims`, or a [`CudaKernelError::Shape`] if it overflows.
fn dims(kernel: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| shape(kernel, format!("dimensions {dims:?} overflow")))
}

/// A [`CudaKernelError::Shape`].
fn shape(kernel: &'static str, message: String) -> CudaKernelError {
    CudaKernelError::Shape { kernel, message }
}
