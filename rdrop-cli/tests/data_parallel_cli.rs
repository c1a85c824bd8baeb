//! The data-parallel path of `rdrop train` / `resume` through the binary, on the CPU: the test
//! hook `RDROP_TEST_CPU_RANKS=1` lets `--nproc-per-node 2 --device cpu` run two ranks with the
//! TCP rendezvous as their collective (no GPU, no NCCL), so everything but the device
//! all-reduce is the real path (launcher, rendezvous, sharded batches and eval, reduced
//! metrics, rank 0 writing, barriers). A tiny ViT on the embedded digits:
//!
//! - two ranks give the one-process run's losses and final weights within 1e-6, with the
//!   explicit engine and with the autograd one;
//! - a process started by a launcher in a world of one goes through the distributed path
//!   (`"world_size": 1, "collective": "tcp"` in the summary) and gives the plain run;
//! - `kill -9` of rank 1 mid-run: the launcher and rank 0 stop within a bounded time with an
//!   error naming rank 1, every checkpoint left is whole, and `rdrop resume` on one process
//!   continues to the one-process result (the same data order);
//! - Ctrl-C to the launcher: every rank stops at the same update, rank 0 writes the
//!   checkpoint, exit code 130; two ranks resume it; a one-process run resumes on two ranks;
//! - ranks started as torchrun or Slurm's srun start them (their variables, no launcher) join
//!   directly and give the same run; a rank whose peers never come stops at the rendezvous
//!   timeout with an error naming the address and the missing rank;
//! - the refusals, without the hook.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

const STEPS: usize = 12;

/// 12 updates of 64 images = 4 micro-batches of 16 (one process) or 2 per rank (two ranks);
/// 176 training images = 11 micro-batches an epoch, so updates straddle epochs. SGD with
/// momentum (the recipe's optimiser): AdamW would divide the key biases' gradients, which are
/// zero up to rounding (softmax ignores them), by their own size and turn the order of the
/// float sums into differences of the learning rate's order.
fn tiny_config(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.toml");
    std::fs::write(
        &p,
        r#"preset = "demo"
steps = 12
batch_size = 64
micro_batch = 16
train_images = 176
optimizer = "sgd"
momentum = 0.9
weight_decay = 0.0
lr = 0.05
warmup_steps = 3
image_size = 16
eval_every = 4
eval_batch_size = 50
save_every = 2
keep_last = 10
threads = 1
"#
        .to_owned()
            + TINY_VIT,
    )
    .unwrap();
    p
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1.0)
}

/// Same final weights (within 1e-6), the same train lines (loss, CE, KL, grad-norm, lr, epoch
/// within 1e-6 or equal) and eval lines (test loss within 1e-6).
fn assert_same_run(a: &Path, b: &Path) {
    let (wa, wb) = (
        load_weights(&a.join("final")),
        load_weights(&b.join("final")),
    );
    assert_eq!(wa.len(), wb.len());
    let (mut worst, mut at) = (0f32, "");
    for (k, va) in &wa {
        let vb = &wb[k];
        assert_eq!(va.len(), vb.len(), "{k}");
        for (x, y) in va.iter().zip(vb) {
            if (x - y).abs() > worst {
                (worst, at) = ((x - y).abs(), k);
            }
        }
    }
    eprintln!("largest final-weight difference: {worst:e} ({at})");
    assert!(worst <= 1e-6, "final weights differ by {worst}");
    let (ma, mb) = (load_metrics(a), load_metrics(b));
    assert_eq!(ma.len(), mb.len(), "number of metric lines");
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x["kind"], y["kind"]);
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["epoch"], y["epoch"], "{x} vs {y}");
        let keys: &[&str] = if x["kind"] == "train" {
            &["loss", "ce", "kl", "grad_norm", "lr"]
        } else {
            &["test_loss"]
        };
        for k in keys {
            let (p, q) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!(close(p, q, 1e-6), "{k}: {p} vs {q} ({x} vs {y})");
        }
    }
    assert_eq!(
        ma.iter().filter(|m| m["kind"] == "train").count(),
        STEPS,
        "train lines"
    );
}

/// The one-process run (4 micro-batches of 16 an update), trained once per test process.
fn reference_run() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let cfg = tiny_config(&dir);
        let out = dir.join("ref");
        run_ok(&["train", "--config", s(&cfg), "--out", s(&out)], false);
        out
    })
    .clone()
}

#[test]
fn two_ranks_give_the_one_process_run() {
    let reference = reference_run();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("dp");
    let res = run_ok(
        &[
            "train",
            "--config",
            s(&cfg),
            "--out",
            s(&out),
            "--nproc-per-node",
            "2",
            // A bucket per block: the sums run over TCP while the backward goes on.
            "--grad-bucket-mb",
            "1e-6",
            "--json",
        ],
        true,
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr),
    );
    // Only rank 0 reports: one summary line; progress and evals only from rank 0.
    assert_eq!(stdout.lines().count(), 1, "stdout:\n{stdout}");
    assert!(stderr.contains("gradients summed in 3 buckets"), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["steps"], STEPS as u64);
    assert!(
        stderr.contains("[rank 0] data parallel: 2 ranks"),
        "{stderr}"
    );
    assert!(stderr.contains("[rank 0] eval at step 4"), "{stderr}");
    assert!(
        !stderr.contains("[rank 1] eval") && !stderr.contains("[rank 1] training"),
        "{stderr}"
    );
    assert_same_run(&reference, &out);
    // The checkpoints hold the one-process data position: the same training state.
    let st = |d: &Path| -> serde_json::Value {
        let t = std::fs::read_to_string(d.join("checkpoints/step-12/train_state.json")).unwrap();
        serde_json::from_str(&t).unwrap()
    };
    let (a, b) = (st(&reference), st(&out));
    assert_eq!(
        (&a["epoch"], &a["batch_index"]),
        (&b["epoch"], &b["batch_index"])
    );
}

#[test]
fn two_ranks_give_the_one_process_run_with_the_autograd_engine_too() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let common = [
        "train",
        "--config",
        s(&cfg),
        "--engine",
        "autograd",
        "--out",
    ];
    let mut a = common.to_vec();
    a.push(s(&one));
    run_ok(&a, false);
    let mut b = common.to_vec();
    b.extend([s(&two), "--nproc-per-node", "2", "--json"]);
    let res = run_ok(&b, true);
    let summary: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(
        (&summary["world_size"], &summary["collective"]),
        (&serde_json::json!(2), &serde_json::json!("tcp"))
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("(autograd engine)"), "{err}");
    assert_same_run(&one, &two);
}

/// torchrun's variables with WORLD_SIZE=1 (as scripts/gpu-check.sh starts its NCCL check):
/// the distributed path with a group of one, the plain run's result.
#[test]
fn a_launched_world_of_one_takes_the_distributed_path() {
    let reference = reference_run();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("w1");
    let port = free_port().to_string();
    let res = rdrop(
        &["train", "--config", s(&cfg), "--out", s(&out), "--json"],
        false,
    )
    .envs([
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", &port),
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    let summary: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(
        (&summary["world_size"], &summary["collective"]),
        (&serde_json::json!(1), &serde_json::json!("tcp"))
    );
    assert_same_run(&reference, &out);
    // Without the variables: no collective.
    let plain = run_ok(
        &[
            "train",
            "--config",
            s(&cfg),
            "--out",
            s(&dir.path().join("plain")),
            "--json",
        ],
        false,
    );
    let summary: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert_eq!(
        (&summary["world_size"], &summary["collective"]),
        (&serde_json::json!(1), &serde_json::json!("none"))
    );
}

/// `rdrop train --nproc-per-node 2` of `cfg` into `out` (then `extra`), 200 ms an update (time
/// to interrupt it), its stderr piped.
fn slow_two_ranks(cfg: &Path, out: &Path, extra: &[&str]) -> std::process::Child {
    let mut args = vec![
        "train",
        "--config",
        s(cfg),
        "--out",
        s(out),
        "--nproc-per-node",
        "2",
    ];
    args.extend_from_slice(extra);
    rdrop(&args, true)
        .env("RDROP_TEST_STEP_DELAY_MS", "200")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The uninterrupted two-rank run, trained once per test process.
fn two_rank_reference() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let cfg = tiny_config(&dir);
        let out = dir.join("ref2");
        let args = [
            "train",
            "--config",
            s(&cfg),
            "--out",
            s(&out),
            "--nproc-per-node",
            "2",
        ];
        run_ok(&args, true);
        out
    })
    .clone()
}

/// Starts two ranks with the launcher (`extra` flags), kills rank 1 with SIGKILL after 5
/// updates and returns the launcher's exit status and stderr lines once it stopped.
fn kill_rank_1_midway(
    cfg: &Path,
    out: &Path,
    extra: &[&str],
) -> (std::process::ExitStatus, Vec<String>, Duration) {
    let mut launcher = slow_two_ranks(cfg, out, extra);
    // The launcher names each rank's pid; keep reading its stderr on a thread.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = launcher.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let pid = loop {
        let l = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        lines.push(l.clone());
        if let Some(p) = l.strip_prefix("rank 1: pid ") {
            break p.trim().parse::<u32>().unwrap();
        }
    };
    let t0 = Instant::now();
    while train_lines(out) < 5 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "launcher exited early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let killed = Instant::now();
    let status = loop {
        if let Some(st) = launcher.try_wait().unwrap() {
            break st;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the launcher did not stop within 60 s of the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopped_in = killed.elapsed();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    (status, lines, stopped_in)
}

#[test]
fn kill_9_of_rank_1_stops_the_run_and_one_process_resumes_it() {
    let reference = reference_run();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("dp");
    let (status, lines, stopped_in) = kill_rank_1_midway(&cfg, &out, &[]);
    let err = lines.join("\n");
    eprintln!("stopped {stopped_in:?} after the kill");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("rank 1 (pid") && err.contains("SIGKILL"),
        "the launcher names rank 1 and the signal:\n{err}"
    );
    // Rank 0 stopped by itself (it saw rank 1 die), with an error that names it.
    let rank0 = lines
        .iter()
        .find(|l| l.starts_with("[rank 0] error:"))
        .unwrap_or_else(|| panic!("no error from rank 0:\n{err}"));
    assert!(rank0.contains("rank 1"), "{rank0}");
    assert!(
        !err.contains("were killed"),
        "rank 0 had to be killed:\n{err}"
    );
    assert!(stopped_in < Duration::from_secs(14), "{stopped_in:?}");
    // Every checkpoint left is whole; no final model.
    assert!(!out.join("final").exists());
    let mut steps = 0;
    for e in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("step-") {
            steps += 1;
            assert!(p.join("model.safetensors").is_file(), "{name}");
            assert!(p.join("train_state.json").is_file(), "{name}");
        }
    }
    assert!(steps >= 2, "expected checkpoints before the kill");
    let tmp = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().starts_with(".tmp-")
        })
        .count();
    assert_eq!(tmp, 0, "a half-written checkpoint was left");
    // One process continues the two-rank run in the same data order.
    run_ok(&["resume", s(&out)], false);
    assert_same_run(&reference, &out);
}

#[test]
fn ctrl_c_to_the_launcher_checkpoints_every_rank_and_two_ranks_resume() {
    let reference = reference_run();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("dp");
    let mut launcher = slow_two_ranks(&cfg, &out, &[]);
    let t0 = Instant::now();
    while train_lines(&out) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "launcher exited early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = Command::new("kill")
        .args(["-INT", &launcher.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let res = launcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "{err}");
    assert!(err.contains("[rank 0] checkpoint written"), "{err}");
    assert!(err.contains("rdrop resume"), "{err}");
    let done = train_lines(&out);
    assert!(done < STEPS, "the run finished before the interrupt");
    assert!(
        out.join(format!("checkpoints/step-{done}/train_state.json"))
            .is_file(),
        "{err}"
    );
    run_ok(&["resume", s(&out), "--nproc-per-node", "2"], true);
    assert_same_run(&reference, &out);
}

#[test]
fn one_process_run_resumes_on_two_ranks() {
    let reference = reference_run();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("run");
    // Stop a one-process run after step 6 by killing it in the checkpoint write of step 8.
    kill_during_checkpoint_write(&cfg, &out, 8);
    // The same command on two ranks continues it (the batch allows 1 or 2 ranks).
    let res = run_ok(
        &[
            "train",
            "--config",
            s(&cfg),
            "--out",
            s(&out),
            "--resume-if-exists",
            "--nproc-per-node",
            "2",
        ],
        true,
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("[rank 0] continuing the run in"), "{err}");
    assert_same_run(&reference, &out);
}

/// What torchrun --max-restarts does after a rank dies: the same command again. The world
/// continues from rank 0's newest whole checkpoint and ends bit-identical to an uninterrupted
/// two-rank run.
#[test]
fn kill_9_of_rank_1_then_the_same_command_ends_as_the_uninterrupted_two_rank_run() {
    let reference = two_rank_reference();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let out = dir.path().join("dp");
    let (status, lines, _) = kill_rank_1_midway(&cfg, &out, &["--resume-if-exists"]);
    assert_eq!(status.code(), Some(1), "{}", lines.join("\n"));
    assert!(!out.join("final").exists());
    let res = run_ok(
        &[
            "train",
            "--config",
            s(&cfg),
            "--out",
            s(&out),
            "--nproc-per-node",
            "2",
            "--resume-if-exists",
        ],
        true,
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("[rank 0] continuing the run in"), "{err}");
    assert_same_final_bits(&reference, &out);
}

/// Ranks whose run folders hold different checkpoints (no shared file system): rank 1 stops
/// with an error naming its checkpoint and rank 0's; nothing trains.
#[test]
fn ranks_that_find_different_checkpoints_stop_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let a = dir.path().join("a");
    // A run stopped after step 4's checkpoint (killed in step 6's write).
    kill_during_checkpoint_write(&cfg, &a, 6);
    // Rank 1's copy lacks step-4.
    let b = dir.path().join("b");
    let st = Command::new("cp")
        .args(["-r", s(&a), s(&b)])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_dir_all(b.join("checkpoints/step-4")).unwrap();
    let logged = train_lines(&a);
    let port = free_port().to_string();
    let ranks: Vec<_> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(r, out)| {
            let rank = r.to_string();
            rdrop(
                &[
                    "train",
                    "--config",
                    s(&cfg),
                    "--out",
                    s(out),
                    "--resume-if-exists",
                ],
                true,
            )
            .envs(torchrun_vars(&rank, "2", &port))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let outs: Vec<Output> = ranks
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let e1 = String::from_utf8_lossy(&outs[1].stderr);
    assert_eq!(outs[1].status.code(), Some(1), "{e1}");
    assert!(
        e1.contains("rank 1 finds step-2") && e1.contains("rank 0 chose step-4"),
        "{e1}"
    );
    assert!(!outs[0].status.success(), "rank 0 trained alone");
    assert_eq!(train_lines(&a), logged, "rank 0 wrote updates");
}

/// torchrun's variables for rank `rank` of a one-node world of `world` at 127.0.0.1:`port`.
fn torchrun_vars<'a>(rank: &'a str, world: &'a str, port: &'a str) -> [(&'static str, &'a str); 6] {
    [
        ("RANK", rank),
        ("WORLD_SIZE", world),
        ("LOCAL_RANK", rank),
        ("LOCAL_WORLD_SIZE", world),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", port),
    ]
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// Two processes given torchrun's variables, then Slurm's, as those launchers would start them.
#[test]
fn ranks_started_by_torchrun_or_slurm_join_directly() {
    let reference = reference_run();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    for launcher in ["torchrun", "slurm"] {
        let out = dir.path().join(launcher);
        let port = free_port().to_string();
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let rank = r.to_string();
                let vars: Vec<(&str, &str)> = if launcher == "torchrun" {
                    torchrun_vars(&rank, "2", &port).to_vec()
                } else {
                    vec![
                        ("SLURM_PROCID", &rank),
                        ("SLURM_NTASKS", "2"),
                        ("SLURM_LOCALID", &rank),
                        ("SLURM_NODEID", "0"),
                        ("SLURM_NTASKS_PER_NODE", "2"),
                        ("SLURM_STEP_TASKS_PER_NODE", "2"),
                        ("SLURM_STEP_NODELIST", "localhost"),
                        ("SLURM_JOB_ID", "4242"),
                        ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", &port),
                    ]
                };
                rdrop(
                    &["train", "--config", s(&cfg), "--out", s(&out), "--json"],
                    true,
                )
                .envs(vars)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
            })
            .collect();
        let outs: Vec<Output> = ranks
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        for (r, o) in outs.iter().enumerate() {
            assert!(
                o.status.success(),
                "{launcher} rank {r}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        // Rank 0 reports; rank 1 prints nothing on stdout.
        assert_eq!(String::from_utf8_lossy(&outs[0].stdout).lines().count(), 1);
        assert!(outs[1].stdout.is_empty());
        let e0 = String::from_utf8_lossy(&outs[0].stderr);
        assert!(e0.contains("data parallel: 2 ranks"), "{launcher}: {e0}");
        assert_same_run(&reference, &out);
    }
}

#[test]
fn a_rank_alone_times_out_at_the_rendezvous_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());
    let port = free_port().to_string();
    let t0 = Instant::now();
    let res = rdrop(
        &[
            "train",
            "--config",
            s(&cfg),
            "--out",
            s(&dir.path().join("x")),
        ],
        true,
    )
    .envs([
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", &port),
        ("RDROP_RENDEZVOUS_TIMEOUT_S", "1"),
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("[1]"),
        "names the address and the missing rank: {err}"
    );
    assert!(!dir.path().join("x").exists());
}

#[test]
fn refusals_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let fail = |args: &[&str], cpu_ranks: bool| -> String {
        let mut all = vec![
            "train",
            "--preset",
            "demo",
            "--steps",
            "2",
            "--out",
            s(&out),
        ];
        all.extend_from_slice(args);
        let res = rdrop(&all, cpu_ranks).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr).to_string();
        assert_eq!(res.status.code(), Some(1), "{all:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{all:?} created the run folder");
        err
    };
    let e = fail(&["--nproc-per-node", "2", "--micro-batch", "32"], false);
    assert!(
        e.contains("--device cpu with 2 ranks") && e.contains("NCCL"),
        "{e}"
    );
    #[cfg(not(feature = "cuda"))]
    {
        let e = fail(
            &[
                "--nproc-per-node",
                "2",
                "--micro-batch",
                "32",
                "--device",
                "cuda",
            ],
            false,
        );
        assert!(
            e.contains(
                "data parallel runs on GPUs through NCCL; this rdrop was built without CUDA"
            ),
            "{e}"
        );
    }
    let e = fail(&["--nproc-per-node", "2"], true);
    assert!(
        e.contains("batch size 64 is not divisible by 2 ranks × micro-batch 64"),
        "{e}"
    );
    let e = fail(&["--nproc-per-node", "0"], false);
    assert!(e.contains("at least 1"), "{e}");
    // Started by torchrun with another count of local ranks.
    let mut c = rdrop(
        &[
            "train",
            "--preset",
            "demo",
            "--out",
            s(&out),
            "--nproc-per-node",
            "4",
        ],
        false,
    );
    for (k, v) in [
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29999"),
    ] {
        c.env(k, v);
    }
    let res = c.output().unwrap();
    let e = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{e}");
    assert!(
        e.contains("--nproc-per-node 4") && e.contains("2 rank"),
        "{e}"
    );
    // --dry-run shows the world and prints the same config.toml as without it.
    let dry = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--preset",
            "demo",
            "--micro-batch",
            "32",
            "--dry-run",
        ];
        a.extend_from_slice(extra);
        run_ok(&a, false)
    };
    let (one, two) = (
        dry(&[]),
        dry(&["--nproc-per-node", "2", "--device", "cuda"]),
    );
    let e = String::from_utf8_lossy(&two.stderr);
    assert!(e.contains("world: 2 ranks"), "{e}");
    let without_device = String::from_utf8_lossy(&one.stdout).replace("device = \"cpu\"", "");
    let with_device = String::from_utf8_lossy(&two.stdout).replace("device = \"cuda:0\"", "");
    assert_eq!(without_device, with_device);
}
