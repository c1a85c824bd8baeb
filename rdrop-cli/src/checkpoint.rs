//! Atomic checkpoint folders: `OUT/checkpoints/step-N/`, `OUT/best/`, `OUT/final/`.
//!
//! A folder is filled under a temporary name in the same parent (`.tmp-step-N-PID`), every
//! file and the folder itself are fsynced, and only then is it renamed into place and the
//! parent fsynced. A crash or `kill -9` at any point leaves either the previous folder or the
//! new one, whole; stale temporaries are removed on the next start. Only the last K
//! `step-N` folders are kept (`best/` and `final/` are separate).

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::Context;

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    // Directories can be opened read-only and fsynced on Unix; elsewhere this is best effort.
    match File::open(dir) {
        Ok(f) => {
            let _ = f.sync_all();
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot open {}", dir.display())),
    }
}

fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot sync {}", p.display()))?;
        }
    }
    sync_dir(dir)
}

/// Writes the folder `parent/name` atomically: `fill` writes into a temporary folder that is
/// then synced and renamed over `parent/name` (an existing folder of that name is replaced).
pub fn write_dir_atomic(
    parent: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".tmp-{name}-{pid}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    fill(&tmp).with_context(|| format!("writing {}", parent.join(name).display()))?;
    sync_tree(&tmp)?;
    let dest = parent.join(name);
    if dest.exists() {
        // rename(2) cannot replace a non-empty directory: move the old one aside first.
        let old = parent.join(format!(".old-{name}-{pid}"));
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        fs::rename(&dest, &old).with_context(|| format!("cannot move {} aside", dest.display()))?;
        fs::rename(&tmp, &dest)
            .with_context(|| format!("cannot rename into {}", dest.display()))?;
        sync_dir(parent)?;
        fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    } else {
        fs::rename(&tmp, &dest)
            .with_context(|| format!("cannot rename into {}", dest.display()))?;
        sync_dir(parent)?;
    }
    Ok(dest)
}

/// Removes temporaries (`.tmp-*`) left by an interrupted write, and restores a folder whose
/// replacement was interrupted between the two renames (`.old-NAME-*` without `NAME`).
pub fn clean_stale(parent: &Path) -> anyhow::Result<()> {
    let Ok(rd) = fs::read_dir(parent) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let p = e.path();
        if name.starts_with(".tmp-") {
            fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        } else if let Some(rest) = name.strip_prefix(".old-") {
            let orig = rest.rsplit_once('-').map(|(n, _)| n).unwrap_or(rest);
            let dest = parent.join(orig);
            if dest.exists() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::rename(&p, &dest)?;
            }
        }
    }
    Ok(())
}

/// The `step-N` folders under `dir`, oldest first.
pub fn list_steps(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("step-")?.parse().ok()?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The folder name of the checkpoint after update `step`.
pub fn step_name(step: u64) -> String {
    format!("step-{step}")
}

/// Deletes all but the newest `keep` `step-N` folders.
pub fn prune(dir: &Path, keep: usize) -> anyhow::Result<()> {
    let steps = list_steps(dir);
    let n = steps.len().saturating_sub(keep);
    for (_, p) in steps.into_iter().take(n) {
        fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_replace_prune_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        for s in [5u64, 10, 15] {
            write_dir_atomic(&ck, &step_name(s), |d| {
                fs::write(d.join("a.txt"), s.to_string())?;
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(
            list_steps(&ck).iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![5, 10, 15]
        );
        // replacing keeps the new content
        write_dir_atomic(&ck, "step-15", |d| Ok(fs::write(d.join("a.txt"), "new")?)).unwrap();
        assert_eq!(fs::read_to_string(ck.join("step-15/a.txt")).unwrap(), "new");
        // a failing fill leaves the previous folder whole and no step-20
        let err = write_dir_atomic(&ck, "step-15", |d| {
            fs::write(d.join("a.txt"), "half")?;
            anyhow::bail!("disk full")
        });
        assert!(format!("{:#}", err.unwrap_err()).contains("disk full"));
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
}
