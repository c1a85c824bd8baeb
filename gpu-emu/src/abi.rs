//! The C ABI between the emulator and the kernel modules compiled for the host
//! (`shim/rdemu_api.h`): the runtime the kernels call back into ([`Api`], implemented by
//! [`crate::launch`]), the tables a module exports ([`Module`], [`Kernel`], [`Param`]), and
//! their Rust view ([`HostKernel`], read by [`crate::module`], launched by [`crate::launch`]).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

#[repr(C)]
pub struct Api {
    pub version: u32,
    pub thread_idx: extern "C" fn() -> Dim3,
    pub block_idx: extern "C" fn() -> Dim3,
    pub block_dim: extern "C" fn() -> Dim3,
    pub grid_dim: extern "C" fn() -> Dim3,
    pub syncthreads: extern "C" fn(),
    pub syncwarp: extern "C" fn(u32),
    pub shfl: extern "C" fn(i32, u32, u64, i32, i32, i32) -> u64,
    pub vote: extern "C" fn(i32, u32, i32) -> u32,
    pub check: extern "C" fn(*const c_void, usize, i32),
    pub unsupported: extern "C" fn(*const c_char),
    pub threadfence: extern "C" fn(),
}

#[repr(C)]
pub struct Param {
    pub decl: *const c_char,
    pub size: u32,
    pub is_pointer: u32,
}

#[repr(C)]
pub struct Kernel {
    pub name: *const c_char,
    pub nparams: u32,
    pub params: *const Param,
    pub pack: extern "C" fn(*const *const c_void) -> *mut c_void,
    pub pack_free: extern "C" fn(*mut c_void),
    pub run: extern "C" fn(*const c_void),
}

#[repr(C)]
pub struct Module {
    pub version: u32,
    pub source: *const c_char,
    pub arch: u32,
    pub nkernels: u32,
    pub kernels: *const Kernel,
    pub shared_range: extern "C" fn(*mut *mut c_void, *mut usize),
}

pub const ABI_VERSION: u32 = 1;

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kernel")
    }
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Module")
    }
}

// SAFETY: the tables are static, immutable data of a loaded module (never unloaded), and
// their functions may be called from any thread.
unsafe impl Sync for Param {}
// SAFETY: as above.
unsafe impl Send for Param {}
// SAFETY: as above.
unsafe impl Sync for Kernel {}
// SAFETY: as above.
unsafe impl Send for Kernel {}
// SAFETY: as above.
unsafe impl Sync for Module {}
// SAFETY: as above.
unsafe impl Send for Module {}

/// One parameter of a host kernel.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Its declaration in the source.
    pub decl: String,
    /// Bytes.
    pub size: usize,
    /// Whether it is a pointer.
    pub is_pointer: bool,
}

/// A host-compiled kernel.
#[derive(Debug, Clone)]
pub struct HostKernel {
    /// Its `extern "C"` name.
    pub name: String,
    /// The `.cu` file.
    pub source: String,
    /// Parameters in order.
    pub params: Vec<ParamInfo>,
    /// The entry (pointers into the loaded module, valid for the process).
    pub entry: &'static Kernel,
    /// The module it belongs to (index into the loaded libraries).
    pub lib: usize,
    /// That module's table (its shared memory range).
    pub module: &'static Module,
}
