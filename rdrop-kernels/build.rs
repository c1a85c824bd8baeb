//! Build script of rdrop-kernels.
//!
//! - Always: compiles `src/cuda/twin.cpp` (the CUDA kernels' per-element math of
//!   `src/cuda/math.cuh`, built for the host by the C++ compiler) into a static library, so that
//!   `tests/cuda_twin.rs` holds the GPU math to the Rust kernels on every CI run, without CUDA.
//! - With the `cuda` feature: compiles every `src/cuda/*.cu` to PTX with `nvcc` (from `PATH`, or
//!   `$CUDA_HOME/bin`), for `sm_$CUDA_COMPUTE_CAP` (default 90: H100/H200). The PTX files land in
//!   `OUT_DIR` and are embedded by `src/cuda/mod.rs`. No CUDA toolkit is needed without the feature.
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources (each one PTX module); `src/cuda/mod.rs` embeds `<name>.ptx`.
const MODULES: [&str; 5] = ["elementwise", "layernorm", "softmax", "loss", "optim"];

fn main() {
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

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if let Err(e) = build_ptx() {
            panic!("rdrop-kernels (feature cuda): {e}");
        }
    }
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

fn build_ptx() -> Result<(), String> {
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-changed=src/cuda/common.cuh");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap = cap.trim().trim_start_matches("sm_").replace('.', "");
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "CUDA_COMPUTE_CAP '{cap}' is not a compute capability like 90"
        ));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let nvcc = nvcc();
    let jobs: Vec<_> = MODULES
        .iter()
        .map(|m| {
            let src = format!("src/cuda/{m}.cu");
            println!("cargo:rerun-if-changed={src}");
            let ptx = out.join(format!("{m}.ptx"));
            let child = Command::new(&nvcc)
                .args(["--ptx", "-std=c++17", "-O3"])
                // No FMA contraction: the per-element math rounds as math.cuh's host twin
                // (compiled with -ffp-contract=off) and as the Rust kernels, op for op.
                .arg("--fmad=false")
                .arg(format!("--gpu-architecture=sm_{cap}"))
                .arg("-Isrc/cuda")
                .arg("-o")
                .arg(&ptx)
                .arg(&src)
                .spawn()
                .map_err(|e| {
                    format!(
                        "cannot run {} ({e}): put nvcc on PATH or set CUDA_HOME",
                        nvcc.display()
                    )
                })?;
            Ok((src, child))
        })
        .collect::<Result<_, String>>()?;
    for (src, child) in jobs {
        let st = child.wait_with_output().map_err(|e| e.to_string())?;
        if !st.status.success() {
            return Err(format!("nvcc failed on {src} ({})", st.status));
        }
    }
    // SASS for the target GPU from the same PTX (ptxas beside nvcc), so that loading the
    // kernels does not JIT 0.7 MB of PTX in every process; the PTX stays as the fallback.
    let ptxas = match nvcc.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("ptxas"),
        _ => PathBuf::from("ptxas"),
    };
    let jobs: Vec<_> = MODULES
        .iter()
        .map(|m| {
            let child = Command::new(&ptxas)
                .arg(format!("-arch=sm_{cap}"))
                .arg("-O3")
                .arg("-o")
                .arg(out.join(format!("{m}.cubin")))
                .arg(out.join(format!("{m}.ptx")))
                .spawn()
                .map_err(|e| format!("cannot run {} ({e})", ptxas.display()))?;
            Ok((m, child))
        })
        .collect::<Result<_, String>>()?;
    for (m, child) in jobs {
        let st = child.wait_with_output().map_err(|e| e.to_string())?;
        if !st.status.success() {
            return Err(format!("ptxas failed on {m}.ptx ({})", st.status));
        }
    }
    Ok(())
}
