//! cuBLASLt matmuls over row-major views of flat device buffers (the engine's GEMMs).
//!
//! Every GEMM the engine runs is, in row-major terms, `C (m, n) = α · op(A) (m, k) · op(B)
//! (k, n) [+ bias (n), broadcast over rows] + β · C`, optionally batched ([`RowGemm`]); cuBLASLt
//! runs it column-major as `Cᵀ = op(B)ᵀ·op(A)ᵀ` ([`ColMajor`]: the operands swap, the
//! transposition flags stay, and the bias, one per row-major column, is cuBLASLt's per-row
//! `BIAS` epilogue). Inputs are `T` (f32, bf16 or f16); the output is `T` or f32 (the
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
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

use super::{Compute, CudaKernelError, Result};
pub use crate::gemm_shape::{alignment, ColMajor, Dt, RowGemm, WORKSPACE_BYTES};

/// A [`CudaKernelError::Gemm`]: `what` failed with `e`.
fn lt_err(what: impl Into<String>, e: impl std::fmt::Display) -> CudaKernelError {
    let (what, message) = (what.into(), e.to_string());
    CudaKernelError::Gemm { what, message }
}

fn cuda_dt(dt: Dt) -> sys::cudaDataType {
    match dt {
        Dt::F32 => sys::cudaDataType::CUDA_R_32F,
        Dt::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        Dt::F16 => sys::cudaDataType::CUDA_R_16F,
    }
}

/// What a cached plan is for: the shape, the operands' and output's types, the epilogue and
/// the pointers' alignments (the heuristic's answer depends on each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    g: RowGemm,
    ab: Dt,
    cd: Dt,
    bias: bool,
    align: [u32; 3],
}

/// A cuBLASLt object destroyed on drop (errors at teardown are ignored).
#[derive(Debug)]
struct Owned<H: Copy> {
    h: H,
    destroy: unsafe fn(H) -> Result<(), lt::CublasError>,
}

impl<H: Copy> Drop for Owned<H> {
    fn drop(&mut self) {
        // SAFETY: `h` was made by the create call matching `destroy`, and is destroyed once.
        let _ = unsafe { (self.destroy)(self.h) };
    }
}

type Layout = Owned<sys::cublasLtMatrixLayout_t>;

/// One cached cuBLASLt plan: its descriptors and chosen algorithm.
#[derive(Debug)]
struct LtPlan {
    desc: Owned<sys::cublasLtMatmulDesc_t>,
    a: Layout,
    b: Layout,
    c: Layout,
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
) -> Result<Layout> {
    let h = lt::create_matrix_layout(cuda_dt(dt), rows as u64, cols as u64, ld as i64)
        .map_err(|e| lt_err("cublasLtMatrixLayoutCreate", e))?;
    let layout = Owned {
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
    Ok(layout)
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
        let plans = HashMap::new();
        Ok(Self {
            handle,
            workspace,
            stream,
            plans,
        })
    }

    fn make_plan(&self, key: &Key) -> Result<LtPlan> {
        use sys::cublasLtEpilogue_t as E;
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let (g, what) = (&key.g, key.g.describe(key.ab, key.cd));
        let err = |stage: &'static str| {
            let what = &what;
            move |e| lt_err(format!("{what}: {stage}"), e)
        };
        let cm = ColMajor::of(g);
        let a = layout(key.ab, cm.first, g.batch, g.stride_b)?;
        let b = layout(key.ab, cm.second, g.batch, g.stride_a)?;
        let c = layout(key.cd, cm.out, g.batch, g.stride_c)?;
        let (compute, scale) = (
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        );
        let h = lt::create_matmul_desc(compute, scale).map_err(err("descriptor"))?;
        let desc = Owned {
            h,
            destroy: lt::destroy_matmul_desc,
        };
        let (ta, tb) = (i32::from(cm.trans_first), i32::from(cm.trans_second));
        let epi = if key.bias {
            E::CUBLASLT_EPILOGUE_BIAS
        } else {
            E::CUBLASLT_EPILOGUE_DEFAULT
        };
        for (a, (p, n)) in [
            (D::CUBLASLT_MATMUL_DESC_TRANSA, attr(&ta)),
            (D::CUBLASLT_MATMUL_DESC_TRANSB, attr(&tb)),
            (D::CUBLASLT_MATMUL_DESC_EPILOGUE, attr(&epi)),
        ] {
            // SAFETY: `desc` is live; TRANSA/TRANSB take a cublasOperation_t (i32: 0 = N,
            // 1 = T), EPILOGUE a cublasLtEpilogue_t, by pointer and size.
            unsafe { lt::set_matmul_desc_attribute(desc.h, a, p, n) }
                .map_err(err("descriptor attribute"))?;
        }
        let h = lt::create_matmul_pref().map_err(err("preference"))?;
        let pref = Owned {
            h,
            destroy: lt::destroy_matmul_pref,
        };
        let ws = WORKSPACE_BYTES as u64;
        // cuBLASLt's `first` operand (its A) is our B, `second` our A.
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
                .map_err(err("preference attribute"))?;
        }
        // SAFETY: every handle passed is live (owned above); C and D share one layout.
        let heur = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.h, a.h, b.h, c.h, c.h, pref.h)
        }
        .map_err(err("no algorithm"))?;
        Ok(LtPlan {
            desc,
            a,
            b,
            c,
            algo: heur.algo,
        })
    }

    /// `C = α·op(A)·op(B) [+ bias] + β·C` (row-major, see the module doc). `bias` has one
    /// element per column of `C`, in `C`'s type. Lengths are checked before the launch.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<T: Compute, C: Compute>(
        &mut self,
        g: &RowGemm,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        c: &mut impl DevicePtrMut<C>,
        bias: Option<&CudaView<'_, C>>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        // Built only on an error (this runs ~30 times a layer).
        let what = || g.describe(T::DT, C::DT);
        // cuBLASLt runs in the calling thread's current context: make it the stream's.
        let stream = self.stream.clone();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| lt_err(what(), e))?;
        g.check(a.len(), b.len(), c.len(), bias.map(|b| b.len()))
            .map_err(|e| lt_err(what(), e))?;
        let (pa, _ra) = a.device_ptr(&stream);
        let (pb, _rb) = b.device_ptr(&stream);
        let (pc, _rc) = c.device_ptr_mut(&stream);
        // The bias is read by the matmul enqueued below on the same stream: its record event
        // (dropped here) only matters to other streams, which never touch the parameters.
        let bias_ptr = bias.map(|b| b.device_ptr(&stream).0);
        let align = [alignment(pa), alignment(pb), alignment(pc)];
        let key = Key {
            g: *g,
            ab: T::DT,
            cd: C::DT,
            bias: bias.is_some(),
            align,
        };
        if !self.plans.contains_key(&key) {
            let plan = self.make_plan(&key)?;
            self.plans.insert(key, plan);
        }
        let plan = &self.plans[&key];
        let (pw, _rw) = self.workspace.device_ptr(&stream);
        let bias_attr = sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER;
        // SAFETY: every handle is live (cached plan, `self.handle`); A, B, C hold at least the
        // elements the layouts address (checked above), the bias at least n; alpha/beta are
        // f32 as the f32 scale type requires; the workspace is WORKSPACE_BYTES long; all run
        // on `stream`, whose ordering the `device_ptr` records above respect.
        unsafe {
            if let Some(bp) = bias_ptr {
                let (p, n) = attr(&bp);
                lt::set_matmul_desc_attribute(plan.desc.h, bias_attr, p, n)
                    .map_err(|e| lt_err(format!("{}: bias pointer", what()), e))?;
            }
            lt::matmul(
                self.handle,
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
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}
