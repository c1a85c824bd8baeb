//! The emulated machine, read once from the environment.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `RDROP_EMU_GPU` | a preset for every device: `h100` (`H100-80GB`), `h200`, `a100-80`, `a100-40`, `l4`, `rtx4090`, `rtx3090`, `t4`, `v100-16`, `v100-32` | `h100` |
//! | `RDROP_EMU_DEVICES` | number of devices | 1 |
//! | `RDROP_EMU_DEVICE_NAME`, `RDROP_EMU_CC` (`9.0`), `RDROP_EMU_MEMORY` (`80GiB`, `16000MiB`, bytes), `RDROP_EMU_SMS` | override the preset, for every device | |
//! | `RDROP_EMU_DEVICE<i>_NAME`, `_CC`, `_MEMORY`, `_SMS` | the same for device `i` only | |
//! | `CUDA_VISIBLE_DEVICES` | which emulated devices the process sees, as with the real driver | all |
//! | `RDROP_EMU_THREADS` | host threads that run the blocks of a kernel | available cores |
//! | `RDROP_EMU_DELAY` | `SEED[:MAX_US]`: each stream sleeps a random 0..MAX_US µs (default 2000) before each operation, and blocks run in a shuffled order | off |
//! | `RDROP_EMU_MEMCHECK` | `0` turns off the memory checks of kernels (faster) | on |
//! | `RDROP_EMU_POISON` | `0`: new allocations are zero instead of 0xff bytes (NaN as floats) | on |
//! | `RDROP_EMU_KERNELS` | folder of the host-compiled kernel modules (`*.so`) | the build's own |
//! | `RDROP_EMU_MUTATE` | fault injection for the emulator's own tests (see `mutate`) | none |
//! | `RDROP_EMU_NCCL_TIMEOUT_S` | NCCL's init and per-collective wait limit, 0: none (read by `nccl`) | 120 |
//! | `RDROP_EMU_NCCL_CHUNK` | bytes of each rank's shared-memory slot (read by `nccl`) | 4 MiB |
//! | `RDROP_EMU_LOG` | `1`: print every driver call that fails, `2`: also every launch | 0 |

use std::sync::OnceLock;

/// One emulated GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    /// `cuDeviceGetName`.
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    /// Bytes of device memory (`cuDeviceTotalMem`).
    pub memory: u64,
    /// Streaming multiprocessors.
    pub sms: i32,
}

/// A preset: (key, name, compute capability, memory bytes, SMs).
pub type Preset = (&'static str, &'static str, (i32, i32), u64, i32);

/// Presets: (key, name, cc, memory bytes, SMs). Memory is what `nvidia-smi` reports as total.
#[rustfmt::skip]
pub const PRESETS: &[Preset] = &[
    ("h100", "NVIDIA H100 80GB HBM3", (9, 0), 81_559 << 20, 132),
    ("h200", "NVIDIA H200", (9, 0), 143_771 << 20, 132),
    ("a100-80", "NVIDIA A100-SXM4-80GB", (8, 0), 81_920 << 20, 108),
    ("a100-40", "NVIDIA A100-SXM4-40GB", (8, 0), 40_960 << 20, 108),
    ("l4", "NVIDIA L4", (8, 9), 23_034 << 20, 58),
    ("rtx4090", "NVIDIA GeForce RTX 4090", (8, 9), 24_564 << 20, 128),
    ("rtx3090", "NVIDIA GeForce RTX 3090", (8, 6), 24_576 << 20, 82),
    ("t4", "Tesla T4", (7, 5), 15_360 << 20, 40),
    ("v100-16", "Tesla V100-SXM2-16GB", (7, 0), 16_384 << 20, 80),
    ("v100-32", "Tesla V100-SXM2-32GB", (7, 0), 32_768 << 20, 80),
];

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The devices this process sees (after `CUDA_VISIBLE_DEVICES`), in ordinal order.
    pub devices: Vec<DeviceSpec>,
    /// Host threads running blocks.
    pub threads: usize,
    /// `(seed, max µs)` of the delay mode.
    pub delay: Option<(u64, u64)>,
    /// Whether kernels' memory accesses are checked.
    pub memcheck: bool,
    /// Whether new allocations are filled with 0xff.
    pub poison: bool,
    /// Where the kernel modules are.
    pub kernels_dir: Option<String>,
    /// Fault injections (comma-separated names).
    pub mutate: Vec<String>,
    /// Log level.
    pub log: u32,
    /// Problems found while reading the variables (reported once, at `cuInit`).
    pub problems: Vec<String>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.trim().is_empty())
}

/// Parses `80GiB`, `16000MiB`, `40GB`, or a byte count.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return None,
    };
    Some((v * mult) as u64)
}

fn parse_cc(s: &str) -> Option<(i32, i32)> {
    let s = s.trim().trim_start_matches("sm_");
    if let Some((a, b)) = s.split_once('.') {
        return Some((a.parse().ok()?, b.parse().ok()?));
    }
    let v: i32 = s.parse().ok()?;
    Some((v / 10, v % 10))
}

impl Config {
    /// Reads the environment.
    pub fn from_env() -> Self {
        let mut problems = Vec::new();
        let preset_key = var("RDROP_EMU_GPU").unwrap_or_else(|| "h100".into());
        let preset = PRESETS
            .iter()
            .find(|p| p.0.eq_ignore_ascii_case(preset_key.trim()))
            .copied()
            .unwrap_or_else(|| {
                problems.push(format!(
                    "RDROP_EMU_GPU={preset_key} is not a preset ({}); using h100",
                    PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
                ));
                PRESETS[0]
            });
        let count = match var("RDROP_EMU_DEVICES") {
            Some(v) => v.trim().parse::<usize>().unwrap_or_else(|_| {
                problems.push(format!("RDROP_EMU_DEVICES={v} is not a number; using 1"));
                1
            }),
            None => 1,
        };
        let mut all = Vec::new();
        for i in 0..count {
            let pick = |suffix: &str| var(&format!("RDROP_EMU_DEVICE{i}_{suffix}"));
            let mut d = DeviceSpec {
                name: preset.1.to_string(),
                cc: preset.2,
                memory: preset.3,
                sms: preset.4,
            };
            if let Some(n) = pick("NAME").or_else(|| var("RDROP_EMU_DEVICE_NAME")) {
                d.name = n;
            }
            if let Some(c) = pick("CC").or_else(|| var("RDROP_EMU_CC")) {
                match parse_cc(&c) {
                    Some(cc) => d.cc = cc,
                    None => problems.push(format!("compute capability '{c}' is not like 9.0")),
                }
            }
            if let Some(m) = pick("MEMORY").or_else(|| var("RDROP_EMU_MEMORY")) {
                match parse_bytes(&m) {
                    Some(b) if b > 0 => d.memory = b,
                    _ => problems.push(format!("memory size '{m}' is not like 80GiB")),
                }
            }
            if let Some(s) = pick("SMS").or_else(|| var("RDROP_EMU_SMS")) {
                match s.trim().parse() {
                    Ok(v) if v > 0 => d.sms = v,
                    _ => problems.push(format!("SM count '{s}' is not a positive number")),
                }
            }
            all.push(d);
        }
        let devices = match var("CUDA_VISIBLE_DEVICES") {
            None => all,
            Some(v) => {
                let mut seen = Vec::new();
                // As the driver: the list stops at the first invalid entry.
                for item in v.split(',') {
                    match item.trim().parse::<usize>() {
                        Ok(i) if i < all.len() && !seen.contains(&i) => seen.push(i),
                        _ => break,
                    }
                }
                seen.into_iter().map(|i| all[i].clone()).collect()
            }
        };
        let threads = var("RDROP_EMU_THREADS")
            .and_then(|v| v.trim().parse().ok())
            .filter(|&t: &usize| t > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        let delay = var("RDROP_EMU_DELAY").and_then(|v| {
            let (seed, max) = match v.split_once(':') {
                Some((s, m)) => (s.trim().parse().ok(), m.trim().parse().ok()),
                None => (v.trim().parse().ok(), Some(2000)),
            };
            match (seed, max) {
                (Some(s), Some(m)) => Some((s, m)),
                _ => {
                    problems.push(format!("RDROP_EMU_DELAY={v} is not SEED[:MAX_US]"));
                    None
                }
            }
        });
        Config {
            devices,
            threads,
            delay,
            memcheck: var("RDROP_EMU_MEMCHECK").is_none_or(|v| v.trim() != "0"),
            poison: var("RDROP_EMU_POISON").is_none_or(|v| v.trim() != "0"),
            kernels_dir: var("RDROP_EMU_KERNELS"),
            mutate: var("RDROP_EMU_MUTATE")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default(),
            log: var("RDROP_EMU_LOG")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0),
            problems,
        }
    }
}

/// The process's configuration (read on first use).
pub fn get() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(Config::from_env)
}

/// Whether the fault injection `name` is on (`RDROP_EMU_MUTATE=name[,name…]`).
pub fn mutate(name: &str) -> bool {
    get().mutate.iter().any(|m| m == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_capabilities_parse() {
        assert_eq!(parse_bytes("80GiB"), Some(80 << 30));
        assert_eq!(parse_bytes("16000MiB"), Some(16000 << 20));
        assert_eq!(parse_bytes("40GB"), Some(40_000_000_000));
        assert_eq!(parse_bytes("1234"), Some(1234));
        assert_eq!(parse_bytes("12 parsecs"), None);
        assert_eq!(parse_cc("8.6"), Some((8, 6)));
        assert_eq!(parse_cc("sm_90"), Some((9, 0)));
        assert_eq!(parse_cc("x"), None);
    }
}
