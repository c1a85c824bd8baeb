//! Saving in the Hugging Face `ViTForImageClassification` layout (`model.safetensors` +
//! `config.json`), so `transformers` loads our checkpoints too. Files are written with
//! rdrop-core's atomic helper (temporary, fsync, rename, fsync of the folder), so a crash
//! never leaves a half-written model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rdrop_core::atomic::write_file;

use crate::config::ViTConfig;
use crate::error::{Result, VitError};
use crate::model::VisionTransformer;

/// Writes `tensors` (canonical HF names) and `cfg` to `dir/model.safetensors` and
/// `dir/config.json` (created if needed). Tensors are stored as f32 on the CPU.
pub fn save_tensors_hf(
    tensors: &[(String, Tensor)],
    cfg: &ViTConfig,
    dir: &Path,
    class_names: Option<&[String]>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| VitError::io(dir, e))?;
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                t.to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    write_file(&dir.join("model.safetensors"), |tmp| {
        candle_core::safetensors::save(&map, tmp)
            .map_err(|e| VitError::parse(tmp, format!("cannot write safetensors: {e}")))
    })?;
    let json = cfg.to_hf_json(class_names);
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| VitError::parse(dir.join("config.json"), e.to_string()))?;
    write_file(&dir.join("config.json"), |tmp| {
        std::fs::write(tmp, text + "\n").map_err(|e| VitError::io(tmp, e))
    })
}

/// Saves `model` (its f32 master parameters and configuration) in the HF
/// `ViTForImageClassification` layout under `dir`.
pub fn save_hf(
    model: &VisionTransformer,
    dir: &Path,
    class_names: Option<&[String]>,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    save_tensors_hf(&tensors, model.config(), dir, class_names)
}
