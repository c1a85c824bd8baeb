//! Hugging Face hub repos (`org/name`) through the standard cache.
//!
//! The cache folder is the one `huggingface_hub` uses: `HF_HUB_CACHE`, else
//! `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`; layout `models--ORG--NAME/{refs/main, snapshots/<rev>/<file>}`.
//! Files already there are used without network. Otherwise they are downloaded with `hf-hub`
//! into that cache, unless `HF_HUB_OFFLINE` is set (`1`/`true`/`yes`), in which case the error
//! names the missing file and where it was looked for.

use std::path::{Path, PathBuf};

use crate::error::{Result, VitError};

/// The hub cache folder from the environment (see the module docs).
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return p;
    }
    if let Some(h) = env("HF_HOME") {
        return h.join("hub");
    }
    let cache = env("XDG_CACHE_HOME").unwrap_or_else(|| {
        env("HOME")
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".cache")
    });
    cache.join("huggingface").join("hub")
}

/// True when `HF_HUB_OFFLINE` asks for cache-only resolution.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
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

/// A file of a hub repo in the cache `cache` (`revision` is a branch, tag or commit).
pub fn cached_file(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    // A ref file holds the commit; a revision may also be a commit hash itself.
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let p = folder.join("snapshots").join(commit).join(file);
    p.exists().then_some(p)
}

/// Resolves `file` of hub repo `repo_spec` (`org/name[@revision]`) in the cache `cache`,
/// downloading it when missing and allowed. `Ok(None)` when the repo does not have the file
/// (download answered "not found") or, offline, when `optional` and it is not cached.
pub fn get(cache: &Path, repo_spec: &str, file: &str, optional: bool) -> Result<Option<PathBuf>> {
    let (repo, revision) = match repo_spec.split_once('@') {
        Some((r, rev)) => (r, rev),
        None => (repo_spec, "main"),
    };
    if let Some(p) = cached_file(cache, repo, revision, file) {
        return Ok(Some(p));
    }
    let where_ = cache.join(format!("models--{}", repo.replace('/', "--")));
    if offline() {
        if optional {
            return Ok(None);
        }
        return Err(VitError::Hub {
            repo: repo.into(),
            file: file.into(),
            msg: format!(
                "is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set: download it first or unset HF_HUB_OFFLINE",
                where_.display()
            ),
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_progress(true)
        .build()
        .map_err(|e| VitError::Hub {
            repo: repo.into(),
            file: file.into(),
            msg: format!("cannot start the hub client: {e}"),
        })?;
    let r = hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    match api.repo(r).get(file) {
        Ok(p) => Ok(Some(p)),
        Err(e) => {
            let msg = e.to_string();
            if optional && msg.contains("404") {
                return Ok(None);
            }
            Err(VitError::Hub {
                repo: repo.into(),
                file: file.into(),
                msg: format!(
                    "is not in the Hugging Face cache ({}) and could not be downloaded: {msg}",
                    where_.display()
                ),
            })
        }
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
