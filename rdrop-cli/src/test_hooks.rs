//! Hooks for the CLI's integration tests, compiled only into debug builds (which `cargo test`
//! uses) and into builds with `--features test-hooks`; in a release build they are empty
//! functions, so the release binary never reads these variables.
//!
//! - `RDROP_TEST_STALL_CHECKPOINT=N` stalls the write of checkpoint `step-N` halfway (model
//!   written, training state not yet), announcing it on stderr, so that a test can `kill -9`
//!   the process there and check that the previous checkpoint stays usable.
//! - `RDROP_TEST_STEP_DELAY_MS=N` sleeps after each update, so that a test can interrupt a
//!   tiny run at a step of its choosing.
//! - `RDROP_TEST_CPU_RANKS=1` lets several ranks (`--nproc-per-node N`) run on the CPU with
//!   the TCP rendezvous as their collective, so that CI tests the data-parallel path without
//!   GPUs or NCCL.

#[cfg(any(debug_assertions, feature = "test-hooks"))]
fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Called between writing a checkpoint's model and its training state.
pub fn checkpoint_half_written(_step: u64) {
    #[cfg(any(debug_assertions, feature = "test-hooks"))]
    if env_u64("RDROP_TEST_STALL_CHECKPOINT") == Some(_step) {
        eprintln!("rdrop-test: stalling checkpoint step-{_step}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Called after each update.
pub fn after_update() {
    #[cfg(any(debug_assertions, feature = "test-hooks"))]
    if let Some(ms) = env_u64("RDROP_TEST_STEP_DELAY_MS") {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Whether ranks may run on the CPU (`RDROP_TEST_CPU_RANKS=1`); always false in release builds.
pub fn cpu_ranks() -> bool {
    #[cfg(any(debug_assertions, feature = "test-hooks"))]
    if env_u64("RDROP_TEST_CPU_RANKS") == Some(1) {
        return true;
    }
    false
}
