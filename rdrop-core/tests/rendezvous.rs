//! The TCP rendezvous and control plane between real processes over 127.0.0.1: this test binary
//! re-executes itself (`child_entry`, selected by `RDROP_RDV_ROLE`) as the other ranks.
//!
//! Covered: broadcast of a 128-byte id, barrier, all-reduce (f64, f32) equal to the rank-order
//! sums on every rank; a rank that never comes (timeout naming the address and the rank, in
//! bounded time); no rank 0 at all; a rank killed with SIGKILL (the survivors get `PeerDied`
//! naming it, directly or relayed by rank 0, and the abort hook runs with no call pending); a
//! wrong world size and a duplicate rank refused on every side.

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rdrop_core::dist::{DistError, Group, JoinOptions, LaunchSource, WorldSpec};

const ROLE: &str = "RDROP_RDV_ROLE";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spec(rank: usize, world: usize, port: u16) -> WorldSpec {
    WorldSpec {
        rank,
        world_size: world,
        local_rank: rank,
        local_world_size: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        source: LaunchSource::Torchrun,
    }
}

/// Starts this test binary as rank `rank` of `world`, playing `role`.
fn spawn(role: &str, rank: usize, world: usize, port: u16, timeout_ms: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env("RDV_RANK", rank.to_string())
        .env("RDV_WORLD", world.to_string())
        .env("RDV_PORT", port.to_string())
        .env("RDV_TIMEOUT_MS", timeout_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a child and returns its stdout; panics with its output unless it succeeded.
fn finished(child: Child) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&stdout).into_owned();
    assert!(
        status.success(),
        "child failed ({status}):\n{out}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    out
}

/// Runs `f` on a thread; panics if it takes longer than `limit` (so a hang fails the test).
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

/// Per-rank values whose sum depends on the order of addition.
fn values_f64(rank: usize) -> Vec<f64> {
    (0..7)
        .map(|i| (1e17f64).powi((rank % 2) as i32) * (i as f64 + 0.3) / (rank as f64 + 1.7))
        .collect()
}

fn values_f32(rank: usize) -> Vec<f32> {
    (0..1000)
        .map(|i| (1e7f32).powi((rank % 2) as i32) * (i as f32 + 0.3) / (rank as f32 + 1.7))
        .collect()
}

fn rank_order_sum<T: Copy + std::ops::AddAssign>(
    world: usize,
    f: impl Fn(usize) -> Vec<T>,
) -> Vec<T> {
    let mut acc = f(0);
    for r in 1..world {
        for (a, b) in acc.iter_mut().zip(f(r)) {
            *a += b;
        }
    }
    acc
}

fn id_bytes() -> Vec<u8> {
    (0..128u32).map(|i| (i * 7 + 3) as u8).collect()
}

/// The collective sequence every rank of `collectives_between_three_processes` runs; returns a
/// line with the bit patterns of the results.
fn run_collectives(g: &Group) -> String {
    let id = g
        .broadcast((g.rank() == 0).then(id_bytes).as_deref())
        .unwrap();
    assert_eq!(id, id_bytes());
    g.barrier().unwrap();
    let mut v = values_f64(g.rank());
    g.all_reduce_f64(&mut v).unwrap();
    let mut f = values_f32(g.rank());
    g.all_reduce_f32(&mut f).unwrap();
    g.barrier().unwrap();
    let want = rank_order_sum(g.world_size(), values_f64);
    let want32 = rank_order_sum(g.world_size(), values_f32);
    assert_eq!(
        v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(
        f.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want32.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let bits: u64 = f
        .iter()
        .fold(0u64, |h, x| h.rotate_left(5) ^ u64::from(x.to_bits()));
    format!(
        "RESULT {:?} {bits}",
        v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    )
}

/// The other ranks' side (does nothing in a normal test run).
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let num = |k: &str| std::env::var(k).unwrap().parse::<u64>().unwrap();
    let (rank, world) = (num("RDV_RANK") as usize, num("RDV_WORLD") as usize);
    let s = spec(rank, world, num("RDV_PORT") as u16);
    let timeout = Duration::from_millis(num("RDV_TIMEOUT_MS"));
    match role.as_str() {
        "collectives" => {
            let g = Group::join(&s, timeout).unwrap();
            println!("{}", run_collectives(&g));
            g.finish().unwrap();
        }
        "sleep" => {
            let _g = Group::join(&s, timeout).unwrap();
            println!("JOINED");
            std::thread::sleep(Duration::from_secs(60));
        }
        "barrier-expect-died" => {
            let g = Group::join(&s, timeout).unwrap();
            match g.barrier() {
                Err(DistError::PeerDied { rank, .. }) => println!("DIED {rank}"),
                other => panic!("expected PeerDied, got {other:?}"),
            }
        }
        "fast-heartbeat" => {
            let opts = JoinOptions {
                timeout,
                heartbeat: Duration::from_millis(100),
                dead_after: Duration::from_secs(30),
            };
            let _g = Group::join_with(&s, &opts).unwrap();
            println!("JOINED");
            std::thread::sleep(Duration::from_secs(60));
        }
        "barrier-then-died" => {
            let g = Group::join(&s, timeout).unwrap();
            match g.barrier() {
                Err(DistError::PeerDied { rank: 0, .. }) => println!("RANK 0 GONE"),
                other => panic!("expected rank 0's death, got {other:?}"),
            }
        }
        "expect-refused" => match Group::join(&s, timeout) {
            Err(e @ DistError::Refused { .. }) => println!("REFUSED {e}"),
            other => panic!("expected Refused, got {other:?}"),
        },
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn collectives_between_three_processes() {
    let port = free_port();
    let children = [
        spawn("collectives", 1, 3, port, 20_000),
        spawn("collectives", 2, 3, port, 20_000),
    ];
    let line = bounded(Duration::from_secs(30), move || {
        let g = Group::join(&spec(0, 3, port), Duration::from_secs(20)).unwrap();
        let line = run_collectives(&g);
        g.finish().unwrap();
        line
    });
    for c in children {
        let out = finished(c);
        assert!(out.contains(&line), "rank 0: {line}\nchild: {out}");
    }
}

#[test]
fn a_world_of_one_needs_no_socket() {
    let g = Group::join(&spec(0, 1, 0), Duration::from_millis(1)).unwrap();
    assert!(run_collectives(&g).starts_with("RESULT"));
    g.finish().unwrap();
}

#[test]
fn a_rank_that_never_comes_times_out_naming_it() {
    let port = free_port();
    let child = spawn("expect-refused", 1, 3, port, 10_000);
    let t0 = Instant::now();
    let e = bounded(Duration::from_secs(15), move || {
        Group::join(&spec(0, 3, port), Duration::from_millis(1500)).unwrap_err()
    });
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    match &e {
        DistError::Timeout {
            rank: 0,
            missing,
            world: 3,
            ..
        } => assert_eq!(missing, &[2]),
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("[2]"),
        "{msg}"
    );
    // The rank that did join is told why rank 0 gave up.
    let out = finished(child);
    assert!(out.contains("REFUSED") && out.contains("[2]"), "{out}");
}

#[test]
fn no_rank_zero_is_a_connect_error_in_bounded_time() {
    let port = free_port();
    let t0 = Instant::now();
    let e = Group::join(&spec(1, 2, port), Duration::from_millis(700)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(matches!(e, DistError::Connect { rank: 1, .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn wrong_world_size_is_refused_on_both_sides() {
    let port = free_port();
    let child = spawn("expect-refused", 1, 3, port, 10_000);
    let e = bounded(Duration::from_secs(15), move || {
        Group::join(&spec(0, 2, port), Duration::from_secs(10)).unwrap_err()
    });
    assert!(
        matches!(&e, DistError::Refused { rank: 0, reason, .. } if reason.contains("world size is 3")),
        "{e:?}"
    );
    let out = finished(child);
    assert!(out.contains("world size is 3"), "{out}");
}

#[test]
fn duplicate_rank_is_refused() {
    let port = free_port();
    let a = spawn("expect-refused", 1, 3, port, 10_000);
    let b = spawn("expect-refused", 1, 3, port, 10_000);
    let e = bounded(Duration::from_secs(15), move || {
        Group::join(&spec(0, 3, port), Duration::from_secs(10)).unwrap_err()
    });
    assert!(
        matches!(&e, DistError::Refused { reason, .. } if reason.contains("rank 1 joined twice")),
        "{e:?}"
    );
    for c in [a, b] {
        let out = finished(c);
        assert!(out.contains("joined twice"), "{out}");
    }
}

/// Waits until the child printed `JOINED` (after the test harness's own lines).
fn wait_joined(child: &mut Child) {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("JOINED") => return,
            Some(Ok(_)) => {}
            other => panic!("the child ended before joining: {other:?}"),
        }
    }
}

#[test]
fn killed_peer_is_seen_by_rank_zero() {
    let port = free_port();
    let mut child = spawn("sleep", 1, 2, port, 10_000);
    let g = Group::join(&spec(0, 2, port), Duration::from_secs(10)).unwrap();
    wait_joined(&mut child);
    let hook = Arc::new(AtomicUsize::new(usize::MAX));
    let h = hook.clone();
    g.set_abort_hook(move |r| h.store(r, Ordering::SeqCst));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let t0 = Instant::now();
    let r = bounded(Duration::from_secs(10), move || g.barrier());
    assert!(t0.elapsed() < Duration::from_secs(5));
    match r {
        Err(DistError::PeerDied { rank: 1, how }) => assert!(how.contains("closed"), "{how}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(hook.load(Ordering::SeqCst), 1);
}

#[test]
fn killed_rank_zero_is_seen_by_the_others() {
    let port = free_port();
    let mut child = spawn("sleep", 0, 2, port, 10_000);
    let g = Group::join(&spec(1, 2, port), Duration::from_secs(10)).unwrap();
    wait_joined(&mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    let r = bounded(Duration::from_secs(10), move || {
        let mut v = [1.0f64];
        g.all_reduce_f64(&mut v)
    });
    assert!(
        matches!(r, Err(DistError::PeerDied { rank: 0, .. })),
        "{r:?}"
    );
}

/// Rank 2 is killed; rank 1 (here) learns it from rank 0 with no call pending (the abort hook
/// runs), then its next call fails naming rank 2; rank 0 fails its pending barrier the same way.
#[test]
fn killed_peer_is_relayed_by_rank_zero() {
    let port = free_port();
    let root = spawn("barrier-expect-died", 0, 3, port, 10_000);
    let mut victim = spawn("sleep", 2, 3, port, 10_000);
    let g = Group::join(&spec(1, 3, port), Duration::from_secs(10)).unwrap();
    wait_joined(&mut victim);
    let hook = Arc::new(AtomicUsize::new(usize::MAX));
    let h = hook.clone();
    g.set_abort_hook(move |r| h.store(r, Ordering::SeqCst));
    victim.kill().unwrap();
    victim.wait().unwrap();
    let t0 = Instant::now();
    while hook.load(Ordering::SeqCst) == usize::MAX {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the hook did not run"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(hook.load(Ordering::SeqCst), 2);
    assert_eq!(g.dead_peer(), Some(2));
    match g.barrier() {
        Err(e @ DistError::PeerDied { rank: 2, .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("rank 2 died") && msg.contains("reported by rank 0"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    let out = finished(root);
    assert!(out.contains("DIED 2"), "{out}");
}

#[test]
fn a_taken_port_is_a_listen_error_naming_the_override() {
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = Group::join(&spec(0, 2, port), Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, DistError::Listen { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("RDROP_MASTER_PORT"),
        "{msg}"
    );
}

/// A rank that goes silent without closing its sockets (stopped with SIGSTOP: a vanished host
/// looks the same) is declared dead after `dead_after`.
#[test]
fn a_silent_peer_is_dead_after_the_allowed_silence() {
    let port = free_port();
    let mut child = spawn("fast-heartbeat", 1, 2, port, 10_000);
    let opts = JoinOptions {
        timeout: Duration::from_secs(10),
        heartbeat: Duration::from_millis(100),
        dead_after: Duration::from_millis(1500),
    };
    let g = Group::join_with(&spec(0, 2, port), &opts).unwrap();
    wait_joined(&mut child);
    // Stopped, its sockets stay open and nothing more arrives: as if its host vanished.
    let stopped = Command::new("kill")
        .args(["-STOP", &child.id().to_string()])
        .status()
        .expect("the `kill` command");
    assert!(stopped.success());
    let t0 = Instant::now();
    let r = bounded(Duration::from_secs(20), move || g.barrier());
    let waited = t0.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    match r {
        Err(DistError::PeerDied { rank: 1, how }) => assert!(how.contains("heartbeat"), "{how}"),
        other => panic!("{other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
}

/// Ranks idle for longer than `dead_after` (in a long step) stay alive through the heartbeats.
#[test]
fn heartbeats_keep_an_idle_group_alive() {
    let port = free_port();
    let opts = JoinOptions {
        timeout: Duration::from_secs(10),
        heartbeat: Duration::from_millis(50),
        dead_after: Duration::from_millis(1000),
    };
    let peer = std::thread::spawn(move || {
        let g = Group::join_with(&spec(1, 2, port), &opts).unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        g.barrier().unwrap();
        g.finish().unwrap();
    });
    let g = Group::join_with(&spec(0, 2, port), &opts).unwrap();
    std::thread::sleep(Duration::from_millis(2500)); // 2.5 times the allowed silence
    g.barrier().unwrap();
    g.finish().unwrap();
    peer.join().unwrap();
    let bad = JoinOptions {
        dead_after: Duration::from_millis(50),
        ..opts
    };
    let e = Group::join_with(&spec(0, 2, port), &bad).unwrap_err();
    assert!(matches!(e, DistError::Unsupported(_)), "{e:?}");
}

/// Ranks whose calls differ (a bug in the caller) get an error naming both calls, not a hang
/// or a wrong sum.
#[test]
fn different_calls_are_a_protocol_error() {
    let port = free_port();
    let child = spawn("barrier-then-died", 1, 2, port, 10_000);
    let e = bounded(Duration::from_secs(15), move || {
        let g = Group::join(&spec(0, 2, port), Duration::from_secs(10)).unwrap();
        let mut v = [1.0f64; 3];
        g.all_reduce_f64(&mut v).unwrap_err()
        // `g` is dropped without a goodbye: rank 1 learns that rank 0 is gone.
    });
    match &e {
        DistError::Protocol { rank: 0, msg } => {
            assert!(
                msg.contains("all_reduce_f64") && msg.contains("barrier"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(finished(child).contains("RANK 0 GONE"));
}
