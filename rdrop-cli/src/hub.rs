//! Hub repo ids given as `--weights`: downloaded into the Hugging Face cache before loading,
//! with a progress display, so that `load_model` then finds them there without a request.

use std::path::Path;

use anyhow::Context;

use rdrop_vit::hub::{self, HubSettings};

use crate::progress::DownloadProgress;

/// When `spec` is a hub repo id (`org/name[@revision]`, not an existing path), makes sure its
/// `model.safetensors` and `config.json` (if the repo has one) are in the cache, downloading
/// them with the `HF_*` settings of the environment.
pub fn prefetch(spec: &str) -> anyhow::Result<()> {
    if Path::new(spec).exists() || !hub::looks_like_repo_id(spec) {
        return Ok(());
    }
    let settings = HubSettings::from_env();
    let mut progress = DownloadProgress::new(!settings.progress_disabled);
    let context = || match settings.offline {
        true => format!("fetching weights `{spec}` (HF_HUB_OFFLINE: cache only)"),
        false => format!("fetching weights `{spec}` from {}", settings.endpoint),
    };
    hub::fetch(&settings, spec, "model.safetensors", false, &mut progress).with_context(context)?;
    hub::fetch(&settings, spec, "config.json", true, &mut progress).with_context(context)?;
    Ok(())
}
