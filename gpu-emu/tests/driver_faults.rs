//! What the emulated driver refuses or reports, each case in a context of its own (an illegal
//! access is sticky for its context, as on a GPU): launch limits, memcheck of kernel accesses
//! (past the end, a host pointer, freed memory), and warp masks naming lanes that do not exist.
#![allow(unsafe_code)]

mod common;

use std::ffi::c_void;

use common::*;
use rdrop_gpu_emu::driver::*;
use rdrop_gpu_emu::error::{CUDA_ERROR_ILLEGAL_ADDRESS, CUDA_ERROR_INVALID_VALUE};

/// A fresh (non-primary) context on device 0, made current on this thread.
fn own_context() -> u64 {
    context(0);
    let mut c = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    ok(unsafe { cuCtxCreate_v2(&mut c, 0, 0) }, "cuCtxCreate");
    rdrop_gpu_emu::context::id_of(c as u64).unwrap()
}

/// The context's sticky error message after a synchronise that must fail with `code`.
fn sticky(ctx: u64, code: i32) -> String {
    // SAFETY: a plain driver call.
    let rc = unsafe { cuCtxSynchronize() };
    assert_eq!(rc, code, "cuCtxSynchronize");
    rdrop_gpu_emu::context::get(ctx)
        .unwrap()
        .sticky
        .expect("a sticky error")
        .message
}

fn cast_launch(f: *mut c_void, out: u64, x: u64, n: i32, grid: u32, block: u32) -> i32 {
    let (mut a0, mut a1, mut a2) = (out, x, n);
    launch(
        f,
        grid,
        block,
        std::ptr::null_mut(),
        &mut [&mut a0, &mut a1, &mut a2],
    )
}

#[test]
fn launches_beyond_the_h100_limits_are_refused() {
    own_context();
    let f = function(module(&["cast_f32_to_f32"]), "cast_f32_to_f32");
    let x = alloc(&[0f32; 64]);
    assert_eq!(cast_launch(f, x, x, 64, 1, 1025), CUDA_ERROR_INVALID_VALUE);
    assert_eq!(cast_launch(f, x, x, 64, 0, 32), CUDA_ERROR_INVALID_VALUE);
    let mut ptrs: Vec<*mut c_void> = Vec::new();
    // SAFETY: the launch is refused before the (absent) arguments are read.
    let rc = unsafe {
        cuLaunchKernel(
            f,
            1,
            65_536,
            1,
            32,
            1,
            1,
            0,
            std::ptr::null_mut(),
            ptrs.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, CUDA_ERROR_INVALID_VALUE, "grid y > 65535");
    // SAFETY: as above.
    let rc = unsafe {
        cuLaunchKernel(
            f,
            1,
            1,
            1,
            8,
            8,
            65,
            0,
            std::ptr::null_mut(),
            ptrs.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, CUDA_ERROR_INVALID_VALUE, "block z > 64");
    // dynamic shared memory past 48 KiB without the function attribute
    // SAFETY: as above.
    let rc = unsafe {
        cuLaunchKernel(
            f,
            1,
            1,
            1,
            32,
            1,
            1,
            64 << 10,
            std::ptr::null_mut(),
            ptrs.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(
        rc, CUDA_ERROR_INVALID_VALUE,
        "64 KiB of dynamic shared memory"
    );
}

#[test]
fn a_read_past_the_end_names_kernel_argument_and_offset() {
    let ctx = own_context();
    let f = function(module(&["cast_f32_to_f32"]), "cast_f32_to_f32");
    let x = alloc(&[1f32; 100]);
    let out = alloc(&[0f32; 101]);
    // n = 101 elements of a 100-element x: thread 100 reads one past its end
    assert_eq!(cast_launch(f, out, x, 101, 1, 128), 0);
    let msg = sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS);
    for part in [
        "cast_f32_to_f32",
        "thread (100,0,0)",
        "`const float* x`",
        "+ 400 bytes",
        "past the end",
    ] {
        assert!(msg.contains(part), "{part} not in: {msg}");
    }
}

#[test]
fn a_host_pointer_and_freed_memory_are_illegal() {
    let ctx = own_context();
    let f = function(module(&["cast_f32_to_f32"]), "cast_f32_to_f32");
    let host: Box<[f32]> = Box::new([0f32; 32]);
    let out = alloc(&[0f32; 32]);
    assert_eq!(cast_launch(f, out, host.as_ptr() as u64, 32, 1, 32), 0);
    let msg = sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS);
    assert!(msg.contains("not device memory"), "{msg}");

    let ctx = own_context();
    let f = function(module(&["cast_f32_to_f32"]), "cast_f32_to_f32");
    let x = alloc(&[0f32; 32]);
    let out = alloc(&[0f32; 32]);
    // SAFETY: frees an allocation made above.
    ok(unsafe { cuMemFree_v2(x) }, "free");
    assert_eq!(cast_launch(f, out, x, 32, 1, 32), 0);
    let msg = sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS);
    assert!(msg.contains("freed by cuMemFree"), "{msg}");
}

#[test]
fn a_full_mask_shuffle_in_a_partial_warp_is_reported() {
    let ctx = own_context();
    let f = function(module(&["sum_squares_finish"]), "sum_squares_finish");
    let part = alloc(&[1f64; 16]);
    let out = alloc(&[0f64]);
    // warp_sum64 shuffles with mask 0xffffffff: a block of 16 threads has no lanes 16..31
    let (mut a0, mut a1, mut a2, mut a3) = (out, part, 16i32, 0i32);
    assert_eq!(
        launch(
            f,
            1,
            16,
            std::ptr::null_mut(),
            &mut [&mut a0, &mut a1, &mut a2, &mut a3]
        ),
        0
    );
    let msg = sticky(ctx, rdrop_gpu_emu::error::CUDA_ERROR_LAUNCH_FAILED);
    assert!(
        msg.contains("__shfl_xor_sync") && msg.contains("do not exist"),
        "{msg}"
    );
}
