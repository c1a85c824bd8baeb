//! The emulated driver end to end on rdrop's host-compiled kernels: copies, launches,
//! barriers and shared memory, shuffles, streams and events (one context for the process;
//! the failing launches are in `driver_faults.rs`, which runs in its own process).
#![allow(unsafe_code)]

mod common;

use std::ffi::c_void;

use common::*;
use rdrop_gpu_emu::driver::*;

#[test]
fn casts_round_as_cuda_and_copies_come_back() {
    context(0);
    let m = module(&["cast_f32_to_bf16", "cast_f32_to_f32"]);
    let f = function(m, "cast_f32_to_bf16");
    let n = 1000usize;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.3131 + 1e-3).collect();
    let dx = alloc(&x);
    let dy = alloc(&vec![0u16; n]);
    let (mut a0, mut a1, mut a2) = (dy, dx, n as i32);
    let code = launch(
        f,
        n.div_ceil(256) as u32,
        256,
        std::ptr::null_mut(),
        &mut [&mut a0, &mut a1, &mut a2],
    );
    assert_eq!(code, 0);
    let got: Vec<u16> = download(dy, n);
    for i in 0..n {
        assert_eq!(got[i], half::bf16::from_f32(x[i]).to_bits(), "element {i}");
    }
}

#[test]
fn block_sums_use_shared_memory_and_barriers() {
    context(0);
    let m = module(&["sum_squares_partials", "sum_squares_finish"]);
    let (fp, ff) = (
        function(m, "sum_squares_partials"),
        function(m, "sum_squares_finish"),
    );
    let n = 5000usize;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    let blocks = 16u32;
    let dx = alloc(&x);
    let dpart = alloc(&vec![0f64; blocks as usize]);
    let dout = alloc(&[0f64]);
    let (mut p0, mut p1, mut p2) = (dpart, dx, n as i32);
    assert_eq!(
        launch(
            fp,
            blocks,
            256,
            std::ptr::null_mut(),
            &mut [&mut p0, &mut p1, &mut p2]
        ),
        0
    );
    let (mut q0, mut q1, mut q2, mut q3) = (dout, dpart, blocks as i32, 0i32);
    assert_eq!(
        launch(
            ff,
            1,
            32,
            std::ptr::null_mut(),
            &mut [&mut q0, &mut q1, &mut q2, &mut q3]
        ),
        0
    );
    let got: Vec<f64> = download(dout, 1);
    let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    assert!((got[0] - want).abs() <= 1e-9 * want, "{} vs {want}", got[0]);
}

#[test]
fn an_event_orders_two_streams_under_delays() {
    context(0);
    // SAFETY: driver calls with valid handles and out-pointers.
    unsafe {
        let (mut s1, mut s2, mut ev) = (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        ok(cuStreamCreate(&mut s1, 1), "stream");
        ok(cuStreamCreate(&mut s2, 1), "stream");
        ok(cuEventCreate(&mut ev, 2), "event");
        let n = 1 << 16;
        let d = alloc(&vec![0u8; n]);
        let host = vec![7u8; n];
        let mut back = vec![0u8; n];
        for round in 0..5u8 {
            let v = vec![round; n];
            ok(
                cuMemcpyHtoDAsync_v2(d, v.as_ptr() as *const c_void, n, s1),
                "htod",
            );
            ok(cuEventRecord(ev, s1), "record");
            ok(cuStreamWaitEvent(s2, ev, 0), "wait");
            ok(
                cuMemcpyDtoHAsync_v2(back.as_mut_ptr() as *mut c_void, d, n, s2),
                "dtoh",
            );
            ok(cuStreamSynchronize(s2), "sync");
            assert!(back.iter().all(|&b| b == round), "round {round}");
        }
        drop(host);
        ok(cuStreamDestroy_v2(s1), "destroy");
        ok(cuStreamDestroy_v2(s2), "destroy");
    }
}
