//! `rdrop train|resume --nproc-per-node N`: a small torchrun. The launcher starts N copies of
//! this binary with the same arguments and torchrun's variables (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` = a free port), so
//! each copy joins the run as `torchrun --no-python` would have started it
//! ([`crate::world`]). It then only relays and watches:
//!
//! - every line a rank writes on stderr is printed as `[rank k] line` (rank 0 alone prints
//!   progress and metrics); stdout is relayed as it is (rank 0's summary, `--json`);
//! - SIGINT (Ctrl-C), SIGTERM and SIGUSR1 to the launcher are forwarded, the same signal, to
//!   each rank (the ranks run in their own process groups, so a terminal's Ctrl-C reaches them
//!   through the launcher only, once), and the launcher exits with their code when they all
//!   stopped after the checkpoint (130, or 75 for a preemption);
//! - when a rank fails (non-zero exit or a signal) the others normally stop by themselves (they
//!   see it die through the rendezvous, and exit with [`PEER_DIED_EXIT`]); any still running
//!   after [`GRACE`] are killed, and the launcher exits non-zero naming the rank that failed
//!   first for a reason of its own, and how.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long the other ranks get to stop by themselves after one failed, before they are killed.
pub const GRACE: Duration = Duration::from_secs(15);

/// The exit code of a rank that stopped because another rank died (so that the launcher names
/// the other one).
pub const PEER_DIED_EXIT: u8 = 3;

/// Whether `err` says that another rank died.
pub fn is_peer_death(err: &anyhow::Error) -> bool {
    use rdrop_core::dist::DistError;
    err.chain().any(|c| {
        matches!(
            c.downcast_ref::<DistError>(),
            Some(DistError::PeerDied { .. })
        ) || matches!(
            c.downcast_ref::<rdrop_core::CoreError>(),
            Some(rdrop_core::CoreError::Dist(DistError::PeerDied { .. }))
        )
    })
}

/// How often the launcher looks at its ranks.
const POLL: Duration = Duration::from_millis(50);

/// A rank did not finish cleanly; `main` exits with [`RanksFailed::exit_code`].
#[derive(Debug)]
pub struct RanksFailed {
    /// The first rank seen failing.
    pub rank: usize,
    /// Its process id.
    pub pid: u32,
    /// How it ended.
    pub status: String,
    /// Every rank stopped with this code after writing the checkpoint of a signal (130 for
    /// SIGINT, [`crate::signals::PREEMPTED_EXIT`] for SIGTERM / SIGUSR1).
    pub stopped: Option<u8>,
    /// Ranks the launcher had to kill after the grace period.
    pub killed: Vec<usize>,
    /// That grace period.
    pub grace: Duration,
}

impl RanksFailed {
    /// The ranks' code when they all stopped on a signal (as a single process), else 1.
    pub fn exit_code(&self) -> u8 {
        self.stopped.unwrap_or(1)
    }
}

impl std::fmt::Display for RanksFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(code) = self.stopped {
            return write!(
                f,
                "{}: every rank stopped after the checkpoint",
                if code == 130 {
                    "interrupted"
                } else {
                    "preempted"
                }
            );
        }
        write!(
            f,
            "rank {} (pid {}) {}; the run stopped (its messages, if any, are above, prefixed [rank {}])",
            self.rank, self.pid, self.status, self.rank
        )?;
        if !self.killed.is_empty() {
            let list: Vec<String> = self.killed.iter().map(|r| r.to_string()).collect();
            write!(
                f,
                "; rank(s) {} did not stop within {} s and were killed",
                list.join(", "),
                self.grace.as_secs_f64()
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for RanksFailed {}

/// How a rank's process ended, in words: "exited with status 1", "was killed by signal 9
/// (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| format!(" ({})", s.as_str()))
                .unwrap_or_default();
            return format!("was killed by signal {sig}{name}");
        }
    }
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => format!("ended ({status})"),
    }
}

/// A port on 127.0.0.1 that was free a moment ago (the OS picks it; rank 0 binds it next).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("finding a free port on 127.0.0.1 for the ranks' rendezvous")?;
    Ok(l.local_addr()?.port())
}

/// The torchrun variables of local rank `rank` of `n` on this node.
pub fn rank_env(rank: usize, n: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", n.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("LOCAL_WORLD_SIZE", n.to_string()),
        ("GROUP_RANK", "0".into()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
    ]
}

/// Copies `from` to the launcher's stderr line by line, each line prefixed `[rank k] `.
fn relay_stderr(rank: usize, from: impl Read + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let prefix = format!("[rank {rank}] ");
        for line in BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line);
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{prefix}{}", text.trim_end_matches('\r'));
        }
    })
}

/// Copies `from` to the launcher's stdout as it is (whole lines, so ranks do not interleave).
fn relay_stdout(from: impl Read + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).split(b'\n') {
            let Ok(mut line) = line else { break };
            line.push(b'\n');
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&line).and_then(|_| out.flush());
        }
    })
}

/// Passes SIGINT, SIGTERM and SIGUSR1 to the launcher on to each rank, the same signal (from
/// a thread of signal-hook's; this also keeps the launcher alive: the ranks decide when to
/// stop).
#[cfg(unix)]
fn forward_signals(pids: Arc<Mutex<Vec<u32>>>) {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("note: cannot install the signal handler ({e})");
            return;
        }
    };
    let r = std::thread::Builder::new()
        .name("rdrop-launch-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let Ok(signal) = nix::sys::signal::Signal::try_from(sig) else {
                    continue;
                };
                eprintln!("{}: passing it on to the ranks", signal.as_str());
                if let Ok(p) = pids.lock() {
                    for &pid in p.iter() {
                        if let Ok(pid) = i32::try_from(pid) {
                            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
                        }
                    }
                }
            }
        });
    if let Err(e) = r {
        eprintln!("note: cannot start the signal thread ({e})");
    }
}

#[cfg(not(unix))]
fn forward_signals(_pids: Arc<Mutex<Vec<u32>>>) {}

/// Starts `n` ranks of this binary with this process's arguments (and `extra` after them),
/// relays their output and waits for them. Ok when every rank exits 0; else [`RanksFailed`].
pub fn launch(n: usize, extra: &[OsString]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the rdrop binary to start the ranks")?;
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    args.extend(extra.iter().cloned());
    let port = free_port()?;
    eprintln!("launching {n} ranks on this node (rendezvous at 127.0.0.1:{port})");
    let pids = Arc::new(Mutex::new(Vec::<u32>::new()));
    forward_signals(Arc::clone(&pids));
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let mut relays = Vec::with_capacity(2 * n);
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .envs(rank_env(rank, n, port))
            // The port chosen here is the rendezvous port: nothing may move it.
            .env_remove(rdrop_core::dist::PORT_OVERRIDE)
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                for c in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        };
        eprintln!("rank {rank}: pid {}", child.id());
        if let Ok(mut p) = pids.lock() {
            p.push(child.id());
        }
        if let Some(e) = child.stderr.take() {
            relays.push(relay_stderr(rank, e));
        }
        if let Some(o) = child.stdout.take() {
            relays.push(relay_stdout(o));
        }
        children.push(child);
    }
    let outcome = watch(&mut children, GRACE);
    for r in relays {
        let _ = r.join();
    }
    outcome
}

/// Waits for every rank; after the first failure, gives the rest `grace` and kills them.
fn watch(children: &mut [Child], grace: Duration) -> anyhow::Result<()> {
    let mut status: Vec<Option<ExitStatus>> = vec![None; children.len()];
    // Failures as (a peer's death, the poll that saw it, not a signal, rank): the smallest is
    // the one to name (a rank's own failure before ranks that only saw it die; in one poll, a
    // signal before an exit status).
    let mut failures: Vec<(bool, u64, bool, usize)> = Vec::new();
    let mut since: Option<Instant> = None;
    let mut killed = Vec::new();
    let mut poll = 0u64;
    while status.iter().any(Option::is_none) {
        poll += 1;
        for (rank, child) in children.iter_mut().enumerate() {
            if status[rank].is_some() {
                continue;
            }
            if let Some(st) = child
                .try_wait()
                .with_context(|| format!("waiting for rank {rank}"))?
            {
                status[rank] = Some(st);
                if !st.success() {
                    let peer = st.code() == Some(i32::from(PEER_DIED_EXIT));
                    failures.push((peer, poll, st.code().is_some(), rank));
                    since.get_or_insert_with(Instant::now);
                }
            }
        }
        if let Some(t) = since {
            if t.elapsed() >= grace {
                for (rank, child) in children.iter_mut().enumerate() {
                    if status[rank].is_none() {
                        let _ = child.kill();
                        status[rank] = Some(child.wait()?);
                        killed.push(rank);
                    }
                }
            }
        }
        std::thread::sleep(POLL);
    }
    let Some(&(_, _, _, rank)) = failures.iter().min() else {
        return Ok(());
    };
    let st = status[rank].unwrap_or_default();
    let first = status[0].and_then(|s| s.code());
    let stopped = first
        .and_then(|c| u8::try_from(c).ok())
        .filter(|&c| c == 130 || c == crate::signals::PREEMPTED_EXIT)
        .filter(|_| killed.is_empty() && status.iter().all(|s| s.and_then(|s| s.code()) == first));
    Err(RanksFailed {
        rank,
        pid: children[rank].id(),
        status: describe(st),
        stopped,
        killed,
        grace,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_env_is_torchruns() {
        let env: std::collections::HashMap<_, _> = rank_env(1, 4, 29500).into_iter().collect();
        assert_eq!(env["RANK"], "1");
        assert_eq!(env["LOCAL_RANK"], "1");
        assert_eq!(env["WORLD_SIZE"], "4");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "4");
        assert_eq!(env["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(env["MASTER_PORT"], "29500");
    }

    #[cfg(unix)]
    #[test]
    fn describes_exit_codes_and_signals() {
        let st = Command::new("sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(describe(st), "exited with status 3");
        let st = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .unwrap();
        assert_eq!(describe(st), "was killed by signal 9 (SIGKILL)");
    }

    #[cfg(unix)]
    #[test]
    fn a_failed_rank_is_named_and_the_others_are_killed_after_the_grace() {
        let mut kids = vec![
            Command::new("sh")
                .args(["-c", "sleep 600"])
                .spawn()
                .unwrap(),
            Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap(),
        ];
        let t0 = Instant::now();
        let grace = Duration::from_millis(500);
        let e = watch(&mut kids, grace).unwrap_err();
        let f = e.downcast_ref::<RanksFailed>().unwrap();
        assert_eq!((f.rank, f.killed.as_slice()), (1, &[0usize][..]));
        assert_eq!(f.exit_code(), 1);
        let text = e.to_string();
        assert!(
            text.contains("rank 1") && text.contains("status 7"),
            "{text}"
        );
        assert!(t0.elapsed() >= grace && t0.elapsed() < grace + Duration::from_secs(5));
        // Every rank interrupted: the launcher exits like one interrupted process.
        let mut kids: Vec<Child> = (0..2)
            .map(|_| Command::new("sh").args(["-c", "exit 130"]).spawn().unwrap())
            .collect();
        let e = watch(&mut kids, grace).unwrap_err();
        assert_eq!(e.downcast_ref::<RanksFailed>().unwrap().exit_code(), 130);
        let mut ok: Vec<Child> = (0..2)
            .map(|_| Command::new("true").spawn().unwrap())
            .collect();
        assert!(watch(&mut ok, grace).is_ok());
    }

    /// Ranks that only saw another die (exit 3) are not the one named, even when they end in
    /// the same poll or earlier; in one poll a signal comes before an exit status.
    #[cfg(unix)]
    #[test]
    fn the_rank_that_failed_first_for_its_own_reason_is_named() {
        let sh = |c: &str| Command::new("sh").args(["-c", c]).spawn().unwrap();
        let named = |mut kids: Vec<Child>| {
            std::thread::sleep(Duration::from_millis(300)); // all ended before the first poll
            let e = watch(&mut kids, Duration::from_millis(500)).unwrap_err();
            let f = e.downcast_ref::<RanksFailed>().unwrap();
            (f.rank, f.status.clone())
        };
        let (rank, how) = named(vec![sh("exit 3"), sh("kill -9 $$")]);
        assert_eq!(
            (rank, how.as_str()),
            (1, "was killed by signal 9 (SIGKILL)")
        );
        assert_eq!(named(vec![sh("exit 1"), sh("exit 3")]).0, 0);
        assert_eq!(named(vec![sh("exit 3"), sh("exit 2")]).0, 1);
        assert_eq!(named(vec![sh("exit 3"), sh("exit 3")]).0, 0);
    }
}
