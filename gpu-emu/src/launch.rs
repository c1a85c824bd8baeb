//! Launches: a grid's blocks are run by a pool of host threads; within a block, every CUDA
//! thread is a [`crate::fiber`] on one host thread, run until it exits or reaches a barrier.
//! When every thread of the block is waiting or done, the barriers that can complete do:
//! - `__syncthreads`: when every thread that has not exited waits there;
//! - `__syncwarp(mask)` / `__shfl*_sync(mask, …)` / votes: when every lane of `mask` waits in
//!   the same kind of operation with the same mask. A lane of the mask that exited (shuffles,
//!   votes), waits elsewhere, or does not exist, a calling lane outside its own mask, a shuffle
//!   reading a lane outside the mask, or a width that is not a power of two ≤ 32 are reported;
//!   shuffles follow PTX's `shfl.sync` rules (segments of `width` lanes, `up`/`down`/`bfly`
//!   keeping their own value outside the segment);
//! - nothing can complete: a deadlock, reported with what each waiting thread waits for.
//!
//! Every load and store of kernel code is checked before it happens (the modules are built
//! with GCC's address-sanitizer instrumentation calling [`api`]'s `check`): the calling
//! fiber's stack is fine; the module's thread-local block is the block's `__shared__` memory
//! (with a race check: two threads touching the same byte between barriers, one of them
//! writing, or a read of a byte no thread of the block wrote); anything else must lie in a
//! live allocation of the launch's device ([`crate::memory::resolve`]). A failure stops the
//! launch and is reported naming the kernel, block, thread, argument and offset.
//!
//! In delay mode (`RDROP_EMU_DELAY`) blocks run in a seeded random order, and so do the
//! runnable threads of a block after each barrier.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::abi::{self, Dim3, HostKernel};
use crate::error::{EmuError, CUDA_ERROR_ILLEGAL_ADDRESS, CUDA_ERROR_LAUNCH_FAILED};
use crate::fiber::Stack;

// ----------------------------------------------------------------------------- the launch

/// The packed arguments of a launch (freed with the module's `pack_free`).
pub struct Packed {
    ptr: *mut c_void,
    free: extern "C" fn(*mut c_void),
}

// SAFETY: the packed block is plain data owned by the launch; the kernels only read it.
unsafe impl Send for Packed {}
// SAFETY: as above (read-only once made).
unsafe impl Sync for Packed {}

impl Drop for Packed {
    fn drop(&mut self) {
        (self.free)(self.ptr);
    }
}

/// One launch, ready to run.
pub struct Launch {
    /// The kernel.
    pub kernel: HostKernel,
    /// Grid and block dimensions.
    pub grid: Dim3,
    /// Block dimensions.
    pub block: Dim3,
    /// Device ordinal.
    pub device: usize,
    /// Packed argument values.
    pub packed: Packed,
    /// Pointer arguments: (index, declaration, value).
    pub ptr_args: Vec<(usize, String, u64)>,
    /// Launch number in the process (for reports).
    pub number: u64,
}

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

impl Launch {
    /// Packs the arguments of `kernel` from cuLaunchKernel's `kernelParams`.
    ///
    /// # Safety
    /// `params` must hold one valid pointer per kernel parameter, each to a value of that
    /// parameter's size.
    pub unsafe fn new(
        kernel: HostKernel,
        grid: Dim3,
        block: Dim3,
        device: usize,
        params: *const *const c_void,
    ) -> Launch {
        let mut ptr_args = Vec::new();
        for (i, p) in kernel.params.iter().enumerate() {
            if p.is_pointer && p.size == 8 {
                let v = std::ptr::read_unaligned(*params.add(i) as *const u64);
                ptr_args.push((i, p.decl.clone(), v));
            }
        }
        let packed = Packed {
            ptr: (kernel.entry.pack)(params),
            free: kernel.entry.pack_free,
        };
        Launch {
            kernel,
            grid,
            block,
            device,
            packed,
            ptr_args,
            number: LAUNCHES.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    fn blocks(&self) -> u64 {
        self.grid.x as u64 * self.grid.y as u64 * self.grid.z as u64
    }
}

/// What stopped a block.
#[derive(Debug, Clone)]
enum Fault {
    /// An access outside every allowed range.
    Mem { addr: u64, size: u64, write: bool },
    /// Anything else, described.
    Other(String),
}

struct Failure {
    fault: Fault,
    block: Dim3,
    thread: Dim3,
}

struct Job {
    launch: Launch,
    total: u64,
    next: AtomicU64,
    active: AtomicUsize,
    failed: AtomicBool,
    failure: Mutex<Option<Failure>>,
    done: Mutex<()>,
    done_cv: Condvar,
    order_seed: Option<u64>,
}

impl Job {
    fn block_of(&self, i: u64) -> u64 {
        match self.order_seed {
            // a bijection of 0..total: an odd multiplier modulo a power of two, rejection
            // sampled into range (a cheap seeded shuffle of the block order)
            Some(seed) => {
                let m = self.total.next_power_of_two();
                let a = (seed | 1) & (m - 1) | 1;
                let c = (seed >> 17) & (m - 1);
                let mut x = i;
                loop {
                    x = (x.wrapping_mul(a).wrapping_add(c)) & (m - 1);
                    if x < self.total {
                        return x;
                    }
                }
            }
            None => i,
        }
    }

    fn participate(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
        RUNNER.with(|r| {
            let mut runner = r.take().unwrap_or_else(|| Box::new(Runner::new()));
            loop {
                if self.failed.load(Ordering::Acquire) {
                    break;
                }
                let i = self.next.fetch_add(1, Ordering::AcqRel);
                if i >= self.total {
                    break;
                }
                let b = self.block_of(i);
                if let Err((fault, thread)) = runner.run_block(self, b) {
                    let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
                    if f.is_none() {
                        *f = Some(Failure {
                            fault,
                            block: linear_to_dim(b, self.launch.grid),
                            thread,
                        });
                    }
                    self.failed.store(true, Ordering::Release);
                }
            }
            r.set(Some(runner));
        });
        let _g = self.done.lock().unwrap_or_else(|p| p.into_inner());
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.done_cv.notify_all();
    }
}

fn linear_to_dim(i: u64, d: Dim3) -> Dim3 {
    let x = (i % d.x as u64) as u32;
    let y = ((i / d.x as u64) % d.y as u64) as u32;
    let z = (i / (d.x as u64 * d.y as u64)) as u32;
    Dim3 { x, y, z }
}

// ------------------------------------------------------------------------------- the pool

struct Pool {
    queue: Mutex<VecDeque<Arc<Job>>>,
    cv: Condvar,
    helpers: usize,
}

fn pool() -> &'static Pool {
    static P: OnceLock<&'static Pool> = OnceLock::new();
    P.get_or_init(|| {
        let helpers = crate::config::get().threads.saturating_sub(1);
        let p: &'static Pool = Box::leak(Box::new(Pool {
            queue: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            helpers,
        }));
        for i in 0..helpers {
            let _ = std::thread::Builder::new()
                .name(format!("emu-sm-{i}"))
                .stack_size(4 << 20)
                .spawn(move || loop {
                    let job = {
                        let mut q = p.queue.lock().unwrap_or_else(|e| e.into_inner());
                        loop {
                            if let Some(j) = q.pop_front() {
                                break j;
                            }
                            q = p.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                        }
                    };
                    job.participate();
                });
        }
        p
    })
}

/// Runs a launch to completion on the calling thread (a stream's worker) and the pool.
pub fn execute(launch: Launch) -> Result<(), EmuError> {
    if !crate::fiber::SUPPORTED {
        return Err(EmuError::new(
            CUDA_ERROR_LAUNCH_FAILED,
            "kernel launches are emulated on x86-64 only",
        ));
    }
    let total = launch.blocks();
    let cfg = crate::config::get();
    let order_seed = cfg
        .delay
        .map(|(s, _)| s ^ launch.number.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    if cfg.log >= 2 {
        crate::error::report(&format!(
            "launch #{} {} grid ({},{},{}) block ({},{},{})",
            launch.number,
            launch.kernel.name,
            launch.grid.x,
            launch.grid.y,
            launch.grid.z,
            launch.block.x,
            launch.block.y,
            launch.block.z
        ));
    }
    let job = Arc::new(Job {
        launch,
        total,
        next: AtomicU64::new(0),
        active: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        failure: Mutex::new(None),
        done: Mutex::new(()),
        done_cv: Condvar::new(),
        order_seed,
    });
    let p = pool();
    let share = (total.saturating_sub(1) as usize).min(p.helpers);
    if share > 0 {
        let mut q = p.queue.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..share {
            q.push_back(job.clone());
        }
        p.cv.notify_all();
    }
    job.participate();
    {
        let mut g = job.done.lock().unwrap_or_else(|p| p.into_inner());
        while job.active.load(Ordering::Acquire) > 0 {
            g = job.done_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
    let failure = job.failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failure {
        None => Ok(()),
        Some(f) => Err(describe(&job.launch, f)),
    }
}

fn describe(l: &Launch, f: Failure) -> EmuError {
    let whr = format!(
        "kernel `{}` ({}), launch #{}, block ({},{},{}) thread ({},{},{})",
        l.kernel.name,
        l.kernel
            .source
            .rsplit('/')
            .next()
            .unwrap_or(&l.kernel.source),
        l.number,
        f.block.x,
        f.block.y,
        f.block.z,
        f.thread.x,
        f.thread.y,
        f.thread.z
    );
    match f.fault {
        Fault::Other(msg) => EmuError::new(CUDA_ERROR_LAUNCH_FAILED, format!("{whr}: {msg}")),
        Fault::Mem { addr, size, write } => {
            let why = match crate::memory::resolve(l.device, addr, size, write) {
                Err(e) => e.message,
                Ok(_) => format!(
                    "{} of {size} bytes at {addr:#x} (no longer failing: freed concurrently?)",
                    if write { "write" } else { "read" }
                ),
            };
            // the pointer argument the address belongs to: the one in the same allocation
            // (or its guard), else the nearest below
            let alloc_of = |p: u64| crate::memory::lookup(p).map(|a| a.base);
            let target = crate::memory::lookup(addr)
                .map(|a| a.base)
                .or_else(|| alloc_of(addr.saturating_sub(1)));
            let arg = l
                .ptr_args
                .iter()
                .filter(|(_, _, v)| *v != 0)
                .find(|(_, _, v)| target.is_some() && alloc_of(*v) == target)
                .or_else(|| {
                    l.ptr_args
                        .iter()
                        .filter(|(_, _, v)| *v != 0 && *v <= addr)
                        .max_by_key(|(_, _, v)| *v)
                });
            let arg = match arg {
                Some((i, decl, v)) => format!(
                    " — argument {i} `{decl}` ({v:#x}) {} {} bytes",
                    if addr >= *v { "+" } else { "-" },
                    addr.abs_diff(*v)
                ),
                None => String::new(),
            };
            EmuError::new(
                CUDA_ERROR_ILLEGAL_ADDRESS,
                format!("memcheck: {whr}: {why}{arg}"),
            )
        }
    }
}

// ----------------------------------------------------------------------------- the runner

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    NotStarted,
    Waiting,
    Exited,
}

/// Warp operation kinds (shuffle kinds 0..=3 as the ABI).
const SYNCWARP: i32 = 10;
const VOTE: i32 = 20; // + vote kind

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    None,
    Block,
    Warp {
        kind: i32,
        mask: u32,
        value: u64,
        size: i32,
        arg: i32,
        width: i32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    st: St,
    sp: usize,
    stack: usize,
    wait: Wait,
    result: u64,
}

/// A warp operation some lanes wait in.
#[derive(Debug, Clone, Copy)]
struct Group {
    kind: i32,
    mask: u32,
    arrived: u32,
}

/// Shadow of one byte of shared memory for the race check.
#[derive(Debug, Clone, Copy, Default)]
struct Shadow {
    /// Writer thread + 1 (0: never written in this block).
    writer: u32,
    w_epoch: u32,
    w_log: u32,
    /// Reader thread + 1 (0: none, u32::MAX: several).
    reader: u32,
    r_epoch: u32,
    r_log: u32,
}

struct Runner {
    stacks: Vec<Stack>,
    free_stacks: Vec<usize>,
    slots: Vec<Slot>,
    sched_sp: usize,
    cur: usize,
    /// `cur`'s index as a Dim3, and its stack range.
    cur_tid: Dim3,
    cur_stack: (u64, u64),
    job: *const Job,
    block_idx: Dim3,
    block_dim: Dim3,
    nthreads: usize,
    fault: Option<Fault>,
    cache: [(u64, u64); 8],
    cache_next: usize,
    shared_of: HashMap<usize, (usize, usize)>,
    shared: (usize, usize),
    shadow: Vec<Shadow>,
    epoch: u32,
    warp_log: Vec<Vec<u32>>,
    /// Pending warp operations per warp, lanes exited per warp.
    groups: Vec<Vec<Group>>,
    exited_lanes: Vec<u32>,
    exited: usize,
    at_barrier: usize,
    queue: VecDeque<usize>,
    rng: u64,
    memcheck: bool,
}

thread_local! {
    static RUNNER: Cell<Option<Box<Runner>>> = const { Cell::new(None) };
    static ACTIVE: Cell<*mut Runner> = const { Cell::new(std::ptr::null_mut()) };
}

impl Runner {
    fn new() -> Runner {
        Runner {
            stacks: Vec::new(),
            free_stacks: Vec::new(),
            slots: Vec::new(),
            sched_sp: 0,
            cur: 0,
            cur_tid: Dim3::default(),
            cur_stack: (0, 0),
            job: std::ptr::null(),
            block_idx: Dim3::default(),
            block_dim: Dim3::default(),
            nthreads: 0,
            fault: None,
            cache: [(0, 0); 8],
            cache_next: 0,
            shared_of: HashMap::new(),
            shared: (0, 0),
            shadow: Vec::new(),
            epoch: 0,
            warp_log: Vec::new(),
            groups: Vec::new(),
            exited_lanes: Vec::new(),
            exited: 0,
            at_barrier: 0,
            queue: VecDeque::new(),
            rng: 0,
            memcheck: crate::config::get().memcheck,
        }
    }

    fn stack(&mut self) -> Result<usize, Fault> {
        if let Some(i) = self.free_stacks.pop() {
            return Ok(i);
        }
        let s = Stack::new().ok_or_else(|| Fault::Other("cannot map a fiber stack".into()))?;
        self.stacks.push(s);
        Ok(self.stacks.len() - 1)
    }

    fn thread_dim(&self, t: usize) -> Dim3 {
        linear_to_dim(t as u64, self.block_dim)
    }

    fn next_rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Makes `lanes` (bits of warp `w`) runnable, in a random order in delay mode. They go to
    /// the front of the queue: a warp runs on through its shuffles before the next warp's
    /// threads start, so that only a warp's worth of fiber stacks is hot at a time.
    fn release(&mut self, w: usize, lanes: u32) {
        let mut v = [0usize; 32];
        let mut n = 0;
        for j in 0..32 {
            if lanes & (1 << j) != 0 {
                v[n] = w * 32 + j;
                n += 1;
            }
        }
        if self.rng != 0 {
            for i in (1..n).rev() {
                let j = (self.next_rand() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
        }
        for &t in v[..n].iter().rev() {
            self.queue.push_front(t);
        }
    }

    /// Runs block `b` of `job`; on a fault, the fault and the thread it happened in.
    fn run_block(&mut self, job: &Job, b: u64) -> Result<(), (Fault, Dim3)> {
        let l = &job.launch;
        self.job = job;
        self.block_idx = linear_to_dim(b, l.grid);
        self.block_dim = l.block;
        self.nthreads = (l.block.x * l.block.y * l.block.z) as usize;
        self.fault = None;
        self.cache = [(0, 0); 8];
        self.rng = job
            .order_seed
            .map_or(0, |s| (s ^ b.wrapping_mul(0x2545_f491_4f6c_dd1d)) | 1);
        // shared memory of this module on this host thread
        let lib = l.kernel.lib;
        let range = match self.shared_of.get(&lib) {
            Some(r) => *r,
            None => {
                let mut start: *mut c_void = std::ptr::null_mut();
                let mut len = 0usize;
                (l.kernel.module.shared_range)(&mut start, &mut len);
                let r = (start as usize, len);
                self.shared_of.insert(lib, r);
                r
            }
        };
        self.shared = (range.0, range.0 + range.1);
        self.shadow.clear();
        self.shadow.resize(range.1, Shadow::default());
        self.epoch = 1;
        let warps = self.nthreads.div_ceil(32);
        self.warp_log.truncate(warps);
        for w in &mut self.warp_log {
            w.clear();
        }
        self.warp_log.resize(warps, Vec::new());
        self.groups.truncate(warps);
        for g in &mut self.groups {
            g.clear();
        }
        self.groups.resize(warps, Vec::new());
        self.exited_lanes.clear();
        self.exited_lanes.resize(warps, 0);
        self.exited = 0;
        self.at_barrier = 0;
        self.slots.clear();
        self.slots.resize(
            self.nthreads,
            Slot {
                st: St::NotStarted,
                sp: 0,
                stack: usize::MAX,
                wait: Wait::None,
                result: 0,
            },
        );
        self.queue.clear();
        if self.rng == 0 {
            self.queue.extend(0..self.nthreads);
        } else {
            let mut v: Vec<usize> = (0..self.nthreads).collect();
            for i in (1..v.len()).rev() {
                let j = (self.next_rand() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
            self.queue.extend(v);
        }
        let me: *mut Runner = self;
        ACTIVE.with(|a| a.set(me));
        let out = loop {
            let mut failed = None;
            while let Some(t) = self.queue.pop_front() {
                if let Err(f) = self.resume(t) {
                    failed = Some((f, self.thread_dim(t)));
                    break;
                }
            }
            if let Some(f) = failed {
                break Err(f);
            }
            if self.exited == self.nthreads {
                break Ok(());
            }
            if self.at_barrier == self.nthreads - self.exited {
                // every live thread waits in __syncthreads
                self.epoch += 1;
                for l in &mut self.warp_log {
                    l.clear();
                }
                self.at_barrier = 0;
                for t in 0..self.nthreads {
                    if self.slots[t].st == St::Waiting && self.slots[t].wait == Wait::Block {
                        self.queue.push_back(t);
                    }
                }
                continue;
            }
            break Err(self.deadlock());
        };
        ACTIVE.with(|a| a.set(std::ptr::null_mut()));
        // abandoned fibers (after a fault) give their stacks back
        for i in 0..self.slots.len() {
            let s = self.slots[i].stack;
            if s != usize::MAX {
                self.free_stacks.push(s);
                self.slots[i].stack = usize::MAX;
            }
        }
        out
    }

    fn deadlock(&self) -> (Fault, Dim3) {
        let live: Vec<usize> = (0..self.nthreads)
            .filter(|&t| self.slots[t].st != St::Exited)
            .collect();
        let first = live.first().copied().unwrap_or(0);
        let mut what: Vec<String> = Vec::new();
        for &t in live.iter().take(8) {
            what.push(format!(
                "thread {t}: {}",
                match self.slots[t].wait {
                    Wait::Block => "__syncthreads".to_string(),
                    Wait::Warp { kind, mask, .. } => format!("{} mask {mask:#010x}", op_name(kind)),
                    Wait::None => "nothing".into(),
                }
            ));
        }
        (
            Fault::Other(format!(
                "deadlock: no barrier can complete ({}{}); the lanes of a mask must all reach \
                 the same warp operation, and every live thread the same __syncthreads",
                what.join("; "),
                if live.len() > 8 { "; …" } else { "" }
            )),
            self.thread_dim(first),
        )
    }

    fn resume(&mut self, t: usize) -> Result<(), Fault> {
        self.cur = t;
        self.cur_tid = if self.block_dim.y == 1 && self.block_dim.z == 1 {
            Dim3 {
                x: t as u32,
                y: 0,
                z: 0,
            }
        } else {
            self.thread_dim(t)
        };
        if self.slots[t].st == St::NotStarted {
            let s = self.stack()?;
            let me = self as *mut Runner as usize;
            self.slots[t].sp = self.stacks[s].prepare(thread_entry, me);
            self.slots[t].stack = s;
        }
        // the stack is one aligned slot (fiber::SLOT): its range follows from any address in it
        let lo = self.slots[t].sp as u64 & !(crate::fiber::SLOT as u64 - 1);
        self.cur_stack = (lo + 4096, lo + crate::fiber::SLOT as u64);
        self.slots[t].wait = Wait::None;
        let sp = self.slots[t].sp;
        // SAFETY: `sp` was prepared for, or saved by, this thread's fiber, whose stack is alive.
        unsafe { crate::fiber::switch(&mut self.sched_sp, sp) };
        if let Some(f) = self.fault.take() {
            return Err(f);
        }
        if self.slots[t].st == St::Exited {
            let s = self.slots[t].stack;
            self.slots[t].stack = usize::MAX;
            self.free_stacks.push(s);
        }
        Ok(())
    }

    /// From a fiber: wait (the slot says for what) and come back when released.
    fn block_here(&mut self) {
        let t = self.cur;
        self.slots[t].st = St::Waiting;
        let save: *mut usize = &mut self.slots[t].sp;
        // SAFETY: `sched_sp` was saved by `resume`'s switch on this host thread.
        unsafe { crate::fiber::switch(save, self.sched_sp) };
    }

    /// From a fiber: stop the launch with `f` (never returns to the kernel code).
    fn fail(&mut self, f: Fault) -> ! {
        self.fault = Some(f);
        let t = self.cur;
        self.slots[t].st = St::Waiting;
        let save: *mut usize = &mut self.slots[t].sp;
        // SAFETY: as `block_here`; this fiber is never resumed.
        unsafe { crate::fiber::switch(save, self.sched_sp) };
        unreachable!("a failed fiber was resumed")
    }

    fn lanes(&self, w: usize) -> usize {
        (self.nthreads - w * 32).min(32)
    }

    /// The calling lane arrives in a warp operation: joins (or opens) its group and completes
    /// it when the last lane of the mask is there.
    fn arrive(&mut self, kind: i32, mask: u32, wait: Wait) -> Result<(), Fault> {
        let t = self.cur;
        let (w, lane) = (t / 32, t % 32);
        if mask & (1 << lane) == 0 {
            return Err(Fault::Other(format!(
                "lane {lane} calls {} with mask {mask:#010x}, which does not include itself",
                op_name(kind)
            )));
        }
        let n = self.lanes(w);
        if n < 32 && mask >> n != 0 {
            return Err(Fault::Other(format!(
                "{} with mask {mask:#010x} names lanes that do not exist (the block has {} \
                 threads: its last warp has {n} lanes)",
                op_name(kind),
                self.nthreads
            )));
        }
        let exited = self.exited_lanes[w];
        if kind != SYNCWARP && mask & exited != 0 {
            return Err(Fault::Other(format!(
                "lane {lane} waits in {} with mask {mask:#010x}, but lane {} of its mask has \
                 exited",
                op_name(kind),
                (mask & exited).trailing_zeros()
            )));
        }
        let mut gi = None;
        for (i, g) in self.groups[w].iter().enumerate() {
            if g.mask & mask == 0 {
                continue;
            }
            if g.mask != mask || g.kind != kind {
                return Err(Fault::Other(format!(
                    "lane {lane} waits in {} with mask {mask:#010x} while lanes {:#010x} wait \
                     in {} with mask {:#010x}: the lanes of a mask must reach the same operation",
                    op_name(kind),
                    g.arrived,
                    op_name(g.kind),
                    g.mask
                )));
            }
            gi = Some(i);
        }
        let gi = match gi {
            Some(i) => i,
            None => {
                self.groups[w].push(Group {
                    kind,
                    mask,
                    arrived: 0,
                });
                self.groups[w].len() - 1
            }
        };
        self.slots[t].wait = wait;
        self.groups[w][gi].arrived |= 1 << lane;
        self.try_complete(w, gi)
    }

    /// Completes group `gi` of warp `w` if every lane it waits for is there.
    fn try_complete(&mut self, w: usize, gi: usize) -> Result<(), Fault> {
        let g = self.groups[w][gi];
        let need = if g.kind == SYNCWARP {
            g.mask & !self.exited_lanes[w]
        } else {
            g.mask
        };
        if g.arrived & need != need {
            return Ok(());
        }
        self.groups[w].swap_remove(gi);
        self.complete_warp(w, g.kind, g.mask, g.arrived)?;
        self.release(w, g.arrived);
        Ok(())
    }

    /// Thread `t` exited: pending warp operations naming it fail (shuffles, votes) or may now
    /// complete (`__syncwarp` excludes exited lanes).
    fn exited_thread(&mut self, t: usize) -> Result<(), Fault> {
        let (w, lane) = (t / 32, t % 32);
        self.exited_lanes[w] |= 1 << lane;
        self.exited += 1;
        let mut i = 0;
        while i < self.groups[w].len() {
            let g = self.groups[w][i];
            if g.mask & (1 << lane) != 0 {
                if g.kind != SYNCWARP {
                    return Err(Fault::Other(format!(
                        "lane {lane} exited while lanes {:#010x} wait for it in {} with mask \
                         {:#010x}",
                        g.arrived,
                        op_name(g.kind),
                        g.mask
                    )));
                }
                let before = self.groups[w].len();
                self.try_complete(w, i)?;
                if self.groups[w].len() < before {
                    continue;
                }
            }
            i += 1;
        }
        Ok(())
    }

    fn complete_warp(&mut self, w: usize, kind: i32, mask: u32, members: u32) -> Result<(), Fault> {
        let mut vals = [0u64; 32];
        let mut preds = 0u32;
        #[allow(clippy::needless_range_loop)] // `j` is a lane: a bit of `members` too
        for j in 0..32 {
            if members & (1 << j) != 0 {
                if let Wait::Warp { value, .. } = self.slots[w * 32 + j].wait {
                    vals[j] = value;
                    if value != 0 {
                        preds |= 1 << j;
                    }
                }
            }
        }
        for j in 0..32usize {
            if members & (1 << j) == 0 {
                continue;
            }
            let t = w * 32 + j;
            let Wait::Warp {
                arg, width, size, ..
            } = self.slots[t].wait
            else {
                continue;
            };
            let r = match kind {
                SYNCWARP => 0,
                k if k >= VOTE => match k - VOTE {
                    0 => (preds & mask) as u64,
                    1 => u64::from(preds & mask != 0),
                    _ => u64::from(preds & mask == mask),
                },
                k => {
                    if width <= 0 || width > 32 || width & (width - 1) != 0 {
                        return Err(Fault::Other(format!(
                            "{} with width {width}: the width must be a power of two ≤ 32",
                            op_name(k)
                        )));
                    }
                    let seg = (32 - width) as u32; // segmask
                    let lane = j as u32;
                    let b = (arg as u32) & 31;
                    let c = if k == 1 { 0 } else { 0x1f };
                    let max_lane = (lane & seg) | (c & !seg & 31);
                    let min_lane = lane & seg;
                    let (src, ok) = match k {
                        0 => {
                            let s = min_lane | (b & !seg & 31);
                            (s, s <= max_lane)
                        }
                        1 => (lane.wrapping_sub(b), lane >= b && lane - b >= max_lane),
                        2 => (lane + b, lane + b <= max_lane),
                        _ => (lane ^ b, (lane ^ b) <= max_lane),
                    };
                    let src = if ok { src } else { lane };
                    if mask & (1 << src) == 0 {
                        return Err(Fault::Other(format!(
                            "lane {lane}'s {} reads lane {src}, which is not in its mask \
                             {mask:#010x}",
                            op_name(k)
                        )));
                    }
                    let v = vals[src as usize];
                    if size == 4 {
                        v & 0xffff_ffff
                    } else {
                        v
                    }
                }
            };
            self.slots[t].result = r;
        }
        self.warp_log[w].push(members);
        Ok(())
    }

    // ------------------------------------------------------------------ memory checks

    fn check(&mut self, addr: u64, size: u64, write: bool) {
        if !self.memcheck {
            return;
        }
        // the fiber's own stack (locals, spilled arguments)
        if addr >= self.cur_stack.0 && addr + size <= self.cur_stack.1 {
            return;
        }
        if addr >= self.shared.0 as u64 && addr + size <= self.shared.1 as u64 && size > 0 {
            self.check_shared(addr - self.shared.0 as u64, size, write);
            return;
        }
        for &(lo, hi) in &self.cache {
            if addr >= lo && addr + size <= hi {
                return;
            }
        }
        // SAFETY: the job outlives the block run.
        let device = unsafe { (*self.job).launch.device };
        match crate::memory::lookup(addr) {
            Some(a) if a.device == device && addr + size <= a.base + a.size => {
                self.cache[self.cache_next] = (a.base, a.base + a.size);
                self.cache_next = (self.cache_next + 1) % self.cache.len();
            }
            _ => self.fail(Fault::Mem { addr, size, write }),
        }
    }

    fn synced(&self, a: usize, b: usize, since: u32) -> bool {
        if a / 32 != b / 32 {
            return false;
        }
        let (la, lb) = (a % 32, b % 32);
        self.warp_log[a / 32]
            .iter()
            .skip(since as usize)
            .any(|m| m & (1 << la) != 0 && m & (1 << lb) != 0)
    }

    fn check_shared(&mut self, off: u64, size: u64, write: bool) {
        let t = self.cur;
        let me = t as u32 + 1;
        let w = t / 32;
        let log = self.warp_log.get(w).map_or(0, |l| l.len()) as u32;
        for o in off..off + size {
            let Some(s) = self.shadow.get(o as usize).copied() else {
                return;
            };
            let conflict = |who: u32, epoch: u32, at: u32, this: &Runner| {
                who != 0
                    && who != me
                    && who != u32::MAX
                    && epoch == this.epoch
                    && !this.synced(t, who as usize - 1, at)
            };
            if write {
                if conflict(s.writer, s.w_epoch, s.w_log, self) {
                    self.race("write", o, s.writer - 1, "written");
                }
                if s.reader == u32::MAX && s.r_epoch == self.epoch {
                    self.race("write", o, u32::MAX, "read");
                }
                if conflict(s.reader, s.r_epoch, s.r_log, self) {
                    self.race("write", o, s.reader - 1, "read");
                }
                self.shadow[o as usize] = Shadow {
                    writer: me,
                    w_epoch: self.epoch,
                    w_log: log,
                    reader: 0,
                    r_epoch: 0,
                    r_log: 0,
                };
            } else {
                if s.writer == 0 {
                    let f = Fault::Other(format!(
                        "read of __shared__ byte {o} that no thread of this block has written \
                         (shared memory starts undefined)"
                    ));
                    self.fail(f);
                }
                if conflict(s.writer, s.w_epoch, s.w_log, self) {
                    self.race("read", o, s.writer - 1, "written");
                }
                let e = &mut self.shadow[o as usize];
                if e.reader == 0 || e.reader == me || e.r_epoch != self.epoch {
                    e.reader = me;
                } else {
                    e.reader = u32::MAX;
                }
                e.r_epoch = self.epoch;
                e.r_log = log;
            }
        }
    }

    fn race(&mut self, what: &str, off: u64, other: u32, did: &str) -> ! {
        let other = if other == u32::MAX {
            "other threads".to_string()
        } else {
            format!("thread {other}")
        };
        let f = Fault::Other(format!(
            "shared-memory race: {what} of __shared__ byte {off} by thread {}, which {other} \
             {did} since the last barrier they share (a missing __syncthreads / __syncwarp)",
            self.cur
        ));
        self.fail(f)
    }
}

fn op_name(kind: i32) -> &'static str {
    match kind {
        0 => "__shfl_sync",
        1 => "__shfl_up_sync",
        2 => "__shfl_down_sync",
        3 => "__shfl_xor_sync",
        SYNCWARP => "__syncwarp",
        20 => "__ballot_sync",
        21 => "__any_sync",
        22 => "__all_sync",
        _ => "a warp operation",
    }
}

extern "C" fn thread_entry(arg: usize) {
    let r = arg as *mut Runner;
    // SAFETY: `arg` is the runner that resumed this fiber; it lives on this host thread until
    // the block ends, and only this fiber touches it until it switches back.
    unsafe {
        let job = &*(*r).job;
        (job.launch.kernel.entry.run)(job.launch.packed.ptr);
        let rr = &mut *r;
        let t = rr.cur;
        rr.slots[t].st = St::Exited;
        if let Err(f) = rr.exited_thread(t) {
            rr.fault = Some(f);
        }
        let save: *mut usize = &mut rr.slots[t].sp;
        let sched = rr.sched_sp;
        crate::fiber::switch(save, sched);
    }
    unreachable!("an exited fiber was resumed");
}

// ---------------------------------------------------------------------------- the ABI

fn with_runner<R>(f: impl FnOnce(&mut Runner) -> R, default: R) -> R {
    let p = ACTIVE.with(|a| a.get());
    if p.is_null() {
        return default;
    }
    // SAFETY: the active runner of this host thread (set around each block run); callbacks
    // come from its fibers only.
    f(unsafe { &mut *p })
}

extern "C" fn cb_thread_idx() -> Dim3 {
    with_runner(|r| r.cur_tid, Dim3::default())
}
extern "C" fn cb_block_idx() -> Dim3 {
    with_runner(|r| r.block_idx, Dim3::default())
}
extern "C" fn cb_block_dim() -> Dim3 {
    with_runner(|r| r.block_dim, Dim3::default())
}
extern "C" fn cb_grid_dim() -> Dim3 {
    // SAFETY: the job outlives the block run.
    with_runner(|r| unsafe { (*r.job).launch.grid }, Dim3::default())
}
extern "C" fn cb_syncthreads() {
    with_runner(
        |r| {
            let t = r.cur;
            r.slots[t].wait = Wait::Block;
            r.at_barrier += 1;
            r.block_here();
        },
        (),
    )
}

/// A warp operation from a fiber: arrive, wait until the group completes, return the result.
fn warp_op(
    r: &mut Runner,
    kind: i32,
    mask: u32,
    value: u64,
    size: i32,
    arg: i32,
    width: i32,
) -> u64 {
    let wait = Wait::Warp {
        kind,
        mask,
        value,
        size,
        arg,
        width,
    };
    if let Err(f) = r.arrive(kind, mask, wait) {
        r.fail(f);
    }
    r.block_here();
    r.slots[r.cur].result
}

extern "C" fn cb_syncwarp(mask: u32) {
    with_runner(
        |r| {
            warp_op(r, SYNCWARP, mask, 0, 0, 0, 32);
        },
        (),
    )
}
extern "C" fn cb_shfl(kind: i32, mask: u32, value: u64, size: i32, arg: i32, width: i32) -> u64 {
    with_runner(
        |r| warp_op(r, kind.clamp(0, 3), mask, value, size, arg, width),
        value,
    )
}
extern "C" fn cb_vote(kind: i32, mask: u32, pred: i32) -> u32 {
    with_runner(
        |r| {
            warp_op(
                r,
                VOTE + kind.clamp(0, 2),
                mask,
                u64::from(pred != 0),
                4,
                0,
                32,
            ) as u32
        },
        0,
    )
}
extern "C" fn cb_check(addr: *const c_void, size: usize, is_write: i32) {
    with_runner(|r| r.check(addr as u64, size as u64, is_write != 0), ())
}
extern "C" fn cb_unsupported(what: *const c_char) {
    let w = if what.is_null() {
        "?".to_string()
    } else {
        // SAFETY: a NUL-terminated string from the shim.
        unsafe { CStr::from_ptr(what) }
            .to_string_lossy()
            .into_owned()
    };
    with_runner(
        |r| r.fail(Fault::Other(format!("{w} (not emulated, or a trap)"))),
        (),
    )
}
extern "C" fn cb_threadfence() {}

static API: abi::Api = abi::Api {
    version: abi::ABI_VERSION,
    thread_idx: cb_thread_idx,
    block_idx: cb_block_idx,
    block_dim: cb_block_dim,
    grid_dim: cb_grid_dim,
    syncthreads: cb_syncthreads,
    syncwarp: cb_syncwarp,
    shfl: cb_shfl,
    vote: cb_vote,
    check: cb_check,
    unsupported: cb_unsupported,
    threadfence: cb_threadfence,
};

/// The services handed to kernel modules.
pub fn api() -> *const abi::Api {
    &API
}
