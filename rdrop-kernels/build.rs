//! Build script of rdrop-kernels.
//!
//! - With the `twin` feature (the crate's own tests): compiles `src/cuda/twin.cpp` (the CUDA
//!   kernels' per-element math of `src/cuda/math.cuh`, built for the host by the C++ compiler)
//!   into a static library, so that `tests/cuda_twin.rs` holds the GPU math to the Rust kernels
//!   on every CI run, without CUDA.
//! - With the `cuda` feature: compiles every `src/cuda/*.cu` with `nvcc` (from `PATH`, or
//!   `$CUDA_HOME/bin`) into a fat binary holding a cubin for each architecture ([`archs`]:
//!   sm_75 to sm_90 with CUDA 13, sm_70 to sm_90 with CUDA 12, or `RDROP_CUDA_ARCHS`) and the
//!   PTX of the lowest, which newer GPUs JIT. The files land in `OUT_DIR` with `modules.rs`,
//!   the list of them that `src/cuda/mod.rs` embeds. No CUDA toolkit is needed without the
//!   feature.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    #[cfg(feature = "twin")]
    build_twin();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if let Err(e) = build_ptx() {
            panic!("rdrop-kernels (feature cuda): {e}");
        }
    }
}

/// `src/cuda/twin.cpp` as the static library `rdrop_cuda_twin` (feature `twin`).
#[cfg(feature = "twin")]
fn build_twin() {
    println!("cargo:rerun-if-changed=src/cuda/math.cuh");
    println!("cargo:rerun-if-changed=src/cuda/twin.cpp");
    cc::Build::new()
        .cpp(true)
        .file("src/cuda/twin.cpp")
        .flag_if_supported("-std=c++17")
        // The twin must round as the GPU code does (nvcc runs with --fmad=false): no contraction.
        .flag_if_supported("-ffp-contract=off")
        // plain functions over arrays: no C++ runtime needed (nor linked into the binaries)
        .flag_if_supported("-fno-exceptions")
        .flag_if_supported("-fno-rtti")
        .cpp_link_stdlib(None)
        .warnings(true)
        .compile("rdrop_cuda_twin");
}

/// nvcc: `PATH` first, then `$CUDA_HOME/bin`, `$CUDA_PATH/bin`.
fn nvcc() -> PathBuf {
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let on_path = Command::new("nvcc").arg("--version").output().is_ok();
    if on_path {
        return PathBuf::from("nvcc");
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}

/// The architectures to build cubins for: `RDROP_CUDA_ARCHS` (e.g. `80` or `75,80,86`), else
/// every one the toolkit supports from Volta/Turing to Hopper: CUDA 13 (no Volta any more)
/// sm_75, 80, 86, 89, 90; CUDA 12 sm_70, 75, 80, 86, 89, 90. The PTX is for the lowest, so
/// newer GPUs (Blackwell and on) JIT it.
fn archs(nvcc: &Path) -> Result<Vec<u32>, String> {
    println!("cargo:rerun-if-env-changed=RDROP_CUDA_ARCHS");
    if let Ok(list) = std::env::var("RDROP_CUDA_ARCHS") {
        let mut v = Vec::new();
        for a in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let n = a.trim_start_matches("sm_").replace('.', "");
            v.push(n.parse::<u32>().map_err(|_| {
                format!("RDROP_CUDA_ARCHS: '{a}' is not a compute capability like 80")
            })?);
        }
        v.sort_unstable();
        v.dedup();
        if v.is_empty() {
            return Err("RDROP_CUDA_ARCHS is empty".into());
        }
        return Ok(v);
    }
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} ({e})", nvcc.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .split("release ")
        .nth(1)
        .and_then(|r| r.split('.').next())
        .and_then(|m| m.trim().parse::<u32>().ok())
        .ok_or_else(|| format!("cannot read the CUDA version from `nvcc --version`: {text}"))?;
    match major {
        13 => Ok(vec![75, 80, 86, 89, 90]),
        12 => Ok(vec![70, 75, 80, 86, 89, 90]),
        m => Err(format!(
            "nvcc of CUDA {m}: rdrop builds with CUDA 12 or 13 (or name the architectures in \
             RDROP_CUDA_ARCHS)"
        )),
    }
}

/// The kernel modules: every `src/cuda/<name>.cu`, by name. (Cargo reruns this script when
/// one of them changes, not when a new one appears: touch build.rs then. Watching the folder
/// would rerun nvcc on every edit of a launcher.)
fn modules() -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for e in std::fs::read_dir("src/cuda").map_err(|e| format!("src/cuda: {e}"))? {
        let p = e.map_err(|e| format!("src/cuda: {e}"))?.path();
        if p.extension().is_some_and(|x| x == "cu") {
            if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Each module as a fat binary (`<m>.fatbin`: a cubin per architecture plus the PTX of the
/// lowest, the driver picks) and as that PTX alone (`<m>.ptx`: the kernels are looked up by
/// its entry names); `modules.rs` lists them, `archs.rs` records the architectures.
fn build_ptx() -> Result<(), String> {
    println!("cargo:rerun-if-changed=src/cuda/common.cuh");
    println!("cargo:rerun-if-changed=src/cuda/math.cuh");
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let nvcc = nvcc();
    let archs = archs(&nvcc)?;
    let lowest = archs[0];
    let modules = modules()?;
    let mut jobs = Vec::new();
    for m in &modules {
        let src = format!("src/cuda/{m}.cu");
        println!("cargo:rerun-if-changed={src}");
        let mut fat = Command::new(&nvcc);
        fat.args(["-fatbin", "-std=c++17", "-O3", "--no-compress"])
            // No FMA contraction: the per-element math rounds as math.cuh's host twin
            // (compiled with -ffp-contract=off) and as the Rust kernels, op for op.
            .arg("--fmad=false");
        for a in &archs {
            fat.arg("-gencode")
                .arg(format!("arch=compute_{a},code=sm_{a}"));
        }
        fat.arg("-gencode")
            .arg(format!("arch=compute_{lowest},code=compute_{lowest}"))
            .arg("-Isrc/cuda")
            .arg("-o")
            .arg(out.join(format!("{m}.fatbin")))
            .arg(&src);
        let mut ptx = Command::new(&nvcc);
        ptx.args(["--ptx", "-std=c++17", "-O3", "--fmad=false"])
            .arg(format!("--gpu-architecture=compute_{lowest}"))
            .arg("-Isrc/cuda")
            .arg("-o")
            .arg(out.join(format!("{m}.ptx")))
            .arg(&src);
        for (what, mut cmd) in [("fatbin", fat), ("ptx", ptx)] {
            let child = cmd.spawn().map_err(|e| {
                format!(
                    "cannot run {} ({e}): put nvcc on PATH or set CUDA_HOME",
                    nvcc.display()
                )
            })?;
            jobs.push((format!("{src} ({what})"), child));
        }
    }
    for (what, child) in jobs {
        let st = child.wait_with_output().map_err(|e| e.to_string())?;
        if !st.status.success() {
            return Err(format!("nvcc failed on {what} ({})", st.status));
        }
    }
    let mut table = String::from(
        "/// The kernel modules: name, PTX of `PTX_ARCH`, fat binary (one per `src/cuda/*.cu`).\n\
         const MODULES: &[(&str, &str, &[u8])] = &[\n",
    );
    for m in &modules {
        let (ptx, fat) = (
            out.join(format!("{m}.ptx")),
            out.join(format!("{m}.fatbin")),
        );
        table.push_str(&format!(
            "    ({m:?}, include_str!({:?}), include_bytes!({:?})),\n",
            ptx.display().to_string(),
            fat.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("modules.rs"), table)
        .map_err(|e| format!("writing modules.rs: {e}"))?;
    let list: Vec<String> = archs.iter().map(u32::to_string).collect();
    std::fs::write(
        out.join("archs.rs"),
        format!(
            "/// The architectures the embedded fat binaries hold a cubin for.\n\
             pub const CUBIN_ARCHS: &[u32] = &[{}];\n\
             /// The architecture of their PTX (JIT on newer GPUs).\n\
             pub const PTX_ARCH: u32 = {lowest};\n",
            list.join(", ")
        ),
    )
    .map_err(|e| format!("writing archs.rs: {e}"))?;
    Ok(())
}
