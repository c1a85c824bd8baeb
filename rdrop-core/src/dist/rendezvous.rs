//! [`Group`]: the control plane of a data-parallel job, over TCP at `MASTER_ADDR:MASTER_PORT`.
//!
//! **Join.** Rank 0 listens; every other rank connects, retrying until the timeout, and sends a
//! hello `(magic "RDRP", protocol version, rank, world)`. Rank 0 checks each hello (same world
//! size, same version, rank in `1..world`, no rank twice); a bad one is refused and the whole
//! rendezvous is aborted with the reason sent to every rank that joined (a misconfigured job
//! should stop, not wait). When every rank has joined, rank 0 acknowledges them all; if the
//! timeout passes first, rank 0 fails naming the missing ranks and tells the others so.
//!
//! **Calls** (star topology, every rank calls the same sequence): [`Group::broadcast`] (rank 0
//! hands out e.g. the 128-byte NCCL id), [`Group::barrier`], [`Group::all_reduce_f64`] and
//! [`Group::all_reduce_f32`]: every rank sends its buffer to rank 0, which sums in rank order
//! `((v₀ + v₁) + v₂) + …` and sends the sum back, so every rank gets the same bits.
//!
//! **Watchdog.** A thread per connection reads continuously. A connection that closes without
//! a goodbye ([`Group::finish`]) means that rank died: rank 0 sees the EOF of rank k directly
//! and tells the others; the others see rank 0's EOF. Either way every rank learns "rank k
//! died" as soon as the kernel closes the dead process's sockets (immediately for `kill -9`),
//! pending and later calls fail with [`DistError::PeerDied`], and the abort hook
//! ([`Group::set_abort_hook`], e.g. `ncclCommAbort`) runs so that a thread blocked elsewhere
//! returns. Each connection also carries a heartbeat ([`JoinOptions`]): a connection silent
//! for `dead_after` (a host that vanished without closing its sockets, a stopped process)
//! counts as that rank's death in the same way.
//!
//! Wire format: frames `[kind: u8][len: u64 LE][payload]`, numbers little-endian.

use std::collections::VecDeque;
use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::collective::Collective;
use super::env::WorldSpec;
use super::error::DistError;

/// Protocol magic of the hello.
const MAGIC: &[u8; 4] = b"RDRP";
/// Protocol version; ranks of different versions refuse each other.
pub const PROTOCOL_VERSION: u32 = 1;
/// The rendezvous timeout when the caller has no opinion.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The most one frame may carry (a corrupt length is refused rather than allocated).
const MAX_FRAME: u64 = 1 << 36;

const HELLO: u8 = 1;
const ACK: u8 = 2;
const BCAST: u8 = 3;
const BARRIER: u8 = 4;
const F64: u8 = 5;
const F32: u8 = 6;
const DIED: u8 = 7;
const BYE: u8 = 8;
const PING: u8 = 9;

fn kind_name(k: u8) -> &'static str {
    match k {
        HELLO => "hello",
        ACK => "acknowledgement",
        BCAST => "broadcast",
        BARRIER => "barrier",
        F64 => "all_reduce_f64",
        F32 => "all_reduce_f32",
        DIED => "death notice",
        BYE => "goodbye",
        PING => "heartbeat",
        _ => "unknown message",
    }
}

/// The function run once when a peer dies (argument: its rank).
type AbortHook = Box<dyn Fn(usize) + Send + Sync>;

/// A joined group of ranks (see the module docs). Calls are collective and serialised.
pub struct Group {
    inner: Arc<Inner>,
    /// Held for the duration of a collective call (one at a time per rank).
    call: Mutex<()>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("rank", &self.inner.rank)
            .field("world", &self.inner.world)
            .field("addr", &self.inner.addr)
            .finish()
    }
}

struct Inner {
    rank: usize,
    world: usize,
    /// The rendezvous address (for messages).
    addr: String,
    /// Silence after which a peer counts as dead.
    dead_after: Duration,
    /// Write halves, by peer rank (rank 0: every other rank; others: only rank 0).
    writers: Vec<Option<Mutex<TcpStream>>>,
    state: Mutex<State>,
    cv: Condvar,
    hook: Mutex<Option<AbortHook>>,
}

#[derive(Default)]
struct State {
    /// Messages received, by sender.
    inbox: Vec<VecDeque<(u8, Vec<u8>)>>,
    /// Senders that said goodbye.
    bye: Vec<bool>,
    /// The first rank seen dead, and how.
    dead: Option<(usize, String)>,
    /// This rank finished or is being dropped: the readers stop reporting.
    closing: bool,
    /// A death is being reported (rank 0 relays it before the local calls fail).
    dying: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent under every lock holder's panic (single assignments).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&[kind])?;
    w.write_all(&(payload.len() as u64).to_le_bytes())?;
    w.write_all(payload)?;
    w.flush()
}

fn read_frame(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok((head[0], buf))
}

fn hello_payload(rank: usize, world: usize) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p.extend_from_slice(&(rank as u32).to_le_bytes());
    p.extend_from_slice(&(world as u32).to_le_bytes());
    p
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(a)
}

fn ack_payload(reason: Option<&str>) -> Vec<u8> {
    match reason {
        None => vec![0],
        Some(r) => {
            let mut p = vec![1];
            p.extend_from_slice(r.as_bytes());
            p
        }
    }
}

/// What rank 0 makes of a hello.
enum Hello {
    /// A rank of this job.
    Rank(usize),
    /// Not an rdrop rank at all (dropped quietly).
    Stranger,
    /// An rdrop rank that does not fit this job (aborts the rendezvous).
    Misfit(String),
}

fn check_hello(kind: u8, p: &[u8], world: usize, joined: &[bool]) -> Hello {
    if kind != HELLO || p.len() != 16 || &p[..4] != MAGIC {
        return Hello::Stranger;
    }
    let (version, rank, their_world) = (u32_at(p, 4), u32_at(p, 8) as usize, u32_at(p, 12));
    if version != PROTOCOL_VERSION {
        return Hello::Misfit(format!(
            "rank {rank} speaks protocol version {version}, rank 0 version {PROTOCOL_VERSION} \
             (different rdrop builds?)"
        ));
    }
    if their_world as usize != world {
        return Hello::Misfit(format!(
            "rank {rank} says the world size is {their_world}, rank 0 says {world}"
        ));
    }
    if rank == 0 || rank >= world {
        return Hello::Misfit(format!(
            "a process claims rank {rank}, which is not in 1..{world}"
        ));
    }
    if joined[rank] {
        return Hello::Misfit(format!("rank {rank} joined twice (duplicate rank)"));
    }
    Hello::Rank(rank)
}

/// How a rank joins and watches the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinOptions {
    /// How long to wait for every rank to join ([`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// How often each connection carries a heartbeat (5 s).
    pub heartbeat: Duration,
    /// A connection silent for this long (no message, no heartbeat) counts as its rank's death
    /// (60 s): a host that vanished, or a process that was stopped.
    pub dead_after: Duration,
}

impl Default for JoinOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            heartbeat: Duration::from_secs(5),
            dead_after: Duration::from_secs(60),
        }
    }
}

impl Group {
    /// Joins the job described by `spec`, waiting at most `timeout` for the others (a world of
    /// one joins at once, without a socket); the default heartbeat ([`JoinOptions`]).
    pub fn join(spec: &WorldSpec, timeout: Duration) -> Result<Group, DistError> {
        Self::join_with(
            spec,
            &JoinOptions {
                timeout,
                ..JoinOptions::default()
            },
        )
    }

    /// [`Group::join`] with every option.
    pub fn join_with(spec: &WorldSpec, opts: &JoinOptions) -> Result<Group, DistError> {
        let timeout = opts.timeout;
        if opts.heartbeat.is_zero() || opts.dead_after < 2 * opts.heartbeat {
            return Err(DistError::Unsupported(format!(
                "join options: dead_after ({:?}) must be at least twice the heartbeat ({:?})",
                opts.dead_after, opts.heartbeat
            )));
        }
        let addr = spec.rendezvous_addr();
        if spec.rank >= spec.world_size {
            return Err(DistError::Refused {
                rank: spec.rank,
                addr,
                reason: format!("rank {} is not below the world size", spec.rank),
            });
        }
        let streams = if spec.world_size == 1 {
            vec![None]
        } else if spec.rank == 0 {
            join_as_root(spec, &addr, timeout)?
        } else {
            let mut v: Vec<Option<TcpStream>> = (0..spec.world_size).map(|_| None).collect();
            v[0] = Some(join_as_peer(spec, &addr, timeout)?);
            v
        };
        let mut writers = Vec::with_capacity(streams.len());
        let mut readers = Vec::new();
        for (r, s) in streams.into_iter().enumerate() {
            match s {
                Some(s) => {
                    let io = |op: &str, e| DistError::Io {
                        rank: spec.rank,
                        addr: addr.clone(),
                        op: format!("{op} (rank {r})"),
                        source: e,
                    };
                    // Silence longer than `dead_after` is a death (reads), and a peer that
                    // stopped reading cannot block a writer forever (writes).
                    s.set_read_timeout(Some(opts.dead_after))
                        .map_err(|e| io("set_read_timeout", e))?;
                    s.set_write_timeout(Some(opts.dead_after))
                        .map_err(|e| io("set_write_timeout", e))?;
                    // Small control messages must not wait for Nagle's timer.
                    s.set_nodelay(true).map_err(|e| io("set_nodelay", e))?;
                    readers.push((r, s.try_clone().map_err(|e| io("try_clone", e))?));
                    writers.push(Some(Mutex::new(s)));
                }
                None => writers.push(None),
            }
        }
        let inner = Arc::new(Inner {
            rank: spec.rank,
            world: spec.world_size,
            addr,
            dead_after: opts.dead_after,
            writers,
            state: Mutex::new(State {
                inbox: vec![VecDeque::new(); spec.world_size],
                bye: vec![false; spec.world_size],
                ..State::default()
            }),
            cv: Condvar::new(),
            hook: Mutex::new(None),
        });
        for (r, s) in readers {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("rdrop-watch-{r}"))
                .spawn(move || inner.read_loop(r, s))
                .map_err(|e| DistError::Io {
                    rank: spec.rank,
                    addr: spec.rendezvous_addr(),
                    op: "spawning the watchdog thread".into(),
                    source: e,
                })?;
        }
        if spec.world_size > 1 {
            let weak = Arc::downgrade(&inner);
            let every = opts.heartbeat;
            std::thread::Builder::new()
                .name("rdrop-heartbeat".into())
                .spawn(move || heartbeat(weak, every))
                .map_err(|e| DistError::Io {
                    rank: spec.rank,
                    addr: spec.rendezvous_addr(),
                    op: "spawning the heartbeat thread".into(),
                    source: e,
                })?;
        }
        Ok(Group {
            inner,
            call: Mutex::new(()),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.inner.world
    }

    /// The rendezvous address `host:port`.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Registers `hook`, run once (on the watchdog thread) when a peer is seen dead, with its
    /// rank; e.g. `ncclCommAbort`, so that a rank blocked in a device collective returns.
    /// If a peer already died, runs it at once.
    pub fn set_abort_hook(&self, hook: impl Fn(usize) + Send + Sync + 'static) {
        let mut slot = lock(&self.inner.hook);
        let dead = lock(&self.inner.state).dead.as_ref().map(|d| d.0);
        match dead {
            Some(r) => {
                drop(slot);
                hook(r)
            }
            None => *slot = Some(Box::new(hook)),
        }
    }

    /// The first peer seen dead, if any.
    pub fn dead_peer(&self) -> Option<usize> {
        lock(&self.inner.state).dead.as_ref().map(|d| d.0)
    }

    /// Rank 0 passes `Some(data)` and every rank returns it (`data` is ignored elsewhere).
    pub fn broadcast(&self, data: Option<&[u8]>) -> Result<Vec<u8>, DistError> {
        let _call = lock(&self.call);
        let inner = &self.inner;
        if inner.rank == 0 {
            let data = data.ok_or_else(|| DistError::Protocol {
                rank: 0,
                msg: "broadcast: rank 0 must pass the data".into(),
            })?;
            for r in 1..inner.world {
                inner.send(r, BCAST, data)?;
            }
            Ok(data.to_vec())
        } else {
            inner.recv(0, BCAST)
        }
    }

    /// Returns when every rank has called it.
    pub fn barrier(&self) -> Result<(), DistError> {
        let _call = lock(&self.call);
        let inner = &self.inner;
        if inner.rank == 0 {
            for r in 1..inner.world {
                inner.recv(r, BARRIER)?;
            }
            for r in 1..inner.world {
                inner.send(r, BARRIER, &[])?;
            }
        } else {
            inner.send(0, BARRIER, &[])?;
            inner.recv(0, BARRIER)?;
        }
        Ok(())
    }

    /// `v ← Σ_ranks v`, summed by rank 0 in rank order (every rank gets the same bits).
    pub fn all_reduce_f64(&self, v: &mut [f64]) -> Result<(), DistError> {
        let _call = lock(&self.call);
        self.inner.all_reduce(v, F64)
    }

    /// `v ← Σ_ranks v` for host `f32` buffers, as [`Group::all_reduce_f64`] (the CPU
    /// multi-process path; GPUs use NCCL).
    pub fn all_reduce_f32(&self, v: &mut [f32]) -> Result<(), DistError> {
        let _call = lock(&self.call);
        self.inner.all_reduce(v, F32)
    }

    /// Says goodbye to the peers: this rank's connections closing later (when the group is
    /// dropped or the process exits) is not a death. No collective call may follow.
    pub fn finish(&self) -> Result<(), DistError> {
        let _call = lock(&self.call);
        lock(&self.inner.state).closing = true;
        let mut first_err = None;
        for r in 0..self.inner.world {
            if self.inner.writers[r].is_some() {
                if let Err(e) = self.inner.send(r, BYE, &[]) {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        lock(&self.inner.state).closing = true;
        for w in self.inner.writers.iter().flatten() {
            // Without a goodbye first, the peers read this as this rank's death: intended on
            // error paths. After `finish`, the goodbye is already out.
            let _ = lock(w).shutdown(Shutdown::Both);
        }
        self.inner.cv.notify_all();
    }
}

/// Sends a heartbeat on every connection every `every`, until the group closes.
fn heartbeat(inner: std::sync::Weak<Inner>, every: Duration) {
    loop {
        std::thread::sleep(every);
        let Some(inner) = inner.upgrade() else { return };
        {
            let st = lock(&inner.state);
            if st.closing || st.dead.is_some() {
                return;
            }
        }
        for w in inner.writers.iter().flatten() {
            // A failed write shows up as the peer's death on the reading side.
            let _ = write_frame(&mut *lock(w), PING, &[]);
        }
    }
}

/// Numbers that travel as little-endian bytes.
trait Wire: Copy + std::ops::AddAssign + 'static {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

impl Wire for f64 {
    const SIZE: usize = 8;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        f64::from_le_bytes(a)
    }
}

impl Wire for f32 {
    const SIZE: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        f32::from_le_bytes(a)
    }
}

fn encode<T: Wire>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * T::SIZE);
    v.iter().for_each(|x| x.put(&mut out));
    out
}

impl Inner {
    fn protocol(&self, msg: String) -> DistError {
        DistError::Protocol {
            rank: self.rank,
            msg,
        }
    }

    fn all_reduce<T: Wire>(&self, v: &mut [T], kind: u8) -> Result<(), DistError> {
        if self.world == 1 {
            return Ok(());
        }
        let n = v.len();
        let check_len = |from: usize, bytes: &[u8]| {
            if bytes.len() != n * T::SIZE {
                Err(self.protocol(format!(
                    "{}: rank {from} sent {} values, rank {} has {}",
                    kind_name(kind),
                    bytes.len() / T::SIZE,
                    self.rank,
                    n
                )))
            } else {
                Ok(())
            }
        };
        if self.rank == 0 {
            for r in 1..self.world {
                let bytes = self.recv(r, kind)?;
                check_len(r, &bytes)?;
                for (x, b) in v.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
                    *x += T::get(b);
                }
            }
            let sum = encode(v);
            for r in 1..self.world {
                self.send(r, kind, &sum)?;
            }
        } else {
            self.send(0, kind, &encode(v))?;
            let bytes = self.recv(0, kind)?;
            check_len(0, &bytes)?;
            for (x, b) in v.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
                *x = T::get(b);
            }
        }
        Ok(())
    }

    fn died_error(&self, d: &(usize, String)) -> DistError {
        DistError::PeerDied {
            rank: d.0,
            how: d.1.clone(),
        }
    }

    fn send(&self, to: usize, kind: u8, payload: &[u8]) -> Result<(), DistError> {
        if let Some(d) = &lock(&self.state).dead {
            return Err(self.died_error(d));
        }
        let Some(w) = self.writers.get(to).and_then(Option::as_ref) else {
            return Err(self.protocol(format!("no connection to rank {to}")));
        };
        let res = {
            let mut s = lock(w);
            let mut bw = BufWriter::with_capacity(1 << 16, &mut *s);
            write_frame(&mut bw, kind, payload)
        };
        res.map_err(|e| {
            // A write to a dead peer usually fails before its reader has seen the EOF: give the
            // watchdog a moment, so the error says who died rather than "broken pipe".
            let st = lock(&self.state);
            let (st, _) = self
                .cv
                .wait_timeout_while(st, Duration::from_secs(2), |s| s.dead.is_none())
                .unwrap_or_else(|p| p.into_inner());
            match &st.dead {
                Some(d) => self.died_error(d),
                None => DistError::Io {
                    rank: self.rank,
                    addr: self.addr.clone(),
                    op: format!("sending {} to rank {to}", kind_name(kind)),
                    source: e,
                },
            }
        })
    }

    /// The next message from rank `from`, which must be of `kind`.
    fn recv(&self, from: usize, kind: u8) -> Result<Vec<u8>, DistError> {
        let mut st = lock(&self.state);
        loop {
            if let Some(d) = &st.dead {
                return Err(self.died_error(d));
            }
            if let Some((k, data)) = st.inbox[from].pop_front() {
                if k != kind {
                    return Err(self.protocol(format!(
                        "rank {} is in {} but rank {from} sent {} (the ranks' calls differ)",
                        self.rank,
                        kind_name(kind),
                        kind_name(k)
                    )));
                }
                return Ok(data);
            }
            if st.bye[from] {
                return Err(self.protocol(format!(
                    "rank {from} has finished while rank {} waits in {}",
                    self.rank,
                    kind_name(kind)
                )));
            }
            if st.closing {
                return Err(self.protocol("the group is closing".into()));
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The watchdog of the connection to rank `from`: queues its messages, notices its death.
    fn read_loop(&self, from: usize, s: TcpStream) {
        let mut r = std::io::BufReader::with_capacity(1 << 16, s);
        let how = loop {
            match read_frame(&mut r) {
                Ok((BYE, _)) => {
                    lock(&self.state).bye[from] = true;
                    self.cv.notify_all();
                    return;
                }
                Ok((DIED, p)) if p.len() >= 4 => {
                    let rank = u32_at(&p, 0) as usize;
                    let how = String::from_utf8_lossy(&p[4..]).into_owned();
                    self.mark_dead(rank, format!("{how}; reported by rank 0"));
                    return;
                }
                Ok((PING, _)) => {}
                Ok((k, p)) => {
                    lock(&self.state).inbox[from].push_back((k, p));
                    self.cv.notify_all();
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break format!(
                        "its connection to rank {} closed without a goodbye",
                        self.rank
                    )
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break format!(
                        "no message or heartbeat on its connection to rank {} for {:?} (its \
                         host went away, or the process was stopped?)",
                        self.rank, self.dead_after
                    )
                }
                Err(e) => break format!("its connection to rank {} failed: {e}", self.rank),
            }
        };
        self.mark_dead(from, how);
    }

    /// Records the first death, tells the others (rank 0) and runs the abort hook.
    fn mark_dead(&self, rank: usize, how: String) {
        {
            let mut st = lock(&self.state);
            if st.closing || st.dead.is_some() || st.dying {
                return;
            }
            st.dying = true;
        }
        if self.rank == 0 {
            // Before the local calls fail (and this process perhaps exits), so that the others
            // learn who died rather than seeing rank 0 go.
            let mut p = (rank as u32).to_le_bytes().to_vec();
            p.extend_from_slice(how.as_bytes());
            for (r, w) in self.writers.iter().enumerate() {
                if let (Some(w), true) = (w, r != rank) {
                    let mut s = lock(w);
                    let _ = write_frame(&mut *s, DIED, &p);
                }
            }
        }
        {
            // The hook runs before any call can fail with the death (so a rank that returns
            // from a failed call finds e.g. NCCL already aborted); `set_abort_hook` takes the
            // same lock, so a hook is run exactly once whenever it is registered.
            let hook = lock(&self.hook);
            if let Some(h) = hook.as_ref() {
                h(rank);
            }
            lock(&self.state).dead = Some((rank, how));
        }
        self.cv.notify_all();
    }
}

impl Collective for Group {
    fn rank(&self) -> usize {
        self.inner.rank
    }

    fn world_size(&self) -> usize {
        self.inner.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_f32(buf)
    }

    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<(), DistError> {
        Group::all_reduce_f64(self, v)
    }

    fn barrier(&self) -> Result<(), DistError> {
        Group::barrier(self)
    }
}

/// The address rank 0 listens on: every interface, IPv6 when the master address is IPv6.
fn listen_addr(spec: &WorldSpec) -> SocketAddr {
    let v6 = spec
        .master_addr
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::Ipv6Addr>()
        .is_ok();
    if v6 {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, spec.master_port))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, spec.master_port))
    }
}

/// Rank 0's side: accept until every rank said a good hello, then acknowledge them all.
fn join_as_root(
    spec: &WorldSpec,
    addr: &str,
    timeout: Duration,
) -> Result<Vec<Option<TcpStream>>, DistError> {
    let world = spec.world_size;
    let listener = TcpListener::bind(listen_addr(spec)).map_err(|e| DistError::Listen {
        addr: addr.into(),
        source: e,
    })?;
    let io = |op: &str, e| DistError::Io {
        rank: 0,
        addr: addr.into(),
        op: op.into(),
        source: e,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| io("set_nonblocking", e))?;
    let start = Instant::now();
    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut joined = vec![false; world];
    joined[0] = true;
    // Tells every joined rank why the rendezvous failed (best effort).
    let abort = |streams: &mut Vec<Option<TcpStream>>, reason: &str| {
        for s in streams.iter_mut().flatten() {
            let _ = write_frame(s, ACK, &ack_payload(Some(reason)));
        }
    };
    while joined.iter().any(|j| !j) {
        match listener.accept() {
            Ok((mut s, peer)) => {
                let setup = s
                    .set_nonblocking(false)
                    .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(10))));
                let frame = setup.and_then(|()| read_frame(&mut s));
                let Ok((kind, p)) = frame else {
                    continue; // not a rank, or one that died mid-hello: it will retry or time out
                };
                match check_hello(kind, &p, world, &joined) {
                    Hello::Rank(r) => {
                        joined[r] = true;
                        streams[r] = Some(s);
                    }
                    Hello::Stranger => continue,
                    Hello::Misfit(reason) => {
                        let reason = format!("{reason} (connection from {peer})");
                        let _ = write_frame(&mut s, ACK, &ack_payload(Some(&reason)));
                        abort(
                            &mut streams,
                            &format!("rendezvous aborted by rank 0: {reason}"),
                        );
                        return Err(DistError::Refused {
                            rank: 0,
                            addr: addr.into(),
                            reason,
                        });
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() >= timeout {
                    let missing: Vec<usize> = (0..world).filter(|&r| !joined[r]).collect();
                    let err = DistError::Timeout {
                        rank: 0,
                        addr: addr.into(),
                        missing,
                        world,
                        waited: start.elapsed(),
                    };
                    abort(&mut streams, &err.to_string());
                    return Err(err);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("accept", e)),
        }
    }
    for (r, s) in streams.iter_mut().enumerate() {
        if let Some(s) = s {
            write_frame(s, ACK, &ack_payload(None))
                .map_err(|e| io(&format!("acknowledging rank {r}"), e))?;
        }
    }
    Ok(streams)
}

/// A non-zero rank's side: connect with retry, say hello, wait for rank 0's acknowledgement.
fn join_as_peer(spec: &WorldSpec, addr: &str, timeout: Duration) -> Result<TcpStream, DistError> {
    let rank = spec.rank;
    let start = Instant::now();
    let mut last = String::from("no attempt");
    let mut s = loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(DistError::Connect {
                rank,
                addr: addr.into(),
                waited: start.elapsed(),
                last,
            });
        }
        match (spec.master_addr.as_str(), spec.master_port).to_socket_addrs() {
            Ok(addrs) => {
                let mut connected = None;
                for a in addrs {
                    let left = timeout.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    match TcpStream::connect_timeout(&a, left.min(Duration::from_secs(5))) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = format!("{a}: {e}"),
                    }
                }
                if let Some(s) = connected {
                    break s;
                }
            }
            Err(e) => last = format!("resolving {}: {e}", spec.master_addr),
        }
        std::thread::sleep(Duration::from_millis(50).min(left));
    };
    let io = |op: &str, e| DistError::Io {
        rank,
        addr: addr.into(),
        op: op.into(),
        source: e,
    };
    write_frame(&mut s, HELLO, &hello_payload(rank, spec.world_size))
        .map_err(|e| io("sending the hello to rank 0", e))?;
    // Rank 0 answers when everyone joined, or with the reason it gave up (it times out on its
    // own clock: allow a little longer to hear its reason).
    let left = timeout.saturating_sub(start.elapsed()) + Duration::from_secs(5);
    s.set_read_timeout(Some(left))
        .map_err(|e| io("set_read_timeout", e))?;
    let (kind, p) = read_frame(&mut s).map_err(|e| {
        io(
            "waiting for rank 0 to acknowledge (the other ranks have not all joined?)",
            e,
        )
    })?;
    match (kind, p.first()) {
        (ACK, Some(0)) => Ok(s),
        (ACK, Some(_)) => Err(DistError::Refused {
            rank,
            addr: addr.into(),
            reason: String::from_utf8_lossy(&p[1..]).into_owned(),
        }),
        _ => Err(DistError::Protocol {
            rank,
            msg: format!("rank 0 answered the hello with a {}", kind_name(kind)),
        }),
    }
}
