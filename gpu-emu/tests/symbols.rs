//! The shell libraries and the symbols they forward: (a) each shell exports exactly its list,
//! versioned with its soname, and NEEDs libcuda.so.1; (b) the emulated driver (the cdylib)
//! exports every `rdemu_<name>` a shell jumps to; (c) the CUDA binaries in `dist/cuda/` (when
//! built) import nothing the installed emulator lacks; (d) the checker names what is missing;
//! (e) a C program linked against the shells runs through them into the stubs.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)]
#[path = "../src/bin/rdrop-gpu-emu/elf.rs"]
mod elf;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `(soname, symbols)` of every `symbols/*.txt`.
fn lists() -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(manifest_dir().join("symbols")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "txt") {
            continue;
        }
        let soname = path.file_stem().unwrap().to_str().unwrap().to_string();
        let names = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| l.split('#').next().unwrap().trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        out.push((soname, names));
    }
    out.sort();
    out
}

/// target/<profile>/ (this test is target/<profile>/deps/symbols-…).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn shells_dir() -> PathBuf {
    PathBuf::from(env!("RDEMU_SHELLS_DIR"))
}

#[test]
fn shells_export_exactly_their_lists_with_the_soname_version() {
    let lists = lists();
    let sonames: Vec<&str> = lists.iter().map(|(s, _)| s.as_str()).collect();
    for want in [
        "libcublas.so.13",
        "libcublasLt.so.13",
        "libcudart.so.13",
        "libcurand.so.10",
        "libnccl.so.2",
    ] {
        assert!(sonames.contains(&want), "no symbols/{want}.txt");
    }
    let mut problems = Vec::new();
    for (soname, names) in &lists {
        let info = elf::read(&shells_dir().join(soname)).unwrap();
        if info.soname.as_deref() != Some(soname.as_str()) {
            problems.push(format!("{soname}: soname {:?}", info.soname));
        }
        if info.needed != ["libcuda.so.1"] {
            problems.push(format!("{soname}: NEEDED {:?}", info.needed));
        }
        if !info.verdefs.iter().any(|v| v == soname) {
            problems.push(format!("{soname}: version nodes {:?}", info.verdefs));
        }
        let listed: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let exported: BTreeSet<&str> = info
            .symbols
            .iter()
            .filter(|s| s.defined && s.name != *soname) // the version node's own symbol
            .map(|s| s.name.as_str())
            .collect();
        if listed != exported {
            problems.push(format!(
                "{soname}: listed but not exported {:?}; exported but not listed {:?}",
                listed.difference(&exported).collect::<Vec<_>>(),
                exported.difference(&listed).collect::<Vec<_>>()
            ));
        }
        for s in info
            .symbols
            .iter()
            .filter(|s| s.defined && s.name != *soname)
        {
            if s.version.as_deref() != Some(soname.as_str()) || s.hidden {
                problems.push(format!("{soname}: {} has version {:?}", s.name, s.version));
            }
        }
        let forwarded: BTreeSet<String> = info
            .symbols
            .iter()
            .filter(|s| !s.defined)
            .map(|s| s.name.clone())
            .collect();
        let want: BTreeSet<String> = names.iter().map(|n| format!("rdemu_{n}")).collect();
        if forwarded != want {
            problems.push(format!(
                "{soname}: imports {forwarded:?}, expected exactly {want:?}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_driver_exports_every_forwarded_function() {
    // `cargo test` leaves the cdylib in deps/ (a `cargo build` also copies it up): the newer
    let so = ["librdrop_gpu_emu.so", "deps/librdrop_gpu_emu.so"]
        .iter()
        .map(|p| profile_dir().join(p))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .expect("no librdrop_gpu_emu.so in target/<profile>/ or its deps/");
    let info = elf::read(&so).unwrap();
    assert_eq!(
        info.soname.as_deref(),
        Some("libcuda.so.1"),
        "{}",
        so.display()
    );
    let missing: Vec<String> = lists()
        .iter()
        .flat_map(|(soname, names)| {
            names
                .iter()
                .filter(|n| !info.exports(&format!("rdemu_{n}"), None))
                .map(move |n| format!("rdemu_{n} (for {soname})"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} does not export {} function(s) the shells forward to:\n  {}",
        so.display(),
        missing.len(),
        missing.join("\n  ")
    );
}

/// `rdrop-gpu-emu install` into a fresh folder of target/tmp.
fn install(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_rdrop-gpu-emu"))
        .arg("install")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("export LD_LIBRARY_PATH="), "{stdout}");
    dir
}

#[test]
fn dist_cuda_binaries_import_nothing_the_emulator_lacks() {
    let dist = manifest_dir().join("../dist/cuda");
    let mut binaries = vec![dist.join("rdrop")];
    if let Ok(tests) = std::fs::read_dir(dist.join("tests")) {
        binaries.extend(tests.map(|e| e.unwrap().path()));
    }
    binaries.retain(|b| b.is_file());
    if binaries.is_empty() {
        eprintln!("skipped: no dist/cuda/rdrop (scripts/build-cuda.sh builds it)");
        return;
    }
    let dir = install("symbols-dist");
    let out = Command::new(env!("CARGO_BIN_EXE_rdrop-gpu-emu"))
        .arg("check-symbols")
        .arg(&dir)
        .args(&binaries)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-symbols:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sym(name: &str, defined: bool, version: Option<&str>, file: Option<&str>) -> elf::DynSym {
    elf::DynSym {
        name: name.into(),
        defined,
        version: version.map(Into::into),
        file: file.map(Into::into),
        hidden: false,
    }
}

#[test]
fn the_checker_names_every_missing_import() {
    let lt = "libcublasLt.so.13";
    let binary = elf::ElfInfo {
        needed: vec!["libcuda.so.1".into(), lt.into(), "libcufft.so.12".into()],
        symbols: vec![
            sym("cuInit", false, None, None),
            sym("cuNotAThing", false, None, None),
            sym("cublasLtCreate", false, Some(lt), Some(lt)),
            sym("cublasLtNotAThing", false, Some(lt), Some(lt)),
            sym("malloc", false, Some("GLIBC_2.2.5"), Some("libc.so.6")),
            sym("custom", false, None, None),
            sym("cuLocal", true, None, None),
        ],
        ..Default::default()
    };
    let provided = |lib: &str| match lib {
        "libcuda.so.1" => Some(elf::ElfInfo {
            symbols: vec![sym("cuInit", true, None, None)],
            ..Default::default()
        }),
        "libcublasLt.so.13" => Some(elf::ElfInfo {
            symbols: vec![
                sym("cublasLtCreate", true, Some(lt), None),
                // right name, wrong version: does not satisfy the import
                sym("cublasLtNotAThing", true, Some("OTHER"), None),
            ],
            ..Default::default()
        }),
        _ => None,
    };
    let report = elf::check("bin", &binary, &provided);
    assert_eq!(
        report.missing,
        [
            "bin: needs libcufft.so.12, which the emulator does not provide",
            "bin: needs cuNotAThing from libcuda.so.1, which the emulator does not export",
            "bin: needs cublasLtNotAThing@libcublasLt.so.13 from libcublasLt.so.13, which the \
             emulator does not export",
        ]
    );
    assert_eq!(report.found.get("libcuda.so.1"), Some(&1));
    assert_eq!(report.found.get(lt), Some(&1));
}

/// A C program linked against the installed shells (versioned references, as the real
/// binaries have) reaches the stubs through the trampolines, arguments intact.
#[test]
fn a_program_linked_against_the_shells_runs_through_them() {
    let dir = install("symbols-link");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let src = tmp.join("symbols-link-prog.c");
    let exe = tmp.join("symbols-link-prog");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <string.h>
int cublasCreate_v2(void **h);
int cublasSetStream_v2(void *h, void *s);
int cublasDestroy_v2(void *h);
int cublasDgemmStridedBatched(void *h, int ta, int tb, int m, int n, int k, const double *al,
    const double *a, int lda, long long sa, const double *b, int ldb, long long sb,
    const double *be, double *c, int ldc, long long sc, int batch);
int curandCreateGenerator(void **g, int type);
int curandSetPseudoRandomGeneratorSeed(void *g, unsigned long long seed);
int curandDestroyGenerator(void *g);
const char *cudaGetErrorString(int e);
const char *cudaGetErrorName(int e);
void **__cudaRegisterFatBinary(void *fat);
int main(void) {
    void *h = 0, *g = 0;
    if (cublasCreate_v2(&h) || !h) return 10;
    if (cublasSetStream_v2(h, (void *)0x1234)) return 11;
    if (cublasDgemmStridedBatched(h, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1) != 15)
        return 12;
    if (cublasDestroy_v2(h)) return 13;
    if (curandCreateGenerator(&g, 100) || !g) return 20;
    if (curandSetPseudoRandomGeneratorSeed(g, 42)) return 21;
    if (curandDestroyGenerator(g)) return 22;
    if (strcmp(cudaGetErrorString(801), "operation not supported")) return 30;
    if (strcmp(cudaGetErrorName(98), "cudaErrorInvalidDeviceFunction")) return 31;
    if (!__cudaRegisterFatBinary(0)) return 32;
    puts("ok");
    return 0;
}
"#,
    )
    .unwrap();
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .arg("-L")
        .arg(&dir)
        .args([
            "-l:libcublas.so.13",
            "-l:libcurand.so.10",
            "-l:libcudart.so.13",
        ])
        .arg(format!("-Wl,-rpath-link,{}", dir.display()))
        .status()
        .unwrap();
    assert!(status.success(), "compiling {}", src.display());
    let readelf = elf::read(&exe).unwrap();
    let imports = elf::cuda_imports(&readelf);
    assert!(
        imports
            .iter()
            .any(|i| i.name == "cublasCreate_v2" && i.version.as_deref() == Some("libcublas.so.13")),
        "{imports:?}"
    );
    let out = Command::new(&exe)
        .env("LD_LIBRARY_PATH", &dir)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout.starts_with(b"ok"),
        "{} exited {:?}: {}{}",
        exe.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
