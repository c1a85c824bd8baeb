//! Which implementation of the model runs a command: the explicit engine (on CPU in f32, or
//! on CUDA in f32, bf16 or f16) or the candle-autograd model (the reference).

use serde::{Deserialize, Serialize};

/// The engine a run asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum EngineKind {
    /// The explicit engine where it runs (CPU in f32; CUDA at any precision), else the
    /// autograd model.
    #[default]
    Auto,
    /// The explicit engine (every ViT architecture; CPU in f32, CUDA in f32, bf16 or f16).
    Explicit,
    /// The candle-autograd model (any device and precision).
    Autograd,
}

impl EngineKind {
    /// The engine that runs on a device (`cpu`: whether it is the CPU) at a precision
    /// (`f32`: whether it is f32): `Ok(true)` for the explicit engine (the CPU engine on the
    /// CPU, the CUDA engine on a GPU), `Ok(false)` for autograd; an explicit request it cannot
    /// honour is an error that says why.
    pub fn resolve(self, cpu: bool, f32: bool) -> Result<bool, String> {
        match self {
            EngineKind::Autograd => Ok(false),
            EngineKind::Auto => Ok(!cpu || f32),
            EngineKind::Explicit if cpu && !f32 => Err(
                "the explicit engine computes in f32 on the CPU (bf16/f16 run on CUDA); use \
                 --precision f32 or --engine autograd"
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
    fn auto_picks_the_engine_on_cpu_f32_and_on_cuda() {
        // (cpu, f32)
        assert_eq!(EngineKind::Auto.resolve(true, true), Ok(true));
        assert_eq!(EngineKind::Auto.resolve(true, false), Ok(false));
        assert_eq!(EngineKind::Auto.resolve(false, true), Ok(true));
        assert_eq!(EngineKind::Auto.resolve(false, false), Ok(true));
        for (cpu, f32) in [(true, true), (true, false), (false, true), (false, false)] {
            assert_eq!(EngineKind::Autograd.resolve(cpu, f32), Ok(false));
        }
        assert_eq!(EngineKind::Explicit.resolve(false, true), Ok(true));
        assert_eq!(EngineKind::Explicit.resolve(false, false), Ok(true));
        assert_eq!(EngineKind::Explicit.resolve(true, true), Ok(true));
        let e = EngineKind::Explicit.resolve(true, false).unwrap_err();
        assert!(e.contains("f32") && e.contains("--engine autograd"), "{e}");
    }
}
