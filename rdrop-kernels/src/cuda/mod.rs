//! The explicit engine's kernels on CUDA (feature `cuda`): `src/cuda/*.cu`, compiled by nvcc in
//! build.rs into fat binaries (a cubin per architecture, [`CUBIN_ARCHS`], and the PTX of the
//! lowest, [`PTX_ARCH`]), loaded once by [`CudaKernels::new`] on the caller's stream (candle's,
//! so that they order with its GEMMs) and launched by the methods below.
//!
//! Conventions (as the CPU kernels'; see `/work/prompts/cuda-interface.md`):
//! - buffers are row-major; inputs are `&impl DevicePtr<X>`, outputs `&mut impl DevicePtrMut<X>`
//!   (a `CudaSlice`, `CudaView` or `CudaViewMut`: sub-views of flat buffers work);
//! - `T: Compute` is the GEMM-side storage type (f32, bf16, f16); the residual stream,
//!   LayerNorm/softmax statistics, gradients of parameters and optimiser state are f32;
//! - every length is checked on the host before the launch: a mismatch is a
//!   [`CudaKernelError::Length`], never an out-of-bounds launch; dims must fit in `i32`;
//! - dropout: `site: Option<Site>` (`None` or `p == 0`: no dropout, nothing written to the
//!   mask) and `row_keys`, a `u32` buffer of `[sample, pass]` pairs, one pair per sample row
//!   (`crate::dropout::RowKey`); element `i` of sample row `r` is kept iff
//!   `philox(i / 4, sample, site << 1 | pass, update; seed)[i % 4] ≥ drop_threshold(p)`, bit for
//!   bit as [`crate::dropout`]. Forwards record the mask as bytes (`keep`, 1 = kept) and
//!   backwards read it (`p` given so that `p == 0` skips it);
//! - nothing uses float atomics: every reduction runs in a fixed order (results are
//!   deterministic run to run); backwards that say "+=" accumulate, the rest overwrite.
//!
//! The per-element and per-row math is `src/cuda/math.cuh`, whose host build is tested against
//! the Rust kernels in `tests/cuda_twin.rs` (bitwise for masks, GELU, LayerNorm and softmax rows,
//! SGD/AdamW elements).
#![allow(unsafe_code)] // kernel launches (cudarc's `launch` is unsafe): each with a SAFETY note

use std::collections::HashMap;
use std::sync::Arc;

/// The cudarc this crate is built with (its `driver` types are the launchers' buffers).
pub use cudarc;
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
pub use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, DriverError};
use cudarc::nvrtc::Ptx;

use crate::dropout::Site;
use crate::loss::{LossConfig, LossMode};
use crate::optim::{AdamCoef, AdamWHyper, SgdHyper};
use crate::philox::{drop_threshold, keep_scale};

/// Errors of the CUDA kernels.
#[derive(Debug, thiserror::Error)]
pub enum CudaKernelError {
    /// The driver refused a module load or a launch.
    #[error("CUDA kernels: driver error: {0}")]
    Driver(#[from] DriverError),
    /// A buffer does not have the length the dimensions give.
    #[error("CUDA kernel {kernel}: {buffer} has {got} elements, expected {want}")]
    Length {
        /// The launcher.
        kernel: &'static str,
        /// The argument.
        buffer: &'static str,
        /// Its length.
        got: usize,
        /// The length the dimensions give.
        want: usize,
    },
    /// Dimensions that are invalid or too large for the kernels' 32-bit indexing.
    #[error("CUDA kernel {kernel}: {message}")]
    Shape {
        /// The launcher.
        kernel: &'static str,
        /// What is wrong.
        message: String,
    },
    /// This build has no kernel image the GPU can run.
    #[error(
        "CUDA kernels: no kernel image for this GPU (compute capability {major}.{minor}): this \
         build holds cubins for {covered} and PTX for compute_{ptx} (newer GPUs JIT it); {hint}"
    )]
    NoImage {
        /// The GPU's compute capability.
        major: u32,
        /// Its minor version.
        minor: u32,
        /// The cubins' architectures, e.g. `sm_75, sm_80`.
        covered: String,
        /// The PTX's architecture.
        ptx: u32,
        /// How to build for it.
        hint: String,
    },
    /// A kernel is missing from the embedded PTX (a build problem).
    #[error("CUDA kernels: function {0} is not in the PTX")]
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
/// templates instantiated with suffixes `_f32`, `_bf16`, `_f16`).
pub trait Compute:
    sealed::Sealed + cudarc::driver::DeviceRepr + Copy + Send + Sync + 'static
{
    /// Kernel-name suffix.
    const NAME: &'static str;
    /// Position in [`TYPES`].
    const INDEX: usize;
}
impl Compute for f32 {
    const NAME: &'static str = "f32";
    const INDEX: usize = 0;
}
impl Compute for half::bf16 {
    const NAME: &'static str = "bf16";
    const INDEX: usize = 1;
}
impl Compute for half::f16 {
    const NAME: &'static str = "f16";
    const INDEX: usize = 2;
}

/// The kernel-name suffixes of the [`Compute`] types, in `INDEX` order.
const TYPES: [&str; 3] = ["f32", "bf16", "f16"];

include!(concat!(env!("OUT_DIR"), "/archs.rs"));

pub use crate::arch::{kernel_image, KernelImage};

/// A kernel module: name, PTX of [`PTX_ARCH`] (its entry names are checked by a test), fat
/// binary (what is loaded), kernels (`{}` = each of f32, bf16, f16).
type Module = (
    &'static str,
    &'static str,
    &'static [u8],
    &'static [&'static str],
);

/// The kernel modules (build.rs writes `<name>.ptx` and `<name>.fatbin`).
const MODULES: [Module; 5] = [
    (
        "elementwise",
        include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx")),
        include_bytes!(concat!(env!("OUT_DIR"), "/elementwise.fatbin")),
        &[
            "im2col_{}",
            "embed_fwd_{}",
            "embed_bwd_tok_{}",
            "embed_bwd_params",
            "residual_dropout_add_{}",
            "dropout_fwd_{}",
            "apply_keep_{}",
            "dropout_grad_{}",
            "gelu_dropout_fwd_{}",
            "gelu_dropout_bwd_{}",
            "gelu_apply_keep_{}",
            "cast_f32_to_{}",
            "cast_{}_to_f32",
            "qkv_split_{}",
            "attn_merge_{}",
            "qkv_merge_grad_{}",
            "attn_split_grad_{}",
            "cls_gather",
            "cls_scatter_grad",
            "column_partials_{}",
            "column_reduce",
        ],
    ),
    (
        "layernorm",
        include_str!(concat!(env!("OUT_DIR"), "/layernorm.ptx")),
        include_bytes!(concat!(env!("OUT_DIR"), "/layernorm.fatbin")),
        &[
            "layernorm_fwd_{}",
            "layernorm_bwd_{}",
            "layernorm_bwd_partials_{}",
        ],
    ),
    (
        "softmax",
        include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx")),
        include_bytes!(concat!(env!("OUT_DIR"), "/softmax.fatbin")),
        &["softmax_dropout_fwd_{}", "softmax_dropout_bwd_{}"],
    ),
    (
        "loss",
        include_str!(concat!(env!("OUT_DIR"), "/loss.ptx")),
        include_bytes!(concat!(env!("OUT_DIR"), "/loss.fatbin")),
        &["rdrop_loss_rows", "rdrop_loss_finish"],
    ),
    (
        "optim",
        include_str!(concat!(env!("OUT_DIR"), "/optim.ptx")),
        include_bytes!(concat!(env!("OUT_DIR"), "/optim.fatbin")),
        &[
            "sum_squares_partials",
            "sum_squares_finish",
            "clip_coef",
            "sgd_update_{}",
            "adamw_update_{}",
            "nonfinite_check",
            "scale_inplace",
        ],
    ),
];

/// Threads of the elementwise kernels' blocks.
const THREADS: u32 = 256;
/// Rows of a column partial (bias gradient, LayerNorm dγ/dβ): crate::layernorm::BWD_ROWS.
pub const COLUMN_ROWS: usize = crate::layernorm::BWD_ROWS;
/// Blocks of [`CudaKernels::sum_squares`]'s first pass (its scratch length).
pub const SUM_SQUARES_BLOCKS: usize = 1024;
/// Header of [`CudaKernels::rdrop_loss`]'s output: `[loss, ce, kl, bad_labels]`.
pub const LOSS_HEADER: usize = 4;

/// A kernel argument (all are passed by value).
enum Arg {
    P(u64),
    I(i32),
    U(u32),
    F(f32),
    D(f64),
}

/// The loaded kernels, launched on one stream.
pub struct CudaKernels {
    stream: Arc<CudaStream>,
    /// Per pattern, the f32, bf16, f16 instances (an untemplated kernel thrice).
    funcs: HashMap<&'static str, [CudaFunction; 3]>,
    /// The image the driver runs on this GPU.
    image: KernelImage,
}

impl std::fmt::Debug for CudaKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKernels")
            .field("kernels", &self.funcs.len())
            .field("image", &self.image)
            .finish()
    }
}

/// `want == got` or a [`CudaKernelError::Length`].
fn len(kernel: &'static str, buffer: &'static str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(CudaKernelError::Length {
            kernel,
            buffer,
            got,
            want,
        })
    }
}

/// `v` as the kernels' `int`, or a [`CudaKernelError::Shape`].
fn int(kernel: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaKernelError::Shape {
        kernel,
        message: format!("{what} = {v} exceeds the kernels' 32-bit indexing"),
    })
}

/// A product of dims, checked against overflow.
fn prod(kernel: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| CudaKernelError::Shape {
            kernel,
            message: format!("dimensions {dims:?} overflow"),
        })
}

/// One thread per element, blocks of [`THREADS`].
fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).max(1) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The mask parameters passed to a kernel: seed lo/hi, update, site, threshold, keep scale,
/// and whether the site drops anything (`p > 0`).
fn site_args(site: Option<Site>) -> [Arg; 7] {
    match site.filter(|s| s.p != 0.0) {
        Some(s) => [
            Arg::U(s.seed as u32),
            Arg::U((s.seed >> 32) as u32),
            Arg::U(s.update),
            Arg::U(s.site),
            Arg::U(drop_threshold(s.p)),
            Arg::F(keep_scale(s.p)),
            Arg::I(1),
        ],
        None => [
            Arg::U(0),
            Arg::U(0),
            Arg::U(0),
            Arg::U(0),
            Arg::U(0),
            Arg::F(1.0),
            Arg::I(0),
        ],
    }
}

/// Whether `site` drops anything.
fn active(site: Option<Site>) -> bool {
    site.is_some_and(|s| s.p != 0.0)
}

/// Checks `p` is a drop probability.
fn check_p(kernel: &'static str, p: f32) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(CudaKernelError::Shape {
            kernel,
            message: format!("drop probability {p} is not in [0, 1)"),
        })
    }
}

impl CudaKernels {
    /// Loads the kernel modules into the stream's context (the driver picks each fat
    /// binary's cubin for the GPU, or JIT-compiles its PTX) and looks up every kernel.
    ///
    /// # Errors
    /// [`CudaKernelError::NoImage`] for a GPU this build has no image for,
    /// [`CudaKernelError::Driver`] if the driver refuses a module, [`CudaKernelError::Missing`]
    /// if a kernel is absent.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        let (major, minor) = ctx.compute_capability()?;
        let (major, minor) = (major.max(0) as u32, minor.max(0) as u32);
        let image = kernel_image(CUBIN_ARCHS, PTX_ARCH, major, minor).ok_or_else(|| {
            let covered: Vec<String> = CUBIN_ARCHS.iter().map(|a| format!("sm_{a}")).collect();
            CudaKernelError::NoImage {
                major,
                minor,
                covered: covered.join(", "),
                ptx: PTX_ARCH,
                hint: if major * 10 + minor < 75 {
                    "CUDA 13 no longer compiles for it: build the CUDA 12 flavour \
                     (`scripts/build-cuda.sh --cuda 12`)"
                        .to_string()
                } else {
                    format!("rebuild with RDROP_CUDA_ARCHS={major}{minor} scripts/build-cuda.sh")
                },
            }
        })?;
        let mut funcs = HashMap::new();
        for (_, _, fatbin, names) in MODULES {
            let module = ctx.load_module(Ptx::from_binary(fatbin.to_vec()))?;
            for &pattern in names {
                let load = |t: &str| {
                    let name = pattern.replace("{}", t);
                    module
                        .load_function(&name)
                        .map_err(|_| CudaKernelError::Missing(name))
                };
                let fs = if pattern.contains("{}") {
                    [load(TYPES[0])?, load(TYPES[1])?, load(TYPES[2])?]
                } else {
                    let f = load("")?;
                    [f.clone(), f.clone(), f]
                };
                funcs.insert(pattern, fs);
            }
        }
        Ok(Self {
            stream,
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

    /// The `T` instance of a templated kernel (`pattern` as in [`MODULES`], e.g. `"im2col_{}"`).
    fn ft<T: Compute>(&self, pattern: &'static str) -> Result<&CudaFunction> {
        self.funcs
            .get(pattern)
            .map(|f| &f[T::INDEX])
            .ok_or_else(|| CudaKernelError::Missing(pattern.replace("{}", T::NAME)))
    }

    /// A kernel that is not templated.
    fn fp(&self, name: &'static str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .map(|f| &f[0])
            .ok_or_else(|| CudaKernelError::Missing(name.to_string()))
    }

    fn launch(&self, f: &CudaFunction, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::U(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
                Arg::D(v) => b.arg(v),
            };
        }
        // SAFETY: every launcher checks on the host, before calling this, that each buffer
        // holds exactly the elements its kernel indexes (the `.cu` kernels index only below
        // the dims passed, which are those checked); the arguments are pushed in the order and
        // with the types of the kernel's C signature (u64 device pointers, int, unsigned,
        // float, double); the device pointers' stream guards live in the caller until after
        // this returns.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    // ------------------------------------------------------------------------------ embedding

    /// Patch rows for the patch-embedding GEMM (crate::patch::im2col, cast to `T`):
    /// `out[b·g² + gy·g + gx, c·p·p + py·p + px] = img[b, c, gy·p + py, gx·p + px]`, `g = s/p`.
    /// Shapes: `out` `(B·g², C·p·p)` T, `img` `(B, C, S, S)` f32. Grid: one thread per output
    /// element.
    #[allow(clippy::too_many_arguments)]
    pub fn im2col<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        img: &impl DevicePtr<f32>,
        b: usize,
        c: usize,
        s: usize,
        p: usize,
    ) -> Result<()> {
        const K: &str = "im2col";
        if p == 0 || !s.is_multiple_of(p) {
            return Err(CudaKernelError::Shape {
                kernel: K,
                message: format!("patch size {p} does not divide image size {s}"),
            });
        }
        let g = s / p;
        len(K, "img", img.len(), prod(K, &[b, c, s, s])?)?;
        let n = prod(K, &[b, g, g, c, p, p])?;
        len(K, "out", out.len(), n)?;
        int(K, "elements", n.max(img.len()))?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (o, _g1) = out.device_ptr_mut(st);
        let (i, _g2) = img.device_ptr(st);
        self.launch(
            self.ft::<T>("im2col_{}")?,
            grid_for(n),
            &[
                Arg::P(o),
                Arg::P(i),
                Arg::I(b as i32),
                Arg::I(c as i32),
                Arg::I(s as i32),
                Arg::I(p as i32),
            ],
        )
    }

    /// Embeddings with dropout (the CPU engine's `embed` after its GEMM):
    /// `x[b, 0] = cls + pos[0]`, `x[b, 1 + j] = tok[b, j] + pos[1 + j]`, then
    /// `x[b] ← mask(site, row_keys[b]) ⊙ x[b]` over the sample's `tokens·d` elements, the mask
    /// recorded in `keep` (untouched without dropout).
    /// Shapes: `x` `(B, Tk, D)` f32, `keep` `(B, Tk, D)` u8, `tok` `(B, Tk−1, D)` T, `cls` `(D)`,
    /// `pos` `(Tk, D)` f32, `row_keys` `2·B` u32. Grid: one thread per 4 elements of a sample
    /// (one Philox block).
    #[allow(clippy::too_many_arguments)]
    pub fn embed_fwd<T: Compute>(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        keep: &mut impl DevicePtrMut<u8>,
        tok: &impl DevicePtr<T>,
        cls: &impl DevicePtr<f32>,
        pos: &impl DevicePtr<f32>,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        b: usize,
        tokens: usize,
        d: usize,
    ) -> Result<()> {
        const K: &str = "embed_fwd";
        if tokens == 0 {
            return Err(CudaKernelError::Shape {
                kernel: K,
                message: "no tokens".into(),
            });
        }
        let n = prod(K, &[b, tokens, d])?;
        len(K, "x", x.len(), n)?;
        len(K, "tok", tok.len(), prod(K, &[b, tokens - 1, d])?)?;
        len(K, "cls", cls.len(), d)?;
        len(K, "pos", pos.len(), tokens * d)?;
        if active(site) {
            len(K, "keep", keep.len(), n)?;
            len(K, "row_keys", row_keys.len(), 2 * b)?;
        }
        int(K, "elements", n)?;
        if n == 0 {
            return Ok(());
        }
        let per = (tokens * d).div_ceil(4);
        let st = &*self.stream;
        let (xp, _g1) = x.device_ptr_mut(st);
        let (kp, _g2) = keep.device_ptr_mut(st);
        let (tp, _g3) = tok.device_ptr(st);
        let (cp, _g4) = cls.device_ptr(st);
        let (pp, _g5) = pos.device_ptr(st);
        let (rp, _g6) = row_keys.device_ptr(st);
        let mut args = vec![
            Arg::P(xp),
            Arg::P(kp),
            Arg::P(tp),
            Arg::P(cp),
            Arg::P(pp),
            Arg::P(rp),
        ];
        args.extend(site_args(site));
        args.extend([Arg::I(b as i32), Arg::I(tokens as i32), Arg::I(d as i32)]);
        self.launch(self.ft::<T>("embed_fwd_{}")?, grid_for(b * per), &args)
    }

    /// Backward of [`Self::embed_fwd`], deterministic (sums over samples in sample order, no
    /// atomics): with `g = keep ⊙ dx / (1−p)` (`g = dx` when `p == 0`),
    /// `dtok[b, j] = g[b, 1 + j]` (overwritten), `dcls += Σ_b g[b, 0]`, `dpos += Σ_b g[b]`.
    /// Shapes: `dtok` `(B, Tk−1, D)` T, `dcls` `(D)`, `dpos` `(Tk, D)` f32, `dx`, `keep`
    /// `(B, Tk, D)`. Grids: one thread per `dtok` element; one thread per `dpos` element.
    #[allow(clippy::too_many_arguments)]
    pub fn embed_bwd<T: Compute>(
        &self,
        dtok: &mut impl DevicePtrMut<T>,
        dcls: &mut impl DevicePtrMut<f32>,
        dpos: &mut impl DevicePtrMut<f32>,
        dx: &impl DevicePtr<f32>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        b: usize,
        tokens: usize,
        d: usize,
    ) -> Result<()> {
        const K: &str = "embed_bwd";
        check_p(K, p)?;
        if tokens == 0 {
            return Err(CudaKernelError::Shape {
                kernel: K,
                message: "no tokens".into(),
            });
        }
        let n = prod(K, &[b, tokens, d])?;
        len(K, "dx", dx.len(), n)?;
        len(K, "dtok", dtok.len(), prod(K, &[b, tokens - 1, d])?)?;
        len(K, "dcls", dcls.len(), d)?;
        len(K, "dpos", dpos.len(), tokens * d)?;
        if p != 0.0 {
            len(K, "keep", keep.len(), n)?;
        }
        int(K, "elements", n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (tp, _g1) = dtok.device_ptr_mut(st);
        let (cp, _g2) = dcls.device_ptr_mut(st);
        let (pp, _g3) = dpos.device_ptr_mut(st);
        let (xp, _g4) = dx.device_ptr(st);
        let (kp, _g5) = keep.device_ptr(st);
        let scale = if p == 0.0 { 1.0 } else { keep_scale(p) };
        let use_keep = Arg::I((p != 0.0) as i32);
        let dims = [Arg::I(b as i32), Arg::I(tokens as i32), Arg::I(d as i32)];
        let ntok = b * (tokens - 1) * d;
        if ntok > 0 {
            let mut args = vec![Arg::P(tp), Arg::P(xp), Arg::P(kp), use_keep, Arg::F(scale)];
            args.extend(dims);
            self.launch(self.ft::<T>("embed_bwd_tok_{}")?, grid_for(ntok), &args)?;
        }
        let mut args = vec![
            Arg::P(cp),
            Arg::P(pp),
            Arg::P(xp),
            Arg::P(kp),
            Arg::I((p != 0.0) as i32),
            Arg::F(scale),
        ];
        args.extend([Arg::I(b as i32), Arg::I(tokens as i32), Arg::I(d as i32)]);
        self.launch(self.fp("embed_bwd_params")?, grid_for(tokens * d), &args)
    }

    // ------------------------------------------------------------------------------ LayerNorm

    /// LayerNorm forward (crate::layernorm::layernorm_fwd, bit for bit in f32 before the cast
    /// of `y`): per row, `μ = Σx/D`, `r = 1/√(Σ(x−μ)²/D + eps)`, `y = (x−μ)·r·γ + β` cast to
    /// T; `mean`, `rstd` overwritten. Shapes: `y` `(N, D)` T, `x` `(N, D)` f32, `w`, `b` `(D)`,
    /// `mean`, `rstd` `(N)`. Grid: 16 lanes per row (two rows a warp), 256-thread blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_fwd<T: Compute>(
        &self,
        y: &mut impl DevicePtrMut<T>,
        mean: &mut impl DevicePtrMut<f32>,
        rstd: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<f32>,
        w: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        eps: f32,
        n: usize,
        d: usize,
    ) -> Result<()> {
        const K: &str = "layernorm_fwd";
        let nd = prod(K, &[n, d])?;
        len(K, "x", x.len(), nd)?;
        len(K, "y", y.len(), nd)?;
        len(K, "mean", mean.len(), n)?;
        len(K, "rstd", rstd.len(), n)?;
        len(K, "w", w.len(), d)?;
        len(K, "b", b.len(), d)?;
        int(K, "elements", nd)?;
        if nd == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (yp, _g1) = y.device_ptr_mut(st);
        let (mp, _g2) = mean.device_ptr_mut(st);
        let (rp, _g3) = rstd.device_ptr_mut(st);
        let (xp, _g4) = x.device_ptr(st);
        let (wp, _g5) = w.device_ptr(st);
        let (bp, _g6) = b.device_ptr(st);
        self.launch(
            self.ft::<T>("layernorm_fwd_{}")?,
            grid_for(n * 16),
            &[
                Arg::P(yp),
                Arg::P(mp),
                Arg::P(rp),
                Arg::P(xp),
                Arg::P(wp),
                Arg::P(bp),
                Arg::F(eps),
                Arg::I(n as i32),
                Arg::I(d as i32),
            ],
        )
    }

    /// Scratch (f32 elements) that [`Self::layernorm_bwd`] needs: a dγ and a dβ partial per
    /// block of [`COLUMN_ROWS`] rows.
    pub fn layernorm_bwd_scratch_len(n: usize, d: usize) -> usize {
        n.div_ceil(COLUMN_ROWS) * 2 * d
    }

    /// LayerNorm backward (crate::layernorm::layernorm_bwd, bit for bit in f32 when `dy` is f32):
    /// `g = dy⊙γ`, `x̂ = (x−μ)·r`, `dx (+)= r·(g − Σg/D − x̂·Σ(g⊙x̂)/D)` (`+=` when
    /// `accumulate`, else overwritten), `dγ += Σ_rows dy⊙x̂`, `dβ += Σ_rows dy` (partials of
    /// [`COLUMN_ROWS`] rows in row order, then added in block order: no atomics).
    /// Shapes: `dx`, `x` `(N, D)` f32, `dy` `(N, D)` T, `w`, `dw`, `db` `(D)`, `mean`, `rstd`
    /// `(N)`, `scratch` ≥ [`Self::layernorm_bwd_scratch_len`]. Grids: 16 lanes per row for dx;
    /// one thread per (column, block of rows) for the partials; one per column for the sum.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_bwd<T: Compute>(
        &self,
        dx: &mut impl DevicePtrMut<f32>,
        dw: &mut impl DevicePtrMut<f32>,
        db: &mut impl DevicePtrMut<f32>,
        scratch: &mut impl DevicePtrMut<f32>,
        dy: &impl DevicePtr<T>,
        x: &impl DevicePtr<f32>,
        w: &impl DevicePtr<f32>,
        mean: &impl DevicePtr<f32>,
        rstd: &impl DevicePtr<f32>,
        n: usize,
        d: usize,
        accumulate: bool,
    ) -> Result<()> {
        const K: &str = "layernorm_bwd";
        let nd = prod(K, &[n, d])?;
        len(K, "dx", dx.len(), nd)?;
        len(K, "dy", dy.len(), nd)?;
        len(K, "x", x.len(), nd)?;
        len(K, "mean", mean.len(), n)?;
        len(K, "rstd", rstd.len(), n)?;
        len(K, "w", w.len(), d)?;
        len(K, "dw", dw.len(), d)?;
        len(K, "db", db.len(), d)?;
        let need = Self::layernorm_bwd_scratch_len(n, d);
        if scratch.len() < need {
            return Err(CudaKernelError::Length {
                kernel: K,
                buffer: "scratch",
                got: scratch.len(),
                want: need,
            });
        }
        int(K, "elements", nd.max(need))?;
        if nd == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(COLUMN_ROWS);
        let st = &*self.stream;
        let (dxp, _g1) = dx.device_ptr_mut(st);
        let (dwp, _g2) = dw.device_ptr_mut(st);
        let (dbp, _g3) = db.device_ptr_mut(st);
        let (sp, _g4) = scratch.device_ptr_mut(st);
        let (dyp, _g5) = dy.device_ptr(st);
        let (xp, _g6) = x.device_ptr(st);
        let (wp, _g7) = w.device_ptr(st);
        let (mp, _g8) = mean.device_ptr(st);
        let (rp, _g9) = rstd.device_ptr(st);
        self.launch(
            self.ft::<T>("layernorm_bwd_{}")?,
            grid_for(n * 16),
            &[
                Arg::P(dxp),
                Arg::P(dyp),
                Arg::P(xp),
                Arg::P(wp),
                Arg::P(mp),
                Arg::P(rp),
                Arg::I(n as i32),
                Arg::I(d as i32),
                Arg::I(accumulate as i32),
            ],
        )?;
        self.launch(
            self.ft::<T>("layernorm_bwd_partials_{}")?,
            grid_for(blocks * d),
            &[
                Arg::P(sp),
                Arg::P(dyp),
                Arg::P(xp),
                Arg::P(mp),
                Arg::P(rp),
                Arg::I(n as i32),
                Arg::I(d as i32),
            ],
        )?;
        // partial c of column j: dγ at scratch[c·2D + j], dβ at scratch[c·2D + D + j]
        self.launch(
            self.fp("column_reduce")?,
            grid_for(d),
            &[
                Arg::P(dwp),
                Arg::P(sp),
                Arg::I(blocks as i32),
                Arg::I(d as i32),
                Arg::I(2 * d as i32),
            ],
        )?;
        let (sp_b, dbv) = (sp + (d * 4) as u64, dbp);
        self.launch(
            self.fp("column_reduce")?,
            grid_for(d),
            &[
                Arg::P(dbv),
                Arg::P(sp_b),
                Arg::I(blocks as i32),
                Arg::I(d as i32),
                Arg::I(2 * d as i32),
            ],
        )
    }

    // ------------------------------------------------------------------------------ attention

    /// `q, k, v (B, H, Tk, Dh) ← qkv (B, Tk, 3D)`: `q[b, h, t, e] = qkv[b, t, h·Dh + e]`, `k` at
    /// column offset `D`, `v` at `2D`. Grid: one thread per element of `q`.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_split<T: Compute>(
        &self,
        q: &mut impl DevicePtrMut<T>,
        k: &mut impl DevicePtrMut<T>,
        v: &mut impl DevicePtrMut<T>,
        qkv: &impl DevicePtr<T>,
        b: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        const K: &str = "qkv_split";
        let n = prod(K, &[b, tokens, heads, head_dim])?;
        len(K, "q", q.len(), n)?;
        len(K, "k", k.len(), n)?;
        len(K, "v", v.len(), n)?;
        len(K, "qkv", qkv.len(), 3 * n)?;
        int(K, "elements", 3 * n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (qp, _g1) = q.device_ptr_mut(st);
        let (kp, _g2) = k.device_ptr_mut(st);
        let (vp, _g3) = v.device_ptr_mut(st);
        let (xp, _g4) = qkv.device_ptr(st);
        self.launch(
            self.ft::<T>("qkv_split_{}")?,
            grid_for(n),
            &[
                Arg::P(qp),
                Arg::P(kp),
                Arg::P(vp),
                Arg::P(xp),
                Arg::I(b as i32),
                Arg::I(tokens as i32),
                Arg::I(heads as i32),
                Arg::I(head_dim as i32),
            ],
        )
    }

    /// The inverse of [`Self::qkv_split`] for the gradients: `dqkv (B, Tk, 3D) ← dq, dk, dv
    /// (B, H, Tk, Dh)` (overwritten). Grid: one thread per element of `dq`.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_merge_grad<T: Compute>(
        &self,
        dqkv: &mut impl DevicePtrMut<T>,
        dq: &impl DevicePtr<T>,
        dk: &impl DevicePtr<T>,
        dv: &impl DevicePtr<T>,
        b: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        const K: &str = "qkv_merge_grad";
        let n = prod(K, &[b, tokens, heads, head_dim])?;
        len(K, "dq", dq.len(), n)?;
        len(K, "dk", dk.len(), n)?;
        len(K, "dv", dv.len(), n)?;
        len(K, "dqkv", dqkv.len(), 3 * n)?;
        int(K, "elements", 3 * n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (xp, _g1) = dqkv.device_ptr_mut(st);
        let (qp, _g2) = dq.device_ptr(st);
        let (kp, _g3) = dk.device_ptr(st);
        let (vp, _g4) = dv.device_ptr(st);
        self.launch(
            self.ft::<T>("qkv_merge_grad_{}")?,
            grid_for(n),
            &[
                Arg::P(xp),
                Arg::P(qp),
                Arg::P(kp),
                Arg::P(vp),
                Arg::I(b as i32),
                Arg::I(tokens as i32),
                Arg::I(heads as i32),
                Arg::I(head_dim as i32),
            ],
        )
    }

    /// Heads back into rows: `out[b, t, h·Dh + e] = o[b, h, t, e]`, `out` `(B, Tk, D)`, `o`
    /// `(B, H, Tk, Dh)`. Grid: one thread per element.
    #[allow(clippy::too_many_arguments)]
    pub fn attn_merge<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        o: &impl DevicePtr<T>,
        b: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.permute::<T>("attn_merge_{}", out, o, b, tokens, heads, head_dim)
    }

    /// The inverse of [`Self::attn_merge`] for the gradient: `do_[b, h, t, e] =
    /// dout[b, t, h·Dh + e]`. Grid: one thread per element.
    #[allow(clippy::too_many_arguments)]
    pub fn attn_split_grad<T: Compute>(
        &self,
        do_: &mut impl DevicePtrMut<T>,
        dout: &impl DevicePtr<T>,
        b: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.permute::<T>("attn_split_grad_{}", do_, dout, b, tokens, heads, head_dim)
    }

    #[allow(clippy::too_many_arguments)]
    fn permute<T: Compute>(
        &self,
        k: &'static str,
        out: &mut impl DevicePtrMut<T>,
        x: &impl DevicePtr<T>,
        b: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let n = prod(k, &[b, tokens, heads, head_dim])?;
        len(k, "out", out.len(), n)?;
        len(k, "in", x.len(), n)?;
        int(k, "elements", n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (op, _g1) = out.device_ptr_mut(st);
        let (xp, _g2) = x.device_ptr(st);
        self.launch(
            self.ft::<T>(k)?,
            grid_for(n),
            &[
                Arg::P(op),
                Arg::P(xp),
                Arg::I(b as i32),
                Arg::I(tokens as i32),
                Arg::I(heads as i32),
                Arg::I(head_dim as i32),
            ],
        )
    }

    /// Softmax with dropout over materialised scores (crate::attention, bit for bit in f32
    /// before the casts): per row `(b, h, i)`, `P = softmax(scale · S)` (max and sum in f32, the
    /// CPU's lane order), written **in place over the scores** `probs` (P is what the backward
    /// needs), and with dropout `attn = P ⊙ M` (the input of the `A·V` GEMM) with the mask
    /// element `(h, i, j)` = element `h·Tk·Tk + i·Tk + j` of sample `b`'s key (as
    /// crate::attention), recorded in `keep`. Without dropout (`site` `None` or `p == 0`) A = P:
    /// `attn` and `keep` are not touched (they may be empty) and the GEMM reads `probs`.
    /// Shapes: `probs`, `attn`, `keep` `(B, H, Tk, Tk)`, `row_keys` `2·B` u32. Grid: 8 lanes per
    /// row (four rows a warp), 256-thread blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_dropout_fwd<T: Compute>(
        &self,
        probs: &mut impl DevicePtrMut<T>,
        attn: &mut impl DevicePtrMut<T>,
        keep: &mut impl DevicePtrMut<u8>,
        scale: f32,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        b: usize,
        heads: usize,
        tokens: usize,
    ) -> Result<()> {
        self.softmax_dropout_fwd_ld(
            probs, attn, keep, scale, site, row_keys, b, heads, tokens, tokens,
        )
    }

    /// [`Self::softmax_dropout_fwd`] over rows `ld ≥ Tk` elements apart: `probs`, `attn`,
    /// `keep` are `(B, H, Tk, ld)`, row `(b, h, i)` at `((b·H + h)·Tk + i)·ld`; the padding
    /// columns `Tk..ld` are never read or written (so a padded, 16-byte aligned leading
    /// dimension can serve the attention GEMMs). The mask numbering is that of `ld = Tk`.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_dropout_fwd_ld<T: Compute>(
        &self,
        probs: &mut impl DevicePtrMut<T>,
        attn: &mut impl DevicePtrMut<T>,
        keep: &mut impl DevicePtrMut<u8>,
        scale: f32,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        b: usize,
        heads: usize,
        tokens: usize,
        ld: usize,
    ) -> Result<()> {
        const K: &str = "softmax_dropout_fwd";
        let n = Self::softmax_len(K, b, heads, tokens, ld)?;
        len(K, "probs", probs.len(), n)?;
        if active(site) {
            len(K, "attn", attn.len(), n)?;
            len(K, "keep", keep.len(), n)?;
            len(K, "row_keys", row_keys.len(), 2 * b)?;
        }
        if n == 0 {
            return Ok(());
        }
        let rows = b * heads * tokens;
        let st = &*self.stream;
        let (pp, _g1) = probs.device_ptr_mut(st);
        let (ap, _g2) = attn.device_ptr_mut(st);
        let (kp, _g3) = keep.device_ptr_mut(st);
        let (rp, _g4) = row_keys.device_ptr(st);
        let mut args = vec![
            Arg::P(pp),
            Arg::P(ap),
            Arg::P(kp),
            Arg::P(rp),
            Arg::F(scale),
        ];
        args.extend(site_args(site));
        args.extend([
            Arg::I(b as i32),
            Arg::I(heads as i32),
            Arg::I(tokens as i32),
            Arg::I(ld as i32),
        ]);
        self.launch(
            self.ft::<T>("softmax_dropout_fwd_{}")?,
            grid_for(rows * 8),
            &args,
        )
    }

    /// `B·H·Tk·ld`, checked (`ld ≥ Tk`, 32-bit indexing).
    fn softmax_len(
        k: &'static str,
        b: usize,
        heads: usize,
        tokens: usize,
        ld: usize,
    ) -> Result<usize> {
        if ld < tokens {
            return Err(CudaKernelError::Shape {
                kernel: k,
                message: format!("leading dimension {ld} is below the {tokens} tokens"),
            });
        }
        let n = prod(k, &[b, heads, tokens, ld])?;
        int(k, "elements", n)?;
        Ok(n)
    }

    /// Backward of [`Self::softmax_dropout_fwd`]: with `dP = keep ⊙ dattn / (1−p)`
    /// (`dP = dattn` when `p == 0`), `dscores = scale · P ⊙ (dP − Σ_j dP_j P_j)` (overwritten;
    /// the dot in f32 in the softmax's lane order). Shapes: all `(B, H, Tk, Tk)`. Grid: 8 lanes
    /// per row.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_dropout_bwd<T: Compute>(
        &self,
        dscores: &mut impl DevicePtrMut<T>,
        dattn: &impl DevicePtr<T>,
        probs: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        scale: f32,
        b: usize,
        heads: usize,
        tokens: usize,
    ) -> Result<()> {
        self.softmax_dropout_bwd_ld(
            dscores, dattn, probs, keep, p, scale, b, heads, tokens, tokens,
        )
    }

    /// [`Self::softmax_dropout_bwd`] over rows `ld ≥ Tk` elements apart (all buffers
    /// `(B, H, Tk, ld)`, padding untouched; see [`Self::softmax_dropout_fwd_ld`]).
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_dropout_bwd_ld<T: Compute>(
        &self,
        dscores: &mut impl DevicePtrMut<T>,
        dattn: &impl DevicePtr<T>,
        probs: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        scale: f32,
        b: usize,
        heads: usize,
        tokens: usize,
        ld: usize,
    ) -> Result<()> {
        const K: &str = "softmax_dropout_bwd";
        check_p(K, p)?;
        let n = Self::softmax_len(K, b, heads, tokens, ld)?;
        len(K, "dscores", dscores.len(), n)?;
        len(K, "dattn", dattn.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (dp, _g1) = dscores.device_ptr_mut(st);
        let (ap, _g2) = dattn.device_ptr(st);
        self.softmax_bwd_launch::<T>(dp, ap, probs, keep, p, scale, b, heads, tokens, ld)
    }

    /// [`Self::softmax_dropout_bwd`] in place: `d` holds `dattn` on entry and `dscores` on
    /// return (saves a `(B, H, Tk, Tk)` buffer). Grid: 8 lanes per row.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_dropout_bwd_inplace<T: Compute>(
        &self,
        d: &mut impl DevicePtrMut<T>,
        probs: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        scale: f32,
        b: usize,
        heads: usize,
        tokens: usize,
    ) -> Result<()> {
        self.softmax_dropout_bwd_inplace_ld(d, probs, keep, p, scale, b, heads, tokens, tokens)
    }

    /// [`Self::softmax_dropout_bwd_inplace`] over rows `ld ≥ Tk` elements apart.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_dropout_bwd_inplace_ld<T: Compute>(
        &self,
        d: &mut impl DevicePtrMut<T>,
        probs: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        scale: f32,
        b: usize,
        heads: usize,
        tokens: usize,
        ld: usize,
    ) -> Result<()> {
        const K: &str = "softmax_dropout_bwd";
        check_p(K, p)?;
        let n = Self::softmax_len(K, b, heads, tokens, ld)?;
        len(K, "d", d.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (dp, _g1) = d.device_ptr_mut(st);
        self.softmax_bwd_launch::<T>(dp, dp, probs, keep, p, scale, b, heads, tokens, ld)
    }

    #[allow(clippy::too_many_arguments)]
    fn softmax_bwd_launch<T: Compute>(
        &self,
        ds: u64,
        da: u64,
        probs: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        scale: f32,
        b: usize,
        heads: usize,
        tokens: usize,
        ld: usize,
    ) -> Result<()> {
        const K: &str = "softmax_dropout_bwd";
        let n = b * heads * tokens * ld;
        len(K, "probs", probs.len(), n)?;
        if p != 0.0 {
            len(K, "keep", keep.len(), n)?;
        }
        let rows = b * heads * tokens;
        let st = &*self.stream;
        let (pp, _g3) = probs.device_ptr(st);
        let (kp, _g4) = keep.device_ptr(st);
        self.launch(
            self.ft::<T>("softmax_dropout_bwd_{}")?,
            grid_for(rows * 8),
            &[
                Arg::P(ds),
                Arg::P(da),
                Arg::P(pp),
                Arg::P(kp),
                Arg::I((p != 0.0) as i32),
                Arg::F(if p == 0.0 { 1.0 } else { keep_scale(p) }),
                Arg::F(scale),
                Arg::I(rows as i32),
                Arg::I(tokens as i32),
                Arg::I(ld as i32),
            ],
        )
    }

    // ----------------------------------------------------------------------- dropout and GELU

    /// The shared checks and mask arguments of the per-sample dropout kernels:
    /// `rows` samples of `n` elements; returns the element count.
    fn sample_rows(
        k: &'static str,
        lens: &[(&'static str, usize)],
        keep_len: usize,
        site: Option<Site>,
        keys_len: usize,
        rows: usize,
        n: usize,
    ) -> Result<usize> {
        let total = prod(k, &[rows, n])?;
        for &(name, l) in lens {
            len(k, name, l, total)?;
        }
        if active(site) {
            len(k, "keep", keep_len, total)?;
            len(k, "row_keys", keys_len, 2 * rows)?;
        }
        int(k, "elements", total)?;
        Ok(total)
    }

    /// Exact GELU with dropout after the fc1 GEMM (`pre = x·Wᵀ + b`): `h = mask ⊙ gelu(pre)`
    /// (crate::gelu's erf GELU bit for bit in f32, then the cast), the mask of sample row `r`
    /// over its `n` elements recorded in `keep`. Shapes: `h`, `pre`, `keep` `(rows, n)`
    /// (`n = Tk·M`), `row_keys` `2·rows`. Grid: one thread per 4 elements (a Philox block).
    #[allow(clippy::too_many_arguments)]
    pub fn gelu_dropout_fwd<T: Compute>(
        &self,
        h: &mut impl DevicePtrMut<T>,
        keep: &mut impl DevicePtrMut<u8>,
        pre: &impl DevicePtr<T>,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        const K: &str = "gelu_dropout_fwd";
        let total = Self::sample_rows(
            K,
            &[("h", h.len()), ("pre", pre.len())],
            keep.len(),
            site,
            row_keys.len(),
            rows,
            n,
        )?;
        if total == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (hp, _g1) = h.device_ptr_mut(st);
        let (kp, _g2) = keep.device_ptr_mut(st);
        let (pp, _g3) = pre.device_ptr(st);
        let (rp, _g4) = row_keys.device_ptr(st);
        self.sample_launch(
            self.ft::<T>("gelu_dropout_fwd_{}")?,
            [hp, kp, pp, rp],
            site,
            rows,
            n,
        )
    }

    /// `x ← mask ⊙ x` in place over `rows` samples of `n` elements, the mask recorded in
    /// `keep` (crate::dropout::dropout_apply_keep; e.g. after a GELU epilogue). Grid: one thread
    /// per 4 elements.
    pub fn dropout_fwd<T: Compute>(
        &self,
        x: &mut impl DevicePtrMut<T>,
        keep: &mut impl DevicePtrMut<u8>,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        const K: &str = "dropout_fwd";
        let total = Self::sample_rows(
            K,
            &[("x", x.len())],
            keep.len(),
            site,
            row_keys.len(),
            rows,
            n,
        )?;
        if total == 0 || !active(site) {
            return Ok(());
        }
        let st = &*self.stream;
        let (xp, _g1) = x.device_ptr_mut(st);
        let (kp, _g2) = keep.device_ptr_mut(st);
        let (rp, _g4) = row_keys.device_ptr(st);
        self.sample_launch(
            self.ft::<T>("dropout_fwd_{}")?,
            [xp, kp, xp, rp],
            site,
            rows,
            n,
        )
    }

    /// The residual branch with dropout (crate::dropout::residual_dropout_add_keep, bit for bit
    /// when `y` is f32): `out = res + m ⊙ y`, `m ∈ {0, 1/(1−p)}` (`out = res + y` without
    /// dropout), the mask recorded in `keep`. Shapes: `out`, `res` f32, `y` T, `keep`
    /// `(rows, n)` (`n = Tk·D`). Grid: one thread per 4 elements.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_dropout_add<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        keep: &mut impl DevicePtrMut<u8>,
        res: &impl DevicePtr<f32>,
        y: &impl DevicePtr<T>,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        const K: &str = "residual_dropout_add";
        let total = Self::sample_rows(
            K,
            &[("out", out.len()), ("res", res.len()), ("y", y.len())],
            keep.len(),
            site,
            row_keys.len(),
            rows,
            n,
        )?;
        if total == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (op, _g1) = out.device_ptr_mut(st);
        let (kp, _g2) = keep.device_ptr_mut(st);
        let (xp, _g3) = res.device_ptr(st);
        let (yp, _g4) = y.device_ptr(st);
        let (rp, _g5) = row_keys.device_ptr(st);
        let mut args = vec![Arg::P(op), Arg::P(kp), Arg::P(xp), Arg::P(yp), Arg::P(rp)];
        args.extend(site_args(site));
        args.extend([Arg::I(rows as i32), Arg::I(n as i32)]);
        self.launch(
            self.ft::<T>("residual_dropout_add_{}")?,
            grid_for(rows * n.div_ceil(4)),
            &args,
        )
    }

    /// [`Self::residual_dropout_add`] in place: `res += m ⊙ y`.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_dropout_add_inplace<T: Compute>(
        &self,
        res: &mut impl DevicePtrMut<f32>,
        keep: &mut impl DevicePtrMut<u8>,
        y: &impl DevicePtr<T>,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        const K: &str = "residual_dropout_add";
        let total = Self::sample_rows(
            K,
            &[("res", res.len()), ("y", y.len())],
            keep.len(),
            site,
            row_keys.len(),
            rows,
            n,
        )?;
        if total == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (op, _g1) = res.device_ptr_mut(st);
        let (kp, _g2) = keep.device_ptr_mut(st);
        let (yp, _g4) = y.device_ptr(st);
        let (rp, _g5) = row_keys.device_ptr(st);
        let mut args = vec![Arg::P(op), Arg::P(kp), Arg::P(op), Arg::P(yp), Arg::P(rp)];
        args.extend(site_args(site));
        args.extend([Arg::I(rows as i32), Arg::I(n as i32)]);
        self.launch(
            self.ft::<T>("residual_dropout_add_{}")?,
            grid_for(rows * n.div_ceil(4)),
            &args,
        )
    }

    fn sample_launch(
        &self,
        f: &CudaFunction,
        ptrs: [u64; 4],
        site: Option<Site>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let mut args: Vec<Arg> = ptrs.iter().map(|&p| Arg::P(p)).collect();
        args.extend(site_args(site));
        args.extend([Arg::I(rows as i32), Arg::I(n as i32)]);
        self.launch(f, grid_for(rows * n.div_ceil(4)), &args)
    }

    /// A recorded mask applied again: `out = keep ? x/(1−p) : 0` (`out = x` when `p == 0`),
    /// e.g. `A = P ⊙ M` regenerated in the backward. Shapes: `out`, `x`, `keep` `(len)`. Grid:
    /// one thread per element.
    pub fn apply_keep<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        x: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
    ) -> Result<()> {
        const K: &str = "apply_keep";
        check_p(K, p)?;
        len(K, "x", x.len(), out.len())?;
        if p != 0.0 {
            len(K, "keep", keep.len(), out.len())?;
        }
        int(K, "elements", out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let n = out.len();
        let st = &*self.stream;
        let (op, _g1) = out.device_ptr_mut(st);
        let (xp, _g2) = x.device_ptr(st);
        let (kp, _g3) = keep.device_ptr(st);
        self.launch(
            self.ft::<T>("apply_keep_{}")?,
            grid_for(n),
            &[
                Arg::P(op),
                Arg::P(xp),
                Arg::P(kp),
                Arg::I((p != 0.0) as i32),
                Arg::F(if p == 0.0 { 1.0 } else { keep_scale(p) }),
                Arg::I(n as i32),
            ],
        )
    }

    /// The gradient of a residual branch: `dy = cast_T(keep ? dres/(1−p) : 0)` (`dy = dres`
    /// when `p == 0`; crate::dropout::apply_keep_to). Shapes: `dy` T, `dres` f32, `keep`, all
    /// `(len)`. Grid: one thread per element.
    pub fn dropout_grad<T: Compute>(
        &self,
        dy: &mut impl DevicePtrMut<T>,
        dres: &impl DevicePtr<f32>,
        keep: &impl DevicePtr<u8>,
        p: f32,
    ) -> Result<()> {
        const K: &str = "dropout_grad";
        check_p(K, p)?;
        len(K, "dres", dres.len(), dy.len())?;
        if p != 0.0 {
            len(K, "keep", keep.len(), dy.len())?;
        }
        int(K, "elements", dy.len())?;
        if dy.is_empty() {
            return Ok(());
        }
        let n = dy.len();
        let st = &*self.stream;
        let (op, _g1) = dy.device_ptr_mut(st);
        let (xp, _g2) = dres.device_ptr(st);
        let (kp, _g3) = keep.device_ptr(st);
        self.launch(
            self.ft::<T>("dropout_grad_{}")?,
            grid_for(n),
            &[
                Arg::P(op),
                Arg::P(xp),
                Arg::P(kp),
                Arg::I((p != 0.0) as i32),
                Arg::F(if p == 0.0 { 1.0 } else { keep_scale(p) }),
                Arg::I(n as i32),
            ],
        )
    }

    /// [`Self::gelu_dropout_fwd`] with the mask it recorded (no Philox): `h = keep ?
    /// gelu(pre)/(1−p) : 0` (`h = gelu(pre)` when `p == 0`, `keep` then unread), bit for bit the
    /// forward's `h`; for recomputing `h` in the backward. Shapes: all `(len)`. Grid: one thread
    /// per element.
    pub fn gelu_apply_keep<T: Compute>(
        &self,
        h: &mut impl DevicePtrMut<T>,
        pre: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
    ) -> Result<()> {
        const K: &str = "gelu_apply_keep";
        check_p(K, p)?;
        len(K, "pre", pre.len(), h.len())?;
        if p != 0.0 {
            len(K, "keep", keep.len(), h.len())?;
        }
        let n = h.len();
        int(K, "elements", n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (hp, _g1) = h.device_ptr_mut(st);
        let (pp, _g2) = pre.device_ptr(st);
        let (kp, _g3) = keep.device_ptr(st);
        self.launch(
            self.ft::<T>("gelu_apply_keep_{}")?,
            grid_for(n),
            &[
                Arg::P(hp),
                Arg::P(pp),
                Arg::P(kp),
                Arg::I((p != 0.0) as i32),
                Arg::F(if p == 0.0 { 1.0 } else { keep_scale(p) }),
                Arg::I(n as i32),
            ],
        )
    }

    /// Backward of [`Self::gelu_dropout_fwd`]: `dpre = gelu'(pre) ⊙ (keep ? dh/(1−p) : 0)`
    /// (`keep` ignored when `p == 0`; crate::gelu's derivative bit for bit in f32). Shapes: all
    /// `(len)`. Grid: one thread per element.
    pub fn gelu_dropout_bwd<T: Compute>(
        &self,
        dpre: &mut impl DevicePtrMut<T>,
        dh: &impl DevicePtr<T>,
        pre: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
    ) -> Result<()> {
        const K: &str = "gelu_dropout_bwd";
        check_p(K, p)?;
        len(K, "dh", dh.len(), dpre.len())?;
        len(K, "pre", pre.len(), dpre.len())?;
        if p != 0.0 {
            len(K, "keep", keep.len(), dpre.len())?;
        }
        let n = dpre.len();
        int(K, "elements", n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (op, _g1) = dpre.device_ptr_mut(st);
        let (hp, _g2) = dh.device_ptr(st);
        self.gelu_bwd_launch::<T>(op, hp, pre, keep, p, n)
    }

    /// [`Self::gelu_dropout_bwd`] in place: `d` holds `dh` on entry and `dpre` on return.
    pub fn gelu_dropout_bwd_inplace<T: Compute>(
        &self,
        d: &mut impl DevicePtrMut<T>,
        pre: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
    ) -> Result<()> {
        const K: &str = "gelu_dropout_bwd";
        check_p(K, p)?;
        len(K, "pre", pre.len(), d.len())?;
        if p != 0.0 {
            len(K, "keep", keep.len(), d.len())?;
        }
        let n = d.len();
        int(K, "elements", n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (op, _g1) = d.device_ptr_mut(st);
        self.gelu_bwd_launch::<T>(op, op, pre, keep, p, n)
    }

    fn gelu_bwd_launch<T: Compute>(
        &self,
        out: u64,
        dh: u64,
        pre: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        n: usize,
    ) -> Result<()> {
        let st = &*self.stream;
        let (pp, _g3) = pre.device_ptr(st);
        let (kp, _g4) = keep.device_ptr(st);
        self.launch(
            self.ft::<T>("gelu_dropout_bwd_{}")?,
            grid_for(n),
            &[
                Arg::P(out),
                Arg::P(dh),
                Arg::P(pp),
                Arg::P(kp),
                Arg::I((p != 0.0) as i32),
                Arg::F(if p == 0.0 { 1.0 } else { keep_scale(p) }),
                Arg::I(n as i32),
            ],
        )
    }

    // --------------------------------------------------------------------- column reductions

    /// Scratch (f32 elements) that [`Self::bias_grad`] needs: one partial per block of
    /// [`COLUMN_ROWS`] rows.
    pub fn bias_grad_scratch_len(n: usize, c: usize) -> usize {
        n.div_ceil(COLUMN_ROWS) * c
    }

    /// Bias gradient `db[j] += Σ_i dy[i, j]`, deterministic: partial sums of [`COLUMN_ROWS`]
    /// rows in row order, then added to `db` in block order. Shapes: `db` `(C)` f32, `dy`
    /// `(N, C)` T, `scratch` ≥ [`Self::bias_grad_scratch_len`]. Grids: one thread per (column,
    /// block); one per column.
    pub fn bias_grad<T: Compute>(
        &self,
        db: &mut impl DevicePtrMut<f32>,
        scratch: &mut impl DevicePtrMut<f32>,
        dy: &impl DevicePtr<T>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const K: &str = "bias_grad";
        len(K, "db", db.len(), c)?;
        len(K, "dy", dy.len(), prod(K, &[n, c])?)?;
        let need = Self::bias_grad_scratch_len(n, c);
        if scratch.len() < need {
            return Err(CudaKernelError::Length {
                kernel: K,
                buffer: "scratch",
                got: scratch.len(),
                want: need,
            });
        }
        int(K, "elements", dy.len().max(need))?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(COLUMN_ROWS);
        let st = &*self.stream;
        let (dp, _g1) = db.device_ptr_mut(st);
        let (sp, _g2) = scratch.device_ptr_mut(st);
        let (yp, _g3) = dy.device_ptr(st);
        self.launch(
            self.ft::<T>("column_partials_{}")?,
            grid_for(blocks * c),
            &[Arg::P(sp), Arg::P(yp), Arg::I(n as i32), Arg::I(c as i32)],
        )?;
        self.launch(
            self.fp("column_reduce")?,
            grid_for(c),
            &[
                Arg::P(dp),
                Arg::P(sp),
                Arg::I(blocks as i32),
                Arg::I(c as i32),
                Arg::I(c as i32),
            ],
        )
    }

    // ------------------------------------------------------------------------- class tokens

    /// The class tokens of the residual stream: `cls[b] = x[b, 0]`. Shapes: `cls` `(B, D)`,
    /// `x` `(B, Tk, D)` f32. Grid: one thread per element of `cls`.
    pub fn cls_gather(
        &self,
        cls: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<f32>,
        b: usize,
        tokens: usize,
        d: usize,
    ) -> Result<()> {
        const K: &str = "cls_gather";
        len(K, "cls", cls.len(), prod(K, &[b, d])?)?;
        len(K, "x", x.len(), prod(K, &[b, tokens, d])?)?;
        int(K, "elements", x.len())?;
        if cls.is_empty() {
            return Ok(());
        }
        let n = cls.len();
        let st = &*self.stream;
        let (cp, _g1) = cls.device_ptr_mut(st);
        let (xp, _g2) = x.device_ptr(st);
        self.launch(
            self.fp("cls_gather")?,
            grid_for(n),
            &[
                Arg::P(cp),
                Arg::P(xp),
                Arg::I(b as i32),
                Arg::I(tokens as i32),
                Arg::I(d as i32),
            ],
        )
    }

    /// The gradient into the residual stream from the class tokens: `dx[b, 0] = dcls[b]`,
    /// `dx[b, t] = 0` for `t > 0` (overwritten). Shapes: `dx` `(B, Tk, D)`, `dcls` `(B, D)`
    /// f32. Grid: one thread per element of `dx`.
    pub fn cls_scatter_grad(
        &self,
        dx: &mut impl DevicePtrMut<f32>,
        dcls: &impl DevicePtr<f32>,
        b: usize,
        tokens: usize,
        d: usize,
    ) -> Result<()> {
        const K: &str = "cls_scatter_grad";
        len(K, "dcls", dcls.len(), prod(K, &[b, d])?)?;
        len(K, "dx", dx.len(), prod(K, &[b, tokens, d])?)?;
        int(K, "elements", dx.len())?;
        if dx.is_empty() {
            return Ok(());
        }
        let n = dx.len();
        let st = &*self.stream;
        let (xp, _g1) = dx.device_ptr_mut(st);
        let (cp, _g2) = dcls.device_ptr(st);
        self.launch(
            self.fp("cls_scatter_grad")?,
            grid_for(n),
            &[
                Arg::P(xp),
                Arg::P(cp),
                Arg::I(b as i32),
                Arg::I(tokens as i32),
                Arg::I(d as i32),
            ],
        )
    }

    // -------------------------------------------------------------------------- casts

    /// `out = cast_T(x)` (round to nearest even). Grid: one thread per element.
    pub fn cast_from_f32<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        x: &impl DevicePtr<f32>,
    ) -> Result<()> {
        const K: &str = "cast_from_f32";
        len(K, "x", x.len(), out.len())?;
        let n = int(K, "elements", out.len())?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (op, _g1) = out.device_ptr_mut(st);
        let (xp, _g2) = x.device_ptr(st);
        self.launch(
            self.ft::<T>("cast_f32_to_{}")?,
            grid_for(n as usize),
            &[Arg::P(op), Arg::P(xp), Arg::I(n)],
        )
    }

    /// `out = f32(x)` (exact). Grid: one thread per element.
    pub fn cast_to_f32<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<T>,
    ) -> Result<()> {
        const K: &str = "cast_to_f32";
        len(K, "x", x.len(), out.len())?;
        let n = int(K, "elements", out.len())?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (op, _g1) = out.device_ptr_mut(st);
        let (xp, _g2) = x.device_ptr(st);
        self.launch(
            self.ft::<T>("cast_{}_to_f32")?,
            grid_for(n as usize),
            &[Arg::P(op), Arg::P(xp), Arg::I(n)],
        )
    }

    // ------------------------------------------------------------------------------- loss

    /// Output length (f64 elements) of [`Self::rdrop_loss`] for `m` samples:
    /// [`LOSS_HEADER`] + 3 per sample.
    pub fn rdrop_loss_out_len(m: usize) -> usize {
        LOSS_HEADER + 3 * m
    }

    /// The R-Drop loss and its gradient (crate::loss::rdrop_loss, in f64): `logits` `(2m, C)`
    /// f32, pass-0 rows then pass-1 rows; `labels` `(m)` u32; `dlogits` `(2m, C)` f32 =
    /// `weight · ∂loss/∂logits` (overwritten). `out` (f64, [`Self::rdrop_loss_out_len`]):
    /// `out[0..4] = [loss, ce, kl, bad_labels]` (the terms as crate::loss::LossValue), then the
    /// per-sample `(ce_i, D_i, bad)` partials. A label `≥ C` is counted in `bad_labels` (the
    /// caller must treat the step as failed: its row's gradient is NaN), never read out of
    /// bounds. Grids: one warp per sample (32 lanes, f64 partials combined in a fixed
    /// butterfly); one warp for the sums over samples (in sample order).
    #[allow(clippy::too_many_arguments)]
    pub fn rdrop_loss(
        &self,
        dlogits: &mut impl DevicePtrMut<f32>,
        out: &mut impl DevicePtrMut<f64>,
        logits: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<u32>,
        m: usize,
        classes: usize,
        cfg: &LossConfig,
        weight: f32,
    ) -> Result<()> {
        const K: &str = "rdrop_loss";
        if classes == 0 {
            return Err(CudaKernelError::Shape {
                kernel: K,
                message: "no classes".into(),
            });
        }
        if !(0.0..1.0).contains(&cfg.label_smoothing) {
            return Err(CudaKernelError::Shape {
                kernel: K,
                message: format!(
                    "label smoothing must be in [0, 1), got {}",
                    cfg.label_smoothing
                ),
            });
        }
        let n = prod(K, &[2, m, classes])?;
        len(K, "logits", logits.len(), n)?;
        len(K, "dlogits", dlogits.len(), n)?;
        len(K, "labels", labels.len(), m)?;
        len(K, "out", out.len(), Self::rdrop_loss_out_len(m))?;
        int(K, "elements", n)?;
        let mm = (m.max(1)) as f64;
        let (ce_w, kl_w) = match cfg.mode {
            LossMode::Mean => (0.5 / mm, 0.5 / mm),
            LossMode::Reference => (1.0 / mm, 1.0),
        };
        let st = &*self.stream;
        let (gp, _g1) = dlogits.device_ptr_mut(st);
        let (op, _g2) = out.device_ptr_mut(st);
        let (lp, _g3) = logits.device_ptr(st);
        let (yp, _g4) = labels.device_ptr(st);
        if m > 0 {
            self.launch(
                self.fp("rdrop_loss_rows")?,
                LaunchConfig {
                    grid_dim: (m.div_ceil(8) as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    Arg::P(gp),
                    Arg::P(op),
                    Arg::P(lp),
                    Arg::P(yp),
                    Arg::I(m as i32),
                    Arg::I(classes as i32),
                    Arg::D(cfg.label_smoothing),
                    Arg::D(ce_w),
                    Arg::D(cfg.alpha * kl_w),
                    Arg::D(weight as f64),
                ],
            )?;
        }
        self.launch(
            self.fp("rdrop_loss_finish")?,
            LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::P(op),
                Arg::I(m as i32),
                Arg::D(ce_w),
                Arg::D(kl_w),
                Arg::D(cfg.alpha),
            ],
        )
    }

    // ---------------------------------------------------------------------------- update

    /// `out[0] (+)= Σ x²` in f64 (`+=` when `accumulate`, so several buffers add up), in a
    /// fixed order: [`SUM_SQUARES_BLOCKS`] blocks of 256 threads stride over `x` (f32 → f64
    /// per element, f64 per thread, a fixed tree per block) into `scratch`, then one warp sums
    /// the block partials in a fixed order. Shapes: `out` `(1)` f64, `scratch`
    /// `(SUM_SQUARES_BLOCKS)` f64, `x` `(len)` f32.
    pub fn sum_squares(
        &self,
        out: &mut impl DevicePtrMut<f64>,
        scratch: &mut impl DevicePtrMut<f64>,
        x: &impl DevicePtr<f32>,
        accumulate: bool,
    ) -> Result<()> {
        const K: &str = "sum_squares";
        len(K, "out", out.len(), 1)?;
        if scratch.len() < SUM_SQUARES_BLOCKS {
            return Err(CudaKernelError::Length {
                kernel: K,
                buffer: "scratch",
                got: scratch.len(),
                want: SUM_SQUARES_BLOCKS,
            });
        }
        let n = int(K, "elements", x.len())?;
        let st = &*self.stream;
        let (op, _g1) = out.device_ptr_mut(st);
        let (sp, _g2) = scratch.device_ptr_mut(st);
        let (xp, _g3) = x.device_ptr(st);
        self.launch(
            self.fp("sum_squares_partials")?,
            LaunchConfig {
                grid_dim: (SUM_SQUARES_BLOCKS as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &[Arg::P(sp), Arg::P(xp), Arg::I(n)],
        )?;
        self.launch(
            self.fp("sum_squares_finish")?,
            LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::P(op),
                Arg::P(sp),
                Arg::I(SUM_SQUARES_BLOCKS as i32),
                Arg::I(accumulate as i32),
            ],
        )
    }

    /// The clipping coefficient on the device (crate::optim::clip_coef of `√sumsq[0]`):
    /// `coef[0] = min(1, max_norm / (‖g‖ + 1e-6))` in f32, `1` when `max_norm` is infinite;
    /// also `norm[0] = ‖g‖` (f64) for the log. Grid: one thread.
    pub fn clip_coef(
        &self,
        coef: &mut impl DevicePtrMut<f32>,
        norm: &mut impl DevicePtrMut<f64>,
        sumsq: &impl DevicePtr<f64>,
        max_norm: f64,
    ) -> Result<()> {
        const K: &str = "clip_coef";
        len(K, "coef", coef.len(), 1)?;
        len(K, "norm", norm.len(), 1)?;
        len(K, "sumsq", sumsq.len(), 1)?;
        if max_norm.is_nan() || max_norm < 0.0 {
            return Err(CudaKernelError::Shape {
                kernel: K,
                message: format!("max_norm {max_norm} is not a norm"),
            });
        }
        let mx = if max_norm.is_infinite() {
            -1.0
        } else {
            max_norm as f32
        };
        let st = &*self.stream;
        let (cp, _g1) = coef.device_ptr_mut(st);
        let (np, _g2) = norm.device_ptr_mut(st);
        let (sp, _g3) = sumsq.device_ptr(st);
        self.launch(
            self.fp("clip_coef")?,
            LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1, 1, 1),
                shared_mem_bytes: 0,
            },
            &[Arg::P(cp), Arg::P(np), Arg::P(sp), Arg::F(mx)],
        )
    }

    /// One SGD(-momentum, Nesterov, L2 wd) update (crate::optim::sgd_step, bit for bit):
    /// gradient scale `coef[0]` read on the device (so no host sync), then `params_t =
    /// cast_T(params)` when given (the compute copy for the next forward). One launch per
    /// weight-decay segment: pass sub-views. Shapes: `params`, `grads`, `mom` (empty allowed
    /// when μ = 0), `params_t` `(len)`; `coef` `(1)` f32. Grid: one thread per element.
    #[allow(clippy::too_many_arguments)]
    pub fn sgd_update<T: Compute>(
        &self,
        params: &mut impl DevicePtrMut<f32>,
        params_t: Option<&mut CudaViewMutT<'_, T>>,
        grads: &impl DevicePtr<f32>,
        mom: &mut impl DevicePtrMut<f32>,
        coef: &impl DevicePtr<f32>,
        first_step: bool,
        h: &SgdHyper,
    ) -> Result<()> {
        const K: &str = "sgd_update";
        let n = params.len();
        len(K, "grads", grads.len(), n)?;
        len(K, "coef", coef.len(), 1)?;
        if h.momentum != 0.0 {
            len(K, "mom", mom.len(), n)?;
        }
        int(K, "elements", n)?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (tp, _gt) = match params_t {
            Some(t) => {
                len(K, "params_t", t.len(), n)?;
                let (p, g) = t.device_ptr_mut(st);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (pp, _g1) = params.device_ptr_mut(st);
        let (gp, _g2) = grads.device_ptr(st);
        let (mp, _g3) = mom.device_ptr_mut(st);
        let (cp, _g4) = coef.device_ptr(st);
        self.launch(
            self.ft::<T>("sgd_update_{}")?,
            grid_for(n),
            &[
                Arg::P(pp),
                Arg::P(tp),
                Arg::P(gp),
                Arg::P(mp),
                Arg::P(cp),
                Arg::F(h.lr),
                Arg::F(h.momentum),
                Arg::F(h.weight_decay),
                Arg::I(h.nesterov as i32),
                Arg::I(first_step as i32),
                Arg::I(n as i32),
            ],
        )
    }

    /// One AdamW update (crate::optim::adamw_step, bit for bit: the same f32 coefficients are
    /// derived on the host from `step`, the parameter's step count after the increment, ≥ 1):
    /// gradient scale `coef[0]` read on the device, then `params_t = cast_T(params)` when given.
    /// One launch per weight-decay segment. Shapes: `params`, `grads`, `exp_avg`, `exp_avg_sq`,
    /// `params_t` `(len)`; `coef` `(1)`. Grid: one thread per element.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_update<T: Compute>(
        &self,
        params: &mut impl DevicePtrMut<f32>,
        params_t: Option<&mut CudaViewMutT<'_, T>>,
        grads: &impl DevicePtr<f32>,
        exp_avg: &mut impl DevicePtrMut<f32>,
        exp_avg_sq: &mut impl DevicePtrMut<f32>,
        coef: &impl DevicePtr<f32>,
        step: u64,
        h: &AdamWHyper,
    ) -> Result<()> {
        const K: &str = "adamw_update";
        let n = params.len();
        len(K, "grads", grads.len(), n)?;
        len(K, "exp_avg", exp_avg.len(), n)?;
        len(K, "exp_avg_sq", exp_avg_sq.len(), n)?;
        len(K, "coef", coef.len(), 1)?;
        if step == 0 {
            return Err(CudaKernelError::Shape {
                kernel: K,
                message: "step counts from 1".into(),
            });
        }
        int(K, "elements", n)?;
        if n == 0 {
            return Ok(());
        }
        let k = AdamCoef::new(step, h);
        let st = &*self.stream;
        let (tp, _gt) = match params_t {
            Some(t) => {
                len(K, "params_t", t.len(), n)?;
                let (p, g) = t.device_ptr_mut(st);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (pp, _g1) = params.device_ptr_mut(st);
        let (gp, _g2) = grads.device_ptr(st);
        let (mp, _g3) = exp_avg.device_ptr_mut(st);
        let (vp, _g4) = exp_avg_sq.device_ptr_mut(st);
        let (cp, _g5) = coef.device_ptr(st);
        self.launch(
            self.ft::<T>("adamw_update_{}")?,
            grid_for(n),
            &[
                Arg::P(pp),
                Arg::P(tp),
                Arg::P(gp),
                Arg::P(mp),
                Arg::P(vp),
                Arg::P(cp),
                Arg::F(k.decay),
                Arg::F(k.one_m_b1),
                Arg::F(k.b2),
                Arg::F(k.one_m_b2),
                Arg::F(k.inv_bc2_sqrt),
                Arg::F(k.eps),
                Arg::F(k.step_size),
                Arg::I((h.weight_decay != 0.0) as i32),
                Arg::I(n as i32),
            ],
        )
    }

    /// `flag[0] = 1` if any element of `x` is NaN or ±∞ (left as it is otherwise: zero it
    /// first; the f16 loss scaler's overflow check). Only the constant 1 is ever stored, so
    /// racing stores are benign. Grid: one thread per element.
    pub fn nonfinite_check(
        &self,
        flag: &mut impl DevicePtrMut<u32>,
        x: &impl DevicePtr<f32>,
    ) -> Result<()> {
        const K: &str = "nonfinite_check";
        len(K, "flag", flag.len(), 1)?;
        let n = int(K, "elements", x.len())?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (fp, _g1) = flag.device_ptr_mut(st);
        let (xp, _g2) = x.device_ptr(st);
        self.launch(
            self.fp("nonfinite_check")?,
            grid_for(n as usize),
            &[Arg::P(fp), Arg::P(xp), Arg::I(n)],
        )
    }

    /// `x *= s` (e.g. un-scaling f16 gradients). Grid: one thread per element.
    pub fn scale_grads(&self, x: &mut impl DevicePtrMut<f32>, s: f32) -> Result<()> {
        const K: &str = "scale_grads";
        let n = int(K, "elements", x.len())?;
        if n == 0 {
            return Ok(());
        }
        let st = &*self.stream;
        let (xp, _g1) = x.device_ptr_mut(st);
        self.launch(
            self.fp("scale_inplace")?,
            grid_for(n as usize),
            &[Arg::P(xp), Arg::F(s), Arg::I(n)],
        )
    }
}

/// The optional compute copy of the parameters written by the update kernels.
pub type CudaViewMutT<'a, T> = cudarc::driver::CudaViewMut<'a, T>;

#[cfg(test)]
mod tests {
    use super::MODULES;

    /// Every kernel the launchers look up is an entry of its embedded PTX (no GPU needed), so
    /// a renamed or missing kernel fails here rather than in `CudaKernels::new` on a GPU.
    #[test]
    fn every_kernel_name_is_in_its_ptx() {
        let mut count = 0;
        for (module, ptx, fatbin, names) in MODULES {
            assert!(fatbin.len() > 1000, "{module}.fatbin is empty");
            for pattern in names {
                for t in super::TYPES {
                    let name = pattern.replace("{}", t);
                    assert!(
                        ptx.contains(&format!(".entry {name}(")),
                        "{name} is not in {module}.ptx"
                    );
                    count += 1;
                }
            }
        }
        assert!(count > 100, "{count} names");
    }
}
