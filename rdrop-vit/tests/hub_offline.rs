//! HF_HUB_OFFLINE: a repo missing from the cache is an error naming the file (own process:
//! it sets an environment variable).

use rdrop_vit::{load_model, LoadOptions};

#[test]
fn offline_missing_file_is_named() {
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let cache = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        hub_cache: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    let err = load_model("google/vit-base-patch16-224-in21k", &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(
        err.contains("models--google--vit-base-patch16-224-in21k"),
        "{err}"
    );
}
