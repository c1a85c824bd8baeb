//! A run that survives preemption: started again with the same command (and
//! `--resume-if-exists`, or as a launcher's restart), `rdrop train` continues from its newest
//! whole checkpoint, and the run ends bit-identical to one that never stopped.
//!
//! - five SIGKILLs of one run at five points (one in the middle of a checkpoint write), each
//!   followed by the same command;
//! - SIGUSR1 and SIGTERM: exit code 75, a checkpoint at the last update, `--requeue` calls
//!   `scontrol requeue $SLURM_JOB_ID`; a second signal during a checkpoint write exits at once
//!   and leaves the previous checkpoint whole;
//! - a Slurm requeue (`SLURM_RESTART_COUNT`) continues without the flag, in the default
//!   `--out` of the job; without the flag or with another `--lr`, the folder is refused;
//! - no checkpoint yet: the run starts again from step 0; `--save-every-minutes` checkpoints
//!   by the clock.
//!
//! The data-parallel restarts are in `data_parallel_cli.rs`; torchrun and Slurm themselves in
//! `scripts/launcher-check.sh`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// `rdrop train --config CFG --out OUT --resume-if-exists EXTRA...`, 150 ms per update, stderr
/// into `OUT.err`.
fn start(cfg: &Path, out: &Path, extra: &[&str], env: &[(&str, String)]) -> Child {
    let mut args = vec![
        "train",
        "--config",
        s(cfg),
        "--out",
        s(out),
        "--resume-if-exists",
    ];
    args.extend_from_slice(extra);
    let err = File::create(err_file(out)).unwrap();
    let mut c = rdrop(&args, false);
    c.env("RDROP_TEST_STEP_DELAY_MS", "150")
        .stdout(Stdio::null())
        .stderr(Stdio::from(err));
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn err_file(out: &Path) -> PathBuf {
    out.with_extension("err")
}

fn stderr_of(out: &Path) -> String {
    std::fs::read_to_string(err_file(out)).unwrap_or_default()
}

/// Sends `sig` (`USR1`, `TERM`, ...) to `child`.
fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits for `child` (at most 120 s) and returns its exit code.
fn exit_code(mut child: Child) -> Option<i32> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("rdrop did not exit within 120 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the same command to the end and checks it against the uninterrupted reference.
fn finish_and_compare(cfg: &Path, out: &Path, extra: &[&str], env: &[(&str, String)]) {
    let child = start(cfg, out, extra, env);
    let code = exit_code(child);
    let err = stderr_of(out);
    assert_eq!(code, Some(0), "the continued run failed:\n{err}");
    assert!(err.contains("continuing the run in"), "{err}");
    assert_same_run(&reference_run(), out);
}

/// The `step-N` checkpoints of a run folder.
fn checkpoints(out: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(out.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    v.sort();
    v
}

fn whole(ck: &Path) -> bool {
    ck.join("model.safetensors").is_file() && ck.join("train_state.json").is_file()
}

#[test]
fn five_sigkills_at_five_points_and_the_same_command_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("run");
    // Kill points (updates logged), increasing; the third is inside the write of step-8.
    let points = [
        Some(random_in(1, 3)),
        Some(random_in(4, 6)),
        None,
        Some(random_in(9, 11)),
        Some(random_in(12, 14)),
    ];
    const STALL: u64 = 8;
    eprintln!("SIGKILL after updates {points:?} (None: during the write of step-{STALL})");
    for p in points {
        let env = match p {
            Some(_) => vec![],
            None => vec![("RDROP_TEST_STALL_CHECKPOINT", STALL.to_string())],
        };
        let mut child = start(&cfg, &out, &[], &env);
        match p {
            Some(n) => wait_for(&mut child, "the kill point", || {
                train_lines(&out) as u64 >= n
            }),
            None => wait_for(&mut child, "the stalled checkpoint write", || {
                stderr_of(&out).contains(&format!("stalling checkpoint step-{STALL}"))
            }),
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if p.is_none() {
            // the half-written checkpoint is not there under its name; the one before is whole
            assert!(!out.join(format!("checkpoints/step-{STALL}")).exists());
            assert!(whole(&out.join(format!("checkpoints/step-{}", STALL - 2))));
        }
        let cks = checkpoints(&out);
        eprintln!(
            "killed at {} updates; checkpoints {cks:?}",
            train_lines(&out)
        );
    }
    finish_and_compare(&cfg, &out, &[], &[]);
}

/// A run stopped by `sig` at a random update: exit code 75, its checkpoint, then the same
/// command continues it to the reference's end. Under `--requeue` with a Slurm job id, SIGUSR1
/// runs `scontrol requeue` (a stand-in on PATH records its arguments).
fn preempt_and_continue(sig: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("run");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let record = dir.path().join("scontrol.log");
    let fake = bin.join("scontrol");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" >> '{}'\n", record.display()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = vec![("SLURM_JOB_ID", "99".to_string()), ("PATH", path)];
    let at = random_in(2, 12);
    eprintln!("SIG{sig} after update {at}");
    let mut child = start(&cfg, &out, &["--requeue"], &env);
    wait_for(&mut child, "the signal point", || {
        train_lines(&out) as u64 >= at
    });
    signal(&child, sig);
    let code = exit_code(child);
    let err = stderr_of(out.as_path());
    assert_eq!(code, Some(75), "exit code after SIG{sig}:\n{err}");
    assert!(err.contains("preempted"), "{err}");
    let done = train_lines(&out) as u64;
    assert!(done < STEPS, "the run ended before the signal");
    assert!(
        whole(&out.join(format!("checkpoints/step-{done}"))),
        "no checkpoint at the last update {done}:\n{err}"
    );
    let requeued = std::fs::read_to_string(&record).unwrap_or_default();
    if sig == "USR1" {
        assert_eq!(requeued.trim(), "requeue 99", "{err}");
    } else {
        assert_eq!(requeued, "", "SIGTERM must not requeue (Slurm decides)");
    }
    finish_and_compare(&cfg, &out, &["--requeue"], &env);
}

#[test]
fn sigusr1_checkpoints_exits_75_requeues_and_the_same_command_continues() {
    preempt_and_continue("USR1");
}

#[test]
fn sigterm_checkpoints_exits_75_and_the_same_command_continues() {
    preempt_and_continue("TERM");
}

#[test]
fn a_second_signal_during_a_checkpoint_write_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("run");
    let stall = 2 * random_in(2, STEPS / 2 - 2);
    eprintln!("two SIGUSR1 during the write of step-{stall}");
    let env = [("RDROP_TEST_STALL_CHECKPOINT", stall.to_string())];
    let mut child = start(&cfg, &out, &[], &env);
    wait_for(&mut child, "the stalled checkpoint write", || {
        stderr_of(&out).contains(&format!("stalling checkpoint step-{stall}"))
    });
    signal(&child, "USR1");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal must not exit"
    );
    let t0 = Instant::now();
    signal(&child, "USR1");
    let code = exit_code(child);
    let err = stderr_of(&out);
    assert_eq!(code, Some(75), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the second signal did not exit at once"
    );
    assert!(err.contains("second signal"), "{err}");
    assert!(!out.join(format!("checkpoints/step-{stall}")).exists());
    assert!(whole(&out.join(format!("checkpoints/step-{}", stall - 2))));
    finish_and_compare(&cfg, &out, &[], &[]);
}

#[test]
fn a_slurm_requeue_continues_in_the_jobs_default_out_and_changes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    // No --out: under Slurm the default is runs/<preset>-slurm-<job id>, the same after a
    // requeue.
    let cmd = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["train", "--config", s(&cfg)];
        args.extend_from_slice(extra);
        let mut c = rdrop(&args, false);
        c.current_dir(dir.path()).env("SLURM_JOB_ID", "4242");
        for (k, v) in env {
            c.env(k, v);
        }
        c
    };
    let out = dir.path().join("runs/demo-slurm-4242");
    let mut child = cmd(&[], &[])
        .env("RDROP_TEST_STEP_DELAY_MS", "150")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&mut child, "the first updates", || train_lines(&out) >= 3);
    signal(&child, "INT");
    assert_eq!(exit_code(child), Some(130));
    let logged = train_lines(&out);

    // The same command, not a restart and without the flag: refused, nothing touched.
    let o = cmd(&[], &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already holds a run") && err.contains("--resume-if-exists"),
        "{err}"
    );
    // Another learning rate: refused with both values, even as a restart.
    let o = cmd(&["--lr", "0.003"], &[("SLURM_RESTART_COUNT", "1")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("lr: 0.002 in the run, 0.003 now"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        train_lines(&out),
        logged,
        "a refused command touched the run"
    );

    // Slurm's requeue: continues without the flag (a different --threads is allowed).
    let o = cmd(&["--threads", "1"], &[("SLURM_RESTART_COUNT", "1")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("continuing the run in") && err.contains("Slurm's requeue 1 of job 4242"),
        "{err}"
    );
    assert_same_run(&reference_run(), &out);
}

#[test]
fn without_a_checkpoint_the_run_starts_again_and_minutes_also_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    // The first start checkpoints only at the end (and every 10 minutes): killed after one
    // update, it leaves none. The second (save_every_minutes may change on a continue)
    // checkpoints by the clock (every 0.3 s; updates take 150 ms) and at the end.
    let out = dir.path().join("timed");
    let untimed = ["--save-every", "0", "--save-every-minutes", "10"];
    let timed = ["--save-every", "0", "--save-every-minutes", "0.005"];
    let mut child = start(&cfg, &out, &untimed, &[]);
    wait_for(&mut child, "the first update", || train_lines(&out) >= 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let first = stderr_of(&out);
    assert!(
        first.contains("holds no run yet: starting a new one"),
        "{first}"
    );
    // Killed before any checkpoint: the same command starts the run again from step 0.
    assert_eq!(checkpoints(&out), Vec::<u64>::new(), "{}", stderr_of(&out));
    let child = start(&cfg, &out, &timed, &[]);
    assert_eq!(exit_code(child), Some(0), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("no checkpoint yet: starting it again from step 0"),
        "{err}"
    );
    assert_same_run(&reference_run(), &out);
    // Timed checkpoints between the updates' multiples (save_every is 0): the newest kept
    // ones (keep_last 3) before the final step-16.
    let cks = checkpoints(&out);
    assert!(
        cks.len() == 3 && cks[0] < STEPS && *cks.last().unwrap() == STEPS,
        "{cks:?}"
    );
}
