//! The signals that stop a run, and how it stops:
//!
//! - SIGINT (Ctrl-C): the user stops the run. Exit code 130.
//! - SIGTERM (spot and notebook machines, `kill`, Slurm at a preemption or the time limit,
//!   torchrun passing on its own) and SIGUSR1 (Slurm's `--signal=USR1@N`, sent N seconds
//!   ahead): the machine is being taken away. Exit code [`PREEMPTED_EXIT`] (75, sysexits'
//!   `EX_TEMPFAIL`: "try again"), and a run started again with the same command continues.
//!
//! The first signal sets a flag: the training loop finishes the current update, writes a
//! checkpoint and returns [`crate::cmd::Interrupted`]. A second signal exits at once with the
//! same code; checkpoints are written to a temporary folder and renamed
//! ([`rdrop_core::atomic`]), so the previous one stays whole even when the second signal comes
//! in the middle of a write.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};

/// The exit code of a run stopped by SIGTERM or SIGUSR1 after writing its checkpoint.
pub const PREEMPTED_EXIT: u8 = 75;

/// Why a run was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    /// SIGINT (Ctrl-C).
    Interrupt = 1,
    /// SIGTERM.
    Terminate = 2,
    /// SIGUSR1 (Slurm's warning before a preemption or the time limit).
    Preempt = 3,
}

impl Stop {
    /// All of them, in the order of the flags that ranks exchange.
    pub const ALL: [Stop; 3] = [Stop::Interrupt, Stop::Terminate, Stop::Preempt];

    fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u8 == v)
    }

    /// The stop of a signal number this module handles.
    fn of_signal(sig: i32) -> Option<Self> {
        match sig {
            SIGINT => Some(Stop::Interrupt),
            SIGTERM => Some(Stop::Terminate),
            SIGUSR1 => Some(Stop::Preempt),
            _ => None,
        }
    }

    /// The signal's name.
    pub fn signal_name(self) -> &'static str {
        match self {
            Stop::Interrupt => "SIGINT",
            Stop::Terminate => "SIGTERM",
            Stop::Preempt => "SIGUSR1",
        }
    }

    /// The process's exit code after this stop: 130 for Ctrl-C, [`PREEMPTED_EXIT`] otherwise.
    pub fn exit_code(self) -> u8 {
        match self {
            Stop::Interrupt => 130,
            Stop::Terminate | Stop::Preempt => PREEMPTED_EXIT,
        }
    }

    /// Whether the machine is being taken away (SIGTERM, SIGUSR1), not the user stopping.
    pub fn is_preemption(self) -> bool {
        self != Stop::Interrupt
    }
}

/// A flag raised by the first of SIGINT / SIGTERM / SIGUSR1, holding which.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicU8>);

impl StopFlag {
    /// The stop requested, if any.
    pub fn get(&self) -> Option<Stop> {
        Stop::from_u8(self.0.load(Ordering::SeqCst))
    }

    /// Requests a stop (the first request stays; also used by tests).
    pub fn set(&self, s: Stop) {
        let _ = self
            .0
            .compare_exchange(0, s as u8, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Installs the process-wide handler (once: later calls return the same flag). A thread of
/// signal-hook's receives the signals, so printing and exiting there are safe.
pub fn install() -> StopFlag {
    static FLAG: OnceLock<StopFlag> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = StopFlag::default();
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "note: cannot install the signal handler ({e}); SIGINT, SIGTERM and \
                     SIGUSR1 will stop without a checkpoint"
                );
                return flag;
            }
        };
        let f = flag.clone();
        let count = AtomicUsize::new(0);
        let spawned = std::thread::Builder::new()
            .name("rdrop-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let Some(s) = Stop::of_signal(sig) else {
                        continue;
                    };
                    if count.fetch_add(1, Ordering::SeqCst) >= 1 {
                        let first = f.get().unwrap_or(s);
                        eprintln!(
                            "\nsecond signal ({}): exiting now (the last written checkpoint is intact)",
                            s.signal_name()
                        );
                        std::process::exit(i32::from(first.exit_code()));
                    }
                    eprintln!(
                        "\n{}: finishing the current update, then writing a checkpoint (a second signal quits at once)",
                        s.signal_name()
                    );
                    f.set(s);
                }
            });
        if let Err(e) = spawned {
            eprintln!("note: cannot start the signal thread ({e})");
        }
        flag
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stop_stays_and_codes_say_why() {
        let f = StopFlag::default();
        assert_eq!(f.get(), None);
        f.set(Stop::Preempt);
        f.set(Stop::Interrupt);
        assert_eq!(f.get(), Some(Stop::Preempt));
        assert_eq!(Stop::Interrupt.exit_code(), 130);
        assert_eq!(Stop::Terminate.exit_code(), PREEMPTED_EXIT);
        assert_eq!(Stop::Preempt.exit_code(), PREEMPTED_EXIT);
        for s in Stop::ALL {
            assert_eq!(Stop::from_u8(s as u8), Some(s));
        }
    }
}
