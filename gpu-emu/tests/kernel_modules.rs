//! The host-compiled kernel modules (build/kernels.rs) through their C ABI
//! (`shim/rdemu_api.h`), with a minimal stub api of this test's own (one thread at a time, no
//! fibers): every module loads and lists its kernels with their parameters; `pack`/`run` call a
//! kernel with `cuLaunchKernel`-style `kernelParams`; the instrumented modules report every
//! access of kernel code to `check` (and the `.fast` ones none); `shared_range` is the module's
//! `__shared__` memory; the mutants are built with their change.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};

use half::{bf16, f16};

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Dim3 {
    x: u32,
    y: u32,
    z: u32,
}

#[repr(C)]
struct Api {
    version: u32,
    thread_idx: extern "C" fn() -> Dim3,
    block_idx: extern "C" fn() -> Dim3,
    block_dim: extern "C" fn() -> Dim3,
    grid_dim: extern "C" fn() -> Dim3,
    syncthreads: extern "C" fn(),
    syncwarp: extern "C" fn(u32),
    shfl: extern "C" fn(i32, u32, u64, i32, i32, i32) -> u64,
    vote: extern "C" fn(i32, u32, i32) -> u32,
    check: extern "C" fn(*const c_void, usize, i32),
    unsupported: extern "C" fn(*const c_char),
    threadfence: extern "C" fn(),
}

#[repr(C)]
struct Param {
    decl: *const c_char,
    size: u32,
    is_pointer: u32,
}

#[repr(C)]
struct Kernel {
    name: *const c_char,
    nparams: u32,
    params: *const Param,
    pack: unsafe extern "C" fn(*const *mut c_void) -> *mut c_void,
    pack_free: unsafe extern "C" fn(*mut c_void),
    run: unsafe extern "C" fn(*const c_void),
}

#[repr(C)]
struct Module {
    version: u32,
    source: *const c_char,
    arch: u32,
    nkernels: u32,
    kernels: *const Kernel,
    shared_range: unsafe extern "C" fn(*mut *mut c_void, *mut usize),
}

/// One checked access: address, size, is_write.
type Access = (usize, usize, bool);

/// Bytes below [`launch`]'s frame that count as the kernel's stack (its locals).
const STACK_WINDOW: usize = 1 << 20;

thread_local! {
    static TID: Cell<Dim3> = const { Cell::new(Dim3 { x: 0, y: 0, z: 0 }) };
    static BID: Cell<Dim3> = const { Cell::new(Dim3 { x: 0, y: 0, z: 0 }) };
    static BDIM: Cell<Dim3> = const { Cell::new(Dim3 { x: 1, y: 1, z: 1 }) };
    static GDIM: Cell<Dim3> = const { Cell::new(Dim3 { x: 1, y: 1, z: 1 }) };
    static CHECKS: RefCell<Vec<Access>> = const { RefCell::new(Vec::new()) };
    static FRAME: Cell<usize> = const { Cell::new(0) };
    static SYNCS: Cell<u32> = const { Cell::new(0) };
    static SHFLS: RefCell<Vec<(i32, i32, i32)>> = const { RefCell::new(Vec::new()) };
}

extern "C" fn thread_idx() -> Dim3 {
    TID.get()
}
extern "C" fn block_idx() -> Dim3 {
    BID.get()
}
extern "C" fn block_dim() -> Dim3 {
    BDIM.get()
}
extern "C" fn grid_dim() -> Dim3 {
    GDIM.get()
}
extern "C" fn syncthreads() {
    SYNCS.set(SYNCS.get() + 1);
}
extern "C" fn syncwarp(_: u32) {}
/// A warp of one thread: every shuffle returns the caller's own value.
extern "C" fn shfl(kind: i32, _mask: u32, value: u64, size: i32, lane: i32, width: i32) -> u64 {
    assert!(size == 4 || size == 8);
    SHFLS.with(|s| s.borrow_mut().push((kind, lane, width)));
    value
}
extern "C" fn vote(_: i32, _: u32, pred: i32) -> u32 {
    (pred != 0) as u32
}
extern "C" fn check(addr: *const c_void, size: usize, is_write: i32) {
    CHECKS.with(|c| c.borrow_mut().push((addr as usize, size, is_write != 0)));
}
extern "C" fn unsupported(what: *const c_char) {
    // SAFETY: the module passes a NUL-terminated literal.
    panic!(
        "unsupported: {}",
        unsafe { CStr::from_ptr(what) }.to_string_lossy()
    );
}
extern "C" fn threadfence() {}

static API: Api = Api {
    version: 1,
    thread_idx,
    block_idx,
    block_dim,
    grid_dim,
    syncthreads,
    syncwarp,
    shfl,
    vote,
    check,
    unsupported,
    threadfence,
};

struct Loaded {
    module: &'static Module,
}

impl Loaded {
    fn open(path: &str) -> Loaded {
        let c = CString::new(path).unwrap();
        // SAFETY: a module built by this crate's build script.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!h.is_null(), "dlopen {path}: {}", dlerror());
        let name = CString::new("rdemu_module_init").unwrap();
        // SAFETY: `h` is live.
        let init = unsafe { libc::dlsym(h, name.as_ptr()) };
        assert!(!init.is_null(), "{path}: no rdemu_module_init");
        // SAFETY: rdemu_module_init's type per rdemu_api.h.
        let init: extern "C" fn(*const Api) -> *const Module = unsafe { std::mem::transmute(init) };
        let m = init(&API);
        assert!(!m.is_null(), "{path}: rdemu_module_init returned NULL");
        // SAFETY: a static table of the module, which stays loaded (never dlclosed).
        let module = unsafe { &*m };
        assert_eq!(module.version, 1);
        assert_eq!(module.arch, 900);
        Loaded { module }
    }

    fn kernels(&self) -> &'static [Kernel] {
        // SAFETY: `nkernels` entries, static in the module.
        unsafe { std::slice::from_raw_parts(self.module.kernels, self.module.nkernels as usize) }
    }

    fn kernel(&self, name: &str) -> &'static Kernel {
        self.kernels()
            .iter()
            .find(|k| cstr(k.name) == name)
            .unwrap_or_else(|| panic!("no kernel {name}"))
    }

    fn source(&self) -> String {
        cstr(self.module.source)
    }

    fn shared_range(&self) -> (usize, usize) {
        let mut p = std::ptr::null_mut();
        let mut n = 0usize;
        // SAFETY: out-pointers to locals.
        unsafe { (self.module.shared_range)(&mut p, &mut n) };
        (p as usize, n)
    }
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated message.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        String::new()
    } else {
        cstr(e)
    }
}

fn cstr(p: *const c_char) -> String {
    assert!(!p.is_null());
    // SAFETY: the module's strings are NUL-terminated literals.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_string()
}

fn params(k: &Kernel) -> Vec<(String, u32, bool)> {
    if k.nparams == 0 {
        return Vec::new();
    }
    // SAFETY: `nparams` entries.
    let ps = unsafe { std::slice::from_raw_parts(k.params, k.nparams as usize) };
    ps.iter()
        .map(|p| (cstr(p.decl), p.size, p.is_pointer != 0))
        .collect()
}

fn kernels_dir() -> &'static str {
    env!("RDEMU_KERNELS_DIR")
}

fn module(name: &str) -> Loaded {
    Loaded::open(&format!("{}/{name}.so", kernels_dir()))
}

/// Runs threads `0..threads` of a one-dimensional launch (blocks of `block` threads) of `k`
/// with `args` (pointers to the argument values, as cuLaunchKernel's kernelParams); returns
/// the checked accesses.
fn launch(k: &Kernel, args: &[*mut c_void], threads: u32, block: u32) -> Vec<Access> {
    assert_eq!(args.len(), k.nparams as usize);
    // SAFETY: `args` holds one pointer per parameter to a value of its type.
    let packed = unsafe { (k.pack)(args.as_ptr()) };
    assert!(!packed.is_null());
    let frame = 0u8;
    FRAME.set(std::ptr::addr_of!(frame) as usize);
    CHECKS.with(|c| c.borrow_mut().clear());
    BDIM.set(Dim3 {
        x: block,
        y: 1,
        z: 1,
    });
    GDIM.set(Dim3 {
        x: threads.div_ceil(block),
        y: 1,
        z: 1,
    });
    for t in 0..threads {
        TID.set(Dim3 {
            x: t % block,
            y: 0,
            z: 0,
        });
        BID.set(Dim3 {
            x: t / block,
            y: 0,
            z: 0,
        });
        // SAFETY: the buffers behind `args` are live and sized for the launch.
        unsafe { (k.run)(packed) };
    }
    // SAFETY: from `pack`.
    unsafe { (k.pack_free)(packed) };
    CHECKS.with(|c| c.borrow_mut().drain(..).collect())
}

fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

fn inside(a: &Access, base: usize, bytes: usize) -> bool {
    a.0 >= base && a.0 + a.1 <= base + bytes
}

/// An access to the running thread's stack below the last [`launch`]'s frame (the kernel's
/// locals: arrays indexed at run time are checked accesses too).
fn on_stack(a: &Access) -> bool {
    let f = FRAME.get();
    a.0 < f && a.0 + STACK_WINDOW > f
}

#[test]
fn every_module_loads_with_its_kernel_table() {
    let names = std::fs::read_to_string(format!("{}/modules.txt", kernels_dir())).unwrap();
    let mut counts = BTreeMap::new();
    for name in names.lines() {
        for variant in ["", ".fast"] {
            let m = module(&format!("{name}{variant}"));
            assert!(
                m.source().ends_with(&format!("/{name}.cu")),
                "{}",
                m.source()
            );
            let ks = m.kernels();
            assert!(!ks.is_empty());
            for k in ks {
                let ps = params(k);
                assert_eq!(ps.len(), k.nparams as usize);
                for (decl, size, is_pointer) in ps {
                    assert!(!decl.is_empty());
                    assert_eq!(is_pointer, decl.contains('*'), "{}: {decl}", cstr(k.name));
                    assert!(
                        matches!(size, 4 | 8),
                        "{}: {decl}: size {size}",
                        cstr(k.name)
                    );
                }
            }
            counts.insert(name.to_string(), ks.len());
        }
    }
    eprintln!("kernels per module: {counts:?}");
    for (m, want) in [
        ("embed", 12),
        ("heads", 12),
        ("dropout", 9),
        ("gelu", 9),
        ("columns", 4),
        ("cast", 3),
        ("layernorm", 9),
        ("softmax", 6),
        ("loss", 2),
        ("optim", 10),
    ] {
        assert!(
            counts.get(m).is_some_and(|&n| n >= want),
            "{m}: {:?} kernels, at least {want} expected",
            counts.get(m)
        );
    }
    let el = module("cast");
    assert_eq!(
        params(el.kernel("cast_f32_to_bf16")),
        vec![
            ("__nv_bfloat16* out".to_string(), 8, true),
            ("const float* x".to_string(), 8, true),
            ("int n".to_string(), 4, false)
        ]
    );
    let adam = params(module("optim").kernel("adamw_update_f16"));
    assert_eq!(adam.len(), 15);
    assert_eq!(adam[1], ("__half* pt".to_string(), 8, true));
    assert_eq!(adam[13], ("int do_decay".to_string(), 4, false));
    let loss = params(module("loss").kernel("rdrop_loss_rows"));
    assert_eq!(loss[6], ("double eps".to_string(), 8, false));
}

fn cast_roundtrip(variant: &str) -> (Vec<Access>, Vec<Access>) {
    let m = module(&format!("cast{variant}"));
    let xs: Vec<f32> = vec![
        1.0,
        -2.5,
        1.0 + 2f32.powi(-8),
        3.0e38,
        f32::NAN,
        1.0e-40,
        65520.0,
        -0.0,
        2f32.powi(-25),
        0.1,
    ];
    let n = xs.len() as i32;
    let mut out = vec![0u16; xs.len()];
    let (mut o, mut x, mut nn) = (out.as_mut_ptr(), xs.as_ptr(), n);
    let a = launch(
        m.kernel("cast_f32_to_bf16"),
        &[arg(&mut o), arg(&mut x), arg(&mut nn)],
        12,
        4,
    );
    for (i, &v) in xs.iter().enumerate() {
        let want = if v.is_nan() {
            0x7fff
        } else {
            bf16::from_f32(v).to_bits()
        };
        assert_eq!(out[i], want, "cast_f32_to_bf16[{i}] of {v:e}");
    }
    let mut back = vec![0f32; xs.len()];
    let mut bo = back.as_mut_ptr();
    let b = launch(
        m.kernel("cast_f32_to_f32"),
        &[arg(&mut bo), arg(&mut x), arg(&mut nn)],
        12,
        4,
    );
    for i in 0..xs.len() {
        assert_eq!(back[i].to_bits(), xs[i].to_bits());
    }
    let mut h = vec![0u16; xs.len()];
    let mut ho = h.as_mut_ptr();
    launch(
        m.kernel("cast_f32_to_f16"),
        &[arg(&mut ho), arg(&mut x), arg(&mut nn)],
        10,
        32,
    );
    for (i, &v) in xs.iter().enumerate() {
        let want = if v.is_nan() {
            0x7fff
        } else {
            f16::from_f32(v).to_bits()
        };
        assert_eq!(h[i], want, "cast_f32_to_f16[{i}] of {v:e}");
    }
    (a, b)
}

#[test]
fn pack_and_run_call_the_kernel_with_the_launch_arguments() {
    let (a, b) = cast_roundtrip("");
    // 10 elements: each a 4-byte load of x and a 2-byte store (threads 10, 11 do nothing)
    assert_eq!(a.len(), 20, "{a:?}");
    assert_eq!(a.iter().filter(|c| c.2 && c.1 == 2).count(), 10);
    assert_eq!(a.iter().filter(|c| !c.2 && c.1 == 4).count(), 10);
    assert_eq!(b.len(), 20, "{b:?}");
}

#[test]
fn fast_modules_check_nothing() {
    let (a, b) = cast_roundtrip(".fast");
    assert!(a.is_empty() && b.is_empty(), "{a:?} {b:?}");
}

#[test]
fn checked_accesses_are_the_kernels_buffers() {
    // gelu (constant tables) and the recorded-mask path: every checked access is in one of
    // the kernel's buffers or on the kernel thread's stack (horner_erfc_r's local table
    // `c[12]`, indexed in a loop), none of the shim's or the module's data
    let m = module("gelu");
    let n = 37usize;
    let pre: Vec<f32> = (0..n).map(|i| (i as f32 - 18.0) * 0.37).collect();
    let keep: Vec<u8> = (0..n).map(|i| (i % 3 != 0) as u8).collect();
    let mut h = vec![0f32; n];
    let (mut hp, mut pp, mut kp) = (h.as_mut_ptr(), pre.as_ptr(), keep.as_ptr());
    let (mut use_keep, mut scale, mut nn) = (1i32, 1.25f32, n as i32);
    let acc = launch(
        m.kernel("gelu_apply_keep_f32"),
        &[
            arg(&mut hp),
            arg(&mut pp),
            arg(&mut kp),
            arg(&mut use_keep),
            arg(&mut scale),
            arg(&mut nn),
        ],
        64,
        32,
    );
    let bufs = [
        (h.as_ptr() as usize, 4 * n),
        (pre.as_ptr() as usize, 4 * n),
        (keep.as_ptr() as usize, n),
    ];
    let stray: Vec<_> = acc
        .iter()
        .filter(|a| !bufs.iter().any(|&(b, l)| inside(a, b, l)) && !on_stack(a))
        .collect();
    assert!(
        stray.is_empty(),
        "accesses outside the kernel's buffers and stack: {stray:?}"
    );
    let stack = acc.iter().filter(|a| on_stack(a)).count();
    eprintln!(
        "gelu_apply_keep_f32, {n} elements: {} checked accesses, {stack} of them to the stack",
        acc.len()
    );
    assert_eq!(acc.iter().filter(|a| a.2).count(), n);
    for i in 0..n {
        assert!(h[i].is_finite());
        if keep[i] == 0 {
            assert_eq!(h[i], 0.0);
        }
    }
}

#[test]
fn shared_memory_is_the_modules_thread_local_block() {
    let m = module("optim");
    let (start, bytes) = m.shared_range();
    assert!(
        start != 0 && bytes >= 32 * 8,
        "shared range {start:#x} + {bytes}"
    );
    // the same block on the same thread, another one on another thread
    assert_eq!(m.shared_range(), (start, bytes));
    let other = std::thread::spawn(|| module("optim").shared_range())
        .join()
        .unwrap();
    assert_ne!(other.0, start);
    assert_eq!(other.1, bytes);
    // sum_squares_partials: lane 0 of the (one) warp stores its sum to `warps[0]`, a checked
    // store into the shared range, then a barrier; with the stub's shuffles (own value) the
    // butterfly doubles the sum five times
    let x = [3.0f32, 100.0, 100.0];
    let mut part = [0f64; 1];
    let (mut pp, mut xp, mut n) = (part.as_mut_ptr(), x.as_ptr(), 1i32);
    SYNCS.set(0);
    let acc = launch(
        m.kernel("sum_squares_partials"),
        &[arg(&mut pp), arg(&mut xp), arg(&mut n)],
        1,
        32,
    );
    assert_eq!(part[0], 9.0 * 32.0);
    assert_eq!(SYNCS.get(), 1);
    assert!(
        acc.iter()
            .any(|a| a.2 && a.1 == 8 && inside(a, start, bytes)),
        "{acc:?} vs shared {start:#x}+{bytes}"
    );
    // the fast module has its own shared block
    let f = module("optim.fast");
    let (fs, fb) = f.shared_range();
    assert!(fs != 0 && fs != start && fb == bytes);
}

#[test]
fn shuffles_reach_the_driver_with_kind_lane_and_width() {
    let m = module("layernorm");
    let d = 4usize;
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let (w, b) = ([1.0f32; 4], [0.0f32; 4]);
    let (mut y, mut mean, mut rstd) = (vec![0f32; d], [0f32; 1], [0f32; 1]);
    let (mut yp, mut mp, mut rp, mut xp, mut wp, mut bp) = (
        y.as_mut_ptr(),
        mean.as_mut_ptr(),
        rstd.as_mut_ptr(),
        x.as_ptr(),
        w.as_ptr(),
        b.as_ptr(),
    );
    let (mut eps, mut n, mut dd) = (1e-5f32, 1i32, d as i32);
    SHFLS.with(|s| s.borrow_mut().clear());
    launch(
        m.kernel("layernorm_fwd_f32"),
        &[
            arg(&mut yp),
            arg(&mut mp),
            arg(&mut rp),
            arg(&mut xp),
            arg(&mut wp),
            arg(&mut bp),
            arg(&mut eps),
            arg(&mut n),
            arg(&mut dd),
        ],
        1,
        32,
    );
    let s = SHFLS.with(|s| s.borrow().clone());
    // two sum16_in_order: lanes 0..16 with width 16, RDEMU_SHFL_IDX
    assert_eq!(s.len(), 32);
    for (i, &(kind, lane, width)) in s.iter().enumerate() {
        assert_eq!((kind, lane, width), (0, (i % 16) as i32, 16));
    }
    let mutant = Loaded::open(&format!(
        "{}/shfl-width/layernorm.so",
        env!("RDEMU_KERNEL_MUTANTS_DIR")
    ));
    assert!(mutant.source().ends_with("shfl-width/src/layernorm.cu"));
    SHFLS.with(|s| s.borrow_mut().clear());
    launch(
        mutant.kernel("layernorm_fwd_f32"),
        &[
            arg(&mut yp),
            arg(&mut mp),
            arg(&mut rp),
            arg(&mut xp),
            arg(&mut wp),
            arg(&mut bp),
            arg(&mut eps),
            arg(&mut n),
            arg(&mut dd),
        ],
        1,
        32,
    );
    let s = SHFLS.with(|s| s.borrow().clone());
    assert_eq!(s.len(), 32);
    assert!(s.iter().all(|&(_, _, width)| width == 8));
}

#[test]
fn mutants_are_built_with_their_change() {
    let dir = env!("RDEMU_KERNEL_MUTANTS_DIR");
    // oob-read: cast_f32_to_f32 reads x[i + 1]: the last thread reads one element past x
    let m = Loaded::open(&format!("{dir}/oob-read/cast.so"));
    // on the heap: accesses to the calling thread's own stack never reach the driver's check
    // (asan_hooks.cpp recognises a fiber's stack slot by address)
    let xs: Box<[f32]> = Box::new([1.0, 2.0, 3.0, 4.0, 5.0]);
    let mut out: Box<[f32]> = Box::new([0f32; 5]);
    let (mut o, mut x, mut n) = (out.as_mut_ptr(), xs.as_ptr(), 4i32);
    let acc = launch(
        m.kernel("cast_f32_to_f32"),
        &[arg(&mut o), arg(&mut x), arg(&mut n)],
        4,
        32,
    );
    let past = acc
        .iter()
        .filter(|a| !a.2 && a.0 == xs.as_ptr() as usize + 16)
        .count();
    assert_eq!(past, 1, "{acc:?}");
    assert_eq!(out[..4], [2.0, 3.0, 4.0, 5.0]);
    // the original reads x[0..4] only
    let acc = launch(
        module("cast").kernel("cast_f32_to_f32"),
        &[arg(&mut o), arg(&mut x), arg(&mut n)],
        4,
        32,
    );
    assert!(
        acc.iter()
            .all(|a| a.2 || inside(a, xs.as_ptr() as usize, 16)),
        "{acc:?}"
    );
    // no-barrier: sum_squares_partials without its __syncthreads
    let m = Loaded::open(&format!("{dir}/no-barrier/optim.so"));
    let x = [3.0f32];
    let mut part = [0f64; 1];
    let (mut pp, mut xp, mut n) = (part.as_mut_ptr(), x.as_ptr(), 1i32);
    SYNCS.set(0);
    launch(
        m.kernel("sum_squares_partials"),
        &[arg(&mut pp), arg(&mut xp), arg(&mut n)],
        1,
        32,
    );
    assert_eq!(SYNCS.get(), 0);
    assert_eq!(part[0], 9.0 * 32.0);
    // only the mutated module is in each mutant's folder
    for (mutant, module) in [
        ("oob-read", "cast"),
        ("no-barrier", "optim"),
        ("shfl-width", "layernorm"),
    ] {
        let sos: Vec<String> = std::fs::read_dir(format!("{dir}/{mutant}"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|f| f.ends_with(".so"))
            .collect();
        assert_eq!(sos, vec![format!("{module}.so")]);
    }
}
