//! Which implementation of the model runs a command: the explicit engine or the
//! candle-autograd model (the reference, and the path for CUDA and reduced precision until the
//! CUDA engine lands).

use serde::{Deserialize, Serialize};

/// The engine a run asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum EngineKind {
    /// The explicit engine where it runs (CPU, f32), else the autograd model.
    #[default]
    Auto,
    /// The explicit engine (CPU, f32; every ViT architecture).
    Explicit,
    /// The candle-autograd model (any device and precision).
    Autograd,
}

impl EngineKind {
    /// The engine that runs on a device (`cpu`: whether it is the CPU) at a precision
    /// (`f32`: whether it is f32): `Ok(true)` for the explicit engine, `Ok(false)` for
    /// autograd; an explicit request it cannot honour is an error that says why.
    pub fn resolve(self, cpu: bool, f32: bool) -> Result<bool, String> {
        match self {
            EngineKind::Autograd => Ok(false),
            EngineKind::Auto => Ok(cpu && f32),
            EngineKind::Explicit if !cpu => Err(
                "the explicit engine runs on the CPU for now; use --engine autograd (or auto) on CUDA"
                    .into(),
            ),
            EngineKind::Explicit if !f32 => Err(
                "the explicit engine computes in f32; use --precision f32 or --engine autograd"
                    .into(),
            ),
            EngineKind::Explicit => Ok(true),
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Auto => "auto",
            EngineKind::Explicit => "explicit",
            EngineKind::Autograd => "autograd",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_the_engine_on_cpu_f32_only() {
        assert_eq!(EngineKind::Auto.resolve(true, true), Ok(true));
        assert_eq!(EngineKind::Auto.resolve(false, true), Ok(false));
        assert_eq!(EngineKind::Auto.resolve(true, false), Ok(false));
        assert_eq!(EngineKind::Autograd.resolve(true, true), Ok(false));
        assert!(EngineKind::Explicit.resolve(false, true).is_err());
        assert!(EngineKind::Explicit.resolve(true, false).is_err());
    }
}
