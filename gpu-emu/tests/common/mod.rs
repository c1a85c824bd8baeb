//! Helpers of the driver-level tests: the emulated driver called directly (the tests link the
//! crate), a context on device 0, modules made from PTX text naming rdrop's kernels.
#![allow(dead_code, unsafe_code)]

use std::ffi::{c_void, CString};

use rdrop_gpu_emu::driver::*;

pub fn ok(code: i32, what: &str) {
    assert_eq!(code, 0, "{what} returned {code}");
}

/// cuInit + the primary context of `device`, made current.
pub fn context(device: i32) -> *mut c_void {
    // SAFETY: plain driver calls with valid out-pointers.
    unsafe {
        ok(cuInit(0), "cuInit");
        let mut ctx = std::ptr::null_mut();
        ok(cuDevicePrimaryCtxRetain(&mut ctx, device), "retain");
        ok(cuCtxSetCurrent(ctx), "set current");
        ctx
    }
}

/// A module whose PTX names `kernels` (the emulator maps them to the host-compiled ones).
pub fn module(kernels: &[&str]) -> *mut c_void {
    let mut ptx = String::from(".version 8.0\n.target sm_80\n.address_size 64\n");
    for k in kernels {
        ptx.push_str(&format!(".visible .entry {k}(\n)\n{{\n}}\n"));
    }
    let c = CString::new(ptx).unwrap();
    let mut m = std::ptr::null_mut();
    // SAFETY: a NUL-terminated PTX string.
    ok(
        unsafe { cuModuleLoadData(&mut m, c.as_ptr() as *const c_void) },
        "load",
    );
    m
}

pub fn function(m: *mut c_void, name: &str) -> *mut c_void {
    let c = CString::new(name).unwrap();
    let mut f = std::ptr::null_mut();
    // SAFETY: valid module and name.
    ok(unsafe { cuModuleGetFunction(&mut f, m, c.as_ptr()) }, name);
    f
}

pub fn alloc<T: Copy>(host: &[T]) -> u64 {
    let bytes = std::mem::size_of_val(host).max(1);
    let mut p = 0u64;
    // SAFETY: valid out pointer; then a copy of exactly `bytes` from the host slice.
    unsafe {
        ok(cuMemAlloc_v2(&mut p, bytes), "alloc");
        if !host.is_empty() {
            ok(
                cuMemcpyHtoD_v2(p, host.as_ptr() as *const c_void, bytes),
                "htod",
            );
        }
    }
    p
}

pub fn download<T: Copy + Default>(p: u64, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    // SAFETY: `n` elements into a host vector of `n`.
    ok(
        unsafe {
            cuMemcpyDtoH_v2(
                v.as_mut_ptr() as *mut c_void,
                p,
                n * std::mem::size_of::<T>(),
            )
        },
        "dtoh",
    );
    v
}

/// Launches `f` with arguments given as byte images of their values.
pub fn launch(
    f: *mut c_void,
    grid: u32,
    block: u32,
    stream: *mut c_void,
    args: &mut [&mut dyn Arg],
) -> i32 {
    let mut ptrs: Vec<*mut c_void> = args.iter_mut().map(|a| (**a).ptr()).collect();
    // SAFETY: one pointer per kernel parameter, each to a value of the parameter's type.
    unsafe {
        cuLaunchKernel(
            f,
            grid,
            1,
            1,
            block,
            1,
            1,
            0,
            stream,
            ptrs.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
}

pub trait Arg {
    fn ptr(&mut self) -> *mut c_void;
}
impl<T> Arg for T {
    fn ptr(&mut self) -> *mut c_void {
        self as *mut T as *mut c_void
    }
}
