//! The emulated machine as the environment describes it (its own process: the configuration is
//! read once): two V100-16GB devices whose second is overridden to an A100's capability and
//! 40 GiB; names, capabilities, memory and attributes as the driver reports them; allocations
//! past a device's memory fail as the driver's do; a pointer of one device is illegal on the
//! other.
#![allow(unsafe_code)]

mod common;

use std::ffi::{c_char, CStr};

use common::*;
use rdrop_gpu_emu::driver::*;
use rdrop_gpu_emu::error::{CUDA_ERROR_ILLEGAL_ADDRESS, CUDA_ERROR_OUT_OF_MEMORY};

#[test]
fn devices_follow_the_environment() {
    std::env::set_var("RDROP_EMU_GPU", "v100-16");
    std::env::set_var("RDROP_EMU_DEVICES", "2");
    std::env::set_var("RDROP_EMU_DEVICE1_CC", "8.0");
    std::env::set_var("RDROP_EMU_DEVICE1_MEMORY", "40GiB");
    // SAFETY: plain driver calls with valid out-pointers.
    unsafe {
        ok(cuInit(0), "cuInit");
        let mut n = 0;
        ok(cuDeviceGetCount(&mut n), "count");
        assert_eq!(n, 2);
        let mut name = [0 as c_char; 64];
        ok(cuDeviceGetName(name.as_mut_ptr(), 64, 0), "name");
        assert_eq!(
            CStr::from_ptr(name.as_ptr()).to_str().unwrap(),
            "Tesla V100-SXM2-16GB"
        );
        let (mut maj, mut min) = (0, 0);
        ok(cuDeviceGetAttribute(&mut maj, 75, 0), "major");
        ok(cuDeviceGetAttribute(&mut min, 76, 0), "minor");
        assert_eq!((maj, min), (7, 0));
        ok(cuDeviceGetAttribute(&mut maj, 75, 1), "major");
        assert_eq!(maj, 8);
        let mut bytes = 0usize;
        ok(cuDeviceTotalMem_v2(&mut bytes, 0), "memory");
        assert_eq!(bytes, 16_384 << 20);
        ok(cuDeviceTotalMem_v2(&mut bytes, 1), "memory");
        assert_eq!(bytes, 40 << 30);
        let mut threads = 0;
        ok(cuDeviceGetAttribute(&mut threads, 1, 0), "threads");
        assert_eq!(threads, 1024);

        // device 0: free memory as cuMemGetInfo reports it, and an allocation beyond it
        let mut c0 = std::ptr::null_mut();
        ok(cuDevicePrimaryCtxRetain(&mut c0, 0), "retain");
        ok(cuCtxSetCurrent(c0), "current");
        let (mut free, mut total) = (0usize, 0usize);
        ok(cuMemGetInfo_v2(&mut free, &mut total), "info");
        assert_eq!(total, 16_384 << 20);
        assert!(
            free < total && free > total - (1 << 30),
            "{free} of {total}"
        );
        let mut p = 0u64;
        assert_eq!(cuMemAlloc_v2(&mut p, free + 4096), CUDA_ERROR_OUT_OF_MEMORY);
        // a kernel on device 1 given device 0's memory
        let x0 = alloc(&[1f32; 32]);
        let mut c1 = std::ptr::null_mut();
        ok(cuDevicePrimaryCtxRetain(&mut c1, 1), "retain 1");
        ok(cuCtxSetCurrent(c1), "current 1");
        let f = function(module(&["cast_f32_to_f32"]), "cast_f32_to_f32");
        let out = alloc(&[0f32; 32]);
        let (mut a0, mut a1, mut a2) = (out, x0, 32i32);
        let rc = launch(
            f,
            1,
            32,
            std::ptr::null_mut(),
            &mut [&mut a0, &mut a1, &mut a2],
        );
        assert_eq!(rc, 0);
        assert_eq!(cuCtxSynchronize(), CUDA_ERROR_ILLEGAL_ADDRESS);
        let id = rdrop_gpu_emu::context::id_of(c1 as u64).unwrap();
        let msg = rdrop_gpu_emu::context::get(id)
            .unwrap()
            .sticky
            .unwrap()
            .message;
        assert!(
            msg.contains("belongs to device 0, used on device 1"),
            "{msg}"
        );
    }
}
