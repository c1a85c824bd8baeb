//! Streams and events. Each stream is a host worker thread that runs its operations in order;
//! the host only waits where the API says it does. Kept as the driver defines them:
//! - the legacy default stream (`0`, `CU_STREAM_LEGACY`) of a context waits for all earlier
//!   work of the context's blocking streams, and they wait for its earlier work;
//! - the per-thread default stream (`CU_STREAM_PER_THREAD`, candle's) is one blocking stream
//!   per (context, host thread);
//! - an event wait waits for the event's most recent record *at the time of the wait call*.
//!
//! Delay mode (`RDROP_EMU_DELAY=SEED[:MAX_US]`): every stream sleeps a seeded random time
//! before each operation, so a missing wait shows as wrong numbers rather than passing by the
//! luck of timing. An operation that fails (a kernel's illegal address, a bad copy) makes the
//! error sticky on the context: later operations are skipped and later calls return it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::context;
use crate::error::{EmuError, CUDA_ERROR_INVALID_HANDLE, CUDA_ERROR_INVALID_VALUE};

/// `CU_STREAM_LEGACY`.
pub const STREAM_LEGACY: u64 = 1;
/// `CU_STREAM_PER_THREAD`.
pub const STREAM_PER_THREAD: u64 = 2;
/// Tag of created streams' handles.
pub const STREAM_TAG: u64 = 0x5757_0000_0000;
/// Tag of events' handles.
pub const EVENT_TAG: u64 = 0xe7e7_0000_0000;

/// An operation run by a stream's worker.
pub type Op = Box<dyn FnOnce() -> Result<(), EmuError> + Send>;

struct Inner {
    queue: VecDeque<(u64, String, Op)>,
    submitted: u64,
    completed: u64,
    closed: bool,
}

/// One stream.
pub struct Stream {
    /// Handle id (0 for default streams).
    pub id: u64,
    /// Its context.
    pub ctx: u64,
    /// Its device.
    pub device: usize,
    /// Created with `CU_STREAM_NON_BLOCKING` (no implicit sync with the legacy stream).
    pub nonblocking: bool,
    /// The legacy default stream of its context.
    pub legacy: bool,
    inner: Mutex<Inner>,
    work: Condvar,
    progress: Condvar,
    rng: AtomicU64,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .field("ctx", &self.ctx)
            .field("legacy", &self.legacy)
            .finish()
    }
}

impl Stream {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Operations enqueued so far.
    pub fn submitted(&self) -> u64 {
        self.lock().submitted
    }

    /// Waits until the stream has completed its first `seq` operations.
    pub fn wait_for(&self, seq: u64) {
        let mut g = self.lock();
        while g.completed < seq {
            g = self.progress.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether every operation enqueued so far has completed.
    pub fn idle(&self) -> bool {
        let g = self.lock();
        g.completed == g.submitted
    }

    fn push(&self, what: String, op: Op) -> u64 {
        let mut g = self.lock();
        g.submitted += 1;
        let seq = g.submitted;
        g.queue.push_back((seq, what, op));
        self.work.notify_one();
        seq
    }

    fn next_delay(&self) -> Option<Duration> {
        let (_, max) = crate::config::get().delay?;
        if max == 0 {
            return None;
        }
        // splitmix64
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Some(Duration::from_micros(z % (max + 1)))
    }

    fn run(self: Arc<Self>) {
        loop {
            let (seq, what, op) = {
                let mut g = self.lock();
                loop {
                    if let Some(x) = g.queue.pop_front() {
                        break x;
                    }
                    if g.closed {
                        return;
                    }
                    g = self.work.wait(g).unwrap_or_else(|p| p.into_inner());
                }
            };
            if let Some(d) = self.next_delay() {
                std::thread::sleep(d);
            }
            match context::usable(self.ctx) {
                Ok(_) => {
                    if let Err(e) = op() {
                        crate::error::report(&format!("{what}: {}", e.message));
                        context::set_sticky(self.ctx, &e);
                    }
                }
                Err(_) => drop(op), // the context is unusable: skipped
            }
            let mut g = self.lock();
            g.completed = seq;
            self.progress.notify_all();
        }
    }
}

struct Registry {
    streams: HashMap<u64, Arc<Stream>>,
    legacy: HashMap<u64, Arc<Stream>>,
    per_thread: HashMap<(u64, ThreadId), Arc<Stream>>,
    /// Streams destroyed while they may still have work queued (their context's destruction
    /// waits for them too).
    closing: Vec<Arc<Stream>>,
    next: u64,
    events: HashMap<u64, Arc<Event>>,
    next_event: u64,
}

fn reg() -> MutexGuard<'static, Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| {
        Mutex::new(Registry {
            streams: HashMap::new(),
            legacy: HashMap::new(),
            per_thread: HashMap::new(),
            closing: Vec::new(),
            next: 1,
            events: HashMap::new(),
            next_event: 1,
        })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

static CREATED: AtomicU64 = AtomicU64::new(0);

fn spawn(id: u64, ctx: u64, device: usize, nonblocking: bool, legacy: bool) -> Arc<Stream> {
    let n = CREATED.fetch_add(1, Ordering::Relaxed);
    let seed = crate::config::get().delay.map_or(0, |d| d.0);
    let s = Arc::new(Stream {
        id,
        ctx,
        device,
        nonblocking,
        legacy,
        inner: Mutex::new(Inner {
            queue: VecDeque::new(),
            submitted: 0,
            completed: 0,
            closed: false,
        }),
        work: Condvar::new(),
        progress: Condvar::new(),
        rng: AtomicU64::new(seed ^ n.wrapping_mul(0xd605_bbb5_8c8a_bd37)),
    });
    let w = s.clone();
    let name = if legacy {
        format!("emu-legacy-{ctx}")
    } else {
        format!("emu-stream-{id}")
    };
    let _ = std::thread::Builder::new()
        .name(name)
        .stack_size(8 << 20)
        .spawn(move || w.run());
    s
}

/// Creates a stream in the current context; returns its handle.
pub fn create(nonblocking: bool) -> Result<u64, EmuError> {
    let c = context::current_usable()?;
    let mut r = reg();
    let id = r.next;
    r.next += 1;
    let s = spawn(id, c.id, c.device, nonblocking, false);
    r.streams.insert(id, s);
    Ok(STREAM_TAG | id)
}

/// Destroys a created stream (its queued work still runs).
pub fn destroy(handle: u64) -> Result<(), EmuError> {
    if handle & !0xffff_ffff != STREAM_TAG {
        return Err(bad_handle(handle));
    }
    let s = {
        let mut r = reg();
        let s = r
            .streams
            .remove(&(handle & 0xffff_ffff))
            .ok_or_else(|| bad_handle(handle))?;
        r.closing.retain(|c| !c.idle());
        r.closing.push(s.clone());
        s
    };
    let mut g = s.lock();
    g.closed = true;
    s.work.notify_all();
    Ok(())
}

fn bad_handle(handle: u64) -> EmuError {
    EmuError::new(
        CUDA_ERROR_INVALID_HANDLE,
        format!("stream {handle:#x} is not a live stream"),
    )
}

/// Closes every stream of context `ctx` (its destruction) and waits until they are idle.
pub fn destroy_context_streams(ctx: u64) {
    let mut r = reg();
    let mut gone = Vec::new();
    r.streams.retain(|_, s| {
        let keep = s.ctx != ctx;
        if !keep {
            gone.push(s.clone());
        }
        keep
    });
    r.closing.retain(|s| {
        let keep = s.ctx != ctx;
        if !keep {
            gone.push(s.clone());
        }
        keep
    });
    if let Some(s) = r.legacy.remove(&ctx) {
        gone.push(s);
    }
    r.per_thread.retain(|k, s| {
        let keep = k.0 != ctx;
        if !keep {
            gone.push(s.clone());
        }
        keep
    });
    drop(r);
    for s in &gone {
        let mut g = s.lock();
        g.closed = true;
        s.work.notify_all();
    }
    // Like the driver, destruction waits for the work in flight: the context is inactive, so
    // queued operations are skipped, but one running now (a kernel, a free) must finish
    // before the caller frees the context's memory, or a free that was still queued would
    // run after the memory went, and after a new activation of the same primary context.
    for s in &gone {
        s.wait_for(s.submitted());
    }
}

/// The stream a handle names, for the calling thread (default streams resolve through the
/// current context).
pub fn resolve(handle: u64) -> Result<Arc<Stream>, EmuError> {
    match handle {
        0 | STREAM_LEGACY => {
            let c = context::current_usable()?;
            let mut r = reg();
            let s = r
                .legacy
                .entry(c.id)
                .or_insert_with(|| spawn(0, c.id, c.device, false, true))
                .clone();
            Ok(s)
        }
        STREAM_PER_THREAD => {
            let c = context::current_usable()?;
            let key = (c.id, std::thread::current().id());
            let mut r = reg();
            let s = r
                .per_thread
                .entry(key)
                .or_insert_with(|| spawn(0, c.id, c.device, false, false))
                .clone();
            Ok(s)
        }
        h if h & !0xffff_ffff == STREAM_TAG => {
            let s = reg()
                .streams
                .get(&(h & 0xffff_ffff))
                .cloned()
                .ok_or_else(|| bad_handle(h))?;
            context::usable(s.ctx)?;
            Ok(s)
        }
        h => Err(bad_handle(h)),
    }
}

/// The device ordinal of the stream `handle` names.
pub fn device_of(handle: u64) -> Result<usize, EmuError> {
    Ok(resolve(handle)?.device)
}

/// The streams an operation on `s` must first wait for (legacy-stream semantics), as
/// (stream, sequence) pairs.
fn implicit_deps(s: &Stream) -> Vec<(Arc<Stream>, u64)> {
    if s.nonblocking {
        return Vec::new();
    }
    let r = reg();
    let mut deps = Vec::new();
    let mut consider = |o: &Arc<Stream>| {
        if std::ptr::eq(&**o, s) || o.ctx != s.ctx || o.nonblocking {
            return;
        }
        let g = o.lock();
        if g.completed < g.submitted {
            deps.push((o.clone(), g.submitted));
        }
    };
    if s.legacy {
        for o in r.streams.values() {
            consider(o);
        }
        for o in r.per_thread.values() {
            consider(o);
        }
    } else if let Some(l) = r.legacy.get(&s.ctx) {
        consider(l);
    }
    deps
}

/// Enqueues `op` on the stream `handle` names; `what` names it in error reports. Returns the
/// stream and the operation's sequence number.
pub fn enqueue(handle: u64, what: String, op: Op) -> Result<(Arc<Stream>, u64), EmuError> {
    let s = resolve(handle)?;
    let seq = enqueue_on(&s, what, op);
    Ok((s, seq))
}

/// [`enqueue`] on a resolved stream.
pub fn enqueue_on(s: &Arc<Stream>, what: String, op: Op) -> u64 {
    for (o, seq) in implicit_deps(s) {
        s.push(
            "an implicit wait for the legacy default stream".into(),
            Box::new(move || {
                o.wait_for(seq);
                Ok(())
            }),
        );
    }
    s.push(what, op)
}

/// Waits until every operation enqueued on `handle` so far has run; the context's sticky error
/// if one happened.
pub fn synchronize(handle: u64) -> Result<(), EmuError> {
    let s = resolve(handle)?;
    let seq = s.submitted();
    s.wait_for(seq);
    context::usable(s.ctx).map(|_| ())
}

/// Waits for every stream of context `ctx`.
pub fn synchronize_context(ctx: u64) -> Result<(), EmuError> {
    let all: Vec<Arc<Stream>> = {
        let r = reg();
        r.streams
            .values()
            .chain(r.legacy.values())
            .chain(r.per_thread.values())
            .filter(|s| s.ctx == ctx)
            .cloned()
            .collect()
    };
    for s in all {
        let seq = s.submitted();
        s.wait_for(seq);
    }
    context::usable(ctx).map(|_| ())
}

/// Whether `handle` has no pending work (`cuStreamQuery`).
pub fn query(handle: u64) -> Result<bool, EmuError> {
    let s = resolve(handle)?;
    context::usable(s.ctx)?;
    Ok(s.idle())
}

// ----------------------------------------------------------------------------------- events

struct EvState {
    recorded: u64,
    completed: u64,
    time: Option<Instant>,
}

/// One event.
pub struct Event {
    /// Its context.
    pub ctx: u64,
    /// `CU_EVENT_DISABLE_TIMING` was given.
    pub no_timing: bool,
    state: Mutex<EvState>,
    cv: Condvar,
}

impl Event {
    fn lock(&self) -> MutexGuard<'_, EvState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates an event in the current context (`flags` as cuEventCreate's).
pub fn event_create(flags: u32) -> Result<u64, EmuError> {
    let c = context::current_usable()?;
    if flags & !0xf != 0 {
        return Err(EmuError::new(
            CUDA_ERROR_INVALID_VALUE,
            format!("cuEventCreate flags {flags:#x}"),
        ));
    }
    let mut r = reg();
    let id = r.next_event;
    r.next_event += 1;
    r.events.insert(
        id,
        Arc::new(Event {
            ctx: c.id,
            no_timing: flags & 0x2 != 0,
            state: Mutex::new(EvState {
                recorded: 0,
                completed: 0,
                time: None,
            }),
            cv: Condvar::new(),
        }),
    );
    Ok(EVENT_TAG | id)
}

fn event(handle: u64) -> Result<Arc<Event>, EmuError> {
    if handle & !0xffff_ffff != EVENT_TAG {
        return Err(EmuError::new(
            CUDA_ERROR_INVALID_HANDLE,
            format!("event {handle:#x} is not an event"),
        ));
    }
    reg()
        .events
        .get(&(handle & 0xffff_ffff))
        .cloned()
        .ok_or_else(|| {
            EmuError::new(
                CUDA_ERROR_INVALID_HANDLE,
                format!("event {handle:#x} was destroyed"),
            )
        })
}

/// Destroys an event (pending records still complete).
pub fn event_destroy(handle: u64) -> Result<(), EmuError> {
    event(handle)?;
    reg().events.remove(&(handle & 0xffff_ffff));
    Ok(())
}

/// Records `ev` on `stream`.
pub fn event_record(ev: u64, stream: u64) -> Result<(), EmuError> {
    let e = event(ev)?;
    let s = resolve(stream)?;
    if s.ctx != e.ctx {
        return Err(EmuError::new(
            CUDA_ERROR_INVALID_HANDLE,
            "cuEventRecord: the event and the stream belong to different contexts",
        ));
    }
    let gen = {
        let mut g = e.lock();
        g.recorded += 1;
        g.recorded
    };
    enqueue_on(
        &s,
        "cuEventRecord".into(),
        Box::new(move || {
            let mut g = e.lock();
            if gen > g.completed {
                g.completed = gen;
                g.time = Some(Instant::now());
            }
            e.cv.notify_all();
            Ok(())
        }),
    );
    Ok(())
}

/// Makes `stream` wait for `ev`'s most recent record.
pub fn stream_wait_event(stream: u64, ev: u64) -> Result<(), EmuError> {
    let e = event(ev)?;
    let s = resolve(stream)?;
    if crate::config::mutate("drop-stream-wait") {
        return Ok(()); // fault injection: a caller that forgot the wait
    }
    let gen = e.lock().recorded;
    if gen == 0 {
        return Ok(());
    }
    enqueue_on(
        &s,
        "cuStreamWaitEvent".into(),
        Box::new(move || {
            let mut g = e.lock();
            while g.completed < gen {
                g = e.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            Ok(())
        }),
    );
    Ok(())
}

/// Host wait for `ev`'s most recent record.
pub fn event_synchronize(ev: u64) -> Result<(), EmuError> {
    let e = event(ev)?;
    let mut g = e.lock();
    let gen = g.recorded;
    while g.completed < gen {
        g = e.cv.wait(g).unwrap_or_else(|p| p.into_inner());
    }
    drop(g);
    context::usable(e.ctx).map(|_| ())
}

/// Whether `ev`'s most recent record has completed.
pub fn event_query(ev: u64) -> Result<bool, EmuError> {
    let e = event(ev)?;
    let g = e.lock();
    Ok(g.completed >= g.recorded)
}

/// Milliseconds between two completed events.
pub fn event_elapsed(start: u64, end: u64) -> Result<f32, EmuError> {
    let (a, b) = (event(start)?, event(end)?);
    if a.no_timing || b.no_timing {
        return Err(EmuError::new(
            CUDA_ERROR_INVALID_HANDLE,
            "cuEventElapsedTime: an event was created with CU_EVENT_DISABLE_TIMING",
        ));
    }
    let (ga, gb) = (a.lock(), b.lock());
    match (ga.time, gb.time) {
        (Some(x), Some(y)) if ga.completed >= ga.recorded && gb.completed >= gb.recorded => {
            let ms = if y >= x {
                (y - x).as_secs_f64() * 1e3
            } else {
                -((x - y).as_secs_f64() * 1e3)
            };
            Ok(ms as f32)
        }
        _ => Err(EmuError::new(
            crate::error::CUDA_ERROR_NOT_READY,
            "cuEventElapsedTime: an event has not completed",
        )),
    }
}
