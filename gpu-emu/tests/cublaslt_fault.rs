//! The emulated cuBLASLt's failures that poison a context, in their own process: an operand
//! whose layout addresses past its allocation is a sticky `CUDA_ERROR_ILLEGAL_ADDRESS` naming the
//! operand; and the `gemm-ld` and `gemm-batch-stride` fault injections (`RDROP_EMU_MUTATE`,
//! read once per process) change the numbers.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::ptr::null_mut;

use rdrop_gpu_emu::cublaslt::*;
use rdrop_gpu_emu::error::CUDA_ERROR_ILLEGAL_ADDRESS;
use rdrop_gpu_emu::{context, lifecycle, memory, stream};

fn ok(s: cublasStatus_t, what: &str) {
    assert_eq!(s, CUBLAS_STATUS_SUCCESS, "{what}");
}

unsafe fn layout(rows: u64, cols: u64, ld: i64) -> *mut c_void {
    let mut h = null_mut();
    ok(
        rdemu_cublasLtMatrixLayoutCreate(&mut h, CUDA_R_32F, rows, cols, ld),
        "layout",
    );
    h
}

/// Makes `l` a batch of `count` matrices `stride` elements apart.
unsafe fn batch(l: *mut c_void, count: i32, stride: i64) -> *mut c_void {
    ok(
        rdemu_cublasLtMatrixLayoutSetAttribute(
            l,
            CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
            &count as *const i32 as *const c_void,
            4,
        ),
        "batch count",
    );
    ok(
        rdemu_cublasLtMatrixLayoutSetAttribute(
            l,
            CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
            &stride as *const i64 as *const c_void,
            8,
        ),
        "batch stride",
    );
    l
}

/// `nb` dense batches of D (m×n) = A (m×k) · B (k×n), f32, B's columns `ld_b` apart; returns
/// the matmul's status.
#[allow(clippy::too_many_arguments)]
unsafe fn run(
    h: *mut c_void,
    s: u64,
    (m, n, k): (usize, usize, usize),
    ld_b: usize,
    nb: i32,
    a: u64,
    b: u64,
    d: u64,
) -> cublasStatus_t {
    let mut desc = null_mut();
    ok(
        rdemu_cublasLtMatmulDescCreate(&mut desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
        "desc",
    );
    let mut l = [
        layout(m as u64, k as u64, m as i64),
        layout(k as u64, n as u64, ld_b as i64),
        layout(m as u64, n as u64, m as i64),
    ];
    if nb > 1 {
        l = [
            batch(l[0], nb, (m * k) as i64),
            batch(l[1], nb, (ld_b * n) as i64),
            batch(l[2], nb, (m * n) as i64),
        ];
    }
    let mut pref = null_mut();
    ok(rdemu_cublasLtMatmulPreferenceCreate(&mut pref), "pref");
    let align: u32 = 4;
    for attr in 5..=8 {
        ok(
            rdemu_cublasLtMatmulPreferenceSetAttribute(
                pref,
                attr,
                &align as *const u32 as *const c_void,
                4,
            ),
            "alignment",
        );
    }
    let mut r = cublasLtMatmulHeuristicResult_t::default();
    let mut count = 0;
    ok(
        rdemu_cublasLtMatmulAlgoGetHeuristic(
            h, desc, l[0], l[1], l[2], l[2], pref, 1, &mut r, &mut count,
        ),
        "heuristic",
    );
    let (alpha, beta) = (1.0f32, 0.0f32);
    rdemu_cublasLtMatmul(
        h,
        desc,
        &alpha as *const f32 as *const c_void,
        a as *const c_void,
        l[0],
        b as *const c_void,
        l[1],
        &beta as *const f32 as *const c_void,
        d as *const c_void,
        l[2],
        d as *mut c_void,
        l[2],
        &r.algo,
        null_mut(),
        0,
        s as *mut c_void,
    )
}

#[test]
fn faults_change_the_numbers_and_an_overrun_is_a_sticky_illegal_address() {
    // Read once, at the first use of the configuration: before anything else in this process.
    std::env::set_var("RDROP_EMU_MUTATE", "gemm-ld,gemm-batch-stride");
    let id = lifecycle::primary_retain(0).unwrap();
    context::set_current(id);
    let s = stream::create(false).unwrap();
    // SAFETY (all): every buffer is allocated here, with room for A read with ld + 1.
    unsafe {
        let mut h = null_mut();
        ok(rdemu_cublasLtCreate(&mut h), "create");
        let (m, n, k) = (3usize, 2usize, 4usize);
        let a = memory::alloc(0, 4096, memory::Kind::Sync).unwrap();
        let b = memory::alloc(0, 4096, memory::Kind::Sync).unwrap();
        let d = memory::alloc(0, 4096, memory::Kind::Sync).unwrap();
        for i in 0..1024 {
            *(a as *mut f32).add(i) = i as f32;
            *(b as *mut f32).add(i) = 1.0;
        }
        // D(i, j) = Σ_p A(i, p) = Σ_p (i + 3p) = 4i + 18 with the right ld; with ld + 1 it
        // reads A(i, p) at i + 4p: 4i + 24.
        ok(run(h, s, (m, n, k), k, 1, a, b, d), "matmul");
        stream::synchronize(s).unwrap();
        let got: Vec<f32> = (0..m * n).map(|i| *(d as *const f32).add(i)).collect();
        let right: Vec<f32> = (0..m * n).map(|i| (4 * (i % m) + 18) as f32).collect();
        assert_ne!(got, right, "gemm-ld changed nothing");
        assert_eq!(got[0], 24.0, "gemm-ld reads A with ld + 1");

        // Two batches of D (3×2) = A (3×1) · B (1×2): A has one column, so only the batch
        // stride fault shows. A's second matrix is elements 3..6 (values 3, 4, 5); read one
        // element early it is 2, 3, 4.
        ok(run(h, s, (m, n, 1), 1, 2, a, b, d), "batched matmul");
        stream::synchronize(s).unwrap();
        let got: Vec<f32> = (0..2 * m * n).map(|i| *(d as *const f32).add(i)).collect();
        assert_eq!(
            &got[..6],
            &[0.0, 1.0, 2.0, 0.0, 1.0, 2.0],
            "batch 0 is unaffected"
        );
        assert_eq!(
            &got[6..],
            &[2.0, 3.0, 4.0, 2.0, 3.0, 4.0],
            "gemm-batch-stride reads A's batch 1 at stride − 1"
        );

        // B's layout (ld 600, 2 columns) addresses 604 floats of a 512-float allocation.
        let small_b = memory::alloc(0, 512 * 4, memory::Kind::Sync).unwrap();
        assert_eq!(
            run(h, s, (m, n, k), 600, 1, a, small_b, d),
            CUBLAS_STATUS_SUCCESS
        );
        let e = stream::synchronize(s).unwrap_err();
        assert_eq!(e.code, CUDA_ERROR_ILLEGAL_ADDRESS, "{}", e.message);
        assert!(e.message.contains("cublasLtMatmul 3×2×4"), "{}", e.message);
        assert!(e.message.contains("operand B"), "{}", e.message);
        assert!(e.message.contains("ld 600"), "{}", e.message);
        assert!(e.message.contains("past"), "{}", e.message);
        // The context is poisoned: the next matmul cannot even be enqueued.
        assert_eq!(
            run(h, s, (m, n, k), k, 1, a, b, d),
            CUBLAS_STATUS_EXECUTION_FAILED
        );
    }
}
