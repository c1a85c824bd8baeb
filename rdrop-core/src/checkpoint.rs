//! Safetensors helpers for checkpoints (weights and optimiser state).
//!
//! Every file is written with [`crate::atomic::write_file`], so an interrupted save leaves the
//! previous file intact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::atomic;
use crate::error::{CoreError, Result};

/// Saves named tensors as safetensors at `path`, atomically. Values are stored bit-for-bit.
pub fn save_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    atomic::write_file(path, |tmp| {
        candle_core::safetensors::save(&map, tmp).map_err(|e| CoreError::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("writing safetensors: {e}"),
        })
    })
}

/// Loads every tensor of a safetensors file onto `device`.
pub fn load_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    if !path.exists() {
        return Err(CoreError::Io {
            path: path.to_path_buf(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let map = candle_core::safetensors::load(path, device).map_err(|e| CoreError::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("reading safetensors: {e}"),
    })?;
    Ok(map.into_iter().collect())
}

/// Saves the variables' current values (by name) as safetensors at `path`, atomically.
pub fn save_vars(path: &Path, vars: &[(String, Var)]) -> Result<()> {
    let map: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    save_tensors(path, &map)
}

/// Sets every variable from the tensor of the same name in the safetensors file at `path`
/// (shape and dtype must match; the file may hold more tensors). Nothing is set unless all
/// variables are found and fit.
pub fn load_vars(path: &Path, vars: &[(String, Var)]) -> Result<()> {
    let tensors = load_tensors(path, &Device::Cpu)?;
    let bad = |msg: String| CoreError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut staged = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let t = tensors
            .get(name)
            .ok_or_else(|| bad(format!("no tensor named {name}")))?;
        if t.shape() != var.shape() || t.dtype() != var.dtype() {
            return Err(bad(format!(
                "{name} is {:?} {:?} in the file, the model expects {:?} {:?}",
                t.dims(),
                t.dtype(),
                var.dims(),
                var.dtype()
            )));
        }
        staged.push((var, t.to_device(var.device())?));
    }
    for (var, t) in staged {
        var.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CoreError + '_ {
        move |source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    #[test]
    fn vars_round_trip_and_errors() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let p = dir.path().join("w.safetensors");
        let a = Var::new(&[[1.5f32, -0.25], [3.0, 1e-30]], &Device::Cpu)?;
        save_vars(&p, &[("a".into(), a.clone())])?;
        let b = Var::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)?;
        load_vars(&p, &[("a".into(), b.clone())])?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        let c = Var::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
        assert!(load_vars(&p, &[("a".into(), c)]).is_err());
        assert!(load_vars(&p, &[("zz".into(), b)]).is_err());
        assert!(load_vars(&dir.path().join("missing"), &[]).is_err());
        // no temporary files left behind
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .map_err(io(dir.path()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        Ok(())
    }
}
