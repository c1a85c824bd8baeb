//! cuBLASLt matmuls over row-major views of the engine's flat device buffers.
//!
//! Every GEMM the engine runs is, in row-major terms,
//! ```text
//! C (m, n) = α · op(A) (m, k) · op(B) (k, n) [+ bias (n), broadcast over rows] + β · C
//! ```
//! optionally batched (`batch` matrices at fixed element strides: the attention's per-(image,
//! head) products). cuBLASLt is column-major; a row-major matrix read column-major is its
//! transpose, so `C = op(A)·op(B)` runs as the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: the operands
//! swap, the transposition flags stay, and the bias (one per row-major column) is cuBLASLt's
//! per-row `BIAS` epilogue. Inputs are `T` (f32, bf16 or f16); the output is `T` or f32 (the
//! weight gradients: bf16 inputs, f32 accumulate, f32 output added with β = 1). The compute
//! type is always `CUBLAS_COMPUTE_32F` (no TF32: the f32 engine must match the CPU to 1e-4).
//!
//! Not used, on purpose: the `GELU_AUX_BIAS` / `DGELU_BGRAD` epilogues compute the tanh
//! approximation of GELU (the model uses the exact erf form, `gelu_dropout_*` kernels), and
//! `BGRADB` overwrites the bias gradient where the engine accumulates micro-batches into it
//! (`bias_grad` kernel, deterministic column sums).
//!
//! Matmul descriptors, layouts and the heuristic's algorithm are created once per
//! ([`RowGemm`], operand dtypes, epilogue, pointer alignments) and cached; the 32 MiB
//! workspace (Hopper's recommendation) is allocated once.

// cuBLASLt's descriptor and matmul calls are FFI: `unsafe` is allowed in this module only,
// each block with its SAFETY argument; the lengths are checked on the host first.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

pub use super::gemm_shape::{ColMajor, RowGemm};
use crate::error::{Result, VitError};

/// Element type of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dt {
    /// f32.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl Dt {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            Dt::F32 => sys::cudaDataType::CUDA_R_32F,
            Dt::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            Dt::F16 => sys::cudaDataType::CUDA_R_16F,
        }
    }

    /// Bytes an element.
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::Bf16 | Dt::F16 => 2,
        }
    }
}

/// A type cuBLASLt multiplies.
pub trait GemmType: DeviceRepr {
    /// Its [`Dt`].
    const DT: Dt;
}

impl GemmType for f32 {
    const DT: Dt = Dt::F32;
}
impl GemmType for half::bf16 {
    const DT: Dt = Dt::Bf16;
}
impl GemmType for half::f16 {
    const DT: Dt = Dt::F16;
}

/// `cuBLASLt matmul m×n×k [Aᵀ] [Bᵀ] [×batch] ab→cd`, for errors.
fn describe(g: &RowGemm, ab: Dt, cd: Dt) -> String {
    format!(
        "cuBLASLt matmul {}×{}×{}{}{}{} {ab:?}→{cd:?}",
        g.m,
        g.n,
        g.k,
        if g.trans_a { " Aᵀ" } else { "" },
        if g.trans_b { " Bᵀ" } else { "" },
        if g.batch > 1 {
            format!(" ×{}", g.batch)
        } else {
            String::new()
        }
    )
}

/// The largest power of two (≤ 256) dividing a device address: cuBLASLt's heuristic assumes
/// 256-byte aligned operands unless told otherwise.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    g: RowGemm,
    ab: Dt,
    cd: Dt,
    bias: bool,
    align: [u32; 3],
}

/// One cached cuBLASLt plan: its descriptors (destroyed on drop) and chosen algorithm.
#[derive(Debug)]
struct LtPlan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: the handles were created by this plan and are destroyed once, here; errors
        // at teardown are ignored (nothing can be done with them).
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A column-major layout `rows × cols` of `dt` with leading dimension `ld`, batched.
fn layout(
    dt: Dt,
    (rows, cols, ld): (usize, usize, usize),
    batch: usize,
    stride: usize,
) -> Result<LayoutGuard> {
    let h = lt::create_matrix_layout(dt.cuda(), rows as u64, cols as u64, ld as i64)
        .map_err(|e| VitError::cuda("cublasLtMatrixLayoutCreate", e))?;
    let g = LayoutGuard(h);
    if batch > 1 {
        let count = batch as i32;
        let stride = stride as i64;
        // SAFETY: `h` is a live layout; the attribute values are an i32 and an i64 as
        // cuBLASLt documents for BATCH_COUNT and STRIDED_BATCH_OFFSET.
        unsafe {
            lt::set_matrix_layout_attribute(
                h,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count) as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
            .map_err(|e| VitError::cuda("layout batch count", e))?;
            lt::set_matrix_layout_attribute(
                h,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                (&stride) as *const i64 as *const c_void,
                std::mem::size_of::<i64>(),
            )
            .map_err(|e| VitError::cuda("layout batch stride", e))?;
        }
    }
    Ok(g)
}

/// Destroys a layout unless [`LayoutGuard::keep`] hands it to a plan.
struct LayoutGuard(sys::cublasLtMatrixLayout_t);

impl LayoutGuard {
    fn keep(self) -> sys::cublasLtMatrixLayout_t {
        let h = self.0;
        std::mem::forget(self);
        h
    }
}

impl Drop for LayoutGuard {
    fn drop(&mut self) {
        // SAFETY: created by `layout`, not handed to a plan (see `keep`), destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.0);
        }
    }
}

/// The engine's cuBLASLt: handle, workspace and plan cache, on one stream.
#[derive(Debug)]
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: HashMap<Key, LtPlan>,
}

/// Workspace bytes (NVIDIA's recommendation for Hopper; enough for every earlier GPU).
pub const WORKSPACE_BYTES: usize = super::plan::GEMM_WORKSPACE_BYTES;

impl Gemm {
    /// A cuBLASLt handle and its workspace on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| VitError::cuda("cublasLtCreate", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| VitError::cuda("cuBLASLt workspace", e))?;
        Ok(Self {
            handle,
            workspace,
            stream,
            plans: HashMap::new(),
        })
    }

    /// Number of cached plans (distinct GEMMs seen so far).
    pub fn cached(&self) -> usize {
        self.plans.len()
    }

    /// Creates and caches the plan of `key` if it is new.
    fn ensure_plan(&mut self, key: Key) -> Result<()> {
        if !self.plans.contains_key(&key) {
            let p = self.make_plan(&key)?;
            self.plans.insert(key, p);
        }
        Ok(())
    }

    fn make_plan(&self, key: &Key) -> Result<LtPlan> {
        let g = &key.g;
        let what = describe(g, key.ab, key.cd);
        let cm = ColMajor::of(g);
        let first = layout(key.ab, cm.first, g.batch, g.stride_b)?;
        let second = layout(key.ab, cm.second, g.batch, g.stride_a)?;
        let out = layout(key.cd, cm.out, g.batch, g.stride_c)?;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| VitError::cuda(format!("{what}: descriptor"), e))?;
        let desc_guard = DescGuard(desc);
        let ta = i32::from(cm.trans_first);
        let tb = i32::from(cm.trans_second);
        let epi = if key.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        // SAFETY: `desc` is live; TRANSA/TRANSB take a cublasOperation_t (i32: 0 = N, 1 = T)
        // and EPILOGUE a cublasLtEpilogue_t (u32-sized enum), passed by pointer and size.
        unsafe {
            for (attr, v) in [
                (
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    ta,
                ),
                (
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    tb,
                ),
            ] {
                lt::set_matmul_desc_attribute(
                    desc,
                    attr,
                    (&v) as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
                .map_err(|e| VitError::cuda(format!("{what}: transposition"), e))?;
            }
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&epi) as *const sys::cublasLtEpilogue_t as *const c_void,
                std::mem::size_of::<sys::cublasLtEpilogue_t>(),
            )
            .map_err(|e| VitError::cuda(format!("{what}: epilogue"), e))?;
        }
        let pref = lt::create_matmul_pref()
            .map_err(|e| VitError::cuda(format!("{what}: preference"), e))?;
        let pref_guard = PrefGuard(pref);
        let ws = WORKSPACE_BYTES as u64;
        // cuBLASLt's `first` operand is our B, `second` our A.
        let [al_a, al_b, al_c] = key.align;
        // SAFETY: `pref` is live; MAX_WORKSPACE_BYTES is a u64, MIN_ALIGNMENT_* are u32.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
            .map_err(|e| VitError::cuda(format!("{what}: workspace preference"), e))?;
            for (attr, v) in [
                (
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    al_b,
                ),
                (
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    al_a,
                ),
                (
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    al_c,
                ),
                (
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    al_c,
                ),
            ] {
                lt::set_matmul_pref_attribute(
                    pref,
                    attr,
                    (&v) as *const u32 as *const c_void,
                    std::mem::size_of::<u32>(),
                )
                .map_err(|e| VitError::cuda(format!("{what}: alignment preference"), e))?;
            }
        }
        // SAFETY: every handle passed is live (guards above); C and D share one layout.
        let heur = unsafe {
            lt::get_matmul_algo_heuristic(
                self.handle,
                desc,
                first.0,
                second.0,
                out.0,
                out.0,
                pref_guard.0,
            )
        }
        .map_err(|e| VitError::cuda(format!("{what}: no algorithm"), e))?;
        drop(pref_guard);
        Ok(LtPlan {
            desc: desc_guard.keep(),
            a: first.keep(),
            b: second.keep(),
            c: out.keep(),
            algo: heur.algo,
        })
    }

    /// `C = α·op(A)·op(B) [+ bias] + β·C` (row-major, see the module doc). `bias` has one
    /// element per column of `C`, in `C`'s type. Lengths are checked before the launch.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<T: GemmType, C: GemmType>(
        &mut self,
        g: &RowGemm,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        c: &mut impl DevicePtrMut<C>,
        bias: Option<&dyn DevicePtrDyn<C>>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let (la, lb, lc) = g.lens();
        // Built only on an error (this runs ~30 times a layer).
        let what = || describe(g, T::DT, C::DT);
        // cuBLASLt runs in the calling thread's current context: make it the stream's.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| VitError::cuda(what(), e))?;
        if g.m == 0 || g.n == 0 || g.k == 0 || g.batch == 0 {
            return Err(VitError::cuda(what(), "empty dimension"));
        }
        if !g.is_valid() {
            return Err(VitError::cuda(
                what(),
                "a leading dimension is below its row length",
            ));
        }
        if a.len() < la || b.len() < lb || c.len() < lc {
            return Err(VitError::cuda(
                what(),
                format!(
                    "operands of {}, {}, {} elements; the shape needs {la}, {lb}, {lc}",
                    a.len(),
                    b.len(),
                    c.len()
                ),
            ));
        }
        if let Some(bias) = bias {
            if bias.len_dyn() < g.n {
                return Err(VitError::cuda(
                    what(),
                    format!("bias of {} elements for {} columns", bias.len_dyn(), g.n),
                ));
            }
        }
        let stream = self.stream.clone();
        let (pa, _ra) = a.device_ptr(&stream);
        let (pb, _rb) = b.device_ptr(&stream);
        let (pc, _rc) = c.device_ptr_mut(&stream);
        // The bias is read by the matmul enqueued below on the same stream: its record event
        // (dropped here) only matters to other streams, which never touch the parameters.
        let bias_ptr = bias.map(|b| b.ptr_dyn(&stream));
        let key = Key {
            g: *g,
            ab: T::DT,
            cd: C::DT,
            bias: bias.is_some(),
            align: [alignment(pa), alignment(pb), alignment(pc)],
        };
        self.ensure_plan(key)?;
        let handle = self.handle;
        let (pw, _rw) = self.workspace.device_ptr(&stream);
        let plan = self
            .plans
            .get(&key)
            .ok_or_else(|| VitError::cuda(what(), "plan missing from the cache"))?;
        // SAFETY: every handle is live (cached plan, `self.handle`); A, B, C hold at least the
        // elements the layouts address (checked above), the bias at least n; alpha/beta are
        // f32 as the f32 scale type requires; the workspace is WORKSPACE_BYTES long; all run
        // on `stream`, whose ordering the `device_ptr` records above respect.
        unsafe {
            if let Some(bp) = bias_ptr {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&bp) as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
                .map_err(|e| VitError::cuda(format!("{}: bias pointer", what()), e))?;
            }
            lt::matmul(
                handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                pb as *const c_void,
                plan.a,
                pa as *const c_void,
                plan.b,
                pc as *const c_void,
                plan.c,
                pc as *mut c_void,
                plan.c,
                &plan.algo,
                pw as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
            .map_err(|e| VitError::cuda(what(), e))?;
        }
        Ok(())
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created in `new` and is destroyed once, after its plans.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// A read-only device buffer behind a trait object (the optional bias).
pub trait DevicePtrDyn<T> {
    /// Its length in elements.
    fn len_dyn(&self) -> usize;
    /// Its address, ordered after earlier writes on `stream`.
    fn ptr_dyn(&self, stream: &CudaStream) -> u64;
}

impl<T, P: DevicePtr<T>> DevicePtrDyn<T> for P {
    fn len_dyn(&self) -> usize {
        self.len()
    }
    fn ptr_dyn(&self, stream: &CudaStream) -> u64 {
        let (p, _record) = self.device_ptr(stream);
        p
    }
}

struct DescGuard(sys::cublasLtMatmulDesc_t);

impl DescGuard {
    fn keep(self) -> sys::cublasLtMatmulDesc_t {
        let h = self.0;
        std::mem::forget(self);
        h
    }
}

impl Drop for DescGuard {
    fn drop(&mut self) {
        // SAFETY: created in `make_plan`, not kept by a plan, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.0);
        }
    }
}

struct PrefGuard(sys::cublasLtMatmulPreference_t);

impl Drop for PrefGuard {
    fn drop(&mut self) {
        // SAFETY: created in `make_plan` and destroyed once, here.
        unsafe {
            let _ = lt::destroy_matmul_pref(self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_of_device_addresses() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1040), 64);
    }
}
