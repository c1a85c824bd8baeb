//! Hugging Face hub repos (`org/name[@revision]`) through the standard cache.
//!
//! The variables are those of `huggingface_hub` ([`HubSettings`]): `HF_ENDPOINT` (a mirror),
//! `HF_TOKEN` or the token file under `HF_HOME` (gated and private repos), `HF_HUB_CACHE` /
//! `HF_HOME` (the cache) and `HF_HUB_OFFLINE` (cache only). The cache layout is theirs too, so
//! `huggingface-cli download` and rdrop share files:
//!
//! ```text
//! models--ORG--NAME/
//!   blobs/<etag>                      the content (etag = sha256 for LFS files)
//!   snapshots/<commit>/<file>         a relative symlink to ../../blobs/<etag>
//!   refs/<revision>                   the commit a branch or tag pointed to
//! ```
//!
//! A file already in the cache is used without any request (unlike `huggingface_hub`, which
//! asks the hub whether a branch moved; pin `@commit`, or delete `refs/<branch>`, to choose).
//! A missing one is downloaded ([`download`]), checked (length; sha256 for LFS files) and
//! moved into place only when complete: a failed download leaves nothing behind.

mod download;
mod settings;

use std::path::{Path, PathBuf};

pub use settings::{HubSettings, DEFAULT_ENDPOINT};

use crate::error::{Result, VitError};
use download::{Client, Failure};

/// Receives the progress of a download; all methods default to doing nothing (`()` is the
/// silent progress).
pub trait Progress {
    /// A download of `file` (`total` bytes) starts.
    fn start(&mut self, _file: &str, _total: u64) {}
    /// `done` bytes of it have arrived.
    fn advance(&mut self, _done: u64) {}
    /// The download ended, complete or not.
    fn finish(&mut self) {}
}

impl Progress for () {}

/// The hub cache folder from the environment (see [`HubSettings::cache`]).
pub fn cache_dir() -> PathBuf {
    HubSettings::from_env().cache
}

/// True when `HF_HUB_OFFLINE` asks for cache-only resolution.
pub fn offline() -> bool {
    HubSettings::from_env().offline
}

/// Whether `spec` looks like a hub repo id (`org/name`, optionally `@revision`).
pub fn looks_like_repo_id(spec: &str) -> bool {
    let id = spec.split('@').next().unwrap_or(spec);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The folder of `repo` (`org/name`) in `cache`.
pub fn repo_folder(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// A file of a hub repo in the cache `cache` (`revision` is a branch, tag or commit).
pub fn cached_file(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let folder = repo_folder(cache, repo);
    // A ref file holds the commit; a revision may also be a commit hash itself.
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let p = folder.join("snapshots").join(commit).join(file);
    p.exists().then_some(p)
}

/// Resolves `file` of hub repo `repo_spec` (`org/name[@revision]`) in the cache `cache`,
/// with the other settings from the environment and no progress display; see [`fetch`].
pub fn get(cache: &Path, repo_spec: &str, file: &str, optional: bool) -> Result<Option<PathBuf>> {
    let settings = HubSettings {
        cache: cache.to_path_buf(),
        ..HubSettings::from_env()
    };
    fetch(&settings, repo_spec, file, optional, &mut ())
}

/// A path segment (`revision`, `file`) that is safe to join to a folder and to put in a URL:
/// ASCII letters, digits, `-_.` and `/` between non-empty parts that are not `.` or `..`.
fn safe_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// A name the hub gives (commit, etag) that can be a file name.
fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `s` percent-encoded for a URL path (`/` kept unless `keep_slash` is false), like
/// `urllib.parse.quote`.
fn quote(s: &str, keep_slash: bool) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b'/' if keep_slash => "/".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Resolves `file` of hub repo `repo_spec` (`org/name[@revision]`, default revision `main`)
/// with `settings`: from the cache without any request when it is there, else downloaded
/// into the cache (unless `settings.offline`), reporting to `progress`.
///
/// `Ok(None)` when `optional` and the file does not exist (HTTP 404) or, offline, is not
/// cached. Every error names the repo, the file and the cause (HTTP status, the token to set,
/// a cut connection, a corrupt file).
pub fn fetch(
    settings: &HubSettings,
    repo_spec: &str,
    file: &str,
    optional: bool,
    progress: &mut dyn Progress,
) -> Result<Option<PathBuf>> {
    let (repo, revision) = match repo_spec.split_once('@') {
        Some((r, rev)) => (r, rev),
        None => (repo_spec, "main"),
    };
    let err = |msg: String| VitError::Hub {
        repo: repo.into(),
        file: file.into(),
        msg,
    };
    if !looks_like_repo_id(repo) {
        return Err(err(
            "is not in a hub repo: expected `org/name[@revision]`".into()
        ));
    }
    if !safe_path(revision) {
        return Err(err(format!(
            "cannot be fetched: revision `{revision}` is not a branch, tag or commit name"
        )));
    }
    if !safe_path(file) {
        return Err(err("is not a valid file name in a repo".into()));
    }
    let cache = &settings.cache;
    if let Some(p) = cached_file(cache, repo, revision, file) {
        return Ok(Some(p));
    }
    let folder = repo_folder(cache, repo);
    if settings.offline {
        if optional {
            return Ok(None);
        }
        return Err(err(format!(
            "is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set: download it first or unset HF_HUB_OFFLINE",
            folder.display()
        )));
    }
    let failed = |f: Failure| {
        err(format!(
            "is not in the Hugging Face cache ({}) and could not be downloaded: {f}",
            folder.display()
        ))
    };
    let client = Client::new(settings).map_err(|m| failed(Failure::Other(m)))?;
    let url = format!(
        "{}/{repo}/resolve/{}/{}",
        settings.endpoint,
        quote(revision, false),
        quote(file, true)
    );
    let remote = match client.metadata(&url) {
        Ok(r) => r,
        Err(Failure::NotFound(_)) if optional => return Ok(None),
        Err(f) => return Err(failed(f)),
    };
    if !safe_name(&remote.commit) || !safe_name(&remote.etag) {
        return Err(failed(Failure::Other(format!(
            "{url} answered with an unusable commit `{}` or etag `{}`",
            remote.commit, remote.etag
        ))));
    }
    let io = |p: &Path, e: std::io::Error| VitError::io(p, e);
    let blobs = folder.join("blobs");
    let blob = blobs.join(&remote.etag);
    if !blob.is_file() {
        std::fs::create_dir_all(&blobs).map_err(|e| io(&blobs, e))?;
        // Own name per process, so two downloads of one blob do not write into one file.
        let tmp = Partial(blobs.join(format!("{}.{}.incomplete", remote.etag, std::process::id())));
        let res = client.download(&remote, &tmp.0, file, progress);
        progress.finish();
        res.map_err(failed)?;
        std::fs::rename(&tmp.0, &blob).map_err(|e| io(&blob, e))?;
    }
    let pointer = folder.join("snapshots").join(&remote.commit).join(file);
    link(&blob, &pointer, file).map_err(|e| io(&pointer, e))?;
    if revision != remote.commit {
        let r = folder.join("refs").join(revision);
        if let Some(parent) = r.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&r, &remote.commit).map_err(|e| io(&r, e))?;
    }
    Ok(Some(pointer))
}

/// A temporary download, removed when dropped (after a successful rename there is nothing
/// left to remove).
struct Partial(PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Makes `pointer` (`snapshots/<commit>/<file>`) refer to `blob`: a relative symlink as
/// `huggingface_hub` makes, or a copy where symlinks are not available.
fn link(blob: &Path, pointer: &Path, file: &str) -> std::io::Result<()> {
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if pointer.symlink_metadata().is_ok() {
        std::fs::remove_file(pointer)?;
    }
    #[cfg(unix)]
    {
        // snapshots/<commit>/<a/b/file> -> ../../(../)*blobs/<etag>
        let mut target = PathBuf::new();
        for _ in 0..file.split('/').count() + 1 {
            target.push("..");
        }
        target.push("blobs");
        if let Some(name) = blob.file_name() {
            target.push(name);
        }
        std::os::unix::fs::symlink(target, pointer)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::fs::copy(blob, pointer).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_id_shapes() {
        assert!(looks_like_repo_id("google/vit-base-patch16-224-in21k"));
        assert!(looks_like_repo_id("timm/vit_base_patch16_224.orig_in21k"));
        assert!(looks_like_repo_id("org/name@v1"));
        assert!(!looks_like_repo_id("model.safetensors"));
        assert!(!looks_like_repo_id("./a/b"));
        assert!(!looks_like_repo_id("a/b/c"));
    }

    #[test]
    fn resolves_from_a_standard_cache_layout() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        // huggingface_hub writes refs without a newline; tolerate one anyway.
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(repo.join("snapshots/abc123/config.json"), "{}").unwrap();
        let p = get(dir.path(), "org/tiny", "config.json", false)
            .unwrap()
            .unwrap();
        assert!(p.ends_with("snapshots/abc123/config.json"));
        assert!(cached_file(dir.path(), "org/tiny", "main", "model.safetensors").is_none());
        assert!(cached_file(dir.path(), "org/tiny", "abc123", "config.json").is_some());
    }
}
