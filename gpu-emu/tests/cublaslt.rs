//! The emulated cuBLASLt end to end, through its `rdemu_*` exports as the shell library calls
//! them: device memory, a stream, descriptors, the heuristic, matmuls checked against an f64
//! reference, and the refusals (types, alignment, layouts). The illegal-address case poisons
//! its context and lives in `cublaslt_fault.rs` (its own process).
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::OnceLock;

use half::{bf16, f16};
use rdrop_gpu_emu::cublaslt::*;
use rdrop_gpu_emu::{context, lifecycle, memory, stream};

/// Makes device 0's primary context current on this thread (retained once per process).
fn ctx() -> u64 {
    static ID: OnceLock<u64> = OnceLock::new();
    let id = *ID.get_or_init(|| lifecycle::primary_retain(0).expect("primary context"));
    context::set_current(id);
    id
}

fn ok(s: cublasStatus_t, what: &str) {
    assert_eq!(s, CUBLAS_STATUS_SUCCESS, "{what}");
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum T {
    F32,
    Bf16,
    F16,
}

impl T {
    fn cuda(self) -> i32 {
        match self {
            T::F32 => CUDA_R_32F,
            T::Bf16 => CUDA_R_16BF,
            T::F16 => CUDA_R_16F,
        }
    }
    fn size(self) -> usize {
        match self {
            T::F32 => 4,
            _ => 2,
        }
    }
    /// Stores `v` (rounded to the type) at element `i` of `base`; returns the stored value.
    unsafe fn put(self, base: u64, i: usize, v: f32) -> f64 {
        match self {
            T::F32 => {
                *(base as *mut f32).add(i) = v;
                v as f64
            }
            T::Bf16 => {
                let x = bf16::from_f32(v);
                *(base as *mut bf16).add(i) = x;
                x.to_f64()
            }
            T::F16 => {
                let x = f16::from_f32(v);
                *(base as *mut f16).add(i) = x;
                x.to_f64()
            }
        }
    }
    unsafe fn get(self, base: u64, i: usize) -> f64 {
        match self {
            T::F32 => *(base as *const f32).add(i) as f64,
            T::Bf16 => (*(base as *const bf16).add(i)).to_f64(),
            T::F16 => (*(base as *const f16).add(i)).to_f64(),
        }
    }
    fn half_ulp(self) -> f64 {
        match self {
            T::F32 => 0.0,
            T::Bf16 => 2f64.powi(-8),
            T::F16 => 2f64.powi(-11),
        }
    }
}

/// One column-major operand: (rows, cols, ld, batch stride).
#[derive(Clone, Copy, Debug)]
struct L {
    rows: usize,
    cols: usize,
    ld: usize,
    stride: usize,
}

impl L {
    fn span(&self, batch: usize) -> usize {
        (batch - 1) * self.stride + (self.rows - 1) + (self.cols - 1) * self.ld + 1
    }
}

unsafe fn layout(t: T, l: L, batch: usize) -> *mut c_void {
    let mut h = null_mut();
    ok(
        rdemu_cublasLtMatrixLayoutCreate(
            &mut h,
            t.cuda(),
            l.rows as u64,
            l.cols as u64,
            l.ld as i64,
        ),
        "layout",
    );
    if batch > 1 {
        let (count, stride) = (batch as i32, l.stride as i64);
        ok(
            rdemu_cublasLtMatrixLayoutSetAttribute(
                h,
                CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &count as *const i32 as *const c_void,
                4,
            ),
            "batch count",
        );
        ok(
            rdemu_cublasLtMatrixLayoutSetAttribute(
                h,
                CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &stride as *const i64 as *const c_void,
                8,
            ),
            "batch stride",
        );
    }
    h
}

unsafe fn set_desc_i32(desc: *mut c_void, attr: u32, v: i32) {
    ok(
        rdemu_cublasLtMatmulDescSetAttribute(desc, attr, &v as *const i32 as *const c_void, 4),
        "desc attribute",
    );
}

unsafe fn desc(compute: i32, ta: bool, tb: bool, bias: bool) -> *mut c_void {
    let mut d = null_mut();
    ok(
        rdemu_cublasLtMatmulDescCreate(&mut d, compute, CUDA_R_32F),
        "desc",
    );
    set_desc_i32(d, CUBLASLT_MATMUL_DESC_TRANSA, ta as i32);
    set_desc_i32(d, CUBLASLT_MATMUL_DESC_TRANSB, tb as i32);
    let epi: u32 = if bias {
        CUBLASLT_EPILOGUE_BIAS
    } else {
        CUBLASLT_EPILOGUE_DEFAULT
    };
    ok(
        rdemu_cublasLtMatmulDescSetAttribute(
            d,
            CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epi as *const u32 as *const c_void,
            4,
        ),
        "epilogue",
    );
    d
}

/// A preference with 32 MiB of workspace and these alignments (A, B, C, D).
unsafe fn pref(align: [u32; 4]) -> *mut c_void {
    let mut p = null_mut();
    ok(rdemu_cublasLtMatmulPreferenceCreate(&mut p), "pref");
    let ws: u64 = 32 << 20;
    ok(
        rdemu_cublasLtMatmulPreferenceSetAttribute(
            p,
            CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const c_void,
            8,
        ),
        "workspace",
    );
    for (i, a) in align.iter().enumerate() {
        ok(
            rdemu_cublasLtMatmulPreferenceSetAttribute(
                p,
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES + i as u32,
                a as *const u32 as *const c_void,
                4,
            ),
            "alignment",
        );
    }
    p
}

fn handle() -> *mut c_void {
    static H: OnceLock<usize> = OnceLock::new();
    *H.get_or_init(|| {
        let mut h = null_mut();
        // SAFETY: out-pointer.
        ok(unsafe { rdemu_cublasLtCreate(&mut h) }, "create");
        h as usize
    }) as *mut c_void
}

#[allow(clippy::too_many_arguments)]
unsafe fn heuristic(
    desc: *mut c_void,
    l: [*mut c_void; 4],
    pref: *mut c_void,
) -> Result<cublasLtMatmulAlgo_t, cublasStatus_t> {
    let mut r = [cublasLtMatmulHeuristicResult_t::default(); 2];
    let mut n = -1;
    let s = rdemu_cublasLtMatmulAlgoGetHeuristic(
        handle(),
        desc,
        l[0],
        l[1],
        l[2],
        l[3],
        pref,
        2,
        r.as_mut_ptr(),
        &mut n,
    );
    if s != CUBLAS_STATUS_SUCCESS {
        assert_eq!(n, 0);
        return Err(s);
    }
    assert_eq!(n, 1);
    assert_eq!(r[0].state, CUBLAS_STATUS_SUCCESS);
    assert_eq!(r[0].workspaceSize, 0);
    Ok(r[0].algo)
}

/// A GEMM problem in cuBLASLt's terms.
#[derive(Clone, Copy, Debug)]
struct G {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    ab: T,
    cd: T,
    batch: usize,
    /// Extra leading-dimension padding and batch-stride slack per operand.
    pad: usize,
    alpha: f32,
    beta: f32,
    bias: bool,
    in_place: bool,
}

/// Runs `g` on the emulated device and checks D against an f64 reference (with the f32
/// accumulation bound 1e-5·Σ|terms| and one rounding of D); also that D's padding is untouched.
unsafe fn check(g: G, seed: u64) {
    ctx();
    let s = stream::create(false).unwrap();
    let mut rng = Rng(seed | 1);
    let lay = |rows: usize, cols: usize| {
        let ld = rows + g.pad;
        L {
            rows,
            cols,
            ld,
            stride: ld * cols + 3 * g.pad,
        }
    };
    let la = if g.ta { lay(g.k, g.m) } else { lay(g.m, g.k) };
    let lb = if g.tb { lay(g.n, g.k) } else { lay(g.k, g.n) };
    let lc = lay(g.m, g.n);
    let ld = if g.in_place { lc } else { lay(g.m, g.n) };
    let alloc = |t: T, l: &L| {
        memory::alloc(0, (l.span(g.batch) * t.size()) as u64, memory::Kind::Sync).unwrap()
    };
    let (pa, pb, pc) = (alloc(g.ab, &la), alloc(g.ab, &lb), alloc(g.cd, &lc));
    let pd = if g.in_place { pc } else { alloc(g.cd, &ld) };
    let fill = |t: T, p: u64, l: &L, rng: &mut Rng| -> Vec<f64> {
        (0..l.span(g.batch))
            .map(|i| t.put(p, i, rng.unit()))
            .collect()
    };
    let va = fill(g.ab, pa, &la, &mut rng);
    let vb = fill(g.ab, pb, &lb, &mut rng);
    let vc = fill(g.cd, pc, &lc, &mut rng);
    let bias_stride = if g.batch > 1 { g.m + 1 } else { 0 };
    let (pbias, vbias) = if g.bias {
        let len = (g.batch - 1) * bias_stride + g.m;
        let p = memory::alloc(0, (len * g.cd.size()) as u64, memory::Kind::Sync).unwrap();
        let v: Vec<f64> = (0..len).map(|i| g.cd.put(p, i, rng.unit())).collect();
        (p, v)
    } else {
        (0, Vec::new())
    };
    let dsc = desc(CUBLAS_COMPUTE_32F, g.ta, g.tb, g.bias);
    if g.bias {
        ok(
            rdemu_cublasLtMatmulDescSetAttribute(
                dsc,
                CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &pbias as *const u64 as *const c_void,
                8,
            ),
            "bias pointer",
        );
        let bs = bias_stride as i64;
        ok(
            rdemu_cublasLtMatmulDescSetAttribute(
                dsc,
                CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                &bs as *const i64 as *const c_void,
                8,
            ),
            "bias stride",
        );
    }
    let l = [
        layout(g.ab, la, g.batch),
        layout(g.ab, lb, g.batch),
        layout(g.cd, lc, g.batch),
        if g.in_place {
            null_mut()
        } else {
            layout(g.cd, ld, g.batch)
        },
    ];
    let l = [l[0], l[1], l[2], if g.in_place { l[2] } else { l[3] }];
    let pr = pref([256; 4]);
    let algo = heuristic(dsc, l, pr).expect("heuristic");
    let before: Vec<u32> = (0..ld.span(g.batch))
        .map(|i| g.cd.get(pd, i).to_bits() as u32)
        .collect();
    let mut ws = [0u8; 16];
    let st = rdemu_cublasLtMatmul(
        handle(),
        dsc,
        &g.alpha as *const f32 as *const c_void,
        pa as *const c_void,
        l[0],
        pb as *const c_void,
        l[1],
        &g.beta as *const f32 as *const c_void,
        pc as *const c_void,
        l[2],
        pd as *mut c_void,
        l[3],
        &algo,
        ws.as_mut_ptr() as *mut c_void,
        ws.len(),
        s as *mut c_void,
    );
    ok(st, &format!("matmul {g:?}"));
    stream::synchronize(s).unwrap();
    let mut addressed = vec![false; ld.span(g.batch)];
    for b in 0..g.batch {
        for j in 0..g.n {
            for i in 0..g.m {
                let (mut v, mut mag) = (0f64, 0f64);
                for p in 0..g.k {
                    let ai = if g.ta { p + i * la.ld } else { i + p * la.ld };
                    let bi = if g.tb { j + p * lb.ld } else { p + j * lb.ld };
                    let x = va[b * la.stride + ai] * vb[b * lb.stride + bi];
                    v += x;
                    mag += x.abs();
                }
                v *= g.alpha as f64;
                mag *= (g.alpha as f64).abs();
                let cv = g.beta as f64 * vc[b * lc.stride + i + j * lc.ld];
                v += cv;
                mag += cv.abs();
                if g.bias {
                    v += vbias[b * bias_stride + i];
                    mag += vbias[b * bias_stride + i].abs();
                }
                let idx = b * ld.stride + i + j * ld.ld;
                addressed[idx] = true;
                let got = g.cd.get(pd, idx);
                let tol = 1e-5 * mag + g.cd.half_ulp() * v.abs() + 1e-7;
                assert!(
                    (got - v).abs() <= tol,
                    "{g:?}: D[{i},{j}] of batch {b} = {got}, want {v} ± {tol}"
                );
            }
        }
    }
    for (i, &a) in addressed.iter().enumerate() {
        if !a {
            assert_eq!(
                g.cd.get(pd, i).to_bits() as u32,
                before[i],
                "{g:?}: element {i} of D outside the matrices was written"
            );
        }
    }
    for h in l.iter().take(if g.in_place { 3 } else { 4 }) {
        ok(rdemu_cublasLtMatrixLayoutDestroy(*h), "layout destroy");
    }
    ok(rdemu_cublasLtMatmulDescDestroy(dsc), "desc destroy");
    ok(rdemu_cublasLtMatmulPreferenceDestroy(pr), "pref destroy");
    stream::destroy(s).unwrap();
}

#[test]
fn matmuls_match_the_reference() {
    let base = G {
        m: 24,
        n: 17,
        k: 33,
        ta: false,
        tb: false,
        ab: T::F32,
        cd: T::F32,
        batch: 1,
        pad: 0,
        alpha: 1.0,
        beta: 0.0,
        bias: false,
        in_place: false,
    };
    let mut seed = 1;
    // SAFETY (all): `check` allocates every buffer it touches.
    unsafe {
        // rdrop's weight gradients: bf16 inputs, f32 output accumulated with β = 1, in place.
        check(
            G {
                ab: T::Bf16,
                ta: true,
                beta: 1.0,
                in_place: true,
                ..base
            },
            seed,
        );
        for ab_cd in [
            (T::F32, T::F32),
            (T::Bf16, T::Bf16),
            (T::Bf16, T::F32),
            (T::F16, T::F16),
            (T::F16, T::F32),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                seed += 1;
                check(
                    G {
                        ab: ab_cd.0,
                        cd: ab_cd.1,
                        ta,
                        tb,
                        batch: 1 + (seed as usize % 3),
                        pad: seed as usize % 4,
                        alpha: 0.75,
                        beta: if seed.is_multiple_of(2) { 0.0 } else { -0.5 },
                        bias: !seed.is_multiple_of(3),
                        in_place: seed.is_multiple_of(4),
                        m: 1 + (seed as usize * 7) % 31,
                        n: 1 + (seed as usize * 5) % 29,
                        k: 1 + (seed as usize * 11) % 37,
                    },
                    seed,
                );
            }
        }
    }
}

/// A small f32 problem: descriptor, layouts (A m×k, B k×n, C = D m×n, dense) and 256-byte
/// aligned buffers, on a new stream.
struct Small {
    desc: *mut c_void,
    l: [*mut c_void; 4],
    p: [u64; 4],
    s: u64,
}

const M: usize = 8;
const N: usize = 8;
const K: usize = 8;

unsafe fn small(dt: T) -> Small {
    ctx();
    let desc = desc(CUBLAS_COMPUTE_32F, false, false, false);
    let l = [
        layout(
            dt,
            L {
                rows: M,
                cols: K,
                ld: M,
                stride: 0,
            },
            1,
        ),
        layout(
            dt,
            L {
                rows: K,
                cols: N,
                ld: K,
                stride: 0,
            },
            1,
        ),
        layout(
            dt,
            L {
                rows: M,
                cols: N,
                ld: M,
                stride: 0,
            },
            1,
        ),
        layout(
            dt,
            L {
                rows: M,
                cols: N,
                ld: M,
                stride: 0,
            },
            1,
        ),
    ];
    // Room for pointers moved a few bytes in.
    let p = [0; 4].map(|_: u64| memory::alloc(0, 4096, memory::Kind::Sync).unwrap());
    for &x in &p {
        std::ptr::write_bytes(x as *mut u8, 0, 4096);
    }
    Small {
        desc,
        l,
        p,
        s: stream::create(false).unwrap(),
    }
}

unsafe fn matmul(t: &Small, algo: *const cublasLtMatmulAlgo_t, p: [u64; 4]) -> cublasStatus_t {
    let (alpha, beta) = (1.0f32, 0.0f32);
    rdemu_cublasLtMatmul(
        handle(),
        t.desc,
        &alpha as *const f32 as *const c_void,
        p[0] as *const c_void,
        t.l[0],
        p[1] as *const c_void,
        t.l[1],
        &beta as *const f32 as *const c_void,
        p[2] as *const c_void,
        t.l[2],
        p[3] as *mut c_void,
        t.l[3],
        algo,
        null_mut(),
        0,
        t.s as *mut c_void,
    )
}

#[test]
fn heuristic_refuses_what_cublaslt_does_not_support() {
    // SAFETY (all): descriptors created here; out-pointers are locals.
    unsafe {
        let t = small(T::F32);
        let pr = pref([256; 4]);
        assert!(heuristic(t.desc, t.l, pr).is_ok());
        // f32 inputs with a bf16 output: not in the type table.
        let dbf = layout(
            T::Bf16,
            L {
                rows: M,
                cols: N,
                ld: M,
                stride: 0,
            },
            1,
        );
        assert_eq!(
            heuristic(t.desc, [t.l[0], t.l[1], dbf, dbf], pr),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        // C and D of different types.
        assert_eq!(
            heuristic(t.desc, [t.l[0], t.l[1], t.l[2], dbf], pr),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        // bf16 inputs with the TF32 compute type.
        let abf = layout(
            T::Bf16,
            L {
                rows: M,
                cols: K,
                ld: M,
                stride: 0,
            },
            1,
        );
        let bbf = layout(
            T::Bf16,
            L {
                rows: K,
                cols: N,
                ld: K,
                stride: 0,
            },
            1,
        );
        let tf32 = desc(CUBLAS_COMPUTE_32F_FAST_TF32, false, false, false);
        assert_eq!(
            heuristic(tf32, [abf, bbf, dbf, dbf], pr),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        assert!(heuristic(t.desc, [abf, bbf, dbf, dbf], pr).is_ok());
        // Row-major order.
        let row = layout(
            T::F32,
            L {
                rows: M,
                cols: K,
                ld: M,
                stride: 0,
            },
            1,
        );
        let order = CUBLASLT_ORDER_ROW;
        ok(
            rdemu_cublasLtMatrixLayoutSetAttribute(
                row,
                CUBLASLT_MATRIX_LAYOUT_ORDER,
                &order as *const i32 as *const c_void,
                4,
            ),
            "order",
        );
        assert_eq!(
            heuristic(t.desc, [row, t.l[1], t.l[2], t.l[3]], pr),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        // A GELU epilogue.
        let gelu = desc(CUBLAS_COMPUTE_32F, false, false, false);
        let epi: u32 = 32;
        ok(
            rdemu_cublasLtMatmulDescSetAttribute(
                gelu,
                CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epi as *const u32 as *const c_void,
                4,
            ),
            "epilogue",
        );
        assert_eq!(heuristic(gelu, t.l, pr), Err(CUBLAS_STATUS_NOT_SUPPORTED));
        // Shapes that do not chain: B with k + 1 rows.
        let b2 = layout(
            T::F32,
            L {
                rows: K + 1,
                cols: N,
                ld: K + 1,
                stride: 0,
            },
            1,
        );
        assert_eq!(
            heuristic(t.desc, [t.l[0], b2, t.l[2], t.l[3]], pr),
            Err(CUBLAS_STATUS_INVALID_VALUE)
        );
        // A promised alignment below the element size.
        let pr2 = pref([2, 256, 256, 256]);
        assert_eq!(
            heuristic(t.desc, t.l, pr2),
            Err(CUBLAS_STATUS_NOT_SUPPORTED)
        );
        // No results asked for.
        let mut r = cublasLtMatmulHeuristicResult_t::default();
        let mut n = 0;
        assert_eq!(
            rdemu_cublasLtMatmulAlgoGetHeuristic(
                handle(),
                t.desc,
                t.l[0],
                t.l[1],
                t.l[2],
                t.l[3],
                pr,
                0,
                &mut r,
                &mut n
            ),
            CUBLAS_STATUS_INVALID_VALUE
        );
        // A layout with ld < rows is refused at creation.
        let mut h = null_mut();
        assert_eq!(
            rdemu_cublasLtMatrixLayoutCreate(&mut h, CUDA_R_32F, 8, 4, 7),
            CUBLAS_STATUS_INVALID_VALUE
        );
        // ... and when set afterwards, at the heuristic.
        let bad_ld: i64 = 4;
        let shrunk = layout(
            T::F32,
            L {
                rows: M,
                cols: K,
                ld: M,
                stride: 0,
            },
            1,
        );
        ok(
            rdemu_cublasLtMatrixLayoutSetAttribute(
                shrunk,
                CUBLASLT_MATRIX_LAYOUT_LD,
                &bad_ld as *const i64 as *const c_void,
                8,
            ),
            "ld",
        );
        assert_eq!(
            heuristic(t.desc, [shrunk, t.l[1], t.l[2], t.l[3]], pr),
            Err(CUBLAS_STATUS_INVALID_VALUE)
        );
    }
}

#[test]
fn matmul_refuses_pointers_less_aligned_than_the_algorithm() {
    // SAFETY (all): buffers of 4096 bytes, pointers moved at most 16 bytes in; the problem
    // addresses 256 bytes per operand.
    unsafe {
        let t = small(T::F32);
        let strict = heuristic(t.desc, t.l, pref([256; 4])).unwrap();
        let loose = heuristic(t.desc, t.l, pref([4, 16, 16, 16])).unwrap();
        assert_eq!(matmul(&t, &strict, t.p), CUBLAS_STATUS_SUCCESS);
        // A 16 bytes in: fine for the loose algorithm, not for the 256-byte one.
        let moved = [t.p[0] + 16, t.p[1], t.p[2], t.p[3]];
        assert_eq!(matmul(&t, &strict, moved), CUBLAS_STATUS_NOT_SUPPORTED);
        assert_eq!(matmul(&t, &loose, moved), CUBLAS_STATUS_SUCCESS);
        // B 4 bytes in: below the loose algorithm's 16.
        let moved_b = [t.p[0], t.p[1] + 4, t.p[2], t.p[3]];
        assert_eq!(matmul(&t, &loose, moved_b), CUBLAS_STATUS_NOT_SUPPORTED);
        // D 2 bytes in: not even aligned to its f32 elements (also with no algorithm given).
        let moved_d = [t.p[0], t.p[1], t.p[2], t.p[3] + 2];
        assert_eq!(
            matmul(&t, std::ptr::null(), moved_d),
            CUBLAS_STATUS_NOT_SUPPORTED
        );
        assert_eq!(matmul(&t, std::ptr::null(), t.p), CUBLAS_STATUS_SUCCESS);
        // An algorithm that did not come from the heuristic.
        let fake = cublasLtMatmulAlgo_t::default();
        assert_eq!(matmul(&t, &fake, t.p), CUBLAS_STATUS_INVALID_VALUE);
        // An algorithm chosen for bf16 used for f32.
        let b = small(T::Bf16);
        let bf_algo = heuristic(b.desc, b.l, pref([256; 4])).unwrap();
        assert_eq!(matmul(&t, &bf_algo, t.p), CUBLAS_STATUS_NOT_SUPPORTED);
        // A bias pointer not aligned to its elements.
        let epi = CUBLASLT_EPILOGUE_BIAS;
        ok(
            rdemu_cublasLtMatmulDescSetAttribute(
                t.desc,
                CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epi as *const u32 as *const c_void,
                4,
            ),
            "epilogue",
        );
        let algo = heuristic(t.desc, t.l, pref([256; 4])).unwrap();
        assert_eq!(matmul(&t, &algo, t.p), CUBLAS_STATUS_INVALID_VALUE); // NULL bias
        let bias = memory::alloc(0, 64, memory::Kind::Sync).unwrap() + 2;
        ok(
            rdemu_cublasLtMatmulDescSetAttribute(
                t.desc,
                CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as *const c_void,
                8,
            ),
            "bias",
        );
        assert_eq!(matmul(&t, &algo, t.p), CUBLAS_STATUS_NOT_SUPPORTED);
        // In place with C and D of different layouts.
        let d_wide = layout(
            T::F32,
            L {
                rows: M,
                cols: N,
                ld: M + 4,
                stride: 0,
            },
            1,
        );
        let mut t2 = small(T::F32);
        t2.l[3] = d_wide;
        let algo2 = heuristic(t2.desc, t2.l, pref([16; 4])).unwrap();
        let same = [t2.p[0], t2.p[1], t2.p[2], t2.p[2]];
        assert_eq!(matmul(&t2, &algo2, same), CUBLAS_STATUS_INVALID_VALUE);
        assert_eq!(matmul(&t2, &algo2, t2.p), CUBLAS_STATUS_SUCCESS);
        stream::synchronize(t.s).unwrap();
        stream::synchronize(t2.s).unwrap();
    }
}

#[test]
fn attributes_round_trip_and_sizes_are_checked() {
    // SAFETY (all): locals as buffers of the sizes passed.
    unsafe {
        let l = layout(
            T::Bf16,
            L {
                rows: 5,
                cols: 3,
                ld: 7,
                stride: 0,
            },
            1,
        );
        let mut ld: i64 = 0;
        let mut written = 0usize;
        ok(
            rdemu_cublasLtMatrixLayoutGetAttribute(
                l,
                CUBLASLT_MATRIX_LAYOUT_LD,
                &mut ld as *mut i64 as *mut c_void,
                8,
                &mut written,
            ),
            "get ld",
        );
        assert_eq!((ld, written), (7, 8));
        let mut ty: u32 = 99;
        ok(
            rdemu_cublasLtMatrixLayoutGetAttribute(
                l,
                CUBLASLT_MATRIX_LAYOUT_TYPE,
                &mut ty as *mut u32 as *mut c_void,
                4,
                null_mut(),
            ),
            "get type",
        );
        assert_eq!(ty as i32, CUDA_R_16BF);
        // Size query.
        ok(
            rdemu_cublasLtMatrixLayoutGetAttribute(
                l,
                CUBLASLT_MATRIX_LAYOUT_ROWS,
                null_mut(),
                0,
                &mut written,
            ),
            "size query",
        );
        assert_eq!(written, 8);
        // The wrong size.
        let count: i64 = 4;
        assert_eq!(
            rdemu_cublasLtMatrixLayoutSetAttribute(
                l,
                CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &count as *const i64 as *const c_void,
                8
            ),
            CUBLAS_STATUS_INVALID_VALUE
        );
        // An unknown attribute.
        assert_eq!(
            rdemu_cublasLtMatrixLayoutSetAttribute(l, 99, &count as *const i64 as *const c_void, 8),
            CUBLAS_STATUS_INVALID_VALUE
        );
        // Descriptor defaults and values.
        let d = desc(CUBLAS_COMPUTE_32F, true, false, false);
        let mut v: i32 = -5;
        ok(
            rdemu_cublasLtMatmulDescGetAttribute(
                d,
                CUBLASLT_MATMUL_DESC_TRANSA,
                &mut v as *mut i32 as *mut c_void,
                4,
                null_mut(),
            ),
            "transa",
        );
        assert_eq!(v, CUBLAS_OP_T);
        ok(
            rdemu_cublasLtMatmulDescGetAttribute(
                d,
                CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &mut v as *mut i32 as *mut c_void,
                4,
                null_mut(),
            ),
            "bias type",
        );
        assert_eq!(v, -1);
        let p = pref([16, 8, 4, 4]);
        let mut a: u32 = 0;
        ok(
            rdemu_cublasLtMatmulPreferenceGetAttribute(
                p,
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                &mut a as *mut u32 as *mut c_void,
                4,
                null_mut(),
            ),
            "alignment",
        );
        assert_eq!(a, 8);
        // A layout passed where a descriptor is expected, and a destroyed one.
        assert_eq!(
            rdemu_cublasLtMatmulDescSetAttribute(
                l,
                CUBLASLT_MATMUL_DESC_TRANSA,
                &v as *const i32 as *const c_void,
                4
            ),
            CUBLAS_STATUS_INVALID_VALUE
        );
        ok(rdemu_cublasLtMatrixLayoutDestroy(l), "destroy");
        assert_eq!(
            rdemu_cublasLtMatrixLayoutDestroy(l),
            CUBLAS_STATUS_INVALID_VALUE
        );
        let mut h = null_mut();
        ok(rdemu_cublasLtCreate(&mut h), "create");
        ok(rdemu_cublasLtDestroy(h), "destroy handle");
        let t = small(T::F32);
        let mut r = cublasLtMatmulHeuristicResult_t::default();
        let mut n = 0;
        assert_eq!(
            rdemu_cublasLtMatmulAlgoGetHeuristic(
                h, t.desc, t.l[0], t.l[1], t.l[2], t.l[3], p, 1, &mut r, &mut n
            ),
            CUBLAS_STATUS_NOT_INITIALIZED
        );
        // Names and version.
        let name =
            std::ffi::CStr::from_ptr(rdemu_cublasLtGetStatusName(CUBLAS_STATUS_NOT_SUPPORTED));
        assert_eq!(name.to_str().unwrap(), "CUBLAS_STATUS_NOT_SUPPORTED");
        assert!(!std::ffi::CStr::from_ptr(rdemu_cublasLtGetStatusString(7)).is_empty());
        assert_eq!(rdemu_cublasLtGetVersion() / 10000, 13);
    }
}
