//! `rdrop-gpu-emu`: lays out the emulated CUDA stack and checks binaries against it.
//!
//! ```text
//! rdrop-gpu-emu install DIR                   the emulated libcuda.so.1, the shells and the
//!                                             kernel modules into DIR; prints the exports
//! rdrop-gpu-emu check-symbols DIR BINARY...   every CUDA symbol the binaries import, exported
//!                                             by DIR's files? (exit 1 listing what is not)
//! rdrop-gpu-emu images BINARY                 the nvcc fat binaries embedded in BINARY and
//!                                             their cubins and PTX, as JSON (what
//!                                             `cuobjdump --list-elf --list-ptx` lists)
//! ```
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[path = "rdrop-gpu-emu/elf.rs"]
mod elf;

const USAGE: &str = "usage: rdrop-gpu-emu install DIR
       rdrop-gpu-emu check-symbols DIR BINARY...
       rdrop-gpu-emu images BINARY";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["install", dir] => install(Path::new(dir)),
        ["check-symbols", dir, binaries @ ..] if !binaries.is_empty() => {
            check_symbols(Path::new(dir), binaries)
        }
        ["images", binary] => images(Path::new(binary)),
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            Ok(true)
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rdrop-gpu-emu: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the fat binaries embedded in `binary`: for each, its cubins' and PTX's
/// architectures, and the union, as JSON (`{"fatbins": [{"cubins": [75, ...], "ptx": [75]}],
/// "cubins": [...], "ptx": [...]}`). A fat binary is found by its header (magic, version 1,
/// header size 16) and kept if it parses whole.
fn images(binary: &Path) -> Result<bool, String> {
    let b = std::fs::read(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    let magic = 0xba55_ed50u32.to_le_bytes();
    let mut found = Vec::new();
    let mut at = 0;
    while at + 16 <= b.len() {
        if b[at..at + 4] == magic && b[at + 4..at + 8] == [1, 0, 16, 0] {
            if let Ok(imgs) = rdrop_gpu_emu::module::parse_fatbin(&b[at..]) {
                let arch = |ptx: bool| -> Vec<i32> {
                    let mut v: Vec<i32> = imgs
                        .iter()
                        .filter(|i| i.ptx == ptx)
                        .map(|i| i.target.0 * 10 + i.target.1)
                        .collect();
                    v.sort_unstable();
                    v
                };
                found.push((arch(false), arch(true)));
            }
        }
        at += 1;
    }
    let union = |ptx: bool| -> Vec<i32> {
        let mut v: Vec<i32> = found
            .iter()
            .flat_map(|(c, p)| if ptx { p.clone() } else { c.clone() })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let list = |v: &[i32]| v.iter().map(i32::to_string).collect::<Vec<_>>().join(", ");
    let fatbins: Vec<String> = found
        .iter()
        .map(|(c, p)| format!("{{\"cubins\": [{}], \"ptx\": [{}]}}", list(c), list(p)))
        .collect();
    println!(
        "{{\"fatbins\": [{}], \"cubins\": [{}], \"ptx\": [{}]}}",
        fatbins.join(", "),
        list(&union(false)),
        list(&union(true))
    );
    Ok(!found.is_empty())
}

/// Copies `from` to `to` through a temporary name (a running process may map the old file).
fn copy(from: &Path, to: &Path) -> Result<(), String> {
    let tmp = to.with_extension("rdemu-tmp");
    std::fs::copy(from, &tmp)
        .and_then(|_| std::fs::rename(&tmp, to))
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}

fn copy_dir(from: &Path, to: &Path) -> Result<usize, String> {
    let err = |e: std::io::Error| format!("{}: {e}", from.display());
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let mut n = 0;
    for entry in std::fs::read_dir(from).map_err(err)? {
        let path = entry.map_err(err)?.path();
        let dest = to.join(path.file_name().expect("a folder entry has a name"));
        if path.is_dir() {
            n += copy_dir(&path, &dest)?;
        } else {
            copy(&path, &dest)?;
            n += 1;
        }
    }
    Ok(n)
}

/// A path as a POSIX shell word.
fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The cdylib of the build that made `exe`: `target/<profile>/librdrop_gpu_emu.so`, or the
/// one in `deps/` (where `cargo test` leaves it), the newer of the two.
fn cdylib_beside(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    [
        dir.join("librdrop_gpu_emu.so"),
        dir.join("deps/librdrop_gpu_emu.so"),
    ]
    .into_iter()
    .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
    .max()
    .map(|(_, p)| p)
}

fn install(dir: &Path) -> Result<bool, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let cdylib = cdylib_beside(&exe).ok_or_else(|| {
        format!(
            "librdrop_gpu_emu.so is not beside {} nor in its deps/ (build it: cargo build -p \
             rdrop-gpu-emu)",
            exe.display()
        )
    })?;
    copy(&cdylib, &dir.join("libcuda.so.1"))?;
    let shells = copy_dir(Path::new(env!("RDEMU_SHELLS_DIR")), &dir)?;
    println!(
        "# installed {}: libcuda.so.1 (the emulated driver) and {shells} shell libraries",
        dir.display()
    );
    let kernels = dir.join("kernels");
    let mut exports = vec![
        format!(
            "LD_LIBRARY_PATH={}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}",
            quote(&dir)
        ),
        format!("RDROP_NCCL_LIBRARY={}", quote(&dir.join("libnccl.so.2"))),
    ];
    match option_env!("RDEMU_KERNELS_DIR") {
        Some(src) => {
            let _ = std::fs::remove_dir_all(&kernels);
            let n = copy_dir(Path::new(src), &kernels)?;
            println!("# {n} kernel module files in {}", kernels.display());
            exports.push(format!("RDROP_EMU_KERNELS={}", quote(&kernels)));
        }
        None => {
            println!("# no kernel modules: this build of rdrop-gpu-emu has no RDEMU_KERNELS_DIR")
        }
    }
    // the kernel mutants of the emulator's own tests (RDROP_EMU_KERNELS=DIR/kernels-mutants/NAME:…)
    if let Some(src) = option_env!("RDEMU_KERNEL_MUTANTS_DIR") {
        let mutants = dir.join("kernels-mutants");
        let _ = std::fs::remove_dir_all(&mutants);
        if Path::new(src).is_dir() {
            let n = copy_dir(Path::new(src), &mutants)?;
            println!("# {n} mutant kernel files in {}", mutants.display());
        }
    }
    println!("export {}", exports.join(" "));
    Ok(true)
}

fn check_symbols(dir: &Path, binaries: &[&str]) -> Result<bool, String> {
    let mut missing = Vec::new();
    for binary in binaries {
        let info = elf::read(Path::new(binary))?;
        let report = elf::check_dir(binary, &info, dir);
        if report.missing.is_empty() {
            let counts: Vec<String> = report
                .found
                .iter()
                .map(|(lib, n)| format!("{lib} {n}"))
                .collect();
            println!("{binary}: ok ({})", counts.join(", "));
        }
        missing.extend(report.missing);
    }
    for line in &missing {
        println!("{line}");
    }
    if !missing.is_empty() {
        eprintln!(
            "rdrop-gpu-emu: {} symbol(s) missing from {}",
            missing.len(),
            PathBuf::from(dir).display()
        );
    }
    Ok(missing.is_empty())
}
