//! A run that continues when it is started again: `--out` is the run's identity.
//!
//! `rdrop train` with an `--out` that already holds a run continues it (from its newest whole
//! checkpoint, or from step 0 when none was written yet) when
//! - the configuration resolved from this command equals the one the folder records
//!   (`config.toml`), except the keys of [`MAY_DIFFER`], and
//! - `--resume-if-exists` is given, or a launcher restarted this process
//!   (`TORCHELASTIC_RESTART_COUNT` > 0: torchrun `--max-restarts`; `SLURM_RESTART_COUNT` > 0:
//!   a requeued Slurm job).
//!
//! Otherwise it refuses, naming the keys that differ (recorded and new value) or the flag to
//! give. The default `--out` ([`default_out`]) is stable under a launcher that restarts, so that
//! the restart finds its run. In data parallel, rank 0's choice of checkpoint is the world's
//! ([`agree`]): a rank that sees another stops with an error naming both.

use std::path::{Path, PathBuf};

use rdrop_core::run_folder::MODEL_FILE;
use rdrop_core::state::STATE_FILE;
use rdrop_core::RunFolder;

use crate::config::{self, RunConfig};
use crate::world::World;

/// Configuration keys that may differ when a run continues: they change neither the updates
/// nor the data order (the number of ranks is not a key: any number that divides the batch
/// into micro-batches continues the same run).
pub const MAY_DIFFER: &[&str] = &[
    "preset",
    "threads",
    "save_every",
    "save_every_minutes",
    "keep_last",
];

/// What the launchers say about restarts of this process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launcher {
    /// `TORCHELASTIC_RESTART_COUNT`: torchrun's restarts of the worker group so far.
    pub torch_restarts: Option<u64>,
    /// `TORCHELASTIC_MAX_RESTARTS`: how many torchrun allows (`--max-restarts`).
    pub torch_max_restarts: Option<u64>,
    /// `TORCHELASTIC_RUN_ID`: torchrun's `--rdzv-id` (`none` when not given).
    pub torch_run_id: Option<String>,
    /// `SLURM_RESTART_COUNT`: how often Slurm requeued this job.
    pub slurm_restarts: Option<u64>,
    /// `SLURM_JOB_ID` (the same after a requeue).
    pub slurm_job_id: Option<String>,
}

impl Launcher {
    /// From the process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From variables looked up by `get` (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let text = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let count = |k: &str| text(k).and_then(|v| v.parse::<u64>().ok());
        Self {
            torch_restarts: count("TORCHELASTIC_RESTART_COUNT"),
            torch_max_restarts: count("TORCHELASTIC_MAX_RESTARTS"),
            torch_run_id: text("TORCHELASTIC_RUN_ID"),
            slurm_restarts: count("SLURM_RESTART_COUNT"),
            slurm_job_id: text("SLURM_JOB_ID"),
        }
    }

    /// A launcher's restart of this command, in words ("torchrun's restart 1"), if it is one.
    pub fn restart(&self) -> Option<String> {
        match (self.torch_restarts, self.slurm_restarts) {
            (Some(n), _) if n > 0 => Some(format!("torchrun's restart {n}")),
            (_, Some(n)) if n > 0 => Some(format!(
                "Slurm's requeue {n} of job {}",
                self.slurm_job_id.as_deref().unwrap_or("?")
            )),
            _ => None,
        }
    }

    /// A torchrun run id that names this run (not torchrun's placeholder `none`).
    fn torch_id(&self) -> Option<&str> {
        self.torch_run_id
            .as_deref()
            .filter(|id| !id.eq_ignore_ascii_case("none"))
    }
}

/// The run folder when `--out` is not given. Under Slurm `runs/<preset>-slurm-<job id>` (a
/// requeued job keeps its id); under torchrun with `--max-restarts` > 0,
/// `runs/<preset>-torchrun-<rdzv id>`, and without an `--rdzv-id` (torchrun's `none`) an
/// error asking for `--out`; else `runs/<preset>-<UTC time>`.
pub fn default_out(preset: &str, l: &Launcher) -> anyhow::Result<PathBuf> {
    if let Some(job) = &l.slurm_job_id {
        return Ok(PathBuf::from("runs").join(format!("{preset}-slurm-{job}")));
    }
    if l.torch_max_restarts.is_some_and(|n| n > 0) || l.torch_restarts.is_some_and(|n| n > 0) {
        let Some(id) = l.torch_id() else {
            anyhow::bail!(
                "torchrun --max-restarts starts this command again after a failure, and a \
                 restart must find its run: give --out DIR (or torchrun's --rdzv-id, which \
                 names the default runs/{preset}-torchrun-<id>)"
            );
        };
        return Ok(PathBuf::from("runs").join(format!("{preset}-torchrun-{id}")));
    }
    Ok(config::default_out_dir(preset))
}

/// A configuration key whose value differs between the run folder and this command.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// Dotted key, as in `config.toml` (`lr`, `vit.dropout`).
    pub key: String,
    /// The run folder's value (TOML), `(none)` when absent.
    pub recorded: String,
    /// This command's value.
    pub now: String,
}

/// The keys (outside [`MAY_DIFFER`]) whose values differ between `recorded` and `now`.
pub fn differences(recorded: &RunConfig, now: &RunConfig) -> anyhow::Result<Vec<Difference>> {
    let flat = |c: &RunConfig| -> anyhow::Result<Vec<(String, toml::Value)>> {
        let mut out = Vec::new();
        flatten("", toml::Value::try_from(c)?, &mut out);
        Ok(out)
    };
    // `micro_batch = auto` continues with the number the run chose and recorded.
    let now = &match (now.micro_batch, recorded.micro_batch) {
        (crate::config::MicroBatch::Auto, m @ crate::config::MicroBatch::Fixed(_)) => RunConfig {
            micro_batch: m,
            ..now.clone()
        },
        _ => now.clone(),
    };
    let (a, b) = (flat(recorded)?, flat(now)?);
    let mut keys: Vec<&String> = a.iter().chain(&b).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    let find = |v: &[(String, toml::Value)], k: &str| {
        v.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone())
    };
    let show = |v: Option<toml::Value>| v.map_or_else(|| "(none)".to_string(), |v| v.to_string());
    Ok(keys
        .into_iter()
        .filter(|k| !MAY_DIFFER.contains(&k.as_str()))
        .filter_map(|k| {
            let (x, y) = (find(&a, k), find(&b, k));
            (x != y).then(|| Difference {
                key: k.clone(),
                recorded: show(x),
                now: show(y),
            })
        })
        .collect())
}

fn flatten(prefix: &str, v: toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        v => out.push((prefix.to_string(), v)),
    }
}

/// Whether `dir` holds a run: its `config.toml`, metrics or checkpoints.
pub fn holds_run(dir: &RunFolder) -> bool {
    dir.config().exists() || dir.metrics().exists() || dir.checkpoints().exists()
}

/// How this command meets its run folder.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The folder holds no run: a new one.
    New,
    /// The folder holds this run (same configuration): continue it.
    Continue {
        /// Why continuing is allowed: `--resume-if-exists` or the launcher's restart.
        why: String,
    },
}

/// Decides [`Plan`] for `cfg` in `dir`. `resume_if_exists`: the flag. Refusals say what to do.
pub fn plan(
    dir: &RunFolder,
    cfg: &RunConfig,
    resume_if_exists: bool,
    launcher: &Launcher,
) -> anyhow::Result<Plan> {
    if !holds_run(dir) {
        return Ok(Plan::New);
    }
    let out = dir.root.display();
    let why = match (resume_if_exists, launcher.restart()) {
        (_, Some(r)) => r,
        (true, None) => "--resume-if-exists".to_string(),
        (false, None) => anyhow::bail!(
            "{out} already holds a run; continue it with `rdrop resume {out}` (or this command \
             with --resume-if-exists), or choose another --out"
        ),
    };
    let path = dir.config();
    anyhow::ensure!(
        path.is_file(),
        "{out} holds metrics or checkpoints but no config.toml: not a run this command can \
         continue; choose another --out"
    );
    let recorded = RunConfig::load(&path)?;
    let diff = differences(&recorded, cfg)?;
    if !diff.is_empty() {
        let lines: Vec<String> = diff
            .iter()
            .map(|d| format!("  {}: {} in the run, {} now", d.key, d.recorded, d.now))
            .collect();
        anyhow::bail!(
            "{out} holds a run with another configuration, so this command cannot continue \
             it ({why}):\n{}\n(--out is the run's identity: choose another --out for a new \
             run; only {} may change on a continue)",
            lines.join("\n"),
            MAY_DIFFER.join(", ")
        );
    }
    Ok(Plan::Continue { why })
}

/// The newest checkpoint of `dir` that is whole (its model and training state present), and
/// the newer ones skipped because they are not.
pub fn newest_checkpoint(dir: &RunFolder) -> (Option<(u64, PathBuf)>, Vec<PathBuf>) {
    let whole = |p: &Path| p.join(MODEL_FILE).is_file() && p.join(STATE_FILE).is_file();
    let mut skipped = Vec::new();
    for (step, p) in dir.steps().into_iter().rev() {
        if whole(&p) {
            return (Some((step, p)), skipped);
        }
        skipped.push(p);
    }
    (None, skipped)
}

/// Rank 0's choice of checkpoint step (`None`: start from step 0), for every rank: each rank
/// offers its own (`own`), rank 0's is sent to all (a sum where the other ranks give 0), and a
/// rank whose own differs stops with an error naming both.
pub fn agree(world: &World, own: Option<u64>, dir: &Path) -> anyhow::Result<Option<u64>> {
    let code = |s: Option<u64>| s.map_or(0.0, |s| s as f64 + 1.0);
    let mut v = [if world.is_lead() { code(own) } else { 0.0 }];
    world.sum(&mut v)?;
    let lead = (v[0] >= 1.0).then(|| v[0] as u64 - 1);
    check_agreement(world.rank(), own, lead, dir)?;
    Ok(lead)
}

/// The check of [`agree`]: `own` (this rank's) against `lead` (rank 0's).
pub fn check_agreement(
    rank: usize,
    own: Option<u64>,
    lead: Option<u64>,
    dir: &Path,
) -> anyhow::Result<()> {
    let name =
        |s: Option<u64>| s.map_or_else(|| "no checkpoint".to_string(), |s| format!("step-{s}"));
    anyhow::ensure!(
        own == lead,
        "rank {rank} finds {} in {}, but rank 0 chose {}: every rank must see the same run \
         folder (a shared file system, the same --out)",
        name(own),
        dir.join("checkpoints").display(),
        name(lead)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launcher(vars: &[(&str, &str)]) -> Launcher {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launcher::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn restarts_come_from_the_launchers_counts() {
        assert_eq!(launcher(&[]).restart(), None);
        assert_eq!(
            launcher(&[("TORCHELASTIC_RESTART_COUNT", "0")]).restart(),
            None
        );
        assert_eq!(
            launcher(&[("TORCHELASTIC_RESTART_COUNT", "2")]).restart(),
            Some("torchrun's restart 2".into())
        );
        assert_eq!(
            launcher(&[("SLURM_RESTART_COUNT", "1"), ("SLURM_JOB_ID", "77")]).restart(),
            Some("Slurm's requeue 1 of job 77".into())
        );
    }

    #[test]
    fn the_default_out_is_stable_under_launchers_that_restart() {
        let slurm = launcher(&[("SLURM_JOB_ID", "4242")]);
        assert_eq!(
            default_out("demo", &slurm).unwrap(),
            PathBuf::from("runs/demo-slurm-4242")
        );
        let torch = launcher(&[
            ("TORCHELASTIC_MAX_RESTARTS", "2"),
            ("TORCHELASTIC_RUN_ID", "job7"),
        ]);
        assert_eq!(
            default_out("demo", &torch).unwrap(),
            PathBuf::from("runs/demo-torchrun-job7")
        );
        let anonymous = launcher(&[
            ("TORCHELASTIC_MAX_RESTARTS", "2"),
            ("TORCHELASTIC_RUN_ID", "none"),
        ]);
        let e = default_out("demo", &anonymous).unwrap_err().to_string();
        assert!(e.contains("--out"), "{e}");
        // no restarts: the time-stamped default
        let plain = launcher(&[("TORCHELASTIC_MAX_RESTARTS", "0")]);
        let d = default_out("demo", &plain).unwrap();
        assert!(d.to_string_lossy().starts_with("runs/demo-2"), "{d:?}");
    }

    #[test]
    fn differences_name_keys_with_both_values_and_skip_those_that_may_differ() {
        let a = RunConfig::preset("demo").unwrap();
        let mut b = a.clone();
        b.threads = Some(7);
        b.keep_last = 9;
        b.save_every_minutes = 5.0;
        assert_eq!(differences(&a, &b).unwrap(), vec![]);
        // A recorded micro-batch answers `auto`, not another number.
        b.micro_batch = crate::config::MicroBatch::Auto;
        assert_eq!(differences(&a, &b).unwrap(), vec![]);
        b.micro_batch = crate::config::MicroBatch::Fixed(8);
        assert_eq!(differences(&a, &b).unwrap()[0].key, "micro_batch");
        assert_eq!(differences(&b, &a).unwrap()[0].now, "64");
        b.micro_batch = a.micro_batch;
        b.lr = 0.5;
        b.vit.dropout = 0.25;
        b.weights = Some("x".into());
        let d = differences(&a, &b).unwrap();
        let keys: Vec<&str> = d.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["lr", "vit.dropout", "weights"]);
        assert_eq!(d[0].now, "0.5");
        assert_eq!(d[0].recorded, a.lr.to_string());
        assert_eq!(d[2].recorded, "(none)");
    }

    #[test]
    fn ranks_that_disagree_are_named() {
        let dir = Path::new("runs/x");
        assert!(check_agreement(1, Some(4), Some(4), dir).is_ok());
        assert!(check_agreement(1, None, None, dir).is_ok());
        let e = check_agreement(1, Some(2), Some(4), dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 1 finds step-2") && e.contains("rank 0 chose step-4"),
            "{e}"
        );
        let e = check_agreement(3, None, Some(4), dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no checkpoint"), "{e}");
    }

    #[test]
    fn a_checkpoint_without_its_training_state_is_never_chosen() {
        let t = tempfile::tempdir().unwrap();
        let dir = RunFolder::new(t.path());
        let ck = dir.checkpoints();
        for (step, whole) in [(2, true), (4, true), (6, false)] {
            let p = ck.join(format!("step-{step}"));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join(MODEL_FILE), b"m").unwrap();
            if whole {
                std::fs::write(p.join(STATE_FILE), b"{}").unwrap();
            }
        }
        let (best, skipped) = newest_checkpoint(&dir);
        assert_eq!(best.map(|b| b.0), Some(4));
        assert_eq!(skipped, vec![ck.join("step-6")]);
    }
}
