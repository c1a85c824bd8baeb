//! One module per subcommand.

pub mod bench;
pub mod data;
pub mod eval;
pub mod plot;
pub mod predict;
pub mod resume;
pub mod train;

/// Returned (inside `anyhow::Error`) when a run stopped on a signal after saving: `main` exits
/// with the stop's code (130 for Ctrl-C, 75 for SIGTERM / SIGUSR1: preempted).
#[derive(Debug)]
pub struct Interrupted {
    /// What to run to continue.
    pub resume_hint: String,
    /// The signal that stopped the run (that of any rank, for every rank).
    pub stop: crate::signals::Stop,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.stop.is_preemption() {
            write!(
                f,
                "preempted ({}); checkpoint saved. Continue with the same command and \
                 --resume-if-exists (a launcher's restart continues by itself), or: {}",
                self.stop.signal_name(),
                self.resume_hint
            )
        } else {
            write!(
                f,
                "interrupted; checkpoint saved. Resume with: {}",
                self.resume_hint
            )
        }
    }
}

impl std::error::Error for Interrupted {}
