//! The emulated NCCL: ranks as threads of this process (each with its own emulated device and
//! context) and as separate processes (this test binary run again as one rank, see
//! [`child_entry`]): sums compared bit for bit with a rank-order sum, in place, several types,
//! chunked buffers; a peer that dies, an abort, init timeouts, mismatches and bad arguments.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_void, CStr};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Once};
use std::time::{Duration, Instant};

use rdrop_gpu_emu::memory::{self, Kind};
use rdrop_gpu_emu::nccl::*;
use rdrop_gpu_emu::{context, lifecycle, stream};

/// Chunk of the communicators created by this binary (small, so that buffers span chunks).
const CHUNK_BYTES: usize = 64 << 10;

/// Three devices and a small chunk, set before anything reads the configuration.
fn setup() {
    static S: Once = Once::new();
    S.call_once(|| {
        std::env::set_var("RDROP_EMU_DEVICES", "3");
        std::env::set_var("RDROP_EMU_MEMORY", "4GiB");
        std::env::set_var("RDROP_EMU_NCCL_CHUNK", "64KiB");
        // A generous limit: a failure here must come from the checks, not the clock.
        std::env::set_var("RDROP_EMU_NCCL_TIMEOUT_S", "60");
    });
}

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678;
    move || {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = z;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
}

/// `n` f32 in roughly [-1000, 1000] with varied exponents (so the order of a sum matters).
fn random_f32(seed: u64, n: usize) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n)
        .map(|_| {
            let m = (r() % 2_000_001) as f32 / 1000.0 - 1000.0;
            m * [1.0, 1e-3, 1e3, 0.1][(r() % 4) as usize]
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn upload(dev: usize, bytes: &[u8]) -> u64 {
    let p = memory::alloc(dev, bytes.len() as u64, Kind::Sync).unwrap();
    if !bytes.is_empty() {
        let h = memory::resolve(dev, p, bytes.len() as u64, true).unwrap();
        // SAFETY: `h` holds `bytes.len()` writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), h, bytes.len()) };
    }
    p
}

fn download(dev: usize, p: u64, len: usize) -> Vec<u8> {
    if len == 0 {
        return Vec::new();
    }
    let h = memory::resolve(dev, p, len as u64, false).unwrap();
    // SAFETY: `h` holds `len` readable bytes.
    unsafe { std::slice::from_raw_parts(h, len).to_vec() }
}

fn new_id() -> ncclUniqueId {
    let mut id = ncclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { rdemu_ncclGetUniqueId(&mut id) }, NCCL_SUCCESS);
    id
}

fn id_to_hex(id: &ncclUniqueId) -> String {
    id.internal
        .iter()
        .map(|&c| format!("{:02x}", c as u8))
        .collect()
}

fn id_from_hex(s: &str) -> ncclUniqueId {
    let mut id = ncclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    for (i, d) in id.internal.iter_mut().enumerate() {
        *d = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap() as _;
    }
    id
}

fn last_error(comm: ncclComm_t) -> String {
    // SAFETY: returns a NUL-terminated string valid until this thread's next call.
    unsafe { CStr::from_ptr(rdemu_ncclGetLastError(comm)) }
        .to_string_lossy()
        .into_owned()
}

/// A rank in a thread: its own context on `dev` and a non-blocking stream.
struct Rank {
    dev: usize,
    ctx: u64,
    stream: u64,
    comm: ncclComm_t,
}

impl Rank {
    fn new(dev: usize) -> Rank {
        let ctx = context::create(dev).unwrap();
        let stream = stream::create(true).unwrap();
        Rank {
            dev,
            ctx,
            stream,
            comm: std::ptr::null_mut(),
        }
    }

    fn init(&mut self, id: ncclUniqueId, nranks: c_int, rank: c_int) -> ncclResult_t {
        // SAFETY: a valid out-pointer.
        unsafe { rdemu_ncclCommInitRank(&mut self.comm, nranks, id, rank) }
    }

    fn all_reduce(&self, send: u64, recv: u64, n: usize, dt: c_int, op: c_int) -> ncclResult_t {
        // SAFETY: device pointers are plain integers to the emulator (checked when run).
        unsafe {
            rdemu_ncclAllReduce(
                send as *const c_void,
                recv as *mut c_void,
                n,
                dt,
                op,
                self.comm,
                self.stream as *mut c_void,
            )
        }
    }

    fn sync(&self) -> Result<(), String> {
        stream::synchronize(self.stream).map_err(|e| e.message)
    }

    fn async_error(&self) -> ncclResult_t {
        let mut e = -1;
        // SAFETY: valid pointers.
        assert_eq!(
            unsafe { rdemu_ncclCommGetAsyncError(self.comm, &mut e) },
            NCCL_SUCCESS
        );
        e
    }

    fn destroy(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: our communicator.
            assert_eq!(unsafe { rdemu_ncclCommDestroy(self.comm) }, NCCL_SUCCESS);
            self.comm = std::ptr::null_mut();
        }
    }
}

impl Drop for Rank {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: our communicator.
            unsafe { rdemu_ncclCommAbort(self.comm) };
        }
        let _ = stream::destroy(self.stream);
        let _ = lifecycle::destroy(self.ctx);
    }
}

/// Runs `f(rank)` for ranks `0..n` in threads (rank r on device r % 3), returning the results
/// in rank order.
fn on_ranks<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let hs: Vec<_> = (0..n)
        .map(|r| {
            let f = f.clone();
            std::thread::spawn(move || f(r))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The rank-order f32 sum every rank must get bit for bit.
fn rank_order_sum(inputs: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = inputs[0].clone();
    for v in &inputs[1..] {
        for (a, b) in acc.iter_mut().zip(v) {
            *a += *b;
        }
    }
    acc
}

const SIZES: [usize; 6] = [
    0,
    1,
    1000,
    CHUNK_BYTES / 4,
    3 * CHUNK_BYTES / 4 + 17,
    100_000,
];

#[test]
fn f32_sums_of_thread_ranks_are_bit_identical_rank_order_sums() {
    setup();
    for nranks in [2usize, 3] {
        let id = new_id();
        let got = on_ranks(nranks, move |r| {
            let mut k = Rank::new(r % 3);
            assert_eq!(k.init(id, nranks as c_int, r as c_int), NCCL_SUCCESS);
            let mut out = Vec::new();
            for (i, &n) in SIZES.iter().enumerate() {
                let data = random_f32((r * 100 + i) as u64, n);
                let send = upload(k.dev, &f32_bytes(&data));
                let recv = upload(k.dev, &vec![0xee; n * 4]);
                let inplace = upload(k.dev, &f32_bytes(&data));
                assert_eq!(k.all_reduce(send, recv, n, dtype::FLOAT32, redop::SUM), 0);
                assert_eq!(
                    k.all_reduce(inplace, inplace, n, dtype::FLOAT32, redop::SUM),
                    0
                );
                k.sync().unwrap();
                out.push((
                    download(k.dev, recv, n * 4),
                    download(k.dev, inplace, n * 4),
                    download(k.dev, send, n * 4) == f32_bytes(&data),
                ));
            }
            k.destroy();
            out
        });
        for (i, &n) in SIZES.iter().enumerate() {
            let inputs: Vec<Vec<f32>> = (0..nranks)
                .map(|r| random_f32((r * 100 + i) as u64, n))
                .collect();
            let want = f32_bytes(&rank_order_sum(&inputs));
            for (r, g) in got.iter().enumerate() {
                assert!(g[i].0 == want, "{nranks} ranks, n={n}: rank {r} differs");
                assert!(
                    g[i].1 == want,
                    "{nranks} ranks, n={n}: rank {r} in place differs"
                );
                assert!(
                    g[i].2,
                    "{nranks} ranks, n={n}: rank {r}'s send buffer changed"
                );
            }
        }
    }
}

#[test]
fn other_types_operations_and_broadcast() {
    setup();
    let id = new_id();
    let n = 20_000; // f64: 160 KB, three chunks
    let got = on_ranks(3, move |r| {
        let mut k = Rank::new(r);
        assert_eq!(k.init(id, 3, r as c_int), NCCL_SUCCESS);
        let f = random_f32(77 + r as u64, n);
        let f64s: Vec<u8> = f
            .iter()
            .flat_map(|x| (f64::from(*x) * 1.000_000_1).to_le_bytes())
            .collect();
        let bf: Vec<u8> = f
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let ints: Vec<u8> = f
            .iter()
            .flat_map(|x| ((*x as i32) % 50).to_le_bytes())
            .collect();
        let mut res = Vec::new();
        for (bytes, dt, op) in [
            (&f64s, dtype::FLOAT64, redop::SUM),
            (&bf, dtype::BFLOAT16, redop::SUM),
            (&ints, dtype::INT32, redop::MAX),
            (&ints, dtype::INT32, redop::PROD),
            (&f64s, dtype::FLOAT64, redop::MIN),
            (&f64s, dtype::FLOAT64, redop::AVG),
        ] {
            let p = upload(k.dev, bytes);
            assert_eq!(k.all_reduce(p, p, n, dt, op), NCCL_SUCCESS);
            k.sync().unwrap();
            res.push(download(k.dev, p, bytes.len()));
        }
        // Broadcast from rank 1: only the root's send buffer matters.
        let send = upload(k.dev, &f32_bytes(&f));
        let recv = upload(k.dev, &vec![0; n * 4]);
        // SAFETY: device pointers, our communicator and stream.
        let rc = unsafe {
            rdemu_ncclBroadcast(
                send as *const c_void,
                recv as *mut c_void,
                n,
                dtype::FLOAT32,
                1,
                k.comm,
                k.stream as *mut c_void,
            )
        };
        assert_eq!(rc, NCCL_SUCCESS);
        k.sync().unwrap();
        res.push(download(k.dev, recv, n * 4));
        k.destroy();
        res
    });
    let inputs: Vec<Vec<f32>> = (0..3).map(|r| random_f32(77 + r as u64, n)).collect();
    let f64_of = |r: usize| -> Vec<f64> {
        inputs[r]
            .iter()
            .map(|x| f64::from(*x) * 1.000_000_1)
            .collect()
    };
    let int_of = |r: usize| -> Vec<i32> { inputs[r].iter().map(|x| (*x as i32) % 50).collect() };
    let (d0, d1, d2) = (f64_of(0), f64_of(1), f64_of(2));
    let mut want: Vec<Vec<u8>> = Vec::new();
    want.push(
        (0..n)
            .flat_map(|i| (d0[i] + d1[i] + d2[i]).to_le_bytes())
            .collect(),
    );
    let bsum = |i: usize| {
        let v = |r: usize| half::bf16::from_f32(inputs[r][i]).to_f32();
        half::bf16::from_f32(v(0) + v(1) + v(2))
    };
    want.push((0..n).flat_map(|i| bsum(i).to_le_bytes()).collect());
    let (i0, i1, i2) = (int_of(0), int_of(1), int_of(2));
    want.push(
        (0..n)
            .flat_map(|i| i0[i].max(i1[i]).max(i2[i]).to_le_bytes())
            .collect(),
    );
    want.push(
        (0..n)
            .flat_map(|i| i0[i].wrapping_mul(i1[i]).wrapping_mul(i2[i]).to_le_bytes())
            .collect(),
    );
    want.push(
        (0..n)
            .flat_map(|i| d0[i].min(d1[i]).min(d2[i]).to_le_bytes())
            .collect(),
    );
    want.push(
        (0..n)
            .flat_map(|i| ((d0[i] + d1[i] + d2[i]) / 3.0).to_le_bytes())
            .collect(),
    );
    want.push(f32_bytes(&inputs[1]));
    let names = [
        "f64 sum", "bf16 sum", "i32 max", "i32 prod", "f64 min", "f64 avg", "bcast",
    ];
    for (j, w) in want.iter().enumerate() {
        for (r, g) in got.iter().enumerate() {
            assert!(g[j] == *w, "{}: rank {r} differs", names[j]);
        }
    }
}

#[test]
fn abort_unblocks_a_pending_all_reduce_and_the_peer_fails_promptly() {
    setup();
    let id = new_id();
    let (to_main, from_rank) = mpsc::channel::<usize>();
    let (go1, wait1) = mpsc::channel::<()>();
    let r0 = std::thread::spawn(move || {
        let mut k = Rank::new(0);
        assert_eq!(k.init(id, 2, 0), NCCL_SUCCESS);
        let p = upload(0, &f32_bytes(&random_f32(1, 5000)));
        assert_eq!(k.all_reduce(p, p, 5000, dtype::FLOAT32, redop::SUM), 0);
        to_main.send(k.comm as usize).unwrap();
        // Blocks until the abort: rank 1 never joins this all-reduce.
        let t = Instant::now();
        let r = k.sync();
        let waited = t.elapsed();
        k.comm = std::ptr::null_mut(); // aborted by the main thread
        (r, waited)
    });
    let r1 = std::thread::spawn(move || {
        let mut k = Rank::new(1);
        assert_eq!(k.init(id, 2, 1), NCCL_SUCCESS);
        wait1.recv().unwrap(); // rank 0 has been aborted
        let p = upload(1, &vec![0; 400]);
        let t = Instant::now();
        assert_eq!(k.all_reduce(p, p, 100, dtype::FLOAT32, redop::SUM), 0);
        let e = k.sync().unwrap_err();
        let took = t.elapsed();
        let code = k.async_error();
        let again = k.all_reduce(p, p, 100, dtype::FLOAT32, redop::SUM);
        let msg = last_error(k.comm);
        k.destroy();
        (e, took, code, again, msg)
    });
    let comm0 = from_rank.recv().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: rank 0's live communicator, aborted from another thread.
    assert_eq!(
        unsafe { rdemu_ncclCommAbort(comm0 as ncclComm_t) },
        NCCL_SUCCESS
    );
    let t = Instant::now();
    let (r, waited) = r0.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(
        r.is_ok(),
        "an aborted all-reduce is not a CUDA error: {r:?}"
    );
    // The handle is gone.
    // SAFETY: a stale handle is refused, not dereferenced.
    let rc = unsafe {
        rdemu_ncclAllReduce(
            std::ptr::null(),
            std::ptr::null_mut(),
            1,
            dtype::FLOAT32,
            redop::SUM,
            comm0 as ncclComm_t,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, NCCL_INVALID_ARGUMENT);
    go1.send(()).unwrap();
    let (e, took, code, again, msg) = r1.join().unwrap();
    assert!(
        e.contains("rank 0") && e.contains("ncclCommAbort") && e.contains("ncclAllReduce #1"),
        "{e}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(code, NCCL_REMOTE_ERROR);
    assert_eq!(again, NCCL_REMOTE_ERROR);
    assert!(msg.contains("rank 0"), "{msg}");
}

#[test]
fn mismatched_nranks_duplicate_ranks_and_mismatched_counts() {
    setup();
    let id = new_id();
    let (tx, rx) = mpsc::channel::<()>();
    let a = std::thread::spawn(move || {
        let mut k = Rank::new(0);
        let rc = k.init(id, 2, 0);
        // Both disagree on the count: both fail, naming the other's collective.
        let p = upload(0, &vec![0; 400]);
        assert_eq!(k.all_reduce(p, p, 10, dtype::FLOAT32, redop::SUM), 0);
        let e = k.sync().unwrap_err();
        rx.recv().unwrap();
        k.destroy();
        (rc, e)
    });
    std::thread::sleep(Duration::from_millis(100));
    let b = std::thread::spawn(move || {
        let mut k = Rank::new(1);
        let wrong = k.init(id, 3, 1);
        let wrong_msg = last_error(std::ptr::null_mut());
        let twice = k.init(id, 2, 0);
        let twice_msg = last_error(std::ptr::null_mut());
        assert!(k.comm.is_null());
        assert_eq!(k.init(id, 2, 1), NCCL_SUCCESS);
        let p = upload(1, &vec![0; 400]);
        assert_eq!(k.all_reduce(p, p, 20, dtype::FLOAT32, redop::SUM), 0);
        let e = k.sync().unwrap_err();
        let code = k.async_error();
        k.destroy();
        (wrong, wrong_msg, twice, twice_msg, e, code)
    });
    let (wrong, wrong_msg, twice, twice_msg, e1, code) = b.join().unwrap();
    tx.send(()).unwrap();
    let (rc, e0) = a.join().unwrap();
    assert_eq!(rc, NCCL_SUCCESS);
    assert_eq!(wrong, NCCL_INVALID_USAGE);
    assert!(
        wrong_msg.contains("nranks=3") && wrong_msg.contains("nranks=2"),
        "{wrong_msg}"
    );
    assert_eq!(twice, NCCL_INVALID_USAGE);
    assert!(twice_msg.contains("rank 0 joined twice"), "{twice_msg}");
    for e in [&e0, &e1] {
        assert!(
            e.contains("disagree") && e.contains("of 10 x ncclFloat32") && e.contains("of 20 x"),
            "{e}"
        );
    }
    assert_eq!(code, NCCL_INVALID_USAGE);
}

#[test]
fn bad_arguments_are_refused() {
    setup();
    std::thread::spawn(|| {
        // No context on this thread.
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid pointers.
        let rc = unsafe { rdemu_ncclCommInitRank(&mut comm, 1, new_id(), 0) };
        assert_eq!(rc, NCCL_INVALID_USAGE);
        // A destroyed context.
        let ctx = context::create(2).unwrap();
        lifecycle::destroy(ctx).unwrap();
        context::set_current(ctx);
        // SAFETY: valid pointers.
        let rc = unsafe { rdemu_ncclCommInitRank(&mut comm, 1, new_id(), 0) };
        assert_eq!(rc, NCCL_INVALID_USAGE);
        let m = last_error(std::ptr::null_mut());
        assert!(m.contains("primary context released"), "{m}");
        context::set_current(0);

        let mut k = Rank::new(2);
        // A foreign id, a bad rank.
        let mut foreign = new_id();
        foreign.internal[0] = 0;
        assert_eq!(k.init(foreign, 1, 0), NCCL_INVALID_ARGUMENT);
        assert_eq!(k.init(new_id(), 2, 2), NCCL_INVALID_ARGUMENT);
        assert_eq!(k.init(new_id(), 1, 0), NCCL_SUCCESS);
        let (mut cnt, mut dev, mut rank) = (0, 0, 0);
        // SAFETY: valid pointers.
        unsafe {
            assert_eq!(rdemu_ncclCommCount(k.comm, &mut cnt), 0);
            assert_eq!(rdemu_ncclCommCuDevice(k.comm, &mut dev), 0);
            assert_eq!(rdemu_ncclCommUserRank(k.comm, &mut rank), 0);
        }
        assert_eq!((cnt, dev, rank), (1, 2, 0));
        let data = random_f32(5, 300);
        let p = upload(2, &f32_bytes(&data));
        let q = upload(2, &vec![0; 1200]);
        assert_eq!(
            k.all_reduce(p, q, 300, 12, redop::SUM),
            NCCL_INVALID_ARGUMENT
        );
        assert_eq!(
            k.all_reduce(p, q, 300, dtype::FLOAT32, 9),
            NCCL_INVALID_ARGUMENT
        );
        assert_eq!(
            k.all_reduce(0, q, 300, dtype::FLOAT32, 0),
            NCCL_INVALID_ARGUMENT
        );
        assert_eq!(k.all_reduce(0, 0, 0, dtype::FLOAT32, 0), NCCL_SUCCESS);
        // A stream of another device.
        let other = Rank::new(1);
        context::set_current(k.ctx);
        // SAFETY: device pointers; the stream is refused before anything runs.
        let rc = unsafe {
            rdemu_ncclAllReduce(
                p as *const c_void,
                q as *mut c_void,
                300,
                dtype::FLOAT32,
                redop::SUM,
                k.comm,
                other.stream as *mut c_void,
            )
        };
        assert_eq!(rc, NCCL_INVALID_ARGUMENT);
        assert!(last_error(std::ptr::null_mut()).contains("device 1"));
        // One rank: the result is the input.
        assert_eq!(k.all_reduce(p, q, 300, dtype::FLOAT32, redop::SUM), 0);
        k.sync().unwrap();
        assert!(download(2, q, 1200) == f32_bytes(&data));
        // A range past the end of the buffer: an illegal address of the stream's context.
        assert_eq!(k.all_reduce(p, q, 301, dtype::FLOAT32, redop::SUM), 0);
        let e = k.sync().unwrap_err();
        assert!(e.contains("past its end"), "{e}");
        assert_eq!(k.async_error(), NCCL_UNHANDLED_CUDA_ERROR);
        let stale = k.comm;
        k.destroy();
        // SAFETY: a destroyed handle is refused, not dereferenced; null is a no-op.
        unsafe {
            assert_eq!(rdemu_ncclCommDestroy(stale), NCCL_INVALID_ARGUMENT);
            assert_eq!(rdemu_ncclCommDestroy(std::ptr::null_mut()), NCCL_SUCCESS);
        }
    })
    .join()
    .unwrap();
}

#[test]
fn init_all_and_grouped_inits_from_one_thread() {
    setup();
    std::thread::spawn(|| {
        // Two ranks initialised from one thread inside a group (the waits happen at GroupEnd).
        let mut ks = [Rank::new(0), Rank::new(1)];
        let id = new_id();
        // SAFETY: group calls have no pointer arguments.
        assert_eq!(unsafe { rdemu_ncclGroupStart() }, NCCL_SUCCESS);
        for (r, k) in ks.iter_mut().enumerate() {
            context::set_current(k.ctx);
            assert_eq!(k.init(id, 2, r as c_int), NCCL_SUCCESS);
        }
        // SAFETY: as above.
        assert_eq!(unsafe { rdemu_ncclGroupEnd() }, NCCL_SUCCESS);
        // SAFETY: as above; an unmatched end is refused.
        assert_eq!(unsafe { rdemu_ncclGroupEnd() }, NCCL_INVALID_USAGE);
        let inputs: Vec<Vec<f32>> = (0..2).map(|r| random_f32(900 + r, 40_000)).collect();
        let ps: Vec<u64> = ks
            .iter()
            .zip(&inputs)
            .map(|(k, v)| upload(k.dev, &f32_bytes(v)))
            .collect();
        for (k, &p) in ks.iter().zip(&ps) {
            assert_eq!(k.all_reduce(p, p, 40_000, dtype::FLOAT32, redop::SUM), 0);
        }
        let want = f32_bytes(&rank_order_sum(&inputs));
        for (k, &p) in ks.iter_mut().zip(&ps) {
            k.sync().unwrap();
            assert!(download(k.dev, p, 160_000) == want);
            k.destroy();
        }

        // ncclCommInitAll over devices 2 and 0, used with streams of those devices.
        let mut comms = [std::ptr::null_mut(); 2];
        let devs = [2, 0];
        // SAFETY: room for two communicators, two device ordinals.
        let rc = unsafe { rdemu_ncclCommInitAll(comms.as_mut_ptr(), 2, devs.as_ptr()) };
        assert_eq!(rc, NCCL_SUCCESS);
        let mut ks = [Rank::new(2), Rank::new(0)];
        for (k, c) in ks.iter_mut().zip(comms) {
            k.comm = c;
            let (mut dev, mut n) = (-1, -1);
            // SAFETY: valid pointers.
            unsafe {
                assert_eq!(rdemu_ncclCommCuDevice(c, &mut dev), 0);
                assert_eq!(rdemu_ncclCommCount(c, &mut n), 0);
            }
            assert_eq!((dev as usize, n), (k.dev, 2));
        }
        let ps: Vec<u64> = ks
            .iter()
            .zip(&inputs)
            .map(|(k, v)| upload(k.dev, &f32_bytes(v)))
            .collect();
        for (k, &p) in ks.iter().zip(&ps) {
            assert_eq!(k.all_reduce(p, p, 40_000, dtype::FLOAT32, redop::SUM), 0);
        }
        for (k, &p) in ks.iter_mut().zip(&ps) {
            k.sync().unwrap();
            assert!(download(k.dev, p, 160_000) == want);
            // SAFETY: our communicator.
            assert_eq!(unsafe { rdemu_ncclCommFinalize(k.comm) }, NCCL_SUCCESS);
            k.destroy();
        }
    })
    .join()
    .unwrap();
}

#[test]
fn destroy_waits_for_pending_collectives() {
    setup();
    let id = new_id();
    let got = on_ranks(2, move |r| {
        let mut k = Rank::new(r);
        assert_eq!(k.init(id, 2, r as c_int), NCCL_SUCCESS);
        let data = random_f32(300 + r as u64, 50_000);
        let p = upload(k.dev, &f32_bytes(&data));
        if r == 1 {
            std::thread::sleep(Duration::from_millis(300));
        }
        assert_eq!(k.all_reduce(p, p, 50_000, dtype::FLOAT32, redop::SUM), 0);
        // Rank 0 destroys at once: the destroy must wait for the all-reduce (which waits for
        // rank 1), and the result must be complete when it returns.
        let t = Instant::now();
        k.destroy();
        let waited = t.elapsed();
        let out = download(k.dev, p, 200_000);
        k.sync().unwrap();
        (out, waited)
    });
    let inputs: Vec<Vec<f32>> = (0..2).map(|r| random_f32(300 + r, 50_000)).collect();
    let want = f32_bytes(&rank_order_sum(&inputs));
    assert!(got[0].0 == want && got[1].0 == want);
    assert!(got[0].1 >= Duration::from_millis(200), "{:?}", got[0].1);
}

// ---------------------------------------------------------------------------- processes

const CHILD_VAR: &str = "RDROP_EMU_NCCL_TEST_CHILD";

/// Runs this binary again as one rank: `scenario:rank:nranks:idhex`.
fn spawn_child(
    scenario: &str,
    rank: usize,
    nranks: usize,
    id: &ncclUniqueId,
) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(
            CHILD_VAR,
            format!("{scenario}:{rank}:{nranks}:{}", id_to_hex(id)),
        )
        .env("RDROP_EMU_NCCL_TIMEOUT_S", "60")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(c: std::process::Child) -> (bool, String) {
    let out = c.wait_with_output().unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A rank in a child process (does nothing in a normal test run).
#[test]
fn child_entry() {
    let Ok(spec) = std::env::var(CHILD_VAR) else {
        return;
    };
    setup();
    let parts: Vec<&str> = spec.split(':').collect();
    let (scenario, rank, nranks) = (
        parts[0],
        parts[1].parse::<usize>().unwrap(),
        parts[2].parse::<usize>().unwrap(),
    );
    let id = id_from_hex(parts[3]);
    if scenario == "init-timeout" {
        std::env::set_var("RDROP_EMU_NCCL_TIMEOUT_S", "1");
    }
    let mut k = Rank::new(0);
    let t = Instant::now();
    let rc = k.init(id, nranks as c_int, rank as c_int);
    match scenario {
        "sum" => {
            assert_eq!(rc, NCCL_SUCCESS);
            // With the default chunk (4 MiB): one buffer over two chunks, one small.
            for (i, n) in [(1usize << 20) + 5, 3].into_iter().enumerate() {
                let i = i as u64;
                let data = random_f32(1000 + rank as u64 * 10 + i, n);
                let p = upload(0, &f32_bytes(&data));
                assert_eq!(k.all_reduce(p, p, n, dtype::FLOAT32, redop::SUM), 0);
                k.sync().unwrap();
                let inputs: Vec<Vec<f32>> = (0..nranks)
                    .map(|r| random_f32(1000 + r as u64 * 10 + i, n))
                    .collect();
                assert!(download(0, p, n * 4) == f32_bytes(&rank_order_sum(&inputs)));
            }
            k.destroy();
            println!("CHILD-OK rank {rank}");
        }
        "die" => {
            assert_eq!(rc, NCCL_SUCCESS);
            std::thread::sleep(Duration::from_millis(300));
            std::process::abort();
        }
        "wait" => {
            assert_eq!(rc, NCCL_SUCCESS);
            let p = upload(0, &vec![0; 4000]);
            let t = Instant::now();
            assert_eq!(k.all_reduce(p, p, 1000, dtype::FLOAT32, redop::SUM), 0);
            let e = k.sync().unwrap_err();
            println!("CHILD-ERROR after {:?}: {e}", t.elapsed());
            assert!(t.elapsed() < Duration::from_secs(10));
            assert_eq!(k.async_error(), NCCL_REMOTE_ERROR);
            let again = k.all_reduce(p, p, 1000, dtype::FLOAT32, redop::SUM);
            assert_eq!(again, NCCL_REMOTE_ERROR);
            k.destroy();
            println!("CHILD-OK rank {rank}");
        }
        "init-timeout" => {
            let m = last_error(std::ptr::null_mut());
            println!("CHILD-ERROR after {:?}: {m}", t.elapsed());
            assert_eq!(rc, NCCL_REMOTE_ERROR);
            assert!(t.elapsed() < Duration::from_secs(5));
            assert!(m.contains("rank(s) [1, 2] of 3 never came"), "{m}");
            println!("CHILD-OK rank {rank}");
        }
        s => panic!("unknown scenario {s}"),
    }
}

#[test]
fn ranks_as_processes_sum_bit_identically() {
    setup();
    let id = new_id();
    let kids: Vec<_> = (0..2).map(|r| spawn_child("sum", r, 2, &id)).collect();
    for (r, c) in kids.into_iter().enumerate() {
        let (ok, text) = finish(c);
        assert!(
            ok && text.contains(&format!("CHILD-OK rank {r}")),
            "rank {r}:\n{text}"
        );
    }
}

#[test]
fn a_peer_process_that_dies_fails_the_all_reduce_naming_it() {
    setup();
    let id = new_id();
    let waiter = spawn_child("wait", 0, 2, &id);
    let dier = spawn_child("die", 1, 2, &id);
    let pid = dier.id();
    let t = Instant::now();
    let (ok, text) = finish(waiter);
    let (died_ok, _) = finish(dier);
    assert!(!died_ok);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("ncclAllReduce #1: rank 1 (pid {pid}) died")),
        "{text}"
    );
}

#[test]
fn init_times_out_naming_the_missing_ranks() {
    setup();
    let (ok, text) = finish(spawn_child("init-timeout", 0, 3, &new_id()));
    assert!(ok && text.contains("CHILD-OK"), "{text}");
}
