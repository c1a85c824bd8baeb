//! cuBLASLt matmuls over row-major views of flat device buffers (the engine's GEMMs).
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

use super::{CudaKernelError, Result};
pub use crate::gemm_shape::{ColMajor, RowGemm, WORKSPACE_BYTES};

/// A [`CudaKernelError::Gemm`]: `what` failed with `e`.
fn lt_err(what: impl Into<String>, e: impl std::fmt::Display) -> CudaKernelError {
    CudaKernelError::Gemm {
        what: what.into(),
        message: e.to_string(),
    }
}

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

/// A cuBLASLt object destroyed on drop (errors at teardown are ignored).
struct Owned<H: Copy> {
    h: H,
    destroy: unsafe fn(H) -> Result<(), lt::CublasError>,
}

impl<H: Copy> Drop for Owned<H> {
    fn drop(&mut self) {
        // SAFETY: `h` was made by the create call matching `destroy`, and is destroyed once.
        unsafe {
            let _ = (self.destroy)(self.h);
        }
    }
}

impl<H: Copy> std::fmt::Debug for Owned<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cuBLASLt object")
    }
}

/// One cached cuBLASLt plan: its descriptors and chosen algorithm.
#[derive(Debug)]
struct LtPlan {
    desc: Owned<sys::cublasLtMatmulDesc_t>,
    a: Owned<sys::cublasLtMatrixLayout_t>,
    b: Owned<sys::cublasLtMatrixLayout_t>,
    c: Owned<sys::cublasLtMatrixLayout_t>,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// `&v` as the (pointer, size) pair cuBLASLt's attribute setters take.
fn attr<V>(v: &V) -> (*const c_void, usize) {
    (v as *const V as *const c_void, std::mem::size_of::<V>())
}

/// A column-major layout `rows × cols` of `dt` with leading dimension `ld`, batched.
fn layout(
    dt: Dt,
    (rows, cols, ld): (usize, usize, usize),
    batch: usize,
    stride: usize,
) -> Result<Owned<sys::cublasLtMatrixLayout_t>> {
    let h = lt::create_matrix_layout(dt.cuda(), rows as u64, cols as u64, ld as i64)
        .map_err(|e| lt_err("cublasLtMatrixLayoutCreate", e))?;
    let g = Owned {
        h,
        destroy: lt::destroy_matrix_layout,
    };
    if batch > 1 {
        use sys::cublasLtMatrixLayoutAttribute_t as A;
        let (count, stride) = (batch as i32, stride as i64);
        for (a, (p, n)) in [
            (A::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, attr(&count)),
            (
                A::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                attr(&stride),
            ),
        ] {
            // SAFETY: `h` is a live layout; BATCH_COUNT takes an i32, STRIDED_BATCH_OFFSET an
            // i64, as cuBLASLt documents.
            unsafe { lt::set_matrix_layout_attribute(h, a, p, n) }
                .map_err(|e| lt_err("layout batch", e))?;
        }
    }
    Ok(g)
}

/// The engine's cuBLASLt: handle, workspace and plan cache, on one stream.
#[derive(Debug)]
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: HashMap<Key, LtPlan>,
}

impl Gemm {
    /// A cuBLASLt handle and its workspace on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| lt_err("cublasLtCreate", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| lt_err("cuBLASLt workspace", e))?;
        Ok(Self {
            handle,
            workspace,
            stream,
            plans: HashMap::new(),
        })
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
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
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
        .map_err(|e| lt_err(format!("{what}: descriptor"), e))?;
        let desc = Owned {
            h: desc,
            destroy: lt::destroy_matmul_desc,
        };
        let (ta, tb) = (i32::from(cm.trans_first), i32::from(cm.trans_second));
        let epi = if key.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        for (a, (p, n)) in [
            (D::CUBLASLT_MATMUL_DESC_TRANSA, attr(&ta)),
            (D::CUBLASLT_MATMUL_DESC_TRANSB, attr(&tb)),
            (D::CUBLASLT_MATMUL_DESC_EPILOGUE, attr(&epi)),
        ] {
            // SAFETY: `desc` is live; TRANSA/TRANSB take a cublasOperation_t (i32: 0 = N,
            // 1 = T), EPILOGUE a cublasLtEpilogue_t, by pointer and size.
            unsafe { lt::set_matmul_desc_attribute(desc.h, a, p, n) }
                .map_err(|e| lt_err(format!("{what}: descriptor attribute"), e))?;
        }
        let pref =
            lt::create_matmul_pref().map_err(|e| lt_err(format!("{what}: preference"), e))?;
        let pref = Owned {
            h: pref,
            destroy: lt::destroy_matmul_pref,
        };
        let ws = WORKSPACE_BYTES as u64;
        // cuBLASLt's `first` operand is our B, `second` our A.
        let [al_a, al_b, al_c] = key.align;
        for (a, (p, n)) in [
            (P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, attr(&ws)),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, attr(&al_b)),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, attr(&al_a)),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, attr(&al_c)),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, attr(&al_c)),
        ] {
            // SAFETY: `pref` is live; MAX_WORKSPACE_BYTES is a u64, MIN_ALIGNMENT_* are u32.
            unsafe { lt::set_matmul_pref_attribute(pref.h, a, p, n) }
                .map_err(|e| lt_err(format!("{what}: preference attribute"), e))?;
        }
        // SAFETY: every handle passed is live (owned above); C and D share one layout.
        let heur = unsafe {
            lt::get_matmul_algo_heuristic(
                self.handle,
                desc.h,
                first.h,
                second.h,
                out.h,
                out.h,
                pref.h,
            )
        }
        .map_err(|e| lt_err(format!("{what}: no algorithm"), e))?;
        Ok(LtPlan {
            desc,
            a: first,
            b: second,
            c: out,
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
            .map_err(|e| lt_err(what(), e))?;
        if g.m == 0 || g.n == 0 || g.k == 0 || g.batch == 0 {
            return Err(lt_err(what(), "empty dimension"));
        }
        if !g.is_valid() {
            return Err(lt_err(
                what(),
                "a leading dimension is below its row length",
            ));
        }
        if a.len() < la || b.len() < lb || c.len() < lc {
            return Err(lt_err(
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
                return Err(lt_err(
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
            .ok_or_else(|| lt_err(what(), "plan missing from the cache"))?;
        // SAFETY: every handle is live (cached plan, `self.handle`); A, B, C hold at least the
        // elements the layouts address (checked above), the bias at least n; alpha/beta are
        // f32 as the f32 scale type requires; the workspace is WORKSPACE_BYTES long; all run
        // on `stream`, whose ordering the `device_ptr` records above respect.
        unsafe {
            if let Some(bp) = bias_ptr {
                let (p, n) = attr(&bp);
                lt::set_matmul_desc_attribute(
                    plan.desc.h,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    p,
                    n,
                )
                .map_err(|e| lt_err(format!("{}: bias pointer", what()), e))?;
            }
            lt::matmul(
                handle,
                plan.desc.h,
                attr(&alpha).0,
                attr(&beta).0,
                pb as *const c_void,
                plan.a.h,
                pa as *const c_void,
                plan.b.h,
                pc as *const c_void,
                plan.c.h,
                pc as *mut c_void,
                plan.c.h,
                &plan.algo,
                pw as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
            .map_err(|e| lt_err(what(), e))?;
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
