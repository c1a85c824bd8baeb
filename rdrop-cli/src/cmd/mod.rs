//! One module per subcommand.

pub mod bench;
pub mod data;
pub mod eval;
pub mod plot;
pub mod predict;
pub mod resume;
pub mod train;

/// Returned (inside `anyhow::Error`) when a run stopped on Ctrl-C / SIGTERM after saving:
/// `main` maps it to exit code 130.
#[derive(Debug)]
pub struct Interrupted {
    /// What to run to continue.
    pub resume_hint: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted; checkpoint saved. Resume with: {}",
            self.resume_hint
        )
    }
}

impl std::error::Error for Interrupted {}
