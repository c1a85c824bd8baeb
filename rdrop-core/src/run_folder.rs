//! The layout of a training run's folder, known here and nowhere else:
//!
//! ```text
//! OUT/config.toml            resolved run configuration (written before step 0)
//! OUT/metrics.jsonl          one JSON line per update and per evaluation
//! OUT/checkpoints/step-N/    model + training state after update N (the newest K kept)
//! OUT/best/                  model with the best test top-1 so far (+ best.json)
//! OUT/final/                 model after the last update
//! OUT/curves.png             loss / accuracy curves
//! ```
//!
//! Folders are written with [`crate::atomic::write_dir`].

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};

/// The file every model folder (checkpoint, `best/`, `final/`) holds.
pub const MODEL_FILE: &str = "model.safetensors";

/// Paths inside a run folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFolder {
    /// The folder.
    pub root: PathBuf,
}

impl RunFolder {
    /// Wraps `root` (not created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `OUT/config.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// `OUT/metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// `OUT/checkpoints`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// `OUT/curves.png`.
    pub fn curves(&self) -> PathBuf {
        self.root.join("curves.png")
    }

    /// Name of the best model's folder, under [`RunFolder::root`].
    pub const BEST: &'static str = "best";

    /// Name of the final model's folder, under [`RunFolder::root`].
    pub const FINAL: &'static str = "final";

    /// The `step-N` checkpoint folders, oldest first.
    pub fn steps(&self) -> Vec<(u64, PathBuf)> {
        list_steps(&self.checkpoints())
    }

    /// The model folder to load from a run: `final/`, else `best/`, else the newest
    /// `checkpoints/step-N/` (each only if it holds a model).
    pub fn model_folder(&self) -> Option<PathBuf> {
        let has_model = |p: &Path| p.join(MODEL_FILE).is_file();
        [Self::FINAL, Self::BEST]
            .into_iter()
            .map(|s| self.root.join(s))
            .find(|p| has_model(p))
            .or_else(|| {
                self.steps()
                    .into_iter()
                    .rev()
                    .map(|(_, p)| p)
                    .find(|p| has_model(p))
            })
    }
}

/// The folder name of the checkpoint after update `step`.
pub fn step_name(step: u64) -> String {
    format!("step-{step}")
}

/// The update number of a `step-N` folder name.
pub fn parse_step_name(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// The `step-N` folders under `dir`, oldest first (none if `dir` does not exist).
pub fn list_steps(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = parse_step_name(&e.file_name().to_string_lossy())?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Deletes all but the newest `keep` `step-N` folders under `dir`.
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
    let steps = list_steps(dir);
    let n = steps.len().saturating_sub(keep);
    for (_, p) in steps.into_iter().take(n) {
        fs::remove_dir_all(&p).map_err(|source| CoreError::Io { path: p, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atomic::{clean_stale, write_dir};

    #[test]
    fn atomic_replace_prune_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CoreError::Io { path, source }
        };
        for s in [5u64, 10, 15] {
            write_dir(&ck, &step_name(s), |d| {
                fs::write(d.join("a.txt"), s.to_string()).map_err(io(d))
            })
            .unwrap();
        }
        assert_eq!(
            list_steps(&ck).iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![5, 10, 15]
        );
        // replacing keeps the new content
        write_dir(&ck, "step-15", |d| {
            fs::write(d.join("a.txt"), "new").map_err(io(d))
        })
        .unwrap();
        assert_eq!(fs::read_to_string(ck.join("step-15/a.txt")).unwrap(), "new");
        // a failing fill leaves the previous folder whole and no step-20
        let err = write_dir(&ck, "step-15", |d| {
            fs::write(d.join("a.txt"), "half").map_err(io(d))?;
            Err(CoreError::Checkpoint {
                path: d.to_path_buf(),
                msg: "disk full".into(),
            })
        });
        assert!(err.unwrap_err().to_string().contains("disk full"));
        assert_eq!(fs::read_to_string(ck.join("step-15/a.txt")).unwrap(), "new");
        prune(&ck, 2).unwrap();
        assert_eq!(
            list_steps(&ck).iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![10, 15]
        );
        // stale temporaries go; an interrupted replacement is restored
        assert!(fs::read_dir(&ck).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp-")));
        fs::rename(ck.join("step-10"), ck.join(".old-step-10-999")).unwrap();
        clean_stale(&ck).unwrap();
        let names: Vec<String> = fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        assert_eq!(fs::read_to_string(ck.join("step-10/a.txt")).unwrap(), "10");
    }

    #[test]
    fn model_folder_prefers_final_then_best_then_newest_step() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunFolder::new(dir.path());
        assert_eq!(run.model_folder(), None);
        let put = |p: PathBuf| {
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join(MODEL_FILE), b"x").unwrap();
        };
        put(run.checkpoints().join(step_name(5)));
        put(run.checkpoints().join(step_name(12)));
        fs::create_dir_all(run.checkpoints().join(step_name(20))).unwrap(); // no model yet
        assert_eq!(run.model_folder(), Some(run.checkpoints().join("step-12")));
        put(run.root.join(RunFolder::BEST));
        assert_eq!(run.model_folder(), Some(run.root.join("best")));
        put(run.root.join(RunFolder::FINAL));
        assert_eq!(run.model_folder(), Some(run.root.join("final")));
        assert_eq!(parse_step_name("step-7"), Some(7));
        assert_eq!(parse_step_name("best"), None);
    }
}
