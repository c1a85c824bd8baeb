//! The emulated cuBLASLt (`libcublasLt.so.13`): handles, matmul descriptors, matrix layouts,
//! preferences, the heuristic and `cublasLtMatmul`, exported as `rdemu_cublasLt*` (the shell
//! library forwards each real name to its `rdemu_` twin).
//!
//! What is kept exactly, so that a wrong `ld`, stride, transposition or pointer in the caller
//! gives wrong numbers or an error here as it would on a GPU:
//! - column-major layouts: element `(i, j)` of batch `b` is at
//!   `base + (b·stride + i + j·ld)·elemsize`, each operand with its own `ld`, batch count and
//!   `STRIDED_BATCH_OFFSET`;
//! - `D = α·op(A)·op(B) + β·C (+ bias[i] on row i of D)`, accumulated in f32 (the `gemm` crate
//!   on f32 copies of 16-bit operands: the widening is exact), rounded once to D's type
//!   (round to nearest even); `β = 0` never reads C;
//! - the type table of NVIDIA's `cublasLtMatmul` documentation for `CUBLAS_COMPUTE_32F`
//!   (scale type `CUDA_R_32F`): A/B f32 → C/D f32; A/B bf16 → C/D bf16 or f32; A/B f16 → C/D
//!   f16 or f32; the `CUBLAS_COMPUTE_32F_FAST_{16F,16BF,TF32}` types only for all-f32 problems
//!   (computed here in full f32). C and D have one type (the table's `Ctype`); the bias has D's
//!   type (the header's `CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE`). Everything else is
//!   `CUBLAS_STATUS_NOT_SUPPORTED`, at the heuristic and at the matmul;
//! - the alignment contract: `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES` (default 256)
//!   promise how aligned the operands will be; the heuristic's algorithm is chosen for
//!   `min(preference, alignment of ld·size, alignment of stride·size)` per operand (the header's
//!   `CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_*`: "required for buffer pointer, leading dimension, and
//!   possibly other strides") and records it; `cublasLtMatmul` with a pointer, ld or stride less
//!   aligned than the algorithm's requirement, or a pointer not aligned to its element size
//!   (bias included), is `CUBLAS_STATUS_NOT_SUPPORTED`. A preference below the element size
//!   has no algorithm. The bias pointer only needs its element alignment here (the real
//!   requirement for the bias is not documented);
//! - in place only with `C == D` and the same layout (else `CUBLAS_STATUS_INVALID_VALUE`);
//! - the host pointer mode: α and β are read when `cublasLtMatmul` is called; the product runs
//!   later, in stream order, on the stream's worker, where every operand's whole addressed range
//!   (its last batch's last element) is checked by [`crate::memory::resolve`]: an operand
//!   outside its allocation is a sticky `CUDA_ERROR_ILLEGAL_ADDRESS` naming the operand, its
//!   layout and the GEMM.
//!
//! Not emulated (`CUBLAS_STATUS_NOT_SUPPORTED`): other epilogues than `DEFAULT` and `BIAS`, the
//! device pointer modes, FP8 scale pointers, `ORDER` other than `CUBLASLT_ORDER_COL`, planar
//! complex, pointer-array batches, negative batch strides, `TRANSC`. The algorithm needs no
//! workspace (`workspaceSize` 0), so `MAX_WORKSPACE_BYTES` never excludes it.
//!
//! Fault injections (`RDROP_EMU_MUTATE`, for the emulator's own mutation tests):
//! - `gemm-ld`: every matmul reads cuBLASLt's A with its `ld + 1` (a caller passing a wrong ld);
//! - `gemm-batch-stride`: batched matmuls (batch count > 1) read A's matrix `b` at
//!   `b·(stride − 1)` instead of `b·stride` (a caller passing a batch stride one element short).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::error::{report, EmuError};

// ------------------------------------------------------------------------------- constants

/// `cublasStatus_t`.
pub type cublasStatus_t = i32;
pub const CUBLAS_STATUS_SUCCESS: cublasStatus_t = 0;
pub const CUBLAS_STATUS_NOT_INITIALIZED: cublasStatus_t = 1;
pub const CUBLAS_STATUS_ALLOC_FAILED: cublasStatus_t = 3;
pub const CUBLAS_STATUS_INVALID_VALUE: cublasStatus_t = 7;
pub const CUBLAS_STATUS_ARCH_MISMATCH: cublasStatus_t = 8;
pub const CUBLAS_STATUS_MAPPING_ERROR: cublasStatus_t = 11;
pub const CUBLAS_STATUS_EXECUTION_FAILED: cublasStatus_t = 13;
pub const CUBLAS_STATUS_INTERNAL_ERROR: cublasStatus_t = 14;
pub const CUBLAS_STATUS_NOT_SUPPORTED: cublasStatus_t = 15;
pub const CUBLAS_STATUS_LICENSE_ERROR: cublasStatus_t = 16;

/// `cudaDataType` values used here.
pub const CUDA_R_32F: i32 = 0;
pub const CUDA_R_16F: i32 = 2;
pub const CUDA_R_16BF: i32 = 14;

/// `cublasComputeType_t` values accepted (all f32 accumulation).
pub const CUBLAS_COMPUTE_32F: i32 = 68;
pub const CUBLAS_COMPUTE_32F_PEDANTIC: i32 = 69;
pub const CUBLAS_COMPUTE_32F_FAST_16F: i32 = 74;
pub const CUBLAS_COMPUTE_32F_FAST_16BF: i32 = 75;
pub const CUBLAS_COMPUTE_32F_FAST_TF32: i32 = 77;

/// `cublasOperation_t`.
pub const CUBLAS_OP_N: i32 = 0;
pub const CUBLAS_OP_T: i32 = 1;
pub const CUBLAS_OP_C: i32 = 2;

/// `cublasLtEpilogue_t` values supported.
pub const CUBLASLT_EPILOGUE_DEFAULT: u32 = 1;
pub const CUBLASLT_EPILOGUE_BIAS: u32 = 4;

/// `cublasLtOrder_t`.
pub const CUBLASLT_ORDER_COL: i32 = 0;
pub const CUBLASLT_ORDER_ROW: i32 = 1;

/// `cublasLtMatrixLayoutAttribute_t`.
pub const CUBLASLT_MATRIX_LAYOUT_TYPE: u32 = 0;
pub const CUBLASLT_MATRIX_LAYOUT_ORDER: u32 = 1;
pub const CUBLASLT_MATRIX_LAYOUT_ROWS: u32 = 2;
pub const CUBLASLT_MATRIX_LAYOUT_COLS: u32 = 3;
pub const CUBLASLT_MATRIX_LAYOUT_LD: u32 = 4;
pub const CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: u32 = 5;
pub const CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: u32 = 6;
pub const CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET: u32 = 7;
pub const CUBLASLT_MATRIX_LAYOUT_BATCH_MODE: u32 = 8;

/// `cublasLtMatmulDescAttributes_t`.
pub const CUBLASLT_MATMUL_DESC_COMPUTE_TYPE: u32 = 0;
pub const CUBLASLT_MATMUL_DESC_SCALE_TYPE: u32 = 1;
pub const CUBLASLT_MATMUL_DESC_POINTER_MODE: u32 = 2;
pub const CUBLASLT_MATMUL_DESC_TRANSA: u32 = 3;
pub const CUBLASLT_MATMUL_DESC_TRANSB: u32 = 4;
pub const CUBLASLT_MATMUL_DESC_TRANSC: u32 = 5;
pub const CUBLASLT_MATMUL_DESC_FILL_MODE: u32 = 6;
pub const CUBLASLT_MATMUL_DESC_EPILOGUE: u32 = 7;
pub const CUBLASLT_MATMUL_DESC_BIAS_POINTER: u32 = 8;
pub const CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE: u32 = 10;
pub const CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: u32 = 26;

/// `cublasLtMatmulPreferenceAttributes_t`.
pub const CUBLASLT_MATMUL_PREF_SEARCH_MODE: u32 = 0;
pub const CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: u32 = 1;
pub const CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK: u32 = 3;
pub const CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: u32 = 5;
pub const CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: u32 = 6;
pub const CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: u32 = 7;
pub const CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: u32 = 8;
pub const CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT: u32 = 9;
pub const CUBLASLT_MATMUL_PREF_IMPL_MASK: u32 = 12;

/// `cublasLtGetVersion`: cuBLAS 13.0.2 (`CUBLAS_VERSION` of the headers rdrop builds with).
pub const VERSION: usize = 13 * 10000 + 2;

/// `cublasLtMatmulAlgo_t`: eight opaque words.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct cublasLtMatmulAlgo_t {
    pub data: [u64; 8],
}

/// `cublasLtMatmulHeuristicResult_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct cublasLtMatmulHeuristicResult_t {
    pub algo: cublasLtMatmulAlgo_t,
    pub workspaceSize: usize,
    pub state: cublasStatus_t,
    pub wavesCount: f32,
    pub reserved: [c_int; 4],
}

/// `data[0]` of the algorithms this emulation hands out ("rdemuLt1").
const ALGO_MAGIC: u64 = 0x3174_4c75_6d65_6472;

// --------------------------------------------------------------------------------- objects

/// Which descriptor an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjKind {
    Handle,
    Desc,
    Layout,
    Pref,
}

impl ObjKind {
    fn name(self) -> &'static str {
        match self {
            ObjKind::Handle => "cuBLASLt handle",
            ObjKind::Desc => "matmul descriptor",
            ObjKind::Layout => "matrix layout",
            ObjKind::Pref => "matmul preference",
        }
    }
}

/// One attribute: its name and its size in bytes (as the header types it).
type AttrSpec = (&'static str, usize);

fn layout_attr(attr: u32) -> Option<AttrSpec> {
    Some(match attr {
        0 => ("CUBLASLT_MATRIX_LAYOUT_TYPE", 4),
        1 => ("CUBLASLT_MATRIX_LAYOUT_ORDER", 4),
        2 => ("CUBLASLT_MATRIX_LAYOUT_ROWS", 8),
        3 => ("CUBLASLT_MATRIX_LAYOUT_COLS", 8),
        4 => ("CUBLASLT_MATRIX_LAYOUT_LD", 8),
        5 => ("CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT", 4),
        6 => ("CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET", 8),
        7 => ("CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET", 8),
        8 => ("CUBLASLT_MATRIX_LAYOUT_BATCH_MODE", 4),
        _ => return None,
    })
}

fn desc_attr(attr: u32) -> Option<AttrSpec> {
    Some(match attr {
        0 => ("CUBLASLT_MATMUL_DESC_COMPUTE_TYPE", 4),
        1 => ("CUBLASLT_MATMUL_DESC_SCALE_TYPE", 4),
        2 => ("CUBLASLT_MATMUL_DESC_POINTER_MODE", 4),
        3 => ("CUBLASLT_MATMUL_DESC_TRANSA", 4),
        4 => ("CUBLASLT_MATMUL_DESC_TRANSB", 4),
        5 => ("CUBLASLT_MATMUL_DESC_TRANSC", 4),
        6 => ("CUBLASLT_MATMUL_DESC_FILL_MODE", 4),
        7 => ("CUBLASLT_MATMUL_DESC_EPILOGUE", 4),
        8 => ("CUBLASLT_MATMUL_DESC_BIAS_POINTER", 8),
        10 => ("CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE", 8),
        11 => ("CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER", 8),
        12 => ("CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD", 8),
        13 => ("CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE", 8),
        14 => ("CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE", 8),
        15 => ("CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET", 4),
        17 => ("CUBLASLT_MATMUL_DESC_A_SCALE_POINTER", 8),
        18 => ("CUBLASLT_MATMUL_DESC_B_SCALE_POINTER", 8),
        19 => ("CUBLASLT_MATMUL_DESC_C_SCALE_POINTER", 8),
        20 => ("CUBLASLT_MATMUL_DESC_D_SCALE_POINTER", 8),
        21 => ("CUBLASLT_MATMUL_DESC_AMAX_D_POINTER", 8),
        22 => ("CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE", 4),
        23 => ("CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER", 8),
        24 => ("CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER", 8),
        25 => ("CUBLASLT_MATMUL_DESC_FAST_ACCUM", 1),
        26 => ("CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE", 4),
        31 => ("CUBLASLT_MATMUL_DESC_A_SCALE_MODE", 4),
        32 => ("CUBLASLT_MATMUL_DESC_B_SCALE_MODE", 4),
        33 => ("CUBLASLT_MATMUL_DESC_C_SCALE_MODE", 4),
        34 => ("CUBLASLT_MATMUL_DESC_D_SCALE_MODE", 4),
        35 => ("CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE", 4),
        36 => ("CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER", 8),
        37 => ("CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE", 4),
        _ => return None,
    })
}

fn pref_attr(attr: u32) -> Option<AttrSpec> {
    Some(match attr {
        0 => ("CUBLASLT_MATMUL_PREF_SEARCH_MODE", 4),
        1 => ("CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES", 8),
        3 => ("CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK", 4),
        5 => ("CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES", 4),
        6 => ("CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES", 4),
        7 => ("CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES", 4),
        8 => ("CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES", 4),
        9 => ("CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT", 4),
        12 => ("CUBLASLT_MATMUL_PREF_IMPL_MASK", 8),
        _ => return None,
    })
}

const MAX_ATTR: usize = 40;

/// A descriptor's attributes, each stored as the little-endian bytes the caller set, zero
/// extended to 64 bits (the typed accessors reinterpret them).
#[derive(Debug, Clone, Copy)]
struct Attrs {
    kind: ObjKind,
    vals: [u64; MAX_ATTR],
}

impl Attrs {
    fn new(kind: ObjKind) -> Self {
        Self {
            kind,
            vals: [0; MAX_ATTR],
        }
    }

    fn spec(&self, attr: u32) -> Option<AttrSpec> {
        match self.kind {
            ObjKind::Handle => None,
            ObjKind::Desc => desc_attr(attr),
            ObjKind::Layout => layout_attr(attr),
            ObjKind::Pref => pref_attr(attr),
        }
    }

    fn raw(&self, attr: u32) -> u64 {
        self.vals.get(attr as usize).copied().unwrap_or(0)
    }

    fn set(&mut self, attr: u32, v: u64) {
        if let Some(x) = self.vals.get_mut(attr as usize) {
            *x = v;
        }
    }

    fn i32(&self, attr: u32) -> i32 {
        self.raw(attr) as u32 as i32
    }

    fn u32(&self, attr: u32) -> u32 {
        self.raw(attr) as u32
    }

    fn i64(&self, attr: u32) -> i64 {
        self.raw(attr) as i64
    }

    fn u64(&self, attr: u32) -> u64 {
        self.raw(attr)
    }
}

struct Registry {
    objs: HashMap<usize, Attrs>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| {
        Mutex::new(Registry {
            objs: HashMap::new(),
        })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

/// Each object is a heap block as large as the largest opaque struct (its address is the handle,
/// unique while it lives); its attributes live in the registry, read and written under its lock.
type Block = [u64; 32];

fn create_obj(attrs: Attrs) -> *mut c_void {
    let p = Box::into_raw(Box::new([0u64; 32] as Block)) as *mut c_void;
    registry().objs.insert(p as usize, attrs);
    p
}

fn destroy_obj(call: &str, p: *mut c_void, kind: ObjKind) -> cublasStatus_t {
    if p.is_null() {
        // As cuBLASLt: destroying NULL is a no-op (the handle's destroy reports it).
        if kind == ObjKind::Handle {
            report(&format!("{call}: NULL handle"));
            return CUBLAS_STATUS_NOT_INITIALIZED;
        }
        return CUBLAS_STATUS_SUCCESS;
    }
    let mut r = registry();
    match r.objs.get(&(p as usize)) {
        Some(a) if a.kind == kind => {
            r.objs.remove(&(p as usize));
            drop(r);
            // SAFETY: `p` was made by `create_obj` from a `Box<Block>` and was still registered
            // (so not yet freed); it is removed from the registry before being freed once.
            drop(unsafe { Box::from_raw(p as *mut Block) });
            CUBLAS_STATUS_SUCCESS
        }
        Some(a) => {
            let k = a.kind;
            drop(r);
            report(&format!(
                "{call}: {p:p} is a {}, not a {}",
                k.name(),
                kind.name()
            ));
            CUBLAS_STATUS_INVALID_VALUE
        }
        None => {
            drop(r);
            report(&format!(
                "{call}: {p:p} is not a live {} (destroyed twice, or never created)",
                kind.name()
            ));
            if kind == ObjKind::Handle {
                CUBLAS_STATUS_NOT_INITIALIZED
            } else {
                CUBLAS_STATUS_INVALID_VALUE
            }
        }
    }
}

/// A copy of the attributes of the live object `p` of `kind`, or the status and the report.
fn get_obj(
    call: &str,
    what: &str,
    p: *const c_void,
    kind: ObjKind,
) -> Result<Attrs, cublasStatus_t> {
    let bad = if kind == ObjKind::Handle {
        CUBLAS_STATUS_NOT_INITIALIZED
    } else {
        CUBLAS_STATUS_INVALID_VALUE
    };
    if p.is_null() {
        report(&format!("{call}: {what} is NULL"));
        return Err(bad);
    }
    let r = registry();
    match r.objs.get(&(p as usize)) {
        Some(a) if a.kind == kind => Ok(*a),
        Some(a) => {
            let k = a.kind;
            drop(r);
            report(&format!(
                "{call}: {what} {p:p} is a {}, not a {}",
                k.name(),
                kind.name()
            ));
            Err(bad)
        }
        None => {
            drop(r);
            report(&format!(
                "{call}: {what} {p:p} is not a live {} (destroyed, or never created)",
                kind.name()
            ));
            Err(bad)
        }
    }
}

unsafe fn set_attr(
    call: &str,
    p: *mut c_void,
    kind: ObjKind,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> cublasStatus_t {
    let mut r = registry();
    let Some(a) = r.objs.get_mut(&(p as usize)).filter(|a| a.kind == kind) else {
        drop(r);
        report(&format!("{call}: {p:p} is not a live {}", kind.name()));
        return CUBLAS_STATUS_INVALID_VALUE;
    };
    let Some((name, want)) = a.spec(attr) else {
        drop(r);
        report(&format!(
            "{call}: attribute {attr} is not a {} attribute",
            kind.name()
        ));
        return CUBLAS_STATUS_INVALID_VALUE;
    };
    if buf.is_null() || size != want {
        drop(r);
        report(&format!(
            "{call}: {name} takes {want} bytes; given {size} bytes at {buf:p}"
        ));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let mut bytes = [0u8; 8];
    // SAFETY: the caller passes `size` (= want ≤ 8) readable bytes at `buf`, non-null.
    unsafe { std::ptr::copy_nonoverlapping(buf as *const u8, bytes.as_mut_ptr(), want) };
    a.set(attr, u64::from_le_bytes(bytes));
    CUBLAS_STATUS_SUCCESS
}

unsafe fn get_attr(
    call: &str,
    p: *const c_void,
    kind: ObjKind,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    written: *mut usize,
) -> cublasStatus_t {
    let a = match get_obj(call, "descriptor", p, kind) {
        Ok(a) => a,
        Err(_) => return CUBLAS_STATUS_INVALID_VALUE,
    };
    let Some((name, want)) = a.spec(attr) else {
        report(&format!(
            "{call}: attribute {attr} is not a {} attribute",
            kind.name()
        ));
        return CUBLAS_STATUS_INVALID_VALUE;
    };
    if size == 0 {
        if written.is_null() {
            report(&format!("{call}: {name}: size 0 and sizeWritten NULL"));
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        // SAFETY: non-null out-pointer given by the caller.
        unsafe { *written = want };
        return CUBLAS_STATUS_SUCCESS;
    }
    if buf.is_null() || size != want {
        report(&format!(
            "{call}: {name} takes {want} bytes; given {size} bytes at {buf:p}"
        ));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let bytes = a.raw(attr).to_le_bytes();
    // SAFETY: the caller passes `size` (= want ≤ 8) writable bytes at `buf`, non-null.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, want);
        if !written.is_null() {
            *written = want;
        }
    }
    CUBLAS_STATUS_SUCCESS
}

// ------------------------------------------------------------------------ the problem model

/// Element type of an operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dt {
    /// `CUDA_R_32F`.
    F32,
    /// `CUDA_R_16F`.
    F16,
    /// `CUDA_R_16BF`.
    Bf16,
}

impl Dt {
    /// The `cudaDataType` value, if it is one of the three.
    pub fn from_cuda(v: i32) -> Option<Dt> {
        match v {
            CUDA_R_32F => Some(Dt::F32),
            CUDA_R_16F => Some(Dt::F16),
            CUDA_R_16BF => Some(Dt::Bf16),
            _ => None,
        }
    }

    /// Its `cudaDataType` value.
    pub fn cuda(self) -> i32 {
        match self {
            Dt::F32 => CUDA_R_32F,
            Dt::F16 => CUDA_R_16F,
            Dt::Bf16 => CUDA_R_16BF,
        }
    }

    /// Bytes an element.
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::F16 | Dt::Bf16 => 2,
        }
    }

    /// `f32`, `f16`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::F16 => "f16",
            Dt::Bf16 => "bf16",
        }
    }
}

fn cuda_type_name(v: i32) -> String {
    match Dt::from_cuda(v) {
        Some(d) => d.name().to_string(),
        None => format!("cudaDataType {v}"),
    }
}

/// One operand's column-major layout: element `(i, j)` of batch `b` at
/// `(b·stride + i + j·ld)` elements from its pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mat {
    /// Element type.
    pub dt: Dt,
    /// Rows (of the stored matrix, before any transposition).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Elements between consecutive columns.
    pub ld: usize,
    /// Number of matrices.
    pub batch: usize,
    /// Elements between consecutive matrices.
    pub stride: usize,
}

impl Mat {
    /// A single dense matrix.
    pub fn new(dt: Dt, rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            dt,
            rows,
            cols,
            ld,
            batch: 1,
            stride: 0,
        }
    }

    /// The same layout, `batch` matrices `stride` elements apart.
    pub fn batched(self, batch: usize, stride: usize) -> Self {
        Self {
            batch,
            stride,
            ..self
        }
    }

    /// Elements from the pointer to the last addressed one, inclusive (0 when empty); `None`
    /// on overflow.
    pub fn span(&self) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 || self.batch == 0 {
            return Some(0);
        }
        let last = (self.batch - 1)
            .checked_mul(self.stride)?
            .checked_add(self.rows - 1)?
            .checked_add((self.cols - 1).checked_mul(self.ld)?)?;
        last.checked_add(1)
    }

    /// Bytes from the pointer to the end of the last addressed element.
    pub fn span_bytes(&self) -> Option<usize> {
        self.span()?.checked_mul(self.dt.size())
    }

    /// `ld 96, 4 batches of stride 9216` (for reports).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} {}×{}, ld {}",
            self.dt.name(),
            self.rows,
            self.cols,
            self.ld
        );
        if self.batch > 1 {
            s.push_str(&format!(
                ", {} batches of stride {}",
                self.batch, self.stride
            ));
        }
        s
    }
}

/// The bias of the `BIAS` epilogue: one element per row of D, D's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bias {
    /// Element type (D's).
    pub dt: Dt,
    /// Elements between the biases of consecutive batches (0: one bias for all).
    pub stride: usize,
}

/// A validated matmul: `D = α·op(A)·op(B) + β·C (+ bias)`, op(A) `m×k`, op(B) `k×n`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Problem {
    /// Rows of D.
    pub m: usize,
    /// Columns of D.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// `op(A) = Aᵀ`.
    pub trans_a: bool,
    /// `op(B) = Bᵀ`.
    pub trans_b: bool,
    /// Layouts.
    pub a: Mat,
    pub b: Mat,
    pub c: Mat,
    pub d: Mat,
    /// Number of products.
    pub batch: usize,
    /// Scales.
    pub alpha: f32,
    pub beta: f32,
    /// The bias epilogue.
    pub bias: Option<Bias>,
}

impl Problem {
    /// `128×96×384 Aᵀ ×4 bf16→f32 +bias` (for reports).
    pub fn describe(&self) -> String {
        format!(
            "{}×{}×{}{}{}{} {}→{}{}",
            self.m,
            self.n,
            self.k,
            if self.trans_a { " Aᵀ" } else { "" },
            if self.trans_b { " Bᵀ" } else { "" },
            if self.batch > 1 {
                format!(" ×{}", self.batch)
            } else {
                String::new()
            },
            self.a.dt.name(),
            self.d.dt.name(),
            if self.bias.is_some() { " +bias" } else { "" }
        )
    }

    /// Elements of the bias vector addressed (0 without bias).
    pub fn bias_span(&self) -> Option<usize> {
        match self.bias {
            None => Some(0),
            Some(_) if self.m == 0 || self.batch == 0 => Some(0),
            Some(b) => (self.batch - 1).checked_mul(b.stride)?.checked_add(self.m),
        }
    }
}

/// The emulator's fault injections (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// `gemm-ld`: A is read with `ld + 1`.
    pub ld: bool,
    /// `gemm-batch-stride`: batched A is read with `stride − 1`.
    pub batch_stride: bool,
}

impl Faults {
    /// The faults `RDROP_EMU_MUTATE` turns on.
    pub fn from_config() -> Self {
        Self {
            ld: crate::config::mutate("gemm-ld"),
            batch_stride: crate::config::mutate("gemm-batch-stride"),
        }
    }

    /// `p` as a caller with these bugs would have described it.
    pub fn apply(self, mut p: Problem) -> Problem {
        if self.ld {
            p.a.ld = p.a.ld.saturating_add(1);
        }
        if self.batch_stride && p.batch > 1 && p.a.stride > 0 {
            p.a.stride -= 1;
        }
        p
    }
}

// ----------------------------------------------------------------------------- validation

type Reject = (cublasStatus_t, String);

fn not_supported(msg: String) -> Reject {
    (CUBLAS_STATUS_NOT_SUPPORTED, msg)
}

fn invalid(msg: String) -> Reject {
    (CUBLAS_STATUS_INVALID_VALUE, msg)
}

/// The matmul descriptor's meaning (what this emulation supports of it).
#[derive(Debug, Clone, Copy)]
struct DescInfo {
    compute: i32,
    trans_a: bool,
    trans_b: bool,
    bias: bool,
    bias_ptr: u64,
    bias_type: i32,
    bias_stride: i64,
}

fn check_desc(desc: &Attrs) -> Result<DescInfo, Reject> {
    let compute = desc.i32(CUBLASLT_MATMUL_DESC_COMPUTE_TYPE);
    if !matches!(
        compute,
        CUBLAS_COMPUTE_32F
            | CUBLAS_COMPUTE_32F_PEDANTIC
            | CUBLAS_COMPUTE_32F_FAST_16F
            | CUBLAS_COMPUTE_32F_FAST_16BF
            | CUBLAS_COMPUTE_32F_FAST_TF32
    ) {
        return Err(not_supported(format!(
            "compute type {compute} (only the CUBLAS_COMPUTE_32F family is emulated)"
        )));
    }
    let scale = desc.i32(CUBLASLT_MATMUL_DESC_SCALE_TYPE);
    if scale != CUDA_R_32F {
        return Err(not_supported(format!(
            "scale type {} with a 32F compute type (must be f32)",
            cuda_type_name(scale)
        )));
    }
    // Attributes that must keep their default for what is emulated.
    for (attr, default) in [
        (CUBLASLT_MATMUL_DESC_POINTER_MODE, 0u64),
        (CUBLASLT_MATMUL_DESC_TRANSC, 0),
        (CUBLASLT_MATMUL_DESC_FILL_MODE, 2),
        (17, 0),
        (18, 0),
        (19, 0),
        (20, 0),
        (21, 0),
        (23, 0),
        (24, 0),
        (31, 0),
        (32, 0),
        (33, 0),
        (34, 0),
        (35, 0),
        (36, 0),
        (37, 0),
    ] {
        let v = desc.raw(attr);
        if v != default {
            let name = desc_attr(attr).map_or("?", |s| s.0);
            return Err(not_supported(format!(
                "{name} = {v:#x} (only the default {default} is emulated)"
            )));
        }
    }
    let op = |attr: u32, which: &str| -> Result<bool, Reject> {
        match desc.i32(attr) {
            CUBLAS_OP_N => Ok(false),
            // CUBLAS_OP_C is CUBLAS_OP_T for real types.
            CUBLAS_OP_T | CUBLAS_OP_C => Ok(true),
            v => Err(invalid(format!("{which} = {v} is not a cublasOperation_t"))),
        }
    };
    let trans_a = op(CUBLASLT_MATMUL_DESC_TRANSA, "TRANSA")?;
    let trans_b = op(CUBLASLT_MATMUL_DESC_TRANSB, "TRANSB")?;
    let epi = desc.u32(CUBLASLT_MATMUL_DESC_EPILOGUE);
    let bias = match epi {
        CUBLASLT_EPILOGUE_DEFAULT => false,
        CUBLASLT_EPILOGUE_BIAS => true,
        v => {
            return Err(not_supported(format!(
                "epilogue {v} (only CUBLASLT_EPILOGUE_DEFAULT and CUBLASLT_EPILOGUE_BIAS are \
                 emulated)"
            )))
        }
    };
    let bias_stride = desc.i64(CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE);
    if bias && bias_stride < 0 {
        return Err(not_supported(format!(
            "negative BIAS_BATCH_STRIDE {bias_stride}"
        )));
    }
    Ok(DescInfo {
        compute,
        trans_a,
        trans_b,
        bias,
        bias_ptr: desc.u64(CUBLASLT_MATMUL_DESC_BIAS_POINTER),
        bias_type: desc.i32(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE),
        bias_stride,
    })
}

fn check_layout(l: &Attrs, which: &str) -> Result<Mat, Reject> {
    let ty = l.i32(CUBLASLT_MATRIX_LAYOUT_TYPE);
    let Some(dt) = Dt::from_cuda(ty) else {
        return Err(not_supported(format!(
            "operand {which} of type {} (f32, f16 and bf16 are emulated)",
            cuda_type_name(ty)
        )));
    };
    let order = l.i32(CUBLASLT_MATRIX_LAYOUT_ORDER);
    if order != CUBLASLT_ORDER_COL {
        return Err(not_supported(format!(
            "operand {which} has ORDER {order}{} (only CUBLASLT_ORDER_COL is emulated)",
            if order == CUBLASLT_ORDER_ROW {
                " (ROW)"
            } else {
                ""
            }
        )));
    }
    let plane = l.i64(CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET);
    let mode = l.u32(CUBLASLT_MATRIX_LAYOUT_BATCH_MODE);
    if plane != 0 || mode != 0 {
        return Err(not_supported(format!(
            "operand {which} has PLANE_OFFSET {plane} / BATCH_MODE {mode} (only regular strided \
             layouts are emulated)"
        )));
    }
    let rows = l.u64(CUBLASLT_MATRIX_LAYOUT_ROWS);
    let cols = l.u64(CUBLASLT_MATRIX_LAYOUT_COLS);
    let ld = l.i64(CUBLASLT_MATRIX_LAYOUT_LD);
    let batch = l.i32(CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT);
    let stride = l.i64(CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET);
    let limit = i64::MAX as u64 >> 8;
    if rows > limit || cols > limit {
        return Err(invalid(format!(
            "operand {which} of {rows}×{cols} elements"
        )));
    }
    if ld < 0 || (ld as u64) < rows {
        return Err(invalid(format!(
            "operand {which}: ld {ld} is below its {rows} rows (column-major: ld ≥ rows)"
        )));
    }
    if batch < 1 {
        return Err(invalid(format!("operand {which}: BATCH_COUNT {batch}")));
    }
    if stride < 0 {
        return Err(not_supported(format!(
            "operand {which}: negative STRIDED_BATCH_OFFSET {stride}"
        )));
    }
    let m = Mat {
        dt,
        rows: rows as usize,
        cols: cols as usize,
        ld: ld as usize,
        batch: batch as usize,
        stride: stride as usize,
    };
    if m.span_bytes().is_none() {
        return Err(invalid(format!(
            "operand {which}: the layout {} addresses more than 2^64 bytes",
            m.describe()
        )));
    }
    Ok(m)
}

/// Checks the descriptor and layouts against each other and the supported set; the problem with
/// α = 1, β = 0.
fn check_problem(
    desc: &Attrs,
    la: &Attrs,
    lb: &Attrs,
    lc: &Attrs,
    ld: &Attrs,
) -> Result<(Problem, DescInfo), Reject> {
    let info = check_desc(desc)?;
    let a = check_layout(la, "A")?;
    let b = check_layout(lb, "B")?;
    let c = check_layout(lc, "C")?;
    let d = check_layout(ld, "D")?;
    // NVIDIA's cublasLtMatmul type table, CUBLAS_COMPUTE_32F rows (scale type f32).
    let fast = matches!(
        info.compute,
        CUBLAS_COMPUTE_32F_FAST_16F | CUBLAS_COMPUTE_32F_FAST_16BF | CUBLAS_COMPUTE_32F_FAST_TF32
    );
    let types_ok = a.dt == b.dt
        && c.dt == d.dt
        && match (a.dt, d.dt) {
            (Dt::F32, Dt::F32) => true,
            (Dt::Bf16, Dt::Bf16 | Dt::F32) | (Dt::F16, Dt::F16 | Dt::F32) => !fast,
            _ => false,
        };
    if !types_ok {
        return Err(not_supported(format!(
            "types A {} B {} C {} D {} with compute type {} (cuBLASLt supports, for the 32F \
             compute types: f32×f32→f32; and with CUBLAS_COMPUTE_32F: bf16×bf16→bf16|f32, \
             f16×f16→f16|f32; C and D of one type)",
            a.dt.name(),
            b.dt.name(),
            c.dt.name(),
            d.dt.name(),
            info.compute
        )));
    }
    let (m, k) = if info.trans_a {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    let (k2, n) = if info.trans_b {
        (b.cols, b.rows)
    } else {
        (b.rows, b.cols)
    };
    if k != k2 || c.rows != m || c.cols != n || d.rows != m || d.cols != n {
        return Err(invalid(format!(
            "shapes do not chain: op(A) is {m}×{k} (A {}×{}{}), op(B) {k2}×{n} (B {}×{}{}), C \
             {}×{}, D {}×{}",
            a.rows,
            a.cols,
            if info.trans_a { ", transposed" } else { "" },
            b.rows,
            b.cols,
            if info.trans_b { ", transposed" } else { "" },
            c.rows,
            c.cols,
            d.rows,
            d.cols
        )));
    }
    if a.batch != d.batch || b.batch != d.batch || c.batch != d.batch {
        return Err(invalid(format!(
            "batch counts differ: A {}, B {}, C {}, D {}",
            a.batch, b.batch, c.batch, d.batch
        )));
    }
    let bias = if info.bias {
        let bt = if info.bias_type == -1 {
            d.dt.cuda()
        } else {
            info.bias_type
        };
        if bt != d.dt.cuda() {
            return Err(not_supported(format!(
                "bias of type {} with D of type {} (the bias has D's type)",
                cuda_type_name(bt),
                d.dt.name()
            )));
        }
        Some(Bias {
            dt: d.dt,
            stride: info.bias_stride as usize,
        })
    } else {
        None
    };
    let p = Problem {
        m,
        n,
        k,
        trans_a: info.trans_a,
        trans_b: info.trans_b,
        a,
        b,
        c,
        d,
        batch: d.batch,
        alpha: 1.0,
        beta: 0.0,
        bias,
    };
    if p.bias_span().is_none() {
        return Err(invalid(format!(
            "BIAS_BATCH_STRIDE {} overflows",
            info.bias_stride
        )));
    }
    Ok((p, info))
}

/// The largest power of two dividing `x`, at most 256 (0 counts as 256-aligned).
fn pow2_align(x: u64) -> u64 {
    if x == 0 {
        256
    } else {
        (1u64 << x.trailing_zeros().min(8)).min(256)
    }
}

/// The alignment an operand's layout allows (ld and, when batched, the batch stride, in bytes).
fn layout_align(m: &Mat) -> u64 {
    let es = m.dt.size() as u64;
    let mut a = pow2_align((m.ld as u64).wrapping_mul(es));
    if m.batch > 1 {
        a = a.min(pow2_align((m.stride as u64).wrapping_mul(es)));
    }
    a
}

fn types_key(p: &Problem, compute: i32) -> u64 {
    p.a.dt.cuda() as u32 as u64
        | (p.d.dt.cuda() as u32 as u64) << 16
        | (compute as u32 as u64) << 32
}

/// The algorithm for `p` whose operands are aligned to `align` bytes (A, B, C, D).
fn make_algo(p: &Problem, compute: i32, align: [u64; 4]) -> cublasLtMatmulAlgo_t {
    let mut data = [0u64; 8];
    data[0] = ALGO_MAGIC;
    data[1] = align[0] | align[1] << 16 | align[2] << 32 | align[3] << 48;
    data[2] = 0; // workspace bytes
    data[3] = types_key(p, compute);
    cublasLtMatmulAlgo_t { data }
}

fn algo_align(algo: &cublasLtMatmulAlgo_t) -> [u64; 4] {
    let w = algo.data[1];
    [w & 0xffff, (w >> 16) & 0xffff, (w >> 32) & 0xffff, w >> 48]
}

// --------------------------------------------------------------------------- the compute

/// An element type of the compute core.
trait Elem: Copy + Send + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl Elem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// An f32 view of one stored matrix: `(ptr, row stride, col stride)` of op(X), converting a
/// 16-bit matrix into `buf` (dense, column-major).
unsafe fn f32_view(
    m: &Mat,
    base: *const u8,
    batch: usize,
    trans: bool,
    buf: &mut Vec<f32>,
) -> (*const f32, isize, isize) {
    let off = batch * m.stride;
    let (ptr, ld) = match m.dt {
        // SAFETY (all arms): `base` covers `m.span()` elements (resolved by the caller), and
        // every element read, `off + i + j·ld` with i < rows, j < cols, lies within it.
        Dt::F32 => (unsafe { (base as *const f32).add(off) }, m.ld),
        Dt::Bf16 => {
            unsafe { widen::<half::bf16>(m, (base as *const half::bf16).add(off), buf) };
            (buf.as_ptr(), m.rows)
        }
        Dt::F16 => {
            unsafe { widen::<half::f16>(m, (base as *const half::f16).add(off), buf) };
            (buf.as_ptr(), m.rows)
        }
    };
    let ld = ld as isize;
    // Stored (i, j) at i + j·ld; op(X)(r, c) = X(r, c), or X(c, r) when transposed.
    if trans {
        (ptr, ld, 1)
    } else {
        (ptr, 1, ld)
    }
}

unsafe fn widen<T: Elem>(m: &Mat, src: *const T, buf: &mut Vec<f32>) {
    buf.clear();
    buf.reserve(m.rows * m.cols);
    for j in 0..m.cols {
        // SAFETY: column j of the matrix, rows elements from `src + j·ld`, inside the span.
        let col = unsafe { std::slice::from_raw_parts(src.add(j * m.ld), m.rows) };
        buf.extend(col.iter().map(|x| x.to_f32()));
    }
}

/// Runs `p` on host memory: `a`, `b`, `c`, `d`, `bias` point at each operand's first element
/// and cover its whole span ([`Mat::span`], [`Problem::bias_span`]); `c` is not read when
/// β = 0 and may then be null, as `bias` without a bias.
///
/// # Safety
/// The pointers must be valid for the spans (D's for writes), aligned to their element types.
pub unsafe fn compute(
    p: &Problem,
    a: *const u8,
    b: *const u8,
    c: *const u8,
    d: *mut u8,
    bias: *const u8,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match p.d.dt {
            Dt::F32 => compute_t::<f32>(p, a, b, c, d, bias),
            Dt::Bf16 => compute_t::<half::bf16>(p, a, b, c, d, bias),
            Dt::F16 => compute_t::<half::f16>(p, a, b, c, d, bias),
        }
    }
}

unsafe fn compute_t<T: Elem>(
    p: &Problem,
    a: *const u8,
    b: *const u8,
    c: *const u8,
    d: *mut u8,
    bias: *const u8,
) {
    let (m, n, k) = (p.m, p.n, p.k);
    if m == 0 || n == 0 || p.batch == 0 {
        return;
    }
    let mut acc = vec![0f32; m * n];
    let (mut abuf, mut bbuf) = (Vec::new(), Vec::new());
    let (c, d, bias) = (c as *const T, d as *mut T, bias as *const T);
    for bi in 0..p.batch {
        if k == 0 {
            acc.fill(0.0);
        } else {
            // SAFETY: the views stay inside A's and B's spans (see `f32_view`); `acc` is m×n.
            unsafe {
                let (lhs, lhs_rs, lhs_cs) = f32_view(&p.a, a, bi, p.trans_a, &mut abuf);
                let (rhs, rhs_rs, rhs_cs) = f32_view(&p.b, b, bi, p.trans_b, &mut bbuf);
                gemm::gemm(
                    m,
                    n,
                    k,
                    acc.as_mut_ptr(),
                    m as isize,
                    1,
                    false,
                    lhs,
                    lhs_cs,
                    lhs_rs,
                    rhs,
                    rhs_cs,
                    rhs_rs,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        let (alpha, beta) = (p.alpha, p.beta);
        let coff = bi * p.c.stride;
        let doff = bi * p.d.stride;
        let boff = p.bias.map_or(0, |b| bi * b.stride);
        for j in 0..n {
            let accj = &acc[j * m..(j + 1) * m];
            for (i, &x) in accj.iter().enumerate() {
                let mut v = alpha * x;
                // SAFETY: C(i, j) of batch bi and bias[i] of batch bi lie inside their spans;
                // C is only read when β ≠ 0; D(i, j) inside D's span.
                unsafe {
                    if beta != 0.0 {
                        v += beta * (*c.add(coff + i + j * p.c.ld)).to_f32();
                    }
                    if p.bias.is_some() {
                        v += (*bias.add(boff + i)).to_f32();
                    }
                    *d.add(doff + i + j * p.d.ld) = T::from_f32(v);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------- exports

/// `cublasLtCreate`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtCreate(handle: *mut *mut c_void) -> cublasStatus_t {
    if handle.is_null() {
        report("cublasLtCreate: NULL handle pointer");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: non-null out-pointer given by the caller.
    unsafe { *handle = create_obj(Attrs::new(ObjKind::Handle)) };
    CUBLAS_STATUS_SUCCESS
}

/// `cublasLtDestroy`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtDestroy(handle: *mut c_void) -> cublasStatus_t {
    destroy_obj("cublasLtDestroy", handle, ObjKind::Handle)
}

/// `cublasLtGetVersion`.
#[no_mangle]
pub extern "C" fn rdemu_cublasLtGetVersion() -> usize {
    VERSION
}

/// `cublasLtGetProperty` (`MAJOR_VERSION` 0, `MINOR_VERSION` 1, `PATCH_LEVEL` 2).
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtGetProperty(ty: i32, value: *mut c_int) -> cublasStatus_t {
    let v = match ty {
        0 => 13,
        1 => 0,
        2 => 2,
        _ => {
            report(&format!("cublasLtGetProperty: property {ty}"));
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    };
    if value.is_null() {
        report("cublasLtGetProperty: NULL value pointer");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: non-null out-pointer given by the caller.
    unsafe { *value = v };
    CUBLAS_STATUS_SUCCESS
}

/// `(name, description)` of a status, as cuBLAS words them.
pub fn status_text(s: cublasStatus_t) -> (&'static std::ffi::CStr, &'static std::ffi::CStr) {
    match s {
        CUBLAS_STATUS_SUCCESS => (c"CUBLAS_STATUS_SUCCESS", c"success"),
        CUBLAS_STATUS_NOT_INITIALIZED => (
            c"CUBLAS_STATUS_NOT_INITIALIZED",
            c"the library was not initialized",
        ),
        CUBLAS_STATUS_ALLOC_FAILED => (
            c"CUBLAS_STATUS_ALLOC_FAILED",
            c"the resource allocation failed",
        ),
        CUBLAS_STATUS_INVALID_VALUE => (
            c"CUBLAS_STATUS_INVALID_VALUE",
            c"an invalid numeric value was used as an argument",
        ),
        CUBLAS_STATUS_ARCH_MISMATCH => (
            c"CUBLAS_STATUS_ARCH_MISMATCH",
            c"an absent device architectural feature is required",
        ),
        CUBLAS_STATUS_MAPPING_ERROR => (
            c"CUBLAS_STATUS_MAPPING_ERROR",
            c"an access to GPU memory space failed",
        ),
        CUBLAS_STATUS_EXECUTION_FAILED => (
            c"CUBLAS_STATUS_EXECUTION_FAILED",
            c"the GPU program failed to execute",
        ),
        CUBLAS_STATUS_INTERNAL_ERROR => (
            c"CUBLAS_STATUS_INTERNAL_ERROR",
            c"an internal operation failed",
        ),
        CUBLAS_STATUS_NOT_SUPPORTED => (
            c"CUBLAS_STATUS_NOT_SUPPORTED",
            c"the functionality requested is not supported",
        ),
        CUBLAS_STATUS_LICENSE_ERROR => (
            c"CUBLAS_STATUS_LICENSE_ERROR",
            c"an error was detected when checking the current licensing",
        ),
        _ => (c"CUBLAS_STATUS_UNKNOWN", c"unknown error"),
    }
}

/// `cublasLtGetStatusName`.
#[no_mangle]
pub extern "C" fn rdemu_cublasLtGetStatusName(status: cublasStatus_t) -> *const c_char {
    status_text(status).0.as_ptr()
}

/// `cublasLtGetStatusString`.
#[no_mangle]
pub extern "C" fn rdemu_cublasLtGetStatusString(status: cublasStatus_t) -> *const c_char {
    status_text(status).1.as_ptr()
}

/// `cublasLtMatrixLayoutCreate`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatrixLayoutCreate(
    layout: *mut *mut c_void,
    ty: i32,
    rows: u64,
    cols: u64,
    ld: i64,
) -> cublasStatus_t {
    const CALL: &str = "cublasLtMatrixLayoutCreate";
    if layout.is_null() {
        report(&format!("{CALL}: NULL layout pointer"));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if ld < 0 || (ld as u64) < rows {
        report(&format!(
            "{CALL}: {rows}×{cols} {} with ld {ld}: a column-major ld must be ≥ the rows",
            cuda_type_name(ty)
        ));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let mut a = Attrs::new(ObjKind::Layout);
    a.set(CUBLASLT_MATRIX_LAYOUT_TYPE, ty as u32 as u64);
    a.set(CUBLASLT_MATRIX_LAYOUT_ORDER, CUBLASLT_ORDER_COL as u64);
    a.set(CUBLASLT_MATRIX_LAYOUT_ROWS, rows);
    a.set(CUBLASLT_MATRIX_LAYOUT_COLS, cols);
    a.set(CUBLASLT_MATRIX_LAYOUT_LD, ld as u64);
    a.set(CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, 1);
    // SAFETY: non-null out-pointer given by the caller.
    unsafe { *layout = create_obj(a) };
    CUBLAS_STATUS_SUCCESS
}

/// `cublasLtMatrixLayoutDestroy`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatrixLayoutDestroy(layout: *mut c_void) -> cublasStatus_t {
    destroy_obj("cublasLtMatrixLayoutDestroy", layout, ObjKind::Layout)
}

/// `cublasLtMatrixLayoutSetAttribute`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatrixLayoutSetAttribute(
    layout: *mut c_void,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> cublasStatus_t {
    // SAFETY: forwarded caller contract (buf readable for size bytes).
    unsafe {
        set_attr(
            "cublasLtMatrixLayoutSetAttribute",
            layout,
            ObjKind::Layout,
            attr,
            buf,
            size,
        )
    }
}

/// `cublasLtMatrixLayoutGetAttribute`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatrixLayoutGetAttribute(
    layout: *mut c_void,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    written: *mut usize,
) -> cublasStatus_t {
    // SAFETY: forwarded caller contract (buf writable for size bytes).
    unsafe {
        get_attr(
            "cublasLtMatrixLayoutGetAttribute",
            layout,
            ObjKind::Layout,
            attr,
            buf,
            size,
            written,
        )
    }
}

/// `cublasLtMatmulDescCreate`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatmulDescCreate(
    desc: *mut *mut c_void,
    compute: i32,
    scale: i32,
) -> cublasStatus_t {
    if desc.is_null() {
        report("cublasLtMatmulDescCreate: NULL descriptor pointer");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let mut a = Attrs::new(ObjKind::Desc);
    a.set(CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, compute as u32 as u64);
    a.set(CUBLASLT_MATMUL_DESC_SCALE_TYPE, scale as u32 as u64);
    a.set(CUBLASLT_MATMUL_DESC_FILL_MODE, 2); // CUBLAS_FILL_MODE_FULL
    a.set(
        CUBLASLT_MATMUL_DESC_EPILOGUE,
        CUBLASLT_EPILOGUE_DEFAULT as u64,
    );
    a.set(22, u32::MAX as u64); // EPILOGUE_AUX_DATA_TYPE: -1
    a.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, u32::MAX as u64); // -1: D's type
                                                                 // SAFETY: non-null out-pointer given by the caller.
    unsafe { *desc = create_obj(a) };
    CUBLAS_STATUS_SUCCESS
}

/// `cublasLtMatmulDescDestroy`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatmulDescDestroy(desc: *mut c_void) -> cublasStatus_t {
    destroy_obj("cublasLtMatmulDescDestroy", desc, ObjKind::Desc)
}

/// `cublasLtMatmulDescSetAttribute`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatmulDescSetAttribute(
    desc: *mut c_void,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> cublasStatus_t {
    // SAFETY: forwarded caller contract (buf readable for size bytes).
    unsafe {
        set_attr(
            "cublasLtMatmulDescSetAttribute",
            desc,
            ObjKind::Desc,
            attr,
            buf,
            size,
        )
    }
}

/// `cublasLtMatmulDescGetAttribute`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatmulDescGetAttribute(
    desc: *mut c_void,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    written: *mut usize,
) -> cublasStatus_t {
    // SAFETY: forwarded caller contract (buf writable for size bytes).
    unsafe {
        get_attr(
            "cublasLtMatmulDescGetAttribute",
            desc,
            ObjKind::Desc,
            attr,
            buf,
            size,
            written,
        )
    }
}

/// `cublasLtMatmulPreferenceCreate`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatmulPreferenceCreate(
    pref: *mut *mut c_void,
) -> cublasStatus_t {
    if pref.is_null() {
        report("cublasLtMatmulPreferenceCreate: NULL preference pointer");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let mut a = Attrs::new(ObjKind::Pref);
    a.set(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, 0x7);
    for attr in 5..=8 {
        a.set(attr, 256);
    }
    a.set(CUBLASLT_MATMUL_PREF_IMPL_MASK, u64::MAX);
    // SAFETY: non-null out-pointer given by the caller.
    unsafe { *pref = create_obj(a) };
    CUBLAS_STATUS_SUCCESS
}

/// `cublasLtMatmulPreferenceDestroy`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatmulPreferenceDestroy(
    pref: *mut c_void,
) -> cublasStatus_t {
    destroy_obj("cublasLtMatmulPreferenceDestroy", pref, ObjKind::Pref)
}

/// `cublasLtMatmulPreferenceSetAttribute`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatmulPreferenceSetAttribute(
    pref: *mut c_void,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> cublasStatus_t {
    // SAFETY: forwarded caller contract (buf readable for size bytes).
    unsafe {
        set_attr(
            "cublasLtMatmulPreferenceSetAttribute",
            pref,
            ObjKind::Pref,
            attr,
            buf,
            size,
        )
    }
}

/// `cublasLtMatmulPreferenceGetAttribute`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasLtMatmulPreferenceGetAttribute(
    pref: *mut c_void,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    written: *mut usize,
) -> cublasStatus_t {
    // SAFETY: forwarded caller contract (buf writable for size bytes).
    unsafe {
        get_attr(
            "cublasLtMatmulPreferenceGetAttribute",
            pref,
            ObjKind::Pref,
            attr,
            buf,
            size,
            written,
        )
    }
}

/// The four layouts' attributes, or the status (reported).
fn get_layouts(call: &str, l: [*const c_void; 4]) -> Result<[Attrs; 4], cublasStatus_t> {
    Ok([
        get_obj(call, "Adesc", l[0], ObjKind::Layout)?,
        get_obj(call, "Bdesc", l[1], ObjKind::Layout)?,
        get_obj(call, "Cdesc", l[2], ObjKind::Layout)?,
        get_obj(call, "Ddesc", l[3], ObjKind::Layout)?,
    ])
}

fn reject(call: &str, what: &str, (status, msg): Reject) -> cublasStatus_t {
    report(&format!("{call}{what}: {msg}"));
    status
}

/// `cublasLtMatmulAlgoGetHeuristic`: one algorithm (no workspace) for every supported problem,
/// chosen for the preference's alignments (see the module doc).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rdemu_cublasLtMatmulAlgoGetHeuristic(
    handle: *mut c_void,
    desc: *mut c_void,
    adesc: *mut c_void,
    bdesc: *mut c_void,
    cdesc: *mut c_void,
    ddesc: *mut c_void,
    pref: *mut c_void,
    requested: c_int,
    results: *mut cublasLtMatmulHeuristicResult_t,
    returned: *mut c_int,
) -> cublasStatus_t {
    const CALL: &str = "cublasLtMatmulAlgoGetHeuristic";
    if let Err(s) = get_obj(CALL, "handle", handle, ObjKind::Handle) {
        return s;
    }
    let desc = match get_obj(CALL, "matmul descriptor", desc, ObjKind::Desc) {
        Ok(d) => d,
        Err(s) => return s,
    };
    let [la, lb, lc, ld] = match get_layouts(CALL, [adesc, bdesc, cdesc, ddesc]) {
        Ok(l) => l,
        Err(s) => return s,
    };
    let pref = match get_obj(CALL, "preference", pref, ObjKind::Pref) {
        Ok(p) => p,
        Err(s) => return s,
    };
    if requested <= 0 || results.is_null() || returned.is_null() {
        report(&format!(
            "{CALL}: requestedAlgoCount {requested}, results {results:p}, returnAlgoCount \
             {returned:p}"
        ));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: non-null out-pointer.
    unsafe { *returned = 0 };
    let (p, info) = match check_problem(&desc, &la, &lb, &lc, &ld) {
        Ok(x) => x,
        Err(r) => return reject(CALL, "", r),
    };
    let what = format!(" ({})", p.describe());
    if pref.u32(CUBLASLT_MATMUL_PREF_SEARCH_MODE) != 0 {
        return reject(
            CALL,
            &what,
            not_supported("only CUBLASLT_SEARCH_BEST_FIT is emulated".into()),
        );
    }
    let mut align = [0u64; 4];
    for (i, (name, m)) in [("A", p.a), ("B", p.b), ("C", p.c), ("D", p.d)]
        .into_iter()
        .enumerate()
    {
        let want = pref.u32(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES + i as u32) as u64;
        let es = m.dt.size() as u64;
        // The largest power of two the preference promises, capped at 256.
        let promised = if want == 0 {
            0
        } else {
            1u64 << (63 - want.leading_zeros()).min(8)
        };
        if promised < es {
            return reject(
                CALL,
                &what,
                not_supported(format!(
                    "MIN_ALIGNMENT_{name}_BYTES {want}: no algorithm reads {} elements aligned \
                     to less than their {es} bytes",
                    m.dt.name()
                )),
            );
        }
        align[i] = promised.min(layout_align(&m));
    }
    if info.bias && info.bias_ptr != 0 && !info.bias_ptr.is_multiple_of(p.d.dt.size() as u64) {
        return reject(
            CALL,
            &what,
            not_supported(format!(
                "the bias pointer {:#x} is not aligned to its {} elements",
                info.bias_ptr,
                p.d.dt.name()
            )),
        );
    }
    let r = cublasLtMatmulHeuristicResult_t {
        algo: make_algo(&p, info.compute, align),
        workspaceSize: 0,
        state: CUBLAS_STATUS_SUCCESS,
        wavesCount: 1.0,
        reserved: [0; 4],
    };
    // SAFETY: `results` has at least `requested` ≥ 1 elements; `returned` is non-null.
    unsafe {
        *results = r;
        *returned = 1;
    }
    CUBLAS_STATUS_SUCCESS
}

/// `cublasLtMatmul`: validated now, α and β read now, computed in stream order.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rdemu_cublasLtMatmul(
    handle: *mut c_void,
    desc: *mut c_void,
    alpha: *const c_void,
    a: *const c_void,
    adesc: *mut c_void,
    b: *const c_void,
    bdesc: *mut c_void,
    beta: *const c_void,
    c: *const c_void,
    cdesc: *mut c_void,
    d: *mut c_void,
    ddesc: *mut c_void,
    algo: *const cublasLtMatmulAlgo_t,
    workspace: *mut c_void,
    workspace_size: usize,
    stream: *mut c_void,
) -> cublasStatus_t {
    const CALL: &str = "cublasLtMatmul";
    let _ = workspace; // the algorithms use no workspace
    if let Err(s) = get_obj(CALL, "handle", handle, ObjKind::Handle) {
        return s;
    }
    let desc = match get_obj(CALL, "matmul descriptor", desc, ObjKind::Desc) {
        Ok(d) => d,
        Err(s) => return s,
    };
    let [la, lb, lc, ld] = match get_layouts(CALL, [adesc, bdesc, cdesc, ddesc]) {
        Ok(l) => l,
        Err(s) => return s,
    };
    let (mut p, info) = match check_problem(&desc, &la, &lb, &lc, &ld) {
        Ok(x) => x,
        Err(r) => return reject(CALL, "", r),
    };
    let what = format!(" {}", p.describe());
    if alpha.is_null() || beta.is_null() {
        return reject(
            CALL,
            &what,
            invalid(format!("alpha {alpha:p} / beta {beta:p} is NULL")),
        );
    }
    // SAFETY: host pointer mode (the default, and the only one emulated): α and β are f32
    // (the scale type) in host memory, read at the call as cuBLASLt does.
    unsafe {
        p.alpha = (alpha as *const f32).read_unaligned();
        p.beta = (beta as *const f32).read_unaligned();
    }
    let ptrs = [a as u64, b as u64, c as u64, d as u64];
    let reads_c = p.beta != 0.0;
    if d.is_null() || (reads_c && c.is_null()) {
        return reject(
            CALL,
            &what,
            invalid(format!(
                "C {c:p} / D {d:p} is NULL (C may be NULL only when beta = 0)"
            )),
        );
    }
    if std::ptr::eq(c, d) && p.c != p.d {
        return reject(
            CALL,
            &what,
            invalid(format!(
                "C and D are the same pointer {d:p} with different layouts (C {}, D {}): in-place \
                 needs one layout",
                p.c.describe(),
                p.d.describe()
            )),
        );
    }
    // The algorithm: its alignments and workspace.
    let align = if algo.is_null() {
        // As cuBLASLt: no algorithm given, one is chosen for these operands.
        [0u64; 4]
    } else {
        // SAFETY: non-null pointer to the caller's algorithm (64 bytes).
        let al = unsafe { algo.read_unaligned() };
        if al.data[0] != ALGO_MAGIC {
            return reject(
                CALL,
                &what,
                invalid("the algorithm was not given by cublasLtMatmulAlgoGetHeuristic".into()),
            );
        }
        if al.data[3] != types_key(&p, info.compute) {
            return reject(
                CALL,
                &what,
                not_supported(
                    "the algorithm was chosen for other types or another compute type".into(),
                ),
            );
        }
        if (workspace_size as u64) < al.data[2] {
            return reject(
                CALL,
                &what,
                invalid(format!(
                    "workspace of {workspace_size} bytes; the algorithm needs {}",
                    al.data[2]
                )),
            );
        }
        algo_align(&al)
    };
    for (i, (name, m)) in [("A", p.a), ("B", p.b), ("C", p.c), ("D", p.d)]
        .into_iter()
        .enumerate()
    {
        if name == "C" && !reads_c && c.is_null() {
            continue;
        }
        let es = m.dt.size() as u64;
        let ptr = ptrs[i];
        if !ptr.is_multiple_of(es) {
            return reject(
                CALL,
                &what,
                not_supported(format!(
                    "operand {name} at {ptr:#x} is not aligned to its {es}-byte {} elements",
                    m.dt.name()
                )),
            );
        }
        let need = align[i];
        if need > 1 {
            let bad = if !ptr.is_multiple_of(need) {
                Some(format!(
                    "its pointer {ptr:#x} is {}-byte aligned",
                    pow2_align(ptr)
                ))
            } else if layout_align(&m) < need {
                Some(format!(
                    "its ld / batch stride ({}) is only {}-byte aligned",
                    m.describe(),
                    layout_align(&m)
                ))
            } else {
                None
            };
            if let Some(bad) = bad {
                return reject(
                    CALL,
                    &what,
                    not_supported(format!(
                        "operand {name}: the algorithm was chosen for {need}-byte aligned {name} \
                         (MIN_ALIGNMENT_{name}_BYTES of the heuristic's preference), but {bad}"
                    )),
                );
            }
        }
    }
    if info.bias {
        if info.bias_ptr == 0 {
            return reject(
                CALL,
                &what,
                invalid("CUBLASLT_EPILOGUE_BIAS with a NULL BIAS_POINTER".into()),
            );
        }
        if !info.bias_ptr.is_multiple_of(p.d.dt.size() as u64) {
            return reject(
                CALL,
                &what,
                not_supported(format!(
                    "the bias pointer {:#x} is not aligned to its {} elements",
                    info.bias_ptr,
                    p.d.dt.name()
                )),
            );
        }
    }
    let s = match crate::stream::resolve(stream as u64) {
        Ok(s) => s,
        Err(e) => {
            report(&format!("{CALL}{what}: stream {stream:p}: {}", e.message));
            return if e.code == crate::error::CUDA_ERROR_INVALID_HANDLE {
                CUBLAS_STATUS_INVALID_VALUE
            } else {
                CUBLAS_STATUS_EXECUTION_FAILED
            };
        }
    };
    let p = Faults::from_config().apply(p);
    let device = s.device;
    let bias_ptr = if info.bias { info.bias_ptr } else { 0 };
    let c_ptr = if reads_c { ptrs[2] } else { 0 };
    let op = Box::new(move || run(&p, device, [ptrs[0], ptrs[1], c_ptr, ptrs[3]], bias_ptr));
    crate::stream::enqueue_on(&s, CALL.to_string(), op);
    CUBLAS_STATUS_SUCCESS
}

/// The stream operation of one matmul: checks every operand's range on `device` and computes.
fn run(p: &Problem, device: usize, ptrs: [u64; 4], bias: u64) -> Result<(), EmuError> {
    let shape = p.describe();
    let check = |name: &str, m: &Mat, ptr: u64, write: bool| -> Result<*mut u8, EmuError> {
        let bytes = m.span_bytes().unwrap_or(usize::MAX) as u64;
        if bytes == 0 {
            return Ok(std::ptr::null_mut());
        }
        crate::memory::resolve(device, ptr, bytes, write).map_err(|e| {
            EmuError::new(
                e.code,
                format!(
                    "cublasLtMatmul {shape}, operand {name} ({}): {}",
                    m.describe(),
                    e.message
                ),
            )
        })
    };
    let ha = check("A", &p.a, ptrs[0], false)?;
    let hb = check("B", &p.b, ptrs[1], false)?;
    let hc = if ptrs[2] != 0 {
        check("C", &p.c, ptrs[2], false)?
    } else {
        std::ptr::null_mut()
    };
    let hd = check("D", &p.d, ptrs[3], true)?;
    let hbias = match p.bias {
        Some(bi) => {
            let n = p.bias_span().unwrap_or(usize::MAX) as u64;
            let bytes = n.saturating_mul(bi.dt.size() as u64);
            crate::memory::resolve(device, bias, bytes, false).map_err(|e| {
                EmuError::new(
                    e.code,
                    format!(
                        "cublasLtMatmul {shape}, the bias ({} elements of {}{}): {}",
                        p.m,
                        bi.dt.name(),
                        if p.batch > 1 {
                            format!(", batch stride {}", bi.stride)
                        } else {
                            String::new()
                        },
                        e.message
                    ),
                )
            })?
        }
        None => std::ptr::null_mut(),
    };
    // SAFETY: every pointer covers its operand's whole span (resolved just above; C only when
    // β ≠ 0, the bias only with the bias epilogue), aligned to its element size (checked at
    // the call). Nothing else runs on this stream meanwhile; other streams racing on the same
    // memory would be the caller's bug, as on a GPU.
    unsafe { compute(p, ha, hb, hc, hd, hbias) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic test data without a dependency.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }
        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// Uniform in [-1, 1).
        pub fn unit(&mut self) -> f32 {
            ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// A typed host buffer.
    #[derive(Clone)]
    enum Buf {
        F32(Vec<f32>),
        Bf16(Vec<half::bf16>),
        F16(Vec<half::f16>),
    }

    impl Buf {
        fn new(dt: Dt, len: usize, fill: f32) -> Self {
            match dt {
                Dt::F32 => Buf::F32(vec![fill; len]),
                Dt::Bf16 => Buf::Bf16(vec![half::bf16::from_f32(fill); len]),
                Dt::F16 => Buf::F16(vec![half::f16::from_f32(fill); len]),
            }
        }
        fn random(dt: Dt, len: usize, rng: &mut Rng) -> Self {
            let mut b = Self::new(dt, len, 0.0);
            for i in 0..len {
                b.set(i, rng.unit());
            }
            b
        }
        fn get(&self, i: usize) -> f64 {
            match self {
                Buf::F32(v) => v[i] as f64,
                Buf::Bf16(v) => v[i].to_f64(),
                Buf::F16(v) => v[i].to_f64(),
            }
        }
        fn bits(&self, i: usize) -> u32 {
            match self {
                Buf::F32(v) => v[i].to_bits(),
                Buf::Bf16(v) => v[i].to_bits() as u32,
                Buf::F16(v) => v[i].to_bits() as u32,
            }
        }
        fn set(&mut self, i: usize, x: f32) {
            match self {
                Buf::F32(v) => v[i] = x,
                Buf::Bf16(v) => v[i] = half::bf16::from_f32(x),
                Buf::F16(v) => v[i] = half::f16::from_f32(x),
            }
        }
        fn len(&self) -> usize {
            match self {
                Buf::F32(v) => v.len(),
                Buf::Bf16(v) => v.len(),
                Buf::F16(v) => v.len(),
            }
        }
        fn ptr(&mut self) -> *mut u8 {
            match self {
                Buf::F32(v) => v.as_mut_ptr() as *mut u8,
                Buf::Bf16(v) => v.as_mut_ptr() as *mut u8,
                Buf::F16(v) => v.as_mut_ptr() as *mut u8,
            }
        }
    }

    /// The f64 reference of `p` (each addressed element of D, as `(index, value, bound)`):
    /// bound is Σ|terms| for the tolerance.
    fn reference(
        p: &Problem,
        a: &Buf,
        b: &Buf,
        c: &Buf,
        bias: Option<&Buf>,
    ) -> Vec<(usize, f64, f64)> {
        let mut out = Vec::new();
        for bi in 0..p.batch {
            for j in 0..p.n {
                for i in 0..p.m {
                    let (mut s, mut mag) = (0f64, 0f64);
                    for l in 0..p.k {
                        let ai = if p.trans_a {
                            l + i * p.a.ld
                        } else {
                            i + l * p.a.ld
                        };
                        let bj = if p.trans_b {
                            j + l * p.b.ld
                        } else {
                            l + j * p.b.ld
                        };
                        let x = a.get(bi * p.a.stride + ai) * b.get(bi * p.b.stride + bj);
                        s += x;
                        mag += x.abs();
                    }
                    let mut v = p.alpha as f64 * s;
                    mag *= (p.alpha as f64).abs();
                    if p.beta != 0.0 {
                        let cv = p.beta as f64 * c.get(bi * p.c.stride + i + j * p.c.ld);
                        v += cv;
                        mag += cv.abs();
                    }
                    if let (Some(bb), Some(bs)) = (bias, p.bias) {
                        let x = bb.get(bi * bs.stride + i);
                        v += x;
                        mag += x.abs();
                    }
                    out.push((bi * p.d.stride + i + j * p.d.ld, v, mag));
                }
            }
        }
        out
    }

    /// Relative rounding error of one rounding to `dt` (half an ulp).
    fn half_ulp(dt: Dt) -> f64 {
        match dt {
            Dt::F32 => 0.0,
            Dt::Bf16 => 2f64.powi(-8),
            Dt::F16 => 2f64.powi(-11),
        }
    }

    #[derive(Clone)]
    struct Case {
        p: Problem,
        a: Buf,
        b: Buf,
        c: Buf,
        d: Buf,
        bias: Option<Buf>,
        in_place: bool,
    }

    const SENTINEL: f32 = 12345.0;

    fn random_case(rng: &mut Rng) -> Case {
        let combos = [
            (Dt::F32, Dt::F32),
            (Dt::Bf16, Dt::Bf16),
            (Dt::Bf16, Dt::F32),
            (Dt::F16, Dt::F16),
            (Dt::F16, Dt::F32),
        ];
        let (ab, cd) = combos[rng.below(combos.len())];
        let (m, n, k) = (1 + rng.below(39), 1 + rng.below(39), 1 + rng.below(39));
        let (ta, tb) = (rng.below(2) == 1, rng.below(2) == 1);
        let batch = 1 + rng.below(4);
        let mat = |rng: &mut Rng, dt: Dt, rows: usize, cols: usize| {
            let ld = rows + rng.below(4);
            let m = Mat::new(dt, rows, cols, ld);
            if batch > 1 {
                m.batched(batch, ld * cols + rng.below(7))
            } else {
                m
            }
        };
        let a = if ta {
            mat(rng, ab, k, m)
        } else {
            mat(rng, ab, m, k)
        };
        let bm = if tb {
            mat(rng, ab, n, k)
        } else {
            mat(rng, ab, k, n)
        };
        let in_place = rng.below(3) == 0;
        let c = mat(rng, cd, m, n);
        let d = if in_place { c } else { mat(rng, cd, m, n) };
        let alphas = [1.0f32, 0.5, -1.25, 2.0];
        let betas = [0.0f32, 1.0, -0.75, 0.5];
        let bias = (rng.below(2) == 1).then(|| Bias {
            dt: cd,
            stride: if batch > 1 && rng.below(2) == 1 {
                m + rng.below(3)
            } else {
                0
            },
        });
        let p = Problem {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
            a,
            b: bm,
            c,
            d,
            batch,
            alpha: alphas[rng.below(4)],
            beta: betas[rng.below(4)],
            bias,
        };
        let ab_buf = Buf::random(ab, a.span().unwrap(), rng);
        let bb_buf = Buf::random(ab, bm.span().unwrap(), rng);
        // C: random, but NaN everywhere when β = 0 (it must not be read).
        let mut c_buf = Buf::random(cd, c.span().unwrap(), rng);
        if p.beta == 0.0 && !in_place {
            c_buf = Buf::new(cd, c.span().unwrap(), f32::NAN);
        }
        let d_buf = if in_place {
            c_buf.clone()
        } else {
            Buf::new(cd, d.span().unwrap(), SENTINEL)
        };
        let bias = p.bias.map(|_| Buf::random(cd, p.bias_span().unwrap(), rng));
        Case {
            p,
            a: ab_buf,
            b: bb_buf,
            c: c_buf,
            d: d_buf,
            bias,
            in_place,
        }
    }

    /// Runs the case; the (index, got, want, bound) of each mismatch, and the indices of D
    /// outside the addressed elements that changed.
    fn run_case(cs: &mut Case, faults: Faults) -> (Vec<String>, usize) {
        let want = reference(&cs.p, &cs.a, &cs.b, &cs.c, cs.bias.as_ref());
        let before = cs.d.clone();
        let run_p = faults.apply(cs.p);
        // The faulty layout may address past the buffers: pad every input for it.
        let mut a = Buf::new(run_p.a.dt, run_p.a.span().unwrap().max(cs.a.len()), 0.25);
        for i in 0..cs.a.len() {
            a.set(i, cs.a.get(i) as f32); // exact: same type
        }
        let mut b = cs.b.clone();
        let mut bias = cs.bias.clone();
        let cptr = if cs.in_place { cs.d.ptr() } else { cs.c.ptr() };
        let dptr = cs.d.ptr();
        // SAFETY: every buffer covers its operand's span (A padded for the faults).
        unsafe {
            compute(
                &run_p,
                a.ptr(),
                b.ptr(),
                cptr,
                dptr,
                bias.as_mut().map_or(std::ptr::null_mut(), |b| b.ptr()),
            )
        };
        let mut bad = Vec::new();
        let mut addressed = std::collections::HashSet::new();
        let out_dt = cs.p.d.dt;
        for (idx, v, mag) in want {
            addressed.insert(idx);
            let got = cs.d.get(idx);
            // f32 accumulation error bound (k terms + α, β, bias) and one rounding to D.
            let tol = 1e-5 * mag + half_ulp(out_dt) * v.abs() + 1e-7;
            if !(got - v).abs().le(&tol) {
                bad.push(format!("D[{idx}] = {got}, want {v} (±{tol})"));
            }
        }
        let mut touched = 0;
        let len = cs.p.d.span().unwrap();
        for i in 0..len {
            if !addressed.contains(&i) && cs.d.bits(i) != before.bits(i) {
                touched += 1;
            }
        }
        (bad, touched)
    }

    #[test]
    fn matches_the_f64_reference_on_random_problems() {
        let mut rng = Rng::new(7);
        for t in 0..300 {
            let mut cs = random_case(&mut rng);
            let desc = format!("case {t}: {} {:?}", cs.p.describe(), cs.p);
            let (bad, touched) = run_case(&mut cs, Faults::default());
            assert!(
                bad.is_empty(),
                "{desc}: {} wrong, first {:?}",
                bad.len(),
                &bad[..bad.len().min(3)]
            );
            assert_eq!(
                touched, 0,
                "{desc}: wrote outside the addressed elements of D"
            );
        }
    }

    #[test]
    fn rounds_to_nearest_even_once() {
        // 1 + 2^-8 is halfway between two bf16 values: it rounds to even (1.0); 1 + 3·2^-9 up.
        let p = Problem {
            m: 1,
            n: 1,
            k: 2,
            trans_a: false,
            trans_b: false,
            a: Mat::new(Dt::Bf16, 1, 2, 1),
            b: Mat::new(Dt::Bf16, 2, 1, 2),
            c: Mat::new(Dt::Bf16, 1, 1, 1),
            d: Mat::new(Dt::Bf16, 1, 1, 1),
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            bias: None,
        };
        for (x, want) in [
            (2f32.powi(-8), 1.0f32),
            (3.0 * 2f32.powi(-9), 1.0 + 2f32.powi(-7)),
        ] {
            let a = [half::bf16::ONE, half::bf16::from_f32(x)];
            let b = [half::bf16::ONE, half::bf16::ONE];
            let mut d = [half::bf16::ZERO];
            // SAFETY: host arrays of the layouts' spans.
            unsafe {
                compute(
                    &p,
                    a.as_ptr() as *const u8,
                    b.as_ptr() as *const u8,
                    std::ptr::null(),
                    d.as_mut_ptr() as *mut u8,
                    std::ptr::null(),
                )
            };
            assert_eq!(d[0].to_f32(), want, "1 + {x}");
        }
    }

    #[test]
    fn faults_change_the_numbers() {
        let mut rng = Rng::new(11);
        let (mut ld_caught, mut stride_caught) = (0, 0);
        for _ in 0..60 {
            let cs = random_case(&mut rng);
            // Every A with more than one column reads other elements with ld + 1.
            if cs.p.a.cols > 1 {
                let (bad, _) = run_case(
                    &mut cs.clone(),
                    Faults {
                        ld: true,
                        batch_stride: false,
                    },
                );
                assert!(!bad.is_empty(), "gemm-ld unnoticed on {}", cs.p.describe());
                ld_caught += 1;
            }
            // Every batched A reads its matrices ≥ 1 shifted by b elements.
            if cs.p.batch > 1 {
                let (bad, _) = run_case(
                    &mut cs.clone(),
                    Faults {
                        ld: false,
                        batch_stride: true,
                    },
                );
                assert!(
                    !bad.is_empty(),
                    "gemm-batch-stride unnoticed on {}",
                    cs.p.describe()
                );
                stride_caught += 1;
            }
        }
        assert!(
            ld_caught > 20 && stride_caught > 10,
            "{ld_caught} {stride_caught}"
        );
    }

    fn layout(dt: Dt, rows: u64, cols: u64, ld: i64) -> Attrs {
        let mut a = Attrs::new(ObjKind::Layout);
        a.set(CUBLASLT_MATRIX_LAYOUT_TYPE, dt.cuda() as u64);
        a.set(CUBLASLT_MATRIX_LAYOUT_ROWS, rows);
        a.set(CUBLASLT_MATRIX_LAYOUT_COLS, cols);
        a.set(CUBLASLT_MATRIX_LAYOUT_LD, ld as u64);
        a.set(CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, 1);
        a
    }

    fn desc(compute: i32) -> Attrs {
        let mut a = Attrs::new(ObjKind::Desc);
        a.set(CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, compute as u64);
        a.set(CUBLASLT_MATMUL_DESC_SCALE_TYPE, CUDA_R_32F as u64);
        a.set(CUBLASLT_MATMUL_DESC_FILL_MODE, 2);
        a.set(CUBLASLT_MATMUL_DESC_EPILOGUE, 1);
        a.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, u32::MAX as u64);
        a
    }

    #[test]
    fn problem_checks_follow_the_type_table_and_shapes() {
        let ok = |ab: Dt, cd: Dt, compute: i32| {
            check_problem(
                &desc(compute),
                &layout(ab, 4, 3, 4),
                &layout(ab, 3, 5, 3),
                &layout(cd, 4, 5, 4),
                &layout(cd, 4, 5, 4),
            )
            .map(|_| ())
            .map_err(|e| e.0)
        };
        assert_eq!(ok(Dt::F32, Dt::F32, CUBLAS_COMPUTE_32F), Ok(()));
        assert_eq!(ok(Dt::Bf16, Dt::F32, CUBLAS_COMPUTE_32F), Ok(()));
        assert_eq!(ok(Dt::Bf16, Dt::Bf16, CUBLAS_COMPUTE_32F), Ok(()));
        assert_eq!(ok(Dt::F16, Dt::F32, CUBLAS_COMPUTE_32F), Ok(()));
        assert_eq!(ok(Dt::F32, Dt::F32, CUBLAS_COMPUTE_32F_FAST_TF32), Ok(()));
        assert_eq!(
            ok(Dt::F32, Dt::Bf16, CUBLAS_COMPUTE_32F),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        assert_eq!(
            ok(Dt::Bf16, Dt::F16, CUBLAS_COMPUTE_32F),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        assert_eq!(
            ok(Dt::Bf16, Dt::Bf16, CUBLAS_COMPUTE_32F_FAST_16BF),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        assert_eq!(ok(Dt::F32, Dt::F32, 70), Err(CUBLAS_STATUS_NOT_SUPPORTED));
        // C and D of different types.
        let r = check_problem(
            &desc(CUBLAS_COMPUTE_32F),
            &layout(Dt::Bf16, 4, 3, 4),
            &layout(Dt::Bf16, 3, 5, 3),
            &layout(Dt::Bf16, 4, 5, 4),
            &layout(Dt::F32, 4, 5, 4),
        );
        assert_eq!(
            r.map(|_| ()).map_err(|e| e.0),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        // k mismatch, ld < rows, ROW order.
        let r = check_problem(
            &desc(CUBLAS_COMPUTE_32F),
            &layout(Dt::F32, 4, 3, 4),
            &layout(Dt::F32, 2, 5, 3),
            &layout(Dt::F32, 4, 5, 4),
            &layout(Dt::F32, 4, 5, 4),
        );
        assert_eq!(
            r.map(|_| ()).map_err(|e| e.0),
            Err(CUBLAS_STATUS_INVALID_VALUE)
        );
        let r = check_problem(
            &desc(CUBLAS_COMPUTE_32F),
            &layout(Dt::F32, 4, 3, 3),
            &layout(Dt::F32, 3, 5, 3),
            &layout(Dt::F32, 4, 5, 4),
            &layout(Dt::F32, 4, 5, 4),
        );
        assert_eq!(
            r.map(|_| ()).map_err(|e| e.0),
            Err(CUBLAS_STATUS_INVALID_VALUE)
        );
        let mut row = layout(Dt::F32, 4, 3, 4);
        row.set(CUBLASLT_MATRIX_LAYOUT_ORDER, CUBLASLT_ORDER_ROW as u64);
        let r = check_problem(
            &desc(CUBLAS_COMPUTE_32F),
            &row,
            &layout(Dt::F32, 3, 5, 3),
            &layout(Dt::F32, 4, 5, 4),
            &layout(Dt::F32, 4, 5, 4),
        );
        assert_eq!(
            r.map(|_| ()).map_err(|e| e.0),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        // Transposed A: stored k×m.
        let mut d = desc(CUBLAS_COMPUTE_32F);
        d.set(CUBLASLT_MATMUL_DESC_TRANSA, 1);
        let r = check_problem(
            &d,
            &layout(Dt::F32, 3, 4, 3),
            &layout(Dt::F32, 3, 5, 3),
            &layout(Dt::F32, 4, 5, 4),
            &layout(Dt::F32, 4, 5, 4),
        );
        let (p, _) = r.unwrap();
        assert_eq!((p.m, p.n, p.k, p.trans_a), (4, 5, 3, true));
        // Unsupported epilogue (GELU).
        let mut d = desc(CUBLAS_COMPUTE_32F);
        d.set(CUBLASLT_MATMUL_DESC_EPILOGUE, 32);
        let r = check_problem(
            &d,
            &layout(Dt::F32, 4, 3, 4),
            &layout(Dt::F32, 3, 5, 3),
            &layout(Dt::F32, 4, 5, 4),
            &layout(Dt::F32, 4, 5, 4),
        );
        assert_eq!(
            r.map(|_| ()).map_err(|e| e.0),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(pow2_align(0), 256);
        assert_eq!(pow2_align(0x1002), 2);
        assert_eq!(pow2_align(0x1040), 64);
        assert_eq!(pow2_align(0x10000), 256);
        let m = Mat::new(Dt::Bf16, 5, 3, 12).batched(2, 40);
        assert_eq!(layout_align(&m), 8); // ld 24 bytes → 8, stride 80 bytes → 16: min 8
    }
}
