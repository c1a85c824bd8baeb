//! The libraries rdrop's binaries link but whose work the emulator does not do: the CUDA
//! runtime (`libcudart.so.13`, used only by candle-kernels' static library), cuBLAS (candle's
//! handle and autograd matmul), cuRAND (candle's per-device generator) and NVRTC (version
//! queries). The shells of `build/shells.rs` forward `<name>` to `rdemu_<name>` here, with the
//! real C signatures.
//!
//! Nothing here computes. What a binary does at start (fat-binary registration, handle and
//! generator creation) succeeds; what would compute (candle's own kernels, its cuBLAS matmul,
//! cuRAND generation, runtime allocations) fails with the library's "not supported" code and
//! one report line naming the call (and the kernel), since the emulator runs rdrop's explicit
//! engine, which must not reach them. Every report line is printed once per process.
#![allow(non_upper_case_globals)] // the C names of the codes
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::error::report;

/// `cudaError_t`.
pub type cudaError_t = c_int;
/// `cudaStream_t` (the driver's `CUstream`).
pub type cudaStream_t = *mut c_void;

pub const cudaSuccess: cudaError_t = 0;
pub const cudaErrorInvalidValue: cudaError_t = 1;
pub const cudaErrorMissingConfiguration: cudaError_t = 52;
pub const cudaErrorInvalidDeviceFunction: cudaError_t = 98;
pub const cudaErrorNoDevice: cudaError_t = 100;
pub const cudaErrorInvalidDevice: cudaError_t = 101;
pub const cudaErrorNotSupported: cudaError_t = 801;

/// `dim3` / `uint3`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct dim3 {
    pub x: c_uint,
    pub y: c_uint,
    pub z: c_uint,
}

fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reports `msg` unless this process already did.
fn report_once(msg: String) {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
    let new = lock(seen).insert(msg.clone());
    if new {
        report(&msg);
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA runtime

/// Host stub address (`hostFun` of `__cudaRegisterFunction`) -> device function name.
fn functions() -> &'static Mutex<HashMap<usize, String>> {
    static F: OnceLock<Mutex<HashMap<usize, String>>> = OnceLock::new();
    F.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The device name registered for a host stub, if any.
pub fn registered_kernel(host_fun: *const c_void) -> Option<String> {
    lock(functions()).get(&(host_fun as usize)).cloned()
}

thread_local! {
    /// The runtime's per-thread last error (`cudaGetLastError`).
    static LAST_ERROR: Cell<cudaError_t> = const { Cell::new(cudaSuccess) };
    /// The device `cudaSetDevice` chose on this thread.
    static RT_DEVICE: Cell<Option<c_int>> = const { Cell::new(None) };
    /// `<<<...>>>` configurations pushed and not yet popped.
    static CALL_CONFIG: RefCell<Vec<(dim3, dim3, usize, cudaStream_t)>> =
        const { RefCell::new(Vec::new()) };
}

/// Records `code` as the thread's last runtime error and returns it.
fn rt_fail(code: cudaError_t) -> cudaError_t {
    LAST_ERROR.with(|e| e.set(code));
    code
}

/// A runtime call that only candle's own kernels make: reported, `cudaErrorNotSupported`.
fn rt_unsupported(call: &str) -> cudaError_t {
    report_once(format!(
        "{call}: the CUDA runtime is not emulated (only candle-kernels' static library calls \
         it); the emulator runs rdrop's explicit engine, which must not reach it"
    ));
    rt_fail(cudaErrorNotSupported)
}

fn kernel_label(host_fun: *const c_void) -> String {
    match registered_kernel(host_fun) {
        Some(name) => format!("`{name}`"),
        None => format!("at host address {host_fun:p} (never registered)"),
    }
}

/// A launch of one of candle's kernels: reported by name, `cudaErrorNotSupported`.
fn rt_launch(call: &str, host_fun: *const c_void) -> cudaError_t {
    report_once(format!(
        "{call}: candle's CUDA kernel {} (registered by candle-kernels' static library) has no \
         host implementation: the emulator runs rdrop's explicit engine, which must not launch it",
        kernel_label(host_fun)
    ));
    rt_fail(cudaErrorNotSupported)
}

/// `__cudaRegisterFatBinary`: a handle (never freed; the images are not read).
#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaRegisterFatBinary(fatCubin: *mut c_void) -> *mut *mut c_void {
    Box::into_raw(Box::new(fatCubin))
}

#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaRegisterFatBinaryEnd(_fatCubinHandle: *mut *mut c_void) {}

#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaUnregisterFatBinary(_fatCubinHandle: *mut *mut c_void) {}

/// Records `hostFun -> deviceName`, so that a launch names the kernel.
#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaRegisterFunction(
    _fatCubinHandle: *mut *mut c_void,
    hostFun: *const c_char,
    deviceFun: *mut c_char,
    deviceName: *const c_char,
    _thread_limit: c_int,
    _tid: *mut dim3,
    _bid: *mut dim3,
    _bDim: *mut dim3,
    _gDim: *mut dim3,
    _wSize: *mut c_int,
) {
    let name = [deviceName, deviceFun as *const c_char]
        .into_iter()
        .find(|p| !p.is_null())
        .map(|p| CStr::from_ptr(p).to_string_lossy().into_owned())
        .unwrap_or_else(|| "<unnamed>".to_string());
    lock(functions()).insert(hostFun as usize, name);
}

#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaRegisterVar(
    _fatCubinHandle: *mut *mut c_void,
    _hostVar: *mut c_char,
    _deviceAddress: *mut c_char,
    _deviceName: *const c_char,
    _ext: c_int,
    _size: usize,
    _constant: c_int,
    _global: c_int,
) {
}

/// `kernel<<<grid, block, shared, stream>>>`: kept for the launch stub's pop.
#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaPushCallConfiguration(
    gridDim: dim3,
    blockDim: dim3,
    sharedMem: usize,
    stream: cudaStream_t,
) -> c_uint {
    CALL_CONFIG.with(|c| c.borrow_mut().push((gridDim, blockDim, sharedMem, stream)));
    0
}

#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaPopCallConfiguration(
    gridDim: *mut dim3,
    blockDim: *mut dim3,
    sharedMem: *mut usize,
    stream: *mut c_void,
) -> cudaError_t {
    let Some((g, b, s, st)) = CALL_CONFIG.with(|c| c.borrow_mut().pop()) else {
        return rt_fail(cudaErrorMissingConfiguration);
    };
    if !gridDim.is_null() {
        *gridDim = g;
    }
    if !blockDim.is_null() {
        *blockDim = b;
    }
    if !sharedMem.is_null() {
        *sharedMem = s;
    }
    if !stream.is_null() {
        *(stream as *mut cudaStream_t) = st;
    }
    cudaSuccess
}

/// The kernel handle of a registered host stub is the stub's address (a lookup: nothing
/// runs); the launch that follows fails naming the kernel.
#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaGetKernel(
    kernel: *mut *mut c_void,
    func: *const c_void,
) -> cudaError_t {
    if kernel.is_null() {
        return rt_fail(cudaErrorInvalidValue);
    }
    if registered_kernel(func).is_none() {
        report_once(format!(
            "__cudaGetKernel: no kernel was registered for host address {func:p}"
        ));
        return rt_fail(cudaErrorInvalidDeviceFunction);
    }
    *kernel = func as *mut c_void;
    cudaSuccess
}

#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaLaunchKernel_ptsz(
    kernel: *mut c_void,
    _gridDim: dim3,
    _blockDim: dim3,
    _args: *mut *mut c_void,
    _sharedMem: usize,
    _stream: cudaStream_t,
) -> cudaError_t {
    rt_launch("__cudaLaunchKernel_ptsz", kernel)
}

#[no_mangle]
pub unsafe extern "C" fn rdemu___cudaLaunchKernel(
    kernel: *mut c_void,
    _gridDim: dim3,
    _blockDim: dim3,
    _args: *mut *mut c_void,
    _sharedMem: usize,
    _stream: cudaStream_t,
) -> cudaError_t {
    rt_launch("__cudaLaunchKernel", kernel)
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaLaunchKernel(
    func: *const c_void,
    _gridDim: dim3,
    _blockDim: dim3,
    _args: *mut *mut c_void,
    _sharedMem: usize,
    _stream: cudaStream_t,
) -> cudaError_t {
    rt_launch("cudaLaunchKernel", func)
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaFuncGetAttributes(
    _attr: *mut c_void,
    func: *const c_void,
) -> cudaError_t {
    rt_launch("cudaFuncGetAttributes", func)
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaFuncSetAttribute(
    func: *const c_void,
    _attr: c_int,
    _value: c_int,
) -> cudaError_t {
    rt_launch("cudaFuncSetAttribute", func)
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    numBlocks: *mut c_int,
    func: *const c_void,
    _blockSize: c_int,
    _dynamicSMemSize: usize,
    _flags: c_uint,
) -> cudaError_t {
    if !numBlocks.is_null() {
        *numBlocks = 0;
    }
    rt_launch(
        "cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags",
        func,
    )
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaMalloc(devPtr: *mut *mut c_void, _size: usize) -> cudaError_t {
    if !devPtr.is_null() {
        *devPtr = std::ptr::null_mut();
    }
    rt_unsupported("cudaMalloc")
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaMallocAsync_ptsz(
    devPtr: *mut *mut c_void,
    _size: usize,
    _hStream: cudaStream_t,
) -> cudaError_t {
    if !devPtr.is_null() {
        *devPtr = std::ptr::null_mut();
    }
    rt_unsupported("cudaMallocAsync")
}

/// `cudaFree(NULL)` succeeds (it is how code initialises the runtime); nothing else can have
/// come from `cudaMalloc`.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaFree(devPtr: *mut c_void) -> cudaError_t {
    if devPtr.is_null() {
        return cudaSuccess;
    }
    rt_unsupported("cudaFree")
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaFreeAsync_ptsz(
    devPtr: *mut c_void,
    _hStream: cudaStream_t,
) -> cudaError_t {
    if devPtr.is_null() {
        return cudaSuccess;
    }
    rt_unsupported("cudaFreeAsync")
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaMemsetAsync_ptsz(
    _devPtr: *mut c_void,
    _value: c_int,
    _count: usize,
    _stream: cudaStream_t,
) -> cudaError_t {
    rt_unsupported("cudaMemsetAsync")
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaStreamSynchronize_ptsz(_stream: cudaStream_t) -> cudaError_t {
    rt_unsupported("cudaStreamSynchronize")
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaDeviceGetAttribute(
    _value: *mut c_int,
    attr: c_int,
    _device: c_int,
) -> cudaError_t {
    rt_unsupported(&format!("cudaDeviceGetAttribute (attribute {attr})"))
}

/// The emulated devices, as the driver counts them.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaGetDeviceCount(count: *mut c_int) -> cudaError_t {
    if count.is_null() {
        return rt_fail(cudaErrorInvalidValue);
    }
    let n = crate::context::device_count();
    *count = c_int::try_from(n).unwrap_or(c_int::MAX);
    if n == 0 {
        return rt_fail(cudaErrorNoDevice);
    }
    cudaSuccess
}

/// This thread's `cudaSetDevice` choice, else the device of its current driver context, else 0.
#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaGetDevice(device: *mut c_int) -> cudaError_t {
    if device.is_null() {
        return rt_fail(cudaErrorInvalidValue);
    }
    let d = RT_DEVICE.with(Cell::get).unwrap_or_else(|| {
        crate::context::current_device()
            .and_then(|d| c_int::try_from(d).ok())
            .unwrap_or(0)
    });
    *device = d;
    cudaSuccess
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaSetDevice(device: c_int) -> cudaError_t {
    match crate::context::check_device(i64::from(device)) {
        Ok(_) => {
            RT_DEVICE.with(|d| d.set(Some(device)));
            cudaSuccess
        }
        Err(_) => rt_fail(cudaErrorInvalidDevice),
    }
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaGetLastError() -> cudaError_t {
    LAST_ERROR.with(|e| e.replace(cudaSuccess))
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaPeekAtLastError() -> cudaError_t {
    LAST_ERROR.with(Cell::get)
}

/// `(name, description)` of the runtime codes this module returns.
fn rt_describe(code: cudaError_t) -> (&'static CStr, &'static CStr) {
    match code {
        cudaSuccess => (c"cudaSuccess", c"no error"),
        cudaErrorInvalidValue => (c"cudaErrorInvalidValue", c"invalid argument"),
        2 => (c"cudaErrorMemoryAllocation", c"out of memory"),
        3 => (c"cudaErrorInitializationError", c"initialization error"),
        cudaErrorMissingConfiguration => (
            c"cudaErrorMissingConfiguration",
            c"__global__ function call is not configured",
        ),
        cudaErrorInvalidDeviceFunction => (
            c"cudaErrorInvalidDeviceFunction",
            c"invalid device function",
        ),
        cudaErrorNoDevice => (c"cudaErrorNoDevice", c"no CUDA-capable device is detected"),
        cudaErrorInvalidDevice => (c"cudaErrorInvalidDevice", c"invalid device ordinal"),
        cudaErrorNotSupported => (c"cudaErrorNotSupported", c"operation not supported"),
        999 => (c"cudaErrorUnknown", c"unknown error"),
        _ => (c"cudaErrorUnknown", c"unrecognized error code"),
    }
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaGetErrorName(error: cudaError_t) -> *const c_char {
    rt_describe(error).0.as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cudaGetErrorString(error: cudaError_t) -> *const c_char {
    rt_describe(error).1.as_ptr()
}

// ---------------------------------------------------------------------------------------------
// cuBLAS

/// `cublasStatus_t`.
pub type cublasStatus_t = c_int;
pub const CUBLAS_STATUS_SUCCESS: cublasStatus_t = 0;
pub const CUBLAS_STATUS_NOT_INITIALIZED: cublasStatus_t = 1;
pub const CUBLAS_STATUS_INVALID_VALUE: cublasStatus_t = 7;
pub const CUBLAS_STATUS_NOT_SUPPORTED: cublasStatus_t = 15;

/// What a `cublasHandle_t` points to.
#[derive(Debug)]
pub struct CublasHandle {
    /// The stream of `cublasSetStream_v2` (null: the default stream).
    pub stream: cudaStream_t,
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasCreate_v2(handle: *mut *mut CublasHandle) -> cublasStatus_t {
    if handle.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    *handle = Box::into_raw(Box::new(CublasHandle {
        stream: std::ptr::null_mut(),
    }));
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasDestroy_v2(handle: *mut CublasHandle) -> cublasStatus_t {
    if handle.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    drop(Box::from_raw(handle));
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasSetStream_v2(
    handle: *mut CublasHandle,
    streamId: cudaStream_t,
) -> cublasStatus_t {
    if handle.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    (*handle).stream = streamId;
    CUBLAS_STATUS_SUCCESS
}

fn cublas_unsupported(call: &str) -> cublasStatus_t {
    report_once(format!(
        "{call}: candle's autograd matmul (cuBLAS) is not emulated; use the explicit engine \
         (cuBLASLt), which the emulator runs"
    ));
    CUBLAS_STATUS_NOT_SUPPORTED
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasDgemmStridedBatched(
    _handle: *mut CublasHandle,
    _transa: c_int,
    _transb: c_int,
    _m: c_int,
    _n: c_int,
    _k: c_int,
    _alpha: *const f64,
    _A: *const f64,
    _lda: c_int,
    _strideA: i64,
    _B: *const f64,
    _ldb: c_int,
    _strideB: i64,
    _beta: *const f64,
    _C: *mut f64,
    _ldc: c_int,
    _strideC: i64,
    _batchCount: c_int,
) -> cublasStatus_t {
    cublas_unsupported("cublasDgemmStridedBatched")
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_cublasGemmStridedBatchedEx(
    _handle: *mut CublasHandle,
    _transa: c_int,
    _transb: c_int,
    _m: c_int,
    _n: c_int,
    _k: c_int,
    _alpha: *const c_void,
    _A: *const c_void,
    _Atype: c_int,
    _lda: c_int,
    _strideA: i64,
    _B: *const c_void,
    _Btype: c_int,
    _ldb: c_int,
    _strideB: i64,
    _beta: *const c_void,
    _C: *mut c_void,
    _Ctype: c_int,
    _ldc: c_int,
    _strideC: i64,
    _batchCount: c_int,
    _computeType: c_int,
    _algo: c_int,
) -> cublasStatus_t {
    cublas_unsupported("cublasGemmStridedBatchedEx")
}

// ---------------------------------------------------------------------------------------------
// cuRAND

/// `curandStatus_t`.
pub type curandStatus_t = c_int;
pub const CURAND_STATUS_SUCCESS: curandStatus_t = 0;
pub const CURAND_STATUS_NOT_INITIALIZED: curandStatus_t = 101;
/// "GPU does not support requested feature": the emulated device generates nothing.
pub const CURAND_STATUS_ARCH_MISMATCH: curandStatus_t = 204;

/// What a `curandGenerator_t` points to.
#[derive(Debug)]
pub struct CurandGenerator {
    pub rng_type: c_int,
    pub seed: c_ulonglong,
    pub stream: cudaStream_t,
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_curandCreateGenerator(
    generator: *mut *mut CurandGenerator,
    rng_type: c_int,
) -> curandStatus_t {
    if generator.is_null() {
        return CURAND_STATUS_NOT_INITIALIZED;
    }
    *generator = Box::into_raw(Box::new(CurandGenerator {
        rng_type,
        seed: 0,
        stream: std::ptr::null_mut(),
    }));
    CURAND_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_curandDestroyGenerator(
    generator: *mut CurandGenerator,
) -> curandStatus_t {
    if generator.is_null() {
        return CURAND_STATUS_NOT_INITIALIZED;
    }
    drop(Box::from_raw(generator));
    CURAND_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_curandSetPseudoRandomGeneratorSeed(
    generator: *mut CurandGenerator,
    seed: c_ulonglong,
) -> curandStatus_t {
    if generator.is_null() {
        return CURAND_STATUS_NOT_INITIALIZED;
    }
    (*generator).seed = seed;
    CURAND_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_curandSetStream(
    generator: *mut CurandGenerator,
    stream: cudaStream_t,
) -> curandStatus_t {
    if generator.is_null() {
        return CURAND_STATUS_NOT_INITIALIZED;
    }
    (*generator).stream = stream;
    CURAND_STATUS_SUCCESS
}

fn curand_unsupported(generator: *mut CurandGenerator, call: &str) -> curandStatus_t {
    if generator.is_null() {
        return CURAND_STATUS_NOT_INITIALIZED;
    }
    report_once(format!(
        "{call}: candle's device random numbers (cuRAND) are not emulated \
         (CURAND_STATUS_ARCH_MISMATCH); the explicit engine must not draw them on the device"
    ));
    CURAND_STATUS_ARCH_MISMATCH
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_curandGenerateUniform(
    generator: *mut CurandGenerator,
    _outputPtr: *mut f32,
    _num: usize,
) -> curandStatus_t {
    curand_unsupported(generator, "curandGenerateUniform")
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_curandGenerateUniformDouble(
    generator: *mut CurandGenerator,
    _outputPtr: *mut f64,
    _num: usize,
) -> curandStatus_t {
    curand_unsupported(generator, "curandGenerateUniformDouble")
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_curandGenerateNormal(
    generator: *mut CurandGenerator,
    _outputPtr: *mut f32,
    _n: usize,
    _mean: f32,
    _stddev: f32,
) -> curandStatus_t {
    curand_unsupported(generator, "curandGenerateNormal")
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_curandGenerateNormalDouble(
    generator: *mut CurandGenerator,
    _outputPtr: *mut f64,
    _n: usize,
    _mean: f64,
    _stddev: f64,
) -> curandStatus_t {
    curand_unsupported(generator, "curandGenerateNormalDouble")
}

// ---------------------------------------------------------------------------------------------
// NVRTC

/// `nvrtcResult`.
pub type nvrtcResult = c_int;

/// NVRTC 13.0, as the toolchain rdrop builds with.
#[no_mangle]
pub unsafe extern "C" fn rdemu_nvrtcVersion(major: *mut c_int, minor: *mut c_int) -> nvrtcResult {
    if major.is_null() || minor.is_null() {
        return 3; // NVRTC_ERROR_INVALID_INPUT
    }
    *major = 13;
    *minor = 0;
    0
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_nvrtcGetErrorString(result: nvrtcResult) -> *const c_char {
    const NAMES: [&CStr; 18] = [
        c"NVRTC_SUCCESS",
        c"NVRTC_ERROR_OUT_OF_MEMORY",
        c"NVRTC_ERROR_PROGRAM_CREATION_FAILURE",
        c"NVRTC_ERROR_INVALID_INPUT",
        c"NVRTC_ERROR_INVALID_PROGRAM",
        c"NVRTC_ERROR_INVALID_OPTION",
        c"NVRTC_ERROR_COMPILATION",
        c"NVRTC_ERROR_BUILTIN_OPERATION_FAILURE",
        c"NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION",
        c"NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION",
        c"NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID",
        c"NVRTC_ERROR_INTERNAL_ERROR",
        c"NVRTC_ERROR_TIME_FILE_WRITE_FAILED",
        c"NVRTC_ERROR_NO_PCH_CREATE_ATTEMPTED",
        c"NVRTC_ERROR_PCH_CREATE_HEAP_EXHAUSTED",
        c"NVRTC_ERROR_PCH_CREATE",
        c"NVRTC_ERROR_CANCELLED",
        c"NVRTC_ERROR_TIME_TRACE_FILE_WRITE_FAILED",
    ];
    usize::try_from(result)
        .ok()
        .and_then(|i| NAMES.get(i))
        .unwrap_or(&c"NVRTC_ERROR unknown")
        .as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn host_stub() {}

    #[test]
    fn registration_names_the_launch_and_sets_the_last_error() {
        unsafe {
            let h = rdemu___cudaRegisterFatBinary(std::ptr::null_mut());
            assert!(!h.is_null());
            let f = host_stub as extern "C" fn() as *const c_char;
            rdemu___cudaRegisterFunction(
                h,
                f,
                c"_Z6kernelv".as_ptr() as *mut c_char,
                c"_Z6kernelv".as_ptr(),
                -1,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            rdemu___cudaRegisterFatBinaryEnd(h);
            let g = dim3 { x: 2, y: 1, z: 1 };
            assert_eq!(
                rdemu___cudaPushCallConfiguration(g, g, 0, std::ptr::null_mut()),
                0
            );
            let (mut gg, mut bb, mut s, mut st) = (
                dim3::default(),
                dim3::default(),
                7usize,
                std::ptr::null_mut::<c_void>(),
            );
            assert_eq!(
                rdemu___cudaPopCallConfiguration(
                    &mut gg,
                    &mut bb,
                    &mut s,
                    (&mut st as *mut cudaStream_t).cast()
                ),
                cudaSuccess
            );
            assert_eq!((gg.x, bb.x, s), (2, 2, 0));
            let mut k = std::ptr::null_mut();
            assert_eq!(rdemu___cudaGetKernel(&mut k, f.cast()), cudaSuccess);
            assert_eq!(registered_kernel(k).as_deref(), Some("_Z6kernelv"));
            let r = rdemu___cudaLaunchKernel_ptsz(k, g, g, std::ptr::null_mut(), 0, st);
            assert_eq!(r, cudaErrorNotSupported);
            assert_eq!(rdemu_cudaPeekAtLastError(), cudaErrorNotSupported);
            assert_eq!(rdemu_cudaGetLastError(), cudaErrorNotSupported);
            assert_eq!(rdemu_cudaGetLastError(), cudaSuccess);
            let name = CStr::from_ptr(rdemu_cudaGetErrorName(cudaErrorNotSupported));
            assert_eq!(name.to_str().unwrap(), "cudaErrorNotSupported");
            rdemu___cudaUnregisterFatBinary(h);
        }
    }

    #[test]
    fn cublas_and_curand_handles_live_and_compute_nothing() {
        unsafe {
            let mut h = std::ptr::null_mut();
            assert_eq!(rdemu_cublasCreate_v2(&mut h), CUBLAS_STATUS_SUCCESS);
            assert_eq!(
                rdemu_cublasSetStream_v2(h, std::ptr::null_mut()),
                CUBLAS_STATUS_SUCCESS
            );
            let p = std::ptr::null();
            let r = rdemu_cublasGemmStridedBatchedEx(
                h,
                0,
                0,
                1,
                1,
                1,
                p,
                p,
                0,
                1,
                1,
                p,
                0,
                1,
                1,
                p,
                std::ptr::null_mut(),
                0,
                1,
                1,
                1,
                0,
                0,
            );
            assert_eq!(r, CUBLAS_STATUS_NOT_SUPPORTED);
            assert_eq!(rdemu_cublasDestroy_v2(h), CUBLAS_STATUS_SUCCESS);

            let mut g = std::ptr::null_mut();
            assert_eq!(
                rdemu_curandCreateGenerator(&mut g, 100),
                CURAND_STATUS_SUCCESS
            );
            assert_eq!(
                rdemu_curandSetPseudoRandomGeneratorSeed(g, 42),
                CURAND_STATUS_SUCCESS
            );
            let r = rdemu_curandGenerateNormal(g, std::ptr::null_mut(), 4, 0.0, 1.0);
            assert_eq!(r, CURAND_STATUS_ARCH_MISMATCH);
            assert_eq!(rdemu_curandDestroyGenerator(g), CURAND_STATUS_SUCCESS);
        }
    }
}
