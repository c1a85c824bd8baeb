//! The emulated NCCL (`libnccl.so.2`): communicators whose ranks are threads of one process or
//! separate processes (each with its own emulated devices), meeting in a shared-memory file
//! named after the `ncclUniqueId`.
//!
//! - `ncclGetUniqueId` makes 128 bytes: a magic prefix and random bytes (`/dev/urandom`, pid,
//!   time). `ncclCommInitRank` opens (or creates) `/dev/shm/rdrop-emu-nccl-<hex>`: a header
//!   (magic, rank count, chunk size), one record per rank (joined, pid, device, progress
//!   counters, what it is doing) and one data slot per rank of `RDROP_EMU_NCCL_CHUNK` bytes
//!   (default 4 MiB). It waits until every rank joined (`RDROP_EMU_NCCL_TIMEOUT_S`, default
//!   120 s, `0`: no limit), then unlinks the file (the mappings stay valid).
//! - A collective runs on its stream's worker, in chunks ("steps", numbered per communicator):
//!   each rank copies its chunk into its slot and raises its `arrived` counter, waits for every
//!   rank's, checks that all ranks run the same collective (count, type, operation), reduces
//!   the slots **in rank order 0..n** into its receive buffer (so every rank gets bit-identical
//!   results) and raises `done`; a slot is rewritten only once every rank is done with it.
//! - Waits spin briefly and then sleep 50 µs, and check the communicator's abort flag
//!   (`ncclCommAbort` from another thread makes a pending collective return, its receive buffer
//!   unspecified), the peers (each rank holds an open-file-description lock on its own byte of
//!   the file for its lifetime, which the kernel drops when the process dies, even before it is
//!   reaped; ranks that destroy, abort or fail say so in their record) and the time limit. A
//!   dead or failed peer fails the collective with a message naming the rank, its pid and the
//!   collective; the communicator's asynchronous error becomes `ncclRemoteError`.
//!
//! Types: every `ncclDataType_t` (halves accumulate in f32); operations: sum, prod, max, min,
//! avg. Also `ncclBroadcast`. `ncclGroupStart`/`ncclGroupEnd` only matter for
//! `ncclCommInitRank` of several ranks from one thread (the waits for the other ranks happen at
//! `ncclGroupEnd`); collectives are always enqueued at once.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{report, EmuError, CUDA_ERROR_LAUNCH_FAILED};

/// `ncclResult_t`.
pub type ncclResult_t = c_int;
/// `ncclSuccess`.
pub const NCCL_SUCCESS: ncclResult_t = 0;
/// `ncclUnhandledCudaError`.
pub const NCCL_UNHANDLED_CUDA_ERROR: ncclResult_t = 1;
/// `ncclSystemError`.
pub const NCCL_SYSTEM_ERROR: ncclResult_t = 2;
/// `ncclInternalError`.
pub const NCCL_INTERNAL_ERROR: ncclResult_t = 3;
/// `ncclInvalidArgument`.
pub const NCCL_INVALID_ARGUMENT: ncclResult_t = 4;
/// `ncclInvalidUsage`.
pub const NCCL_INVALID_USAGE: ncclResult_t = 5;
/// `ncclRemoteError`.
pub const NCCL_REMOTE_ERROR: ncclResult_t = 6;
/// `ncclInProgress`.
pub const NCCL_IN_PROGRESS: ncclResult_t = 7;

/// The version `ncclGetVersion` reports (2.27.3).
pub const NCCL_VERSION_CODE: c_int = 22703;
/// Bytes of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;
/// The prefix of the ids this emulator makes.
pub const ID_MAGIC: &[u8; 8] = b"RDEMNCCL";

/// `ncclUniqueId` (passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ncclUniqueId {
    /// The bytes.
    pub internal: [c_char; UNIQUE_ID_BYTES],
}

/// `ncclComm_t`: an opaque handle (not a pointer to anything).
pub type ncclComm_t = *mut c_void;

/// `ncclDataType_t` values.
pub mod dtype {
    use std::ffi::c_int;
    pub const INT8: c_int = 0;
    pub const UINT8: c_int = 1;
    pub const INT32: c_int = 2;
    pub const UINT32: c_int = 3;
    pub const INT64: c_int = 4;
    pub const UINT64: c_int = 5;
    pub const FLOAT16: c_int = 6;
    pub const FLOAT32: c_int = 7;
    pub const FLOAT64: c_int = 8;
    pub const BFLOAT16: c_int = 9;
}

/// `ncclRedOp_t` values.
pub mod redop {
    use std::ffi::c_int;
    pub const SUM: c_int = 0;
    pub const PROD: c_int = 1;
    pub const MAX: c_int = 2;
    pub const MIN: c_int = 3;
    pub const AVG: c_int = 4;
}

const DTYPE_NAMES: [&str; 10] = [
    "ncclInt8",
    "ncclUint8",
    "ncclInt32",
    "ncclUint32",
    "ncclInt64",
    "ncclUint64",
    "ncclFloat16",
    "ncclFloat32",
    "ncclFloat64",
    "ncclBfloat16",
];
const DTYPE_SIZES: [usize; 10] = [1, 1, 4, 4, 8, 8, 2, 4, 8, 2];
const REDOP_NAMES: [&str; 5] = ["ncclSum", "ncclProd", "ncclMax", "ncclMin", "ncclAvg"];

/// The message of a result code, as the real `ncclGetErrorString` gives it.
pub fn error_string(code: ncclResult_t) -> &'static str {
    match code {
        NCCL_SUCCESS => "no error",
        NCCL_UNHANDLED_CUDA_ERROR => "unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
        NCCL_SYSTEM_ERROR => "unhandled system error (run with NCCL_DEBUG=INFO for details)",
        NCCL_INTERNAL_ERROR => "internal error - please report this issue to the NCCL developers",
        NCCL_INVALID_ARGUMENT => "invalid argument (run with NCCL_DEBUG=WARN for details)",
        NCCL_INVALID_USAGE => "invalid usage (run with NCCL_DEBUG=WARN for details)",
        NCCL_REMOTE_ERROR => "remote process exited or there was a network error",
        NCCL_IN_PROGRESS => "NCCL operation in progress",
        _ => "unknown result code",
    }
}

// ------------------------------------------------------------------------------ settings

/// Default bytes of one rank's data slot.
pub const DEFAULT_CHUNK: usize = 4 << 20;
const PAGE: usize = 4096;
/// Offset of the rank records in the file.
const RECORDS: usize = PAGE;
/// Bytes of one rank record.
const REC_BYTES: usize = 128;
/// Most ranks of a communicator.
pub const MAX_RANKS: usize = 4096;
/// Offset of the byte each rank locks (beyond the end of the file: only a lock, never data).
const LOCK_BASE: i64 = 1 << 40;
const FILE_VERSION: u64 = 1;

/// `RDROP_EMU_NCCL_TIMEOUT_S` (default 120 s; `0`: none).
fn timeout_from_env() -> Option<Duration> {
    let v = std::env::var("RDROP_EMU_NCCL_TIMEOUT_S").ok();
    let secs = v
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(120.0);
    (secs > 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs))
}

/// `RDROP_EMU_NCCL_CHUNK` (bytes, `64KiB`, …; whole pages; default 4 MiB), read by the rank
/// that creates the communicator's file.
fn chunk_from_env() -> usize {
    std::env::var("RDROP_EMU_NCCL_CHUNK")
        .ok()
        .and_then(|v| crate::config::parse_bytes(&v))
        .map(|b| (b as usize).clamp(PAGE, 1 << 30).div_ceil(PAGE) * PAGE)
        .unwrap_or(DEFAULT_CHUNK)
}

fn shm_dir() -> std::path::PathBuf {
    let p = std::path::Path::new("/dev/shm");
    if p.is_dir() {
        p.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ------------------------------------------------------------------------ shared layout

/// The file's header (offset 0).
#[repr(C)]
struct Global {
    magic: AtomicU64,
    version: AtomicU64,
    nranks: AtomicU64,
    chunk: AtomicU64,
    joined: AtomicU64,
}

/// One rank's record.
#[repr(C)]
struct Rec {
    joined: AtomicU64,
    pid: AtomicU64,
    device: AtomicU64,
    /// `GONE_*`: why the rank left (0: it has not).
    gone: AtomicU64,
    /// The last step whose data is in its slot.
    arrived: AtomicU64,
    /// The last step it has finished reading every slot of.
    done: AtomicU64,
    /// What it runs at step `arrived`: collective number, count, kind/type/operation.
    op_index: AtomicU64,
    count: AtomicU64,
    meta: AtomicU64,
}

const GONE_DESTROYED: u64 = 1;
const GONE_ABORTED: u64 = 2;
const GONE_FAILED: u64 = 3;

const FILE_MAGIC: u64 = u64::from_le_bytes(*b"RDNCCLF1");

fn data_offset(nranks: usize) -> usize {
    RECORDS + (nranks * REC_BYTES).div_ceil(PAGE) * PAGE
}

fn file_len(nranks: usize, chunk: usize) -> usize {
    data_offset(nranks) + nranks * chunk
}

// --------------------------------------------------------------------------- communicator

struct Sched {
    /// Collectives issued (the next one is `issued + 1`).
    issued: u64,
    /// Collectives finished (run, failed or skipped).
    finished: u64,
    /// The next step to hand out.
    next_step: u64,
    /// The last step this rank has executed (or given up).
    executed: u64,
}

/// One rank of a communicator.
struct CommInner {
    /// `rdrop-emu-nccl-<hex>` (for messages).
    name: String,
    path: CString,
    fd: c_int,
    base: *mut u8,
    len: usize,
    nranks: usize,
    rank: usize,
    device: usize,
    chunk: usize,
    data_off: usize,
    timeout: Option<Duration>,
    /// Open-file-description locks work (else pids are probed).
    ofd: bool,
    ready: AtomicBool,
    aborted: AtomicBool,
    unlinked: AtomicBool,
    async_err: AtomicI32,
    async_msg: Mutex<Option<String>>,
    sched: Mutex<Sched>,
    cv: Condvar,
}

// SAFETY: `base` is a shared mapping owned by this value (unmapped in Drop only); everything
// it points to that is shared is accessed through atomics, and the data slots are only written
// by the owning rank between the step handshakes.
unsafe impl Send for CommInner {}
// SAFETY: as above.
unsafe impl Sync for CommInner {}

impl Drop for CommInner {
    fn drop(&mut self) {
        // SAFETY: the mapping and descriptor were made by `join` and are released once, here.
        unsafe {
            libc::munmap(self.base as *mut c_void, self.len);
            libc::close(self.fd);
        }
    }
}

/// Why a wait ended early.
enum Fail {
    /// This communicator was aborted.
    Aborted,
    /// A peer died, left or failed, or the time ran out (`ncclRemoteError`).
    Remote(String),
    /// The ranks disagree about the collective (`ncclInvalidUsage`).
    Usage(String),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    AllReduce,
    Broadcast,
}

/// One collective as issued.
#[derive(Clone, Debug)]
struct Desc {
    kind: Kind,
    index: u64,
    count: usize,
    dtype: c_int,
    /// The reduction (all-reduce) or root (broadcast).
    arg: c_int,
    first_step: u64,
    steps: u64,
    /// Elements per step.
    per_step: usize,
}

impl Desc {
    fn call(&self) -> &'static str {
        match self.kind {
            Kind::AllReduce => "ncclAllReduce",
            Kind::Broadcast => "ncclBroadcast",
        }
    }

    fn what(&self) -> String {
        format!("{} #{}", self.call(), self.index)
    }

    fn meta(&self) -> u64 {
        let k = match self.kind {
            Kind::AllReduce => 1u64,
            Kind::Broadcast => 2,
        };
        (k << 56) | ((self.dtype as u64 & 0xff) << 48) | (self.arg as u32 as u64)
    }
}

fn describe_sig(index: u64, count: u64, meta: u64) -> String {
    let kind = match meta >> 56 {
        1 => "ncclAllReduce",
        2 => "ncclBroadcast",
        _ => "?",
    };
    let dt = ((meta >> 48) & 0xff) as usize;
    let dt = DTYPE_NAMES.get(dt).copied().unwrap_or("?");
    let arg = (meta & 0xffff_ffff) as usize;
    let arg = if meta >> 56 == 1 {
        REDOP_NAMES.get(arg).copied().unwrap_or("?").to_string()
    } else {
        format!("root {arg}")
    };
    format!("{kind} #{index} of {count} x {dt} ({arg})")
}

impl CommInner {
    fn global(&self) -> &Global {
        // SAFETY: offset 0 of a mapping of at least one page; `Global` is atomics only.
        unsafe { &*(self.base as *const Global) }
    }

    fn rec(&self, r: usize) -> &Rec {
        debug_assert!(r < self.nranks);
        // SAFETY: record `r < nranks` lies inside the mapping (see `file_len`); atomics only.
        unsafe { &*(self.base.add(RECORDS + r * REC_BYTES) as *const Rec) }
    }

    fn me(&self) -> &Rec {
        self.rec(self.rank)
    }

    fn slot(&self, r: usize) -> *mut u8 {
        // SAFETY: slot `r < nranks` lies inside the mapping.
        unsafe { self.base.add(self.data_off + r * self.chunk) }
    }

    fn lock_sched(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_async(&self, code: ncclResult_t, msg: &str) {
        if self
            .async_err
            .compare_exchange(NCCL_SUCCESS, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            *self.async_msg.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.to_string());
        }
    }

    fn async_error(&self) -> Option<(ncclResult_t, String)> {
        let code = self.async_err.load(Ordering::Acquire);
        (code != NCCL_SUCCESS).then(|| {
            let m = self.async_msg.lock().unwrap_or_else(|p| p.into_inner());
            (code, m.clone().unwrap_or_default())
        })
    }

    /// Marks this rank as gone (the first reason stays), so that peers stop waiting for it.
    fn leave(&self, why: u64) {
        let _ = self
            .me()
            .gone
            .compare_exchange(0, why, Ordering::AcqRel, Ordering::Acquire);
    }

    fn unlink(&self) {
        if !self.unlinked.swap(true, Ordering::AcqRel) {
            // SAFETY: a NUL-terminated path.
            unsafe { libc::unlink(self.path.as_ptr()) };
        }
    }

    /// Whether rank `r`'s process (or thread's open file) still holds its lock.
    fn alive(&self, r: usize) -> bool {
        if self.ofd {
            // SAFETY: a zeroed `flock` is a valid argument; F_OFD_GETLK only fills it.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as _;
            fl.l_whence = libc::SEEK_SET as _;
            fl.l_start = LOCK_BASE + r as i64;
            fl.l_len = 1;
            // SAFETY: a valid descriptor and flock.
            let rc = unsafe { libc::fcntl(self.fd, libc::F_OFD_GETLK, &mut fl) };
            return rc != 0 || fl.l_type != libc::F_UNLCK as _;
        }
        let pid = self.rec(r).pid.load(Ordering::Acquire) as libc::pid_t;
        // SAFETY: getpid has no preconditions.
        if pid <= 0 || pid == unsafe { libc::getpid() } {
            return true;
        }
        // SAFETY: signal 0 only probes.
        let exists = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !exists {
            return false;
        }
        // A zombie (dead, not yet reaped) is dead.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !matches!(
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().chars().next()),
                Some(Some('Z' | 'X'))
            ),
            Err(_) => true,
        }
    }

    /// What is wrong with peer `r`, if anything: it left (saying why) or died.
    fn peer_problem(&self, r: usize) -> Option<String> {
        let rec = self.rec(r);
        let pid = rec.pid.load(Ordering::Acquire);
        let said = |g: u64| -> Option<String> {
            let why = match g {
                0 => return None,
                GONE_DESTROYED => "destroyed its communicator (ncclCommDestroy)",
                GONE_ABORTED => "aborted its communicator (ncclCommAbort)",
                _ => "failed (see its own report)",
            };
            Some(format!("rank {r} (pid {pid}) {why}"))
        };
        if let Some(m) = said(rec.gone.load(Ordering::Acquire)) {
            return Some(m);
        }
        if !self.alive(r) {
            // It may have said goodbye just before closing its file.
            return said(rec.gone.load(Ordering::Acquire))
                .or_else(|| Some(format!("rank {r} (pid {pid}) died")));
        }
        None
    }

    /// Waits until every rank's counter (`arrived` or `done`) reaches `step`.
    fn wait_all(
        &self,
        what: &str,
        step: u64,
        done: bool,
        detail: &dyn Fn() -> String,
    ) -> Result<(), Fail> {
        let field = |r: usize| {
            let rec = self.rec(r);
            if done {
                rec.done.load(Ordering::Acquire)
            } else {
                rec.arrived.load(Ordering::Acquire)
            }
        };
        let start = Instant::now();
        let mut last_check = start;
        let mut spins = 0u32;
        loop {
            let missing: Vec<usize> = (0..self.nranks).filter(|&r| field(r) < step).collect();
            if missing.is_empty() {
                return Ok(());
            }
            if self.aborted.load(Ordering::Acquire) {
                return Err(Fail::Aborted);
            }
            if spins < 1000 {
                spins += 1;
                if spins.is_multiple_of(16) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            // 50 µs while the peers are close, 500 µs once they are clearly busy elsewhere.
            let long = start.elapsed() > Duration::from_millis(50);
            std::thread::sleep(Duration::from_micros(if long { 500 } else { 50 }));
            let now = Instant::now();
            if now - last_check < Duration::from_millis(2) {
                continue;
            }
            last_check = now;
            for &r in &missing {
                if let Some(p) = self.peer_problem(r) {
                    if field(r) >= step {
                        continue; // it got there before leaving
                    }
                    return Err(Fail::Remote(format!(
                        "{what}: {p}; rank {} (pid {}) was waiting for it {}",
                        self.rank,
                        std::process::id(),
                        detail()
                    )));
                }
            }
            if let Some(t) = self.timeout {
                if now - start > t {
                    return Err(Fail::Remote(format!(
                        "{what}: timed out after {:.1} s waiting for rank(s) {missing:?} of {} \
                         ({}; RDROP_EMU_NCCL_TIMEOUT_S sets the limit, 0 for none): did every \
                         rank issue the same collectives in the same order?",
                        t.as_secs_f64(),
                        self.nranks,
                        detail()
                    )));
                }
            }
        }
    }

    /// Waits until every rank has joined (the rendezvous of `ncclCommInitRank`).
    fn await_all(&self) -> Result<(), (ncclResult_t, String)> {
        let start = Instant::now();
        loop {
            if self.global().joined.load(Ordering::Acquire) >= self.nranks as u64 {
                break;
            }
            if self.aborted.load(Ordering::Acquire) {
                return Err((
                    NCCL_INVALID_USAGE,
                    "ncclCommInitRank: the communicator was aborted during its initialisation"
                        .into(),
                ));
            }
            let joined: Vec<usize> = (0..self.nranks)
                .filter(|&r| self.rec(r).joined.load(Ordering::Acquire) != 0)
                .collect();
            for &r in &joined {
                if r != self.rank {
                    if let Some(p) = self.peer_problem(r) {
                        self.fail_init();
                        return Err((
                            NCCL_REMOTE_ERROR,
                            format!("ncclCommInitRank: {p} before every rank joined"),
                        ));
                    }
                }
            }
            if let Some(t) = self.timeout {
                if start.elapsed() > t {
                    let missing: Vec<usize> =
                        (0..self.nranks).filter(|r| !joined.contains(r)).collect();
                    self.fail_init();
                    return Err((
                        NCCL_REMOTE_ERROR,
                        format!(
                            "ncclCommInitRank: timed out after {:.1} s: rank(s) {missing:?} of {} \
                             never came (rank(s) {joined:?} joined; this is rank {}, device {}; \
                             RDROP_EMU_NCCL_TIMEOUT_S sets the limit)",
                            t.as_secs_f64(),
                            self.nranks,
                            self.rank,
                            self.device
                        ),
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.ready.store(true, Ordering::Release);
        self.unlink();
        Ok(())
    }

    fn fail_init(&self) {
        self.leave(GONE_FAILED);
        self.unlink();
    }

    /// Waits for this collective's turn (collectives of a communicator run in issue order).
    fn wait_turn(&self, first_step: u64) -> Result<(), Fail> {
        let mut g = self.lock_sched();
        while g.executed + 1 < first_step {
            if self.aborted.load(Ordering::Acquire) {
                return Err(Fail::Aborted);
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(5))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    fn wait_ready(&self) -> Result<(), Fail> {
        let start = Instant::now();
        while !self.ready.load(Ordering::Acquire) {
            if self.aborted.load(Ordering::Acquire) {
                return Err(Fail::Aborted);
            }
            if let Some(t) = self.timeout {
                if start.elapsed() > t {
                    return Err(Fail::Remote(
                        "the communicator never finished its initialisation (was \
                         ncclGroupEnd called?)"
                            .into(),
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Waits until every collective issued so far has finished.
    fn wait_idle(&self) {
        let mut g = self.lock_sched();
        while g.finished < g.issued {
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Runs the steps of `d` (send and receive already checked).
    fn steps(&self, d: &Desc, send: *const u8, recv: *mut u8) -> Result<(), Fail> {
        let what = d.what();
        let esz = DTYPE_SIZES[d.dtype as usize];
        let meta = d.meta();
        for k in 0..d.steps {
            let s = d.first_step + k;
            let off = k as usize * d.per_step;
            let n = d.per_step.min(d.count - off);
            let detail = || {
                format!(
                    "at chunk {} of {} ({} elements of {})",
                    k + 1,
                    d.steps,
                    n,
                    d.count
                )
            };
            // Every rank must be done with step s-1 before this rank rewrites its slot.
            self.wait_all(&what, s - 1, true, &detail)?;
            let contributes = d.kind == Kind::AllReduce || d.arg as usize == self.rank;
            if contributes {
                // SAFETY: `send` covers `count` elements (resolved), the slot `chunk` bytes
                // (n * esz <= chunk); they never overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        send.add(off * esz),
                        self.slot(self.rank),
                        n * esz,
                    )
                };
            }
            let me = self.me();
            me.op_index.store(d.index, Ordering::Relaxed);
            me.count.store(d.count as u64, Ordering::Relaxed);
            me.meta.store(meta, Ordering::Relaxed);
            me.arrived.store(s, Ordering::Release);
            self.wait_all(&what, s, false, &detail)?;
            for r in 0..self.nranks {
                let rec = self.rec(r);
                let theirs = (
                    rec.op_index.load(Ordering::Relaxed),
                    rec.count.load(Ordering::Relaxed),
                    rec.meta.load(Ordering::Relaxed),
                );
                if theirs != (d.index, d.count as u64, meta) {
                    // A peer that aborted or died left a stale record: say that instead (one
                    // that failed most likely saw this same disagreement).
                    let failed = rec.gone.load(Ordering::Acquire) == GONE_FAILED;
                    if let Some(p) = self.peer_problem(r).filter(|_| !failed) {
                        return Err(Fail::Remote(format!(
                            "{what}: {p}; rank {} (pid {}) was waiting for it {}",
                            self.rank,
                            std::process::id(),
                            detail()
                        )));
                    }
                    return Err(Fail::Usage(format!(
                        "{what}: the ranks disagree: rank {} runs {}, rank {r} runs {} (every \
                         rank must issue the same collectives with the same counts, types and \
                         operations in the same order)",
                        self.rank,
                        describe_sig(d.index, d.count as u64, meta),
                        describe_sig(theirs.0, theirs.1, theirs.2)
                    )));
                }
            }
            // SAFETY: `recv` covers `count` elements (resolved); the slots `n * esz` bytes each.
            unsafe {
                let dst = recv.add(off * esz);
                match d.kind {
                    Kind::AllReduce => {
                        let srcs: Vec<*const u8> = (0..self.nranks)
                            .map(|r| self.slot(r) as *const u8)
                            .collect();
                        reduce(d.dtype, d.arg, &srcs, dst, n);
                    }
                    Kind::Broadcast => {
                        std::ptr::copy_nonoverlapping(self.slot(d.arg as usize), dst, n * esz)
                    }
                }
            }
            me.done.store(s, Ordering::Release);
        }
        Ok(())
    }
}

/// A collective on its way through a stream: its end (even when the stream skips it) advances
/// the communicator.
struct Pending {
    c: Arc<CommInner>,
    d: Desc,
    send: u64,
    recv: u64,
    ran: bool,
}

impl Pending {
    fn run(&mut self) -> Result<(), EmuError> {
        self.ran = true;
        let c = self.c.clone();
        let d = self.d.clone();
        let what = d.what();
        let failed = |code: ncclResult_t, m: String| {
            c.set_async(code, &m);
            c.leave(GONE_FAILED);
            EmuError::new(CUDA_ERROR_LAUNCH_FAILED, m)
        };
        let aborted = || {
            report(&format!(
                "{what} (rank {}, device {}): the communicator was aborted (ncclCommAbort); \
                 its receive buffer is left unspecified",
                c.rank, c.device
            ));
            Ok(())
        };
        match c.wait_turn(d.first_step).and_then(|_| c.wait_ready()) {
            Ok(()) => {}
            Err(Fail::Aborted) => return aborted(),
            Err(Fail::Remote(m)) => return Err(failed(NCCL_REMOTE_ERROR, format!("{what}: {m}"))),
            Err(Fail::Usage(m)) => return Err(failed(NCCL_INVALID_USAGE, m)),
        }
        if c.aborted.load(Ordering::Acquire) {
            return aborted();
        }
        if let Some((_, m)) = c.async_error() {
            return Err(EmuError::new(
                CUDA_ERROR_LAUNCH_FAILED,
                format!("{what}: not run: the communicator failed before: {m}"),
            ));
        }
        let bytes = (d.count * DTYPE_SIZES[d.dtype as usize]) as u64;
        let reads = d.kind == Kind::AllReduce || d.arg as usize == c.rank;
        let resolved = (|| {
            let s = if reads {
                crate::memory::resolve(c.device, self.send, bytes, false)?
            } else {
                std::ptr::null_mut()
            };
            let r = crate::memory::resolve(c.device, self.recv, bytes, true)?;
            Ok::<_, EmuError>((s, r))
        })();
        let (send, recv) = match resolved {
            Ok(p) => p,
            Err(e) => {
                let m = format!("{what} (rank {}): {}", c.rank, e.message);
                c.set_async(NCCL_UNHANDLED_CUDA_ERROR, &m);
                c.leave(GONE_FAILED);
                return Err(EmuError::new(e.code, m));
            }
        };
        match c.steps(&d, send, recv) {
            Ok(()) => Ok(()),
            Err(Fail::Aborted) => aborted(),
            Err(Fail::Remote(m)) => Err(failed(NCCL_REMOTE_ERROR, m)),
            Err(Fail::Usage(m)) => Err(failed(NCCL_INVALID_USAGE, m)),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let c = &self.c;
        if !self.ran {
            let m = format!(
                "{} (rank {}) was skipped: its stream's context has an error",
                self.d.what(),
                c.rank
            );
            c.set_async(NCCL_UNHANDLED_CUDA_ERROR, &m);
            c.leave(GONE_FAILED);
        }
        let mut g = c.lock_sched();
        g.executed = g.executed.max(self.d.first_step + self.d.steps - 1);
        g.finished += 1;
        c.cv.notify_all();
    }
}

// ------------------------------------------------------------------------------ reduction

trait Acc: Copy {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn max_(self, o: Self) -> Self;
    fn min_(self, o: Self) -> Self;
    fn div_n(self, n: usize) -> Self;
}

macro_rules! int_acc {
    ($($t:ty),*) => {$(
        impl Acc for $t {
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn max_(self, o: Self) -> Self { self.max(o) }
            fn min_(self, o: Self) -> Self { self.min(o) }
            fn div_n(self, n: usize) -> Self { self / (n as $t) }
        }
    )*};
}
int_acc!(i8, u8, i32, u32, i64, u64);

macro_rules! float_acc {
    ($($t:ty),*) => {$(
        impl Acc for $t {
            fn add(self, o: Self) -> Self { self + o }
            fn mul(self, o: Self) -> Self { self * o }
            fn max_(self, o: Self) -> Self { self.max(o) }
            fn min_(self, o: Self) -> Self { self.min(o) }
            fn div_n(self, n: usize) -> Self { self / (n as $t) }
        }
    )*};
}
float_acc!(f32, f64);

/// `dst[i] = op(src0[i], src1[i], …)` in rank order, through the accumulator type `A`.
///
/// # Safety
/// Every source holds `n` `T`s and `dst` has room for `n` (any alignment).
unsafe fn red<T: Copy, A: Acc>(
    op: c_int,
    srcs: &[*const u8],
    dst: *mut u8,
    n: usize,
    load: impl Fn(T) -> A,
    store: impl Fn(A) -> T,
) {
    unsafe fn go<T: Copy, A: Acc>(
        srcs: &[*const u8],
        dst: *mut u8,
        n: usize,
        load: &impl Fn(T) -> A,
        store: &impl Fn(A) -> T,
        f: impl Fn(A, A) -> A,
        avg: bool,
    ) {
        let nr = srcs.len();
        for i in 0..n {
            let mut acc = load((srcs[0] as *const T).add(i).read_unaligned());
            for s in &srcs[1..] {
                acc = f(acc, load((*s as *const T).add(i).read_unaligned()));
            }
            if avg {
                acc = acc.div_n(nr);
            }
            (dst as *mut T).add(i).write_unaligned(store(acc));
        }
    }
    match op {
        redop::PROD => go(srcs, dst, n, &load, &store, A::mul, false),
        redop::MAX => go(srcs, dst, n, &load, &store, A::max_, false),
        redop::MIN => go(srcs, dst, n, &load, &store, A::min_, false),
        redop::AVG => go(srcs, dst, n, &load, &store, A::add, true),
        _ => go(srcs, dst, n, &load, &store, A::add, false),
    }
}

/// Reduces `n` elements of type `dt` from each source into `dst`, in source order.
///
/// # Safety
/// As [`red`].
unsafe fn reduce(dt: c_int, op: c_int, srcs: &[*const u8], dst: *mut u8, n: usize) {
    use half::{bf16, f16};
    fn id<T>(x: T) -> T {
        x
    }
    match dt {
        dtype::INT8 => red::<i8, i8>(op, srcs, dst, n, id, id),
        dtype::UINT8 => red::<u8, u8>(op, srcs, dst, n, id, id),
        dtype::INT32 => red::<i32, i32>(op, srcs, dst, n, id, id),
        dtype::UINT32 => red::<u32, u32>(op, srcs, dst, n, id, id),
        dtype::INT64 => red::<i64, i64>(op, srcs, dst, n, id, id),
        dtype::UINT64 => red::<u64, u64>(op, srcs, dst, n, id, id),
        dtype::FLOAT16 => red::<f16, f32>(op, srcs, dst, n, f16::to_f32, f16::from_f32),
        dtype::FLOAT32 => red::<f32, f32>(op, srcs, dst, n, id, id),
        dtype::FLOAT64 => red::<f64, f64>(op, srcs, dst, n, id, id),
        dtype::BFLOAT16 => red::<bf16, f32>(op, srcs, dst, n, bf16::to_f32, bf16::from_f32),
        _ => {}
    }
}

/// The reference result of an all-reduce (rank-order, as the collectives compute it), for
/// tests: `inputs[r]` is rank r's buffer of `n` elements of `dt` as bytes.
pub fn reference_reduce(dt: c_int, op: c_int, inputs: &[Vec<u8>], n: usize) -> Vec<u8> {
    let esz = DTYPE_SIZES.get(dt as usize).copied().unwrap_or(0);
    let mut out = vec![0u8; n * esz];
    if esz == 0 || inputs.is_empty() || inputs.iter().any(|i| i.len() < n * esz) {
        return out;
    }
    let srcs: Vec<*const u8> = inputs.iter().map(|v| v.as_ptr()).collect();
    // SAFETY: every input holds n elements (checked), `out` has room for n.
    unsafe { reduce(dt, op, &srcs, out.as_mut_ptr(), n) };
    out
}

// ----------------------------------------------------------------------------- handles

const COMM_TAG: usize = 0x00cc_c000_0000;

fn comms() -> MutexGuard<'static, HashMap<usize, Arc<CommInner>>> {
    static C: OnceLock<Mutex<HashMap<usize, Arc<CommInner>>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn register(c: Arc<CommInner>) -> ncclComm_t {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let h = COMM_TAG | (NEXT.fetch_add(1, Ordering::Relaxed) as usize & 0xfff_ffff);
    comms().insert(h, c);
    h as ncclComm_t
}

fn lookup(call: &str, comm: ncclComm_t) -> Result<Arc<CommInner>, ncclResult_t> {
    let h = comm as usize;
    comms().get(&h).cloned().ok_or_else(|| {
        fail(
            NCCL_INVALID_ARGUMENT,
            format!(
                "{call}: communicator {h:#x} is not a live communicator{}",
                if h == 0 {
                    " (null)"
                } else if h & !0xfff_ffff == COMM_TAG {
                    " (already destroyed or aborted)"
                } else {
                    ""
                }
            ),
        )
    })
}

fn take(call: &str, comm: ncclComm_t) -> Result<Arc<CommInner>, ncclResult_t> {
    // One lock: of two racing destroy/abort calls, only one gets the communicator.
    let c = comms().remove(&(comm as usize));
    match c {
        Some(c) => Ok(c),
        None => lookup(call, comm),
    }
}

thread_local! {
    static LAST: RefCell<CString> = RefCell::new(CString::default());
    static GROUP: RefCell<(u32, Vec<Arc<CommInner>>)> = const { RefCell::new((0, Vec::new())) };
}

/// Reports `msg`, keeps it for `ncclGetLastError` and returns `code`.
fn fail(code: ncclResult_t, msg: String) -> ncclResult_t {
    report(&msg);
    LAST.with(|l| {
        *l.borrow_mut() = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    });
    code
}

/// Runs an export's body, turning a panic into `ncclInternalError`.
fn guard(call: &str, f: impl FnOnce() -> ncclResult_t) -> ncclResult_t {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(c) => c,
        Err(_) => fail(
            NCCL_INTERNAL_ERROR,
            format!("{call}: internal error of the emulator (a panic)"),
        ),
    }
}

// ----------------------------------------------------------------------------- joining

fn random_bytes(out: &mut [u8]) {
    use std::io::Read;
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(out))
        .is_ok();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = t
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, b) in out.iter_mut().enumerate() {
        // splitmix64, mixed in (the only source when /dev/urandom is missing)
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = z;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        let v = (x >> ((i % 8) * 8)) as u8;
        *b = if ok { *b ^ v } else { v };
    }
}

/// A fresh unique id.
pub fn new_unique_id() -> [u8; UNIQUE_ID_BYTES] {
    let mut id = [0u8; UNIQUE_ID_BYTES];
    id[..8].copy_from_slice(ID_MAGIC);
    random_bytes(&mut id[8..40]);
    id
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Closes `fd` (which also drops its flock).
fn close_fd(fd: c_int) {
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(fd) };
}

/// Opens (or creates) the communicator's file and registers `rank` (no waiting).
fn join(
    id: &[u8; UNIQUE_ID_BYTES],
    nranks: c_int,
    rank: c_int,
    device: usize,
) -> Result<Arc<CommInner>, (ncclResult_t, String)> {
    let call = "ncclCommInitRank";
    if &id[..8] != ID_MAGIC {
        return Err((
            NCCL_INVALID_ARGUMENT,
            format!(
                "{call}: the unique id (starting {}) was not made by this emulator's \
                 ncclGetUniqueId (all ranks must use the id rank 0 made)",
                hex(&id[..8])
            ),
        ));
    }
    if nranks < 1 || nranks as usize > MAX_RANKS {
        return Err((
            NCCL_INVALID_ARGUMENT,
            format!("{call}: nranks {nranks} (1..={MAX_RANKS})"),
        ));
    }
    if rank < 0 || rank >= nranks {
        return Err((
            NCCL_INVALID_ARGUMENT,
            format!("{call}: rank {rank} is not in 0..{nranks}"),
        ));
    }
    let (nranks, rank) = (nranks as usize, rank as usize);
    let name = format!("rdrop-emu-nccl-{}", hex(&id[8..40]));
    let path = shm_dir().join(&name);
    let cpath = CString::new(path.to_string_lossy().into_owned()).map_err(|_| {
        (
            NCCL_SYSTEM_ERROR,
            format!("{call}: bad path {}", path.display()),
        )
    })?;
    // SAFETY: a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err((
            NCCL_SYSTEM_ERROR,
            os_err(&format!("{call}: cannot open {}", path.display())),
        ));
    }
    let sys = |m: String| {
        close_fd(fd);
        Err((NCCL_SYSTEM_ERROR, m))
    };
    // Initialisation under an exclusive flock (per open file, so it also orders threads).
    // SAFETY: a valid descriptor.
    if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
        return sys(os_err(&format!("{call}: flock {}", path.display())));
    }
    // SAFETY: a zeroed stat is a valid out-argument.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out-pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return sys(os_err(&format!("{call}: fstat {}", path.display())));
    }
    let created = st.st_size == 0;
    let (file_nranks, chunk) = if created {
        let chunk = chunk_from_env();
        let len = file_len(nranks, chunk);
        // SAFETY: valid descriptor.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            let m = os_err(&format!(
                "{call}: cannot size {} to {len} bytes",
                path.display()
            ));
            // SAFETY: a NUL-terminated path.
            unsafe { libc::unlink(cpath.as_ptr()) };
            return sys(m);
        }
        // Reserve the pages now: a full /dev/shm is an error here, not a SIGBUS later.
        // SAFETY: valid descriptor.
        let rc = unsafe { libc::posix_fallocate(fd, 0, len as libc::off_t) };
        if rc != 0 && rc != libc::EOPNOTSUPP && rc != libc::EINVAL {
            // SAFETY: a NUL-terminated path.
            unsafe { libc::unlink(cpath.as_ptr()) };
            return sys(format!(
                "{call}: cannot reserve {} MiB in {} for {nranks} ranks ({}); a smaller \
                 RDROP_EMU_NCCL_CHUNK (now {} KiB per rank) needs less",
                len >> 20,
                shm_dir().display(),
                std::io::Error::from_raw_os_error(rc),
                chunk >> 10
            ));
        }
        (nranks, chunk)
    } else {
        let mut hdr = [0u64; 5];
        // SAFETY: reads 40 bytes into a buffer of 40 bytes.
        let n = unsafe { libc::pread(fd, hdr.as_mut_ptr() as *mut c_void, 40, 0) };
        if n != 40 || hdr[0] != FILE_MAGIC || hdr[1] != FILE_VERSION {
            return sys(format!(
                "{call}: {} is not a communicator file of this emulator version",
                path.display()
            ));
        }
        (hdr[2] as usize, hdr[3] as usize)
    };
    let len = file_len(file_nranks, chunk);
    if !created && (st.st_size as usize) < len {
        return sys(format!("{call}: {} is truncated", path.display()));
    }
    // SAFETY: a shared mapping of `len` bytes of the file (which is at least that long).
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return sys(os_err(&format!("{call}: cannot map {}", path.display())));
    }
    let c = CommInner {
        name,
        path: cpath,
        fd,
        base: base as *mut u8,
        len,
        nranks: file_nranks,
        rank,
        device,
        chunk,
        data_off: data_offset(file_nranks),
        timeout: timeout_from_env(),
        ofd: true,
        ready: AtomicBool::new(false),
        aborted: AtomicBool::new(false),
        unlinked: AtomicBool::new(false),
        async_err: AtomicI32::new(NCCL_SUCCESS),
        async_msg: Mutex::new(None),
        sched: Mutex::new(Sched {
            issued: 0,
            finished: 0,
            next_step: 1,
            executed: 0,
        }),
        cv: Condvar::new(),
    };
    // From here on, dropping `c` unmaps and closes (which also drops the flock).
    if created {
        let g = c.global();
        g.version.store(FILE_VERSION, Ordering::Relaxed);
        g.nranks.store(nranks as u64, Ordering::Relaxed);
        g.chunk.store(chunk as u64, Ordering::Relaxed);
        g.joined.store(0, Ordering::Relaxed);
        g.magic.store(FILE_MAGIC, Ordering::Release);
    }
    let joined_ranks = || -> Vec<(usize, u64)> {
        (0..file_nranks)
            .filter(|&r| c.rec(r).joined.load(Ordering::Acquire) != 0)
            .map(|r| (r, c.rec(r).pid.load(Ordering::Acquire)))
            .collect()
    };
    if file_nranks != nranks {
        let others = joined_ranks();
        return Err((
            NCCL_INVALID_USAGE,
            format!(
                "{call}: rank {rank} (pid {}) says nranks={nranks}, but the rank(s) that already \
                 joined this communicator ({}) said nranks={file_nranks}",
                std::process::id(),
                others
                    .iter()
                    .map(|(r, p)| format!("rank {r} pid {p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if c.rec(rank).joined.load(Ordering::Acquire) != 0 {
        let rec = c.rec(rank);
        return Err((
            NCCL_INVALID_USAGE,
            format!(
                "{call}: rank {rank} joined twice (pid {}, and now pid {}): every rank must \
                 pass a distinct rank",
                rec.pid.load(Ordering::Acquire),
                std::process::id()
            ),
        ));
    }
    // The lock that says this rank is alive (held until the descriptor is closed).
    // SAFETY: a zeroed flock is a valid argument.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = LOCK_BASE + rank as i64;
    fl.l_len = 1;
    // SAFETY: valid descriptor and flock.
    let mut c = c;
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            c.ofd = false; // an old kernel: probe pids instead
        } else {
            return Err((
                NCCL_INVALID_USAGE,
                format!("{call}: rank {rank} is already held by another process ({e})"),
            ));
        }
    }
    let rec = c.rec(rank);
    rec.pid
        .store(u64::from(std::process::id()), Ordering::Relaxed);
    rec.device.store(device as u64, Ordering::Relaxed);
    rec.gone.store(0, Ordering::Relaxed);
    rec.arrived.store(0, Ordering::Relaxed);
    rec.done.store(0, Ordering::Relaxed);
    rec.op_index.store(0, Ordering::Relaxed);
    rec.joined.store(1, Ordering::Release);
    c.global().joined.fetch_add(1, Ordering::AcqRel);
    // SAFETY: valid descriptor.
    unsafe { libc::flock(fd, libc::LOCK_UN) };
    Ok(Arc::new(c))
}

fn current_device(call: &str) -> Result<usize, ncclResult_t> {
    let Some(id) = crate::context::current() else {
        return Err(fail(
            NCCL_INVALID_USAGE,
            format!(
                "{call}: no CUDA context is current on this thread (make the rank's device \
                 current first: NCCL binds the communicator to it)"
            ),
        ));
    };
    crate::context::usable(id).map(|c| c.device).map_err(|e| {
        fail(
            NCCL_INVALID_USAGE,
            format!(
                "{call}: no usable CUDA context on this thread (was the device's primary \
                 context released?): {}",
                e.message
            ),
        )
    })
}

fn id_bytes(id: &ncclUniqueId) -> [u8; UNIQUE_ID_BYTES] {
    let mut b = [0u8; UNIQUE_ID_BYTES];
    for (d, s) in b.iter_mut().zip(id.internal.iter()) {
        *d = *s as u8;
    }
    b
}

// ------------------------------------------------------------------------------ exports

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclGetVersion(version: *mut c_int) -> ncclResult_t {
    guard("ncclGetVersion", || {
        if version.is_null() {
            return fail(
                NCCL_INVALID_ARGUMENT,
                "ncclGetVersion: version is null".into(),
            );
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *version = NCCL_VERSION_CODE };
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclGetUniqueId(unique_id: *mut ncclUniqueId) -> ncclResult_t {
    guard("ncclGetUniqueId", || {
        if unique_id.is_null() {
            return fail(
                NCCL_INVALID_ARGUMENT,
                "ncclGetUniqueId: uniqueId is null".into(),
            );
        }
        let id = new_unique_id();
        let mut out = ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (d, s) in out.internal.iter_mut().zip(id.iter()) {
            *d = *s as c_char;
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { unique_id.write_unaligned(out) };
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclCommInitRank(
    comm: *mut ncclComm_t,
    nranks: c_int,
    comm_id: ncclUniqueId,
    rank: c_int,
) -> ncclResult_t {
    let call = "ncclCommInitRank";
    guard(call, || {
        if comm.is_null() {
            return fail(NCCL_INVALID_ARGUMENT, format!("{call}: comm is null"));
        }
        let device = match current_device(call) {
            Ok(d) => d,
            Err(code) => return code,
        };
        let c = match join(&id_bytes(&comm_id), nranks, rank, device) {
            Ok(c) => c,
            Err((code, m)) => return fail(code, m),
        };
        let in_group = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            if g.0 > 0 {
                g.1.push(c.clone());
                true
            } else {
                false
            }
        });
        if !in_group {
            if let Err((code, m)) = c.await_all() {
                return fail(code, m);
            }
        }
        let h = register(c);
        // SAFETY: non-null out-pointer from the caller.
        unsafe { comm.write(h) };
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclCommInitAll(
    comms_out: *mut ncclComm_t,
    ndev: c_int,
    devlist: *const c_int,
) -> ncclResult_t {
    let call = "ncclCommInitAll";
    guard(call, || {
        if comms_out.is_null() || ndev < 1 {
            return fail(
                NCCL_INVALID_ARGUMENT,
                format!("{call}: comms is null or ndev {ndev} < 1"),
            );
        }
        let id = new_unique_id();
        let mut joined = Vec::new();
        for i in 0..ndev {
            let d = if devlist.is_null() {
                i
            } else {
                // SAFETY: the caller passes `ndev` ints.
                unsafe { *devlist.add(i as usize) }
            };
            let d = match crate::context::check_device(i64::from(d)) {
                Ok(d) => d,
                Err(e) => return fail(NCCL_INVALID_ARGUMENT, format!("{call}: {}", e.message)),
            };
            match join(&id, ndev, i, d) {
                Ok(c) => joined.push(c),
                Err((code, m)) => return fail(code, m),
            }
        }
        for c in &joined {
            if let Err((code, m)) = c.await_all() {
                return fail(code, m);
            }
        }
        for (i, c) in joined.into_iter().enumerate() {
            // SAFETY: the caller passes room for `ndev` communicators.
            unsafe { comms_out.add(i).write(register(c)) };
        }
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclGroupStart() -> ncclResult_t {
    guard("ncclGroupStart", || {
        GROUP.with(|g| g.borrow_mut().0 += 1);
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclGroupEnd() -> ncclResult_t {
    guard("ncclGroupEnd", || {
        let pending = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            if g.0 == 0 {
                return None;
            }
            g.0 -= 1;
            Some(if g.0 == 0 {
                std::mem::take(&mut g.1)
            } else {
                Vec::new()
            })
        });
        let Some(pending) = pending else {
            return fail(
                NCCL_INVALID_USAGE,
                "ncclGroupEnd without ncclGroupStart".into(),
            );
        };
        let mut result = NCCL_SUCCESS;
        for c in pending {
            if let Err((code, m)) = c.await_all() {
                c.set_async(code, &m);
                result = fail(code, m);
            }
        }
        result
    })
}

#[allow(clippy::too_many_arguments)]
fn collective(
    kind: Kind,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dt: c_int,
    arg: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    let call = match kind {
        Kind::AllReduce => "ncclAllReduce",
        Kind::Broadcast => "ncclBroadcast",
    };
    let c = match lookup(call, comm) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if c.aborted.load(Ordering::Acquire) {
        return fail(
            NCCL_INVALID_USAGE,
            format!("{call}: the communicator was aborted"),
        );
    }
    if let Some((code, m)) = c.async_error() {
        return fail(
            code,
            format!(
                "{call} (rank {}): the communicator failed before: {m}",
                c.rank
            ),
        );
    }
    if !(0..DTYPE_NAMES.len() as c_int).contains(&dt) {
        return fail(
            NCCL_INVALID_ARGUMENT,
            format!("{call}: datatype {dt} is not an ncclDataType_t"),
        );
    }
    match kind {
        Kind::AllReduce if !(0..REDOP_NAMES.len() as c_int).contains(&arg) => {
            return fail(
                NCCL_INVALID_ARGUMENT,
                format!(
                    "{call}: op {arg} is not a supported ncclRedOp_t (sum, prod, max, min, avg)"
                ),
            )
        }
        Kind::Broadcast if arg < 0 || arg as usize >= c.nranks => {
            return fail(
                NCCL_INVALID_ARGUMENT,
                format!("{call}: root {arg} is not a rank of {}", c.nranks),
            )
        }
        _ => {}
    }
    if count == 0 {
        return NCCL_SUCCESS;
    }
    let esz = DTYPE_SIZES[dt as usize];
    if count
        .checked_mul(esz)
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return fail(
            NCCL_INVALID_ARGUMENT,
            format!("{call}: count {count} is too large"),
        );
    }
    let reads = kind == Kind::AllReduce || arg as usize == c.rank;
    if recv.is_null() || (reads && send.is_null()) {
        return fail(
            NCCL_INVALID_ARGUMENT,
            format!("{call}: null buffer (sendbuff {send:?}, recvbuff {recv:?})"),
        );
    }
    let s = match crate::stream::resolve(stream as u64) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                NCCL_INVALID_ARGUMENT,
                format!("{call}: stream {:#x}: {}", stream as u64, e.message),
            )
        }
    };
    if s.device != c.device {
        return fail(
            NCCL_INVALID_ARGUMENT,
            format!(
                "{call}: the stream belongs to device {}, the communicator (rank {}) to device {}",
                s.device, c.rank, c.device
            ),
        );
    }
    let per_step = c.chunk / esz;
    let steps = count.div_ceil(per_step) as u64;
    let d = {
        let mut g = c.lock_sched();
        g.issued += 1;
        let first = g.next_step;
        g.next_step += steps;
        Desc {
            kind,
            index: g.issued,
            count,
            dtype: dt,
            arg,
            first_step: first,
            steps,
            per_step,
        }
    };
    let mut p = Pending {
        c,
        d,
        send: send as u64,
        recv: recv as u64,
        ran: false,
    };
    crate::stream::enqueue_on(&s, "libnccl".into(), Box::new(move || p.run()));
    NCCL_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    guard("ncclAllReduce", || {
        collective(
            Kind::AllReduce,
            sendbuff,
            recvbuff,
            count,
            datatype,
            op,
            comm,
            stream,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    guard("ncclBroadcast", || {
        collective(
            Kind::Broadcast,
            sendbuff,
            recvbuff,
            count,
            datatype,
            root,
            comm,
            stream,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclCommAbort(comm: ncclComm_t) -> ncclResult_t {
    guard("ncclCommAbort", || {
        if comm.is_null() {
            return NCCL_SUCCESS; // as NCCL: aborting null is a no-op
        }
        let c = match take("ncclCommAbort", comm) {
            Ok(c) => c,
            Err(code) => return code,
        };
        c.aborted.store(true, Ordering::Release);
        c.leave(GONE_ABORTED);
        c.cv.notify_all();
        c.unlink();
        // The mapping goes when the last pending collective (holding `c`) returns.
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclCommDestroy(comm: ncclComm_t) -> ncclResult_t {
    guard("ncclCommDestroy", || {
        if comm.is_null() {
            return NCCL_SUCCESS;
        }
        let c = match take("ncclCommDestroy", comm) {
            Ok(c) => c,
            Err(code) => return code,
        };
        c.wait_idle();
        c.leave(GONE_DESTROYED);
        c.unlink();
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclCommFinalize(comm: ncclComm_t) -> ncclResult_t {
    guard("ncclCommFinalize", || {
        let c = match lookup("ncclCommFinalize", comm) {
            Ok(c) => c,
            Err(code) => return code,
        };
        c.wait_idle();
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclCommGetAsyncError(
    comm: ncclComm_t,
    async_error: *mut ncclResult_t,
) -> ncclResult_t {
    let call = "ncclCommGetAsyncError";
    guard(call, || {
        let c = match lookup(call, comm) {
            Ok(c) => c,
            Err(code) => return code,
        };
        if async_error.is_null() {
            return fail(NCCL_INVALID_ARGUMENT, format!("{call}: asyncError is null"));
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *async_error = c.async_err.load(Ordering::Acquire) };
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclGetErrorString(result: ncclResult_t) -> *const c_char {
    static STRINGS: OnceLock<Vec<CString>> = OnceLock::new();
    let all = STRINGS.get_or_init(|| {
        (0..=8)
            .map(|c| CString::new(error_string(c)).unwrap_or_default())
            .collect()
    });
    let i = if (0..8).contains(&result) {
        result as usize
    } else {
        8
    };
    all[i].as_ptr()
}

/// `ncclGetLastError`: the communicator's asynchronous error message if it has one, else the
/// last error this thread's NCCL calls reported (valid until this thread's next call).
#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclGetLastError(comm: ncclComm_t) -> *const c_char {
    let h = comm as usize;
    std::panic::catch_unwind(move || {
        let from_comm = comms()
            .get(&h)
            .and_then(|c| c.async_error())
            .map(|(_, m)| m);
        LAST.with(|l| {
            let mut l = l.borrow_mut();
            if let Some(m) = from_comm {
                *l = CString::new(m.replace('\0', " ")).unwrap_or_default();
            }
            l.as_ptr()
        })
    })
    .unwrap_or(c"".as_ptr())
}

fn comm_query(
    call: &str,
    comm: ncclComm_t,
    out: *mut c_int,
    f: impl FnOnce(&CommInner) -> usize,
) -> ncclResult_t {
    guard(call, || {
        let c = match lookup(call, comm) {
            Ok(c) => c,
            Err(code) => return code,
        };
        if out.is_null() {
            return fail(NCCL_INVALID_ARGUMENT, format!("{call}: null out-pointer"));
        }
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *out = f(&c) as c_int };
        NCCL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclCommCount(comm: ncclComm_t, count: *mut c_int) -> ncclResult_t {
    comm_query("ncclCommCount", comm, count, |c| c.nranks)
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclCommCuDevice(
    comm: ncclComm_t,
    device: *mut c_int,
) -> ncclResult_t {
    comm_query("ncclCommCuDevice", comm, device, |c| c.device)
}

#[no_mangle]
pub unsafe extern "C" fn rdemu_ncclCommUserRank(
    comm: ncclComm_t,
    rank: *mut c_int,
) -> ncclResult_t {
    comm_query("ncclCommUserRank", comm, rank, |c| c.rank)
}

/// The shared-memory file name of a communicator (for tests and reports).
pub fn comm_file_name(comm: ncclComm_t) -> Option<String> {
    comms().get(&(comm as usize)).map(|c| c.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_strings_and_version() {
        // SAFETY: static strings.
        let s = |c| unsafe { std::ffi::CStr::from_ptr(rdemu_ncclGetErrorString(c)) };
        assert_eq!(s(0).to_str().unwrap(), "no error");
        assert!(s(5).to_str().unwrap().contains("invalid usage"));
        assert!(s(6).to_str().unwrap().contains("remote process exited"));
        assert_eq!(s(99).to_str().unwrap(), "unknown result code");
        assert_eq!(s(-1).to_str().unwrap(), "unknown result code");
        let mut v = 0;
        // SAFETY: a valid out-pointer.
        assert_eq!(unsafe { rdemu_ncclGetVersion(&mut v) }, NCCL_SUCCESS);
        assert_eq!(v, 22703);
        // SAFETY: null is refused.
        assert_eq!(
            unsafe { rdemu_ncclGetVersion(std::ptr::null_mut()) },
            NCCL_INVALID_ARGUMENT
        );
    }

    #[test]
    fn unique_ids_are_distinct_and_marked() {
        let mut a = ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        let mut b = a;
        // SAFETY: valid out-pointers.
        unsafe {
            assert_eq!(rdemu_ncclGetUniqueId(&mut a), NCCL_SUCCESS);
            assert_eq!(rdemu_ncclGetUniqueId(&mut b), NCCL_SUCCESS);
        }
        let (a, b) = (id_bytes(&a), id_bytes(&b));
        assert_eq!(&a[..8], ID_MAGIC);
        assert_ne!(a[8..40], b[8..40]);
    }

    #[test]
    fn reductions_are_in_rank_order() {
        let f = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let ins = vec![
            f(&[1e8, 1.0, -2.0]),
            f(&[1.0, 2.0, 5.0]),
            f(&[-1e8, 3.0, 0.5]),
        ];
        let out = reference_reduce(dtype::FLOAT32, redop::SUM, &ins, 3);
        let got: Vec<f32> = out
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // (1e8 + 1) - 1e8 in f32 is 0: the order is rank order, not a pairwise tree.
        assert_eq!(got, vec![0.0, 6.0, 3.5]);
        let out = reference_reduce(dtype::FLOAT32, redop::MAX, &ins, 3);
        assert_eq!(&out[4..8], &3.0f32.to_le_bytes());
        let out = reference_reduce(dtype::FLOAT32, redop::AVG, &ins, 3);
        assert_eq!(&out[4..8], &2.0f32.to_le_bytes());
        let i = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let out = reference_reduce(dtype::INT32, redop::PROD, &[i(&[3, -2]), i(&[5, 7])], 2);
        assert_eq!(out, i(&[15, -14]));
        let h = |v: &[f32]| {
            v.iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect::<Vec<u8>>()
        };
        let out = reference_reduce(dtype::BFLOAT16, redop::SUM, &[h(&[1.5]), h(&[2.25])], 1);
        assert_eq!(out, h(&[3.75]));
    }

    #[test]
    fn init_without_a_context_is_invalid_usage() {
        let mut id = ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: valid pointers; the thread has no current context.
        let rc = std::thread::spawn(move || unsafe {
            let mut comm: ncclComm_t = std::ptr::null_mut();
            rdemu_ncclGetUniqueId(&mut id);
            rdemu_ncclCommInitRank(&mut comm, 1, id, 0)
        })
        .join()
        .unwrap();
        assert_eq!(rc, NCCL_INVALID_USAGE);
    }
}
