//! Atomic writes: the one helper every writer of the workspace uses (training state, model
//! files, run configuration, checkpoint folders).
//!
//! A file is written under a temporary sibling name (`.NAME.tmp-PID`), fsynced, renamed over
//! its target, and the folder is fsynced so that the rename itself survives a power cut. A
//! folder is filled the same way under `.tmp-NAME-PID` in its parent. A crash or `kill -9` at
//! any point leaves either the previous version or the new one, whole; [`clean_stale`] removes
//! what an interrupted folder write leaves behind.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CoreError + '_ {
    move |source| CoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Fsyncs a folder so that renames inside it are durable (Unix; best effort elsewhere).
pub fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(io(dir))?;
    // Windows cannot fsync a directory handle; the rename is still atomic there.
    let _ = f.sync_all();
    Ok(())
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let p = e.map_err(io(dir))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            sync_file(&p)?;
        }
    }
    sync_dir(dir)
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes the file `path` atomically: `fill` writes a temporary sibling, which is fsynced,
/// renamed over `path`, and the folder fsynced. On error the temporary is removed and `path`
/// is untouched.
pub fn write_file<E: From<CoreError>>(
    path: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_file(&tmp)?;
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(parent_of(path))?;
    Ok(())
}

/// Writes `bytes` to `path` atomically ([`write_file`]).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, |tmp| fs::write(tmp, bytes).map_err(io(tmp)))
}

/// Writes the folder `parent/name` atomically: `fill` writes into a temporary folder that is
/// then fsynced (every file and folder) and renamed over `parent/name` (an existing folder of
/// that name is replaced), and `parent` is fsynced. Returns `parent/name`.
pub fn write_dir<E: From<CoreError>>(
    parent: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<PathBuf, E> {
    fs::create_dir_all(parent).map_err(io(parent))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".tmp-{name}-{pid}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    fill(&tmp)?;
    sync_tree(&tmp)?;
    let dest = parent.join(name);
    if dest.exists() {
        // rename(2) cannot replace a non-empty directory: move the old one aside first.
        let old = parent.join(format!(".old-{name}-{pid}"));
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        fs::rename(&dest, &old).map_err(io(&dest))?;
        fs::rename(&tmp, &dest).map_err(io(&dest))?;
        sync_dir(parent)?;
        fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        fs::rename(&tmp, &dest).map_err(io(&dest))?;
        sync_dir(parent)?;
    }
    Ok(dest)
}

/// Removes temporaries (`.tmp-*`) left in `parent` by an interrupted [`write_dir`], and
/// restores a folder whose replacement was interrupted between the two renames
/// (`.old-NAME-PID` without `NAME`). A missing `parent` is fine.
pub fn clean_stale(parent: &Path) -> Result<()> {
    let Ok(rd) = fs::read_dir(parent) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let p = e.path();
        if name.starts_with(".tmp-") {
            if p.is_dir() {
                fs::remove_dir_all(&p).map_err(io(&p))?;
            } else {
                fs::remove_file(&p).map_err(io(&p))?;
            }
        } else if let Some(rest) = name.strip_prefix(".old-") {
            let orig = rest.rsplit_once('-').map(|(n, _)| n).unwrap_or(rest);
            let dest = parent.join(orig);
            if dest.exists() {
                fs::remove_dir_all(&p).map_err(io(&p))?;
            } else {
                fs::rename(&p, &dest).map_err(io(&dest))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_replace_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_bytes(&p, b"one").unwrap();
        write_bytes(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let err = write_file(&p, |tmp| {
            fs::write(tmp, b"half").unwrap();
            Err(CoreError::Io {
                path: tmp.to_path_buf(),
                source: std::io::ErrorKind::StorageFull.into(),
            })
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec!["a.json".to_string()], "no temporary left");
    }
}
