//! A device's primary context released to zero is destroyed with its memory, as the driver
//! does, and NCCL then refuses to bind to it: the defect rdrop's data-parallel setup had (it
//! opened the device and dropped it right before ncclCommInitRank). Its own process: nothing
//! else may hold the primary context.
#![allow(unsafe_code)]

mod common;

use std::ffi::c_void;

use common::*;
use rdrop_gpu_emu::driver::*;

#[test]
fn a_released_primary_context_takes_its_memory_and_nccl_refuses_it() {
    // SAFETY: plain driver and NCCL calls with valid out-pointers.
    unsafe {
        ok(cuInit(0), "cuInit");
        let mut c = std::ptr::null_mut();
        ok(cuDevicePrimaryCtxRetain(&mut c, 0), "retain");
        ok(cuCtxSetCurrent(c), "current");
        let p = alloc(&[1u8; 64]);
        ok(cuDevicePrimaryCtxRetain(&mut c, 0), "retain again");
        ok(cuDevicePrimaryCtxRelease_v2(0), "release once");
        assert!(
            rdrop_gpu_emu::memory::lookup(p).is_some(),
            "freed while still retained"
        );
        ok(cuDevicePrimaryCtxRelease_v2(0), "release to zero");
        assert!(
            rdrop_gpu_emu::memory::lookup(p).is_none(),
            "memory kept after the release"
        );
        let (mut flags, mut active) = (0u32, 1i32);
        ok(
            cuDevicePrimaryCtxGetState(0, &mut flags, &mut active),
            "state",
        );
        assert_eq!(active, 0);
        // the thread's current context is still the released one: NCCL cannot bind to it
        use rdrop_gpu_emu::nccl::{ncclUniqueId, rdemu_ncclCommInitRank, rdemu_ncclGetUniqueId};
        let mut id = ncclUniqueId { internal: [0; 128] };
        assert_eq!(rdemu_ncclGetUniqueId(&mut id), 0);
        let mut comm: *mut c_void = std::ptr::null_mut();
        let rc = rdemu_ncclCommInitRank(&mut comm, 1, id, 0);
        assert_ne!(rc, 0, "ncclCommInitRank bound to a destroyed context");
        // retained again, the device works (a new, empty context)
        ok(
            cuDevicePrimaryCtxRetain(&mut c, 0),
            "retain after the release",
        );
        ok(cuCtxSetCurrent(c), "current");
        let q = alloc(&[2u8; 64]);
        assert_eq!(download::<u8>(q, 64), vec![2u8; 64]);
    }
}
