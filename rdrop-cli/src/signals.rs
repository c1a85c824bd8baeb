//! Ctrl-C / SIGTERM: the first signal sets a flag; the training loop finishes the current
//! update, writes a checkpoint and exits with [`crate::cmd::Interrupted`] (exit code 130).
//! A second signal exits at once (the last complete checkpoint stays intact).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A flag raised by Ctrl-C / SIGTERM.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Whether a stop was requested.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Requests a stop (also used by tests).
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
}

/// Installs the process-wide handler (once; later calls return a fresh, never-raised flag
/// together with a note, since the ctrlc crate allows a single handler).
pub fn install() -> StopFlag {
    let flag = StopFlag::default();
    let f = flag.clone();
    let count = Arc::new(AtomicUsize::new(0));
    let r = ctrlc::set_handler(move || {
        if count.fetch_add(1, Ordering::SeqCst) >= 1 {
            eprintln!("\nsecond interrupt: exiting now (the last written checkpoint is intact)");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current update, then writing a checkpoint (again to quit now)");
        f.set();
    });
    if let Err(e) = r {
        eprintln!(
            "note: cannot install the Ctrl-C handler ({e}); Ctrl-C will stop without a checkpoint"
        );
    }
    flag
}
