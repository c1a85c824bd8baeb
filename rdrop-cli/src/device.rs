//! `--device cpu|cuda[:N]`, `--precision f32|bf16|f16` (rdrop-core's [`Precision`], a clap
//! value through its `clap` feature) and `--threads T`, shared by the subcommands.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Where tensors live: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The host CPU.
    #[default]
    Cpu,
    /// CUDA device with this ordinal (needs a build with `--features cuda`).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| format!("bad CUDA ordinal in device `{s}` (expected cuda:N)")),
                None => Err(format!(
                    "unknown device `{s}` (expected cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Opens the device. A CUDA device in a build without the `cuda` feature is an error that
    /// says how to rebuild.
    pub fn open(&self) -> anyhow::Result<Device> {
        match *self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    anyhow::bail!(
                        "device cuda:{n} requested, but this rdrop was built without CUDA \
                         support; rebuild with --features cuda (scripts/build-cuda.sh)"
                    );
                }
                Device::new_cuda(n).map_err(|e| cuda_open_error(n, e))
            }
        }
    }
}

/// Says what to do when the driver has no such GPU (the raw driver error stays as the cause).
fn cuda_open_error(n: usize, e: candle_core::Error) -> anyhow::Error {
    let raw = e.to_string();
    let what = if raw.contains("CUDA_ERROR_NO_DEVICE") {
        format!(
            "no CUDA GPU found (device cuda:{n}): the driver reports no device; check \
             `nvidia-smi` and CUDA_VISIBLE_DEVICES, or use --device cpu"
        )
    } else if raw.contains("CUDA_ERROR_INVALID_DEVICE") {
        format!("no CUDA GPU with ordinal {n} (`nvidia-smi -L` lists them; cuda = cuda:0)")
    } else {
        format!("cannot open CUDA device cuda:{n}")
    };
    anyhow::Error::new(e).context(what)
}

pub use rdrop_core::Precision;
pub use rdrop_vit::EngineKind;

/// `precision` of `rdrop train`: `auto` (the presets' default: f32 on the CPU; on CUDA bf16
/// where the GPU has bf16 GEMMs, compute capability 8.0 and newer, else f16 with dynamic loss
/// scaling, as `torch.cuda.is_bf16_supported()` and autocast decide) or a fixed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSetting {
    /// f32 on the CPU, bf16 on GPUs of compute capability 8.0+, f16 below.
    Auto,
    /// f32 everywhere.
    F32,
    /// bf16 forward (CUDA, compute capability 8.0+).
    Bf16,
    /// f16 forward with dynamic loss scaling (CUDA).
    F16,
}

impl fmt::Display for PrecisionSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fixed() {
            Some(p) => write!(f, "{p}"),
            None => write!(f, "auto"),
        }
    }
}

impl From<Precision> for PrecisionSetting {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => Self::F32,
            Precision::Bf16 => Self::Bf16,
            Precision::F16 => Self::F16,
        }
    }
}

/// A GPU as the driver names it, for the choices made for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuModel {
    /// `NVIDIA A100-SXM4-80GB`.
    pub name: String,
    /// Compute capability.
    pub cc: (u32, u32),
}

impl GpuModel {
    /// Whether it has bf16 GEMMs (compute capability 8.0 and newer).
    pub fn has_bf16(&self) -> bool {
        self.cc.0 >= 8
    }

    /// The GPU behind an open CUDA `device` (`None` on the CPU or when the driver does not say).
    pub fn of(device: &Device) -> Option<Self> {
        #[cfg(feature = "cuda")]
        if let Ok(cd) = device.as_cuda_device() {
            let stream = cd.cuda_stream();
            let ctx = stream.context();
            let (a, b) = ctx.compute_capability().ok()?;
            return Some(Self {
                name: ctx.name().unwrap_or_else(|_| "a CUDA GPU".into()),
                cc: (a.max(0) as u32, b.max(0) as u32),
            });
        }
        let _ = device;
        None
    }
}

impl PrecisionSetting {
    /// The fixed precision, `None` for `auto`.
    pub fn fixed(self) -> Option<Precision> {
        match self {
            Self::Auto => None,
            Self::F32 => Some(Precision::F32),
            Self::Bf16 => Some(Precision::Bf16),
            Self::F16 => Some(Precision::F16),
        }
    }

    /// The precision a run on `device` (`gpu`: its GPU, once open) computes in. Refused: bf16
    /// or f16 on the CPU, bf16 on a GPU without bf16 GEMMs (naming it and the alternative).
    pub fn resolve(self, device: &DeviceSpec, gpu: Option<&GpuModel>) -> anyhow::Result<Precision> {
        if *device == DeviceSpec::Cpu {
            let p = self.fixed().unwrap_or(Precision::F32);
            check_precision(p, device)?;
            return Ok(p);
        }
        match (self, gpu) {
            (Self::Auto, Some(g)) if !g.has_bf16() => Ok(Precision::F16),
            (Self::Auto, _) => Ok(Precision::Bf16),
            (Self::Bf16, Some(g)) if !g.has_bf16() => anyhow::bail!(
                "precision bf16 needs bf16 GEMMs, which GPUs have from compute capability 8.0 \
                 (A100, RTX 30xx/40xx, L4, H100); {} is {}.{}: use --precision f16 (dynamic \
                 loss scaling, as the reference's apex O2) or auto",
                g.name,
                g.cc.0,
                g.cc.1
            ),
            (s, _) => Ok(s.fixed().unwrap_or(Precision::Bf16)),
        }
    }

    /// What the settings checks assume before a GPU is open: f32 on the CPU, and for `auto`
    /// on CUDA bf16 (the engine chosen is the same for bf16 and f16).
    pub fn assumed(self, device: &DeviceSpec) -> Precision {
        match (self.fixed(), device) {
            (Some(p), _) => p,
            (None, DeviceSpec::Cpu) => Precision::F32,
            (None, DeviceSpec::Cuda(_)) => Precision::Bf16,
        }
    }
}

/// Refuses precisions candle cannot run on `device` (reduced precision on CPU: bf16
/// conv/matmul is widened or missing there, see candle-notes).
pub fn check_precision(precision: Precision, device: &DeviceSpec) -> anyhow::Result<()> {
    if *device == DeviceSpec::Cpu && precision != Precision::F32 {
        anyhow::bail!(
            "precision {precision} is only supported on CUDA; use --precision f32 on cpu"
        );
    }
    Ok(())
}

/// `--device`, `--precision` and `--threads`: the flags of every command that runs a model
/// with fixed defaults (`rdrop eval`, `predict`, `bench train`), flattened into each.
#[derive(clap::Args, Debug, Clone)]
pub struct ComputeArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "D")]
    pub device: DeviceSpec,
    /// Compute precision: f32, bf16 or f16 (bf16/f16 on CUDA only; master weights stay f32).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// CPU threads for candle and the data pipeline (default: all cores).
    #[arg(long, value_name = "T")]
    pub threads: Option<usize>,
    /// `explicit` (hand-written forward/backward: on the CPU in f32, on CUDA at every
    /// precision), `autograd` (the candle model: any device and precision) or `auto` (explicit
    /// where it runs, else autograd).
    #[arg(long, value_enum, default_value_t = EngineKind::Auto)]
    pub engine: EngineKind,
}

impl Default for ComputeArgs {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            precision: Precision::F32,
            threads: None,
            engine: EngineKind::Auto,
        }
    }
}

impl ComputeArgs {
    /// Applies the thread count, checks the precision against the device, opens the device.
    pub fn open(&self) -> anyhow::Result<Device> {
        set_threads(self.threads)?;
        check_precision(self.precision, &self.device)?;
        self.device.open()
    }

    /// Whether the explicit engine runs (see [`use_explicit`]).
    pub fn explicit(&self) -> anyhow::Result<bool> {
        use_explicit(self.engine, &self.device, self.precision)
    }
}

/// Whether `kind` runs the explicit engine on `device` at `precision` (a clear error when an
/// explicit request cannot be honoured).
pub fn use_explicit(
    kind: EngineKind,
    device: &DeviceSpec,
    precision: Precision,
) -> anyhow::Result<bool> {
    kind.resolve(*device == DeviceSpec::Cpu, precision == Precision::F32)
        .map_err(|e| anyhow::anyhow!("--engine {kind}: {e}"))
}

/// Applies `--threads T` to candle's CPU kernels and rayon (data pipeline). Must run before
/// the first tensor operation: candle and rayon size their pools once, from
/// `RAYON_NUM_THREADS`/`CANDLE_NUM_THREADS`.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(t) = threads {
        anyhow::ensure!(t > 0, "--threads must be at least 1");
        // Edition 2021: set_var is safe; we are still single-threaded here.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
        // Ignore "already initialised" (tests call this more than once in one process).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_the_default_on_cpu_in_f32_and_on_cuda() {
        let auto = EngineKind::default();
        assert!(use_explicit(auto, &DeviceSpec::Cpu, Precision::F32).unwrap());
        assert!(!use_explicit(auto, &DeviceSpec::Cpu, Precision::Bf16).unwrap());
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert!(
                use_explicit(auto, &DeviceSpec::Cuda(0), p).unwrap(),
                "{p:?}"
            );
            assert!(use_explicit(EngineKind::Explicit, &DeviceSpec::Cuda(0), p).unwrap());
            assert!(!use_explicit(EngineKind::Autograd, &DeviceSpec::Cuda(0), p).unwrap());
        }
        assert!(!use_explicit(EngineKind::Autograd, &DeviceSpec::Cpu, Precision::F32).unwrap());
        let e = use_explicit(EngineKind::Explicit, &DeviceSpec::Cpu, Precision::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--engine explicit") && e.contains("f32"), "{e}");
    }

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("CUDA:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .contains("unknown device"));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_rebuild() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("built without CUDA support"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn auto_precision_follows_the_gpu_and_bf16_is_refused_without_bf16_gemms() {
        let gpu = |name: &str, cc| GpuModel {
            name: name.into(),
            cc,
        };
        let cuda = DeviceSpec::Cuda(0);
        let auto = PrecisionSetting::Auto;
        assert_eq!(
            auto.resolve(&DeviceSpec::Cpu, None).unwrap(),
            Precision::F32
        );
        for (name, cc, want) in [
            ("Tesla V100-SXM2-16GB", (7, 0), Precision::F16),
            ("Tesla T4", (7, 5), Precision::F16),
            ("NVIDIA A100-SXM4-80GB", (8, 0), Precision::Bf16),
            ("NVIDIA GeForce RTX 4090", (8, 9), Precision::Bf16),
            ("NVIDIA H100 80GB HBM3", (9, 0), Precision::Bf16),
        ] {
            let g = gpu(name, cc);
            assert_eq!(auto.resolve(&cuda, Some(&g)).unwrap(), want, "{name}");
            assert_eq!(
                PrecisionSetting::F16.resolve(&cuda, Some(&g)).unwrap(),
                Precision::F16
            );
        }
        let v100 = gpu("Tesla V100-SXM2-16GB", (7, 0));
        let e = PrecisionSetting::Bf16
            .resolve(&cuda, Some(&v100))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Tesla V100-SXM2-16GB is 7.0") && e.contains("--precision f16"),
            "{e}"
        );
        assert!(PrecisionSetting::Bf16
            .resolve(&DeviceSpec::Cpu, None)
            .is_err());
        assert_eq!(auto.assumed(&DeviceSpec::Cpu), Precision::F32);
        assert_eq!(auto.to_string(), "auto");
        assert_eq!(PrecisionSetting::from(Precision::F16).to_string(), "f16");
    }

    #[test]
    fn reduced_precision_refused_on_cpu() {
        assert!(check_precision(Precision::Bf16, &DeviceSpec::Cpu).is_err());
        assert!(check_precision(Precision::F32, &DeviceSpec::Cpu).is_ok());
        assert!(check_precision(Precision::F16, &DeviceSpec::Cuda(0)).is_ok());
    }
}
