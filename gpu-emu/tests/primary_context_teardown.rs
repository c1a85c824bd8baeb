//! Work still queued on a stream when the primary context is released to zero must not run in
//! the context's next activation: the release waits for it. CI once saw the other order under
//! load (a test's slices freed with `cuMemFreeAsync`, the context released, the next test
//! retaining it again, then the queued free running: "already freed", a sticky error in the
//! next test). Its own process: nothing else may hold the primary context.
#![allow(unsafe_code)]

mod common;

use std::ffi::c_void;

use common::*;
use rdrop_gpu_emu::driver::*;

unsafe extern "C" fn slow(_: *mut c_void) {
    std::thread::sleep(std::time::Duration::from_millis(300));
}

#[test]
fn a_release_waits_for_queued_frees_before_the_next_activation() {
    // SAFETY: plain driver calls with valid out-pointers and a host function without data.
    unsafe {
        ok(cuInit(0), "cuInit");
        let mut c = std::ptr::null_mut();
        ok(cuDevicePrimaryCtxRetain(&mut c, 0), "retain");
        ok(cuCtxSetCurrent(c), "current");
        let mut s = std::ptr::null_mut();
        ok(cuStreamCreate(&mut s, 1), "stream");
        let mut p = 0u64;
        ok(cuMemAllocAsync(&mut p, 920, s), "alloc");
        // the stream is busy when the free is queued, and still when the context goes
        ok(
            cuLaunchHostFunc(s, Some(slow), std::ptr::null_mut()),
            "host fn",
        );
        ok(cuMemFreeAsync(p, s), "free");
        ok(cuStreamDestroy_v2(s), "destroy stream");
        ok(cuDevicePrimaryCtxRelease_v2(0), "release to zero");
        ok(cuDevicePrimaryCtxRetain(&mut c, 0), "retain again");
        ok(cuCtxSetCurrent(c), "current again");
        std::thread::sleep(std::time::Duration::from_millis(500));
        let q = alloc(&[7u8; 64]);
        assert_eq!(download::<u8>(q, 64), vec![7u8; 64]);
        ok(cuCtxSynchronize(), "the new activation has no sticky error");
    }
}
