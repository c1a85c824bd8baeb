//! The kernel modules: rdrop-kernels' CUDA kernels (`rdrop-kernels/src/cuda/*.cu`, unchanged)
//! compiled for the host by g++ with the shim of `shim/` (`cuda_shim.h` force-included, so a
//! `.cu` compiles as nvcc's device pass sees it: `__CUDACC__`, `__CUDA_ARCH__` = 900), one
//! shared object per `.cu` that the emulated driver dlopens (`shim/rdemu_api.h` is the ABI).
//!
//! For each `<module>.cu` (every `.cu` of the folder, so new modules are picked up):
//!
//! 1. **scan**: `g++ -E -P -DRDEMU_SCAN` with the shim, where `__global__` becomes the marker
//!    `RDEMU_KERNEL`; every `extern "C" RDEMU_KERNEL void NAME(PARAMS)` is a kernel, its
//!    parameter declarations split at top-level commas (the `decl` strings of the table);
//! 2. **generate** `OUT_DIR/kernels/gen_<module>.cpp`: `#include`s the `.cu` and
//!    `shim/kernel_table.h` and lists the kernels; sizes, pointer-ness and the packing come
//!    from the kernel's real signature (the compiler), and a `static_assert` per kernel makes a
//!    parameter count that differs from the scan's a build error naming the kernel;
//! 3. **compile** it twice, with `shim/asan_hooks.cpp` (never instrumented) linked in:
//!    - `OUT_DIR/kernels/<module>.so`: instrumented (GCC's `-fsanitize=kernel-address`, every
//!      load and store of kernel code calls a hook that forwards to `rdemu_api.check`);
//!    - `OUT_DIR/kernels/<module>.fast.so`: the same without instrumentation (memory checks off).
//!
//! Also `OUT_DIR/kernels/shim_selftest.so` (`shim/tests/shim_selftest.cpp`: the shim's bf16/f16
//! conversions as `rdemu_f2bf`, `rdemu_bf2f`, `rdemu_f2h`, `rdemu_h2f`, for
//! tests/shim_conversions.rs) and `OUT_DIR/kernels/modules.txt` (the module names, one a line).
//!
//! **Mutants** for the emulator's self-tests, each one module with one textual change (the
//! pattern is asserted to occur exactly once, so the build fails loudly when the source
//! changes), compiled instrumented into `OUT_DIR/kernels-mutants/<mutant>/<module>.so` (the
//! mutated sources beside it in `src/`; other modules are not built there):
//!
//! - `oob-read` (cast): `cast_f32_to_{f32,bf16,f16}` read `x[i + 1]` instead of `x[i]`, so
//!   the last thread (`i = n − 1`) reads one element past `x` (the launcher sizes `x` to exactly
//!   `n` elements);
//! - `no-barrier` (optim): `sum_squares_partials` loses its `__syncthreads()` between the warp
//!   leaders' stores to `__shared__ double warps[32]` and thread 0's reads of them (a
//!   shared-memory race with more than one warp per block);
//! - `shfl-width` (layernorm): `common.cuh`'s `sum16_in_order` shuffles with width 8 instead of
//!   16 (both of its `__shfl_sync`), so each half-warp sums two groups of 8 lanes wrongly
//!   (lanes 8..15 read lanes l mod 8 of their own group of 8); the mutated copy of common.cuh
//!   lies beside the copied `.cu`, which includes it first.
//!
//! Environment for the crate: `RDEMU_KERNELS_DIR` = `OUT_DIR/kernels`,
//! `RDEMU_KERNEL_MUTANTS_DIR` = `OUT_DIR/kernels-mutants`.
//!
//! The compiler: `RDEMU_CXX`, else `CXX` when it is GCC, else `g++` (GCC ≥ 11: the hooks and
//! `--param`s are GCC's). At most two compilations run at once.
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The flags of every module compilation (nvcc builds the kernels with --fmad=false; the host
/// twin of the math, `src/cuda/twin.cpp`, is compiled with -ffp-contract=off).
const COMMON_FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fPIC",
    "-fno-exceptions",
    "-fno-rtti",
    "-fvisibility=hidden",
    "-Wno-unknown-pragmas",
];

/// The instrumentation of the checked modules: a call per load/store (`__asan_load4_noabort`,
/// `__asan_store8_noabort`, ..., `__asan_loadN_noabort`), no shadow memory, no stack or global
/// redzones.
const ASAN_FLAGS: &[&str] = &[
    "-fsanitize=kernel-address",
    "--param",
    "asan-instrumentation-with-call-threshold=0",
    "--param",
    "asan-stack=0",
    "--param",
    "asan-globals=0",
    "-fno-sanitize-address-use-after-scope",
];

const LINK_FLAGS: &[&str] = &["-shared", "-Wl,-z,defs", "-Wl,--as-needed", "-ldl"];

/// At most this many compilations at once (a shared, small build machine).
const MAX_JOBS: usize = 2;

struct Mutant {
    name: &'static str,
    module: &'static str,
    /// The file changed: the module's `.cu` or one of the headers.
    file: &'static str,
    from: &'static str,
    to: &'static str,
}

const MUTANTS: &[Mutant] = &[
    Mutant {
        name: "oob-read",
        module: "cast",
        file: "cast.cu",
        from: "if (i < n) out[i] = rd::from_f32<T>(x[i]);",
        to: "if (i < n) out[i] = rd::from_f32<T>(x[i + 1]);",
    },
    Mutant {
        name: "no-barrier",
        module: "optim",
        file: "optim.cu",
        from: "    if (lane == 0) warps[wid] = acc;\n    __syncthreads();\n",
        to: "    if (lane == 0) warps[wid] = acc;\n",
    },
    Mutant {
        name: "shfl-width",
        module: "layernorm",
        file: "common.cuh",
        from: "    float s = __shfl_sync(0xffffffffu, v, 0, 16);\n#pragma unroll\n    for (int l = 1; l < 16; ++l) s += __shfl_sync(0xffffffffu, v, l, 16);",
        to: "    float s = __shfl_sync(0xffffffffu, v, 0, 8);\n#pragma unroll\n    for (int l = 1; l < 16; ++l) s += __shfl_sync(0xffffffffu, v, l, 8);",
    },
];

/// One `extern "C" __global__` kernel found by the scan.
struct Kernel {
    name: String,
    decls: Vec<String>,
}

/// One compilation of a generated file into a shared object.
struct Job {
    what: String,
    source: PathBuf,
    output: PathBuf,
    instrumented: bool,
    /// Extra objects linked in.
    objects: Vec<PathBuf>,
}

pub fn build() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let shim = manifest.join("shim");
    let cuda = manifest
        .join("../rdrop-kernels/src/cuda")
        .canonicalize()
        .expect("rdrop-kernels/src/cuda (the CUDA kernels) not found next to gpu-emu");
    let kdir = out_dir.join("kernels");
    let mdir = out_dir.join("kernels-mutants");
    for d in [&kdir, &mdir] {
        if d.exists() {
            fs::remove_dir_all(d).unwrap_or_else(|e| panic!("removing {}: {e}", d.display()));
        }
        fs::create_dir_all(d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    }
    println!("cargo:rustc-env=RDEMU_KERNELS_DIR={}", kdir.display());
    println!(
        "cargo:rustc-env=RDEMU_KERNEL_MUTANTS_DIR={}",
        mdir.display()
    );
    println!("cargo:rerun-if-env-changed=RDEMU_CXX");
    println!("cargo:rerun-if-env-changed=CXX");
    println!("cargo:rerun-if-changed={}", cuda.display());
    println!("cargo:rerun-if-changed={}", shim.display());
    for f in files(&shim, &["h", "cpp"])
        .into_iter()
        .chain(files(&shim.join("tests"), &["h", "cpp"]))
    {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let sources = files(&cuda, &["cu", "cuh"]);
    for f in &sources {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let modules: Vec<PathBuf> = sources
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    assert!(!modules.is_empty(), "no .cu files in {}", cuda.display());

    let cxx = compiler();
    let hooks = kdir.join("asan_hooks.o");
    run(
        Command::new(&cxx)
            .args(COMMON_FLAGS)
            .arg("-I")
            .arg(&shim)
            .arg("-c")
            .arg(shim.join("asan_hooks.cpp"))
            .arg("-o")
            .arg(&hooks),
        "asan_hooks.cpp",
    );

    let mut jobs = Vec::new();
    let mut names = String::new();
    for cu in &modules {
        let module = stem(cu);
        let kernels = scan(&cxx, &shim, cu);
        assert!(
            !kernels.is_empty(),
            "{}: no extern \"C\" __global__ kernels found",
            cu.display()
        );
        let gen = kdir.join(format!("gen_{module}.cpp"));
        write(&gen, &generate(cu, &kernels));
        writeln!(names, "{module}").unwrap();
        for instrumented in [true, false] {
            let suffix = if instrumented { "" } else { ".fast" };
            jobs.push(Job {
                what: format!("{module}{suffix}.so"),
                source: gen.clone(),
                output: kdir.join(format!("{module}{suffix}.so")),
                instrumented,
                objects: vec![hooks.clone()],
            });
        }
    }
    write(&kdir.join("modules.txt"), &names);

    for m in MUTANTS {
        let dir = mdir.join(m.name);
        let src = dir.join("src");
        fs::create_dir_all(&src).unwrap_or_else(|e| panic!("creating {}: {e}", src.display()));
        for f in files(&cuda, &["cuh"])
            .iter()
            .chain([&cuda.join(format!("{}.cu", m.module))])
        {
            let name = f.file_name().unwrap().to_str().unwrap();
            let mut text = read(f);
            if name == m.file {
                let count = text.matches(m.from).count();
                assert!(
                    count == 1,
                    "mutant {}: the pattern to change occurs {count} times in {} (want once): update build/kernels.rs",
                    m.name,
                    f.display()
                );
                text = text.replacen(m.from, m.to, 1);
            }
            write(&src.join(name), &text);
        }
        assert!(
            src.join(m.file).exists(),
            "mutant {}: {} not found in {}",
            m.name,
            m.file,
            cuda.display()
        );
        let cu = src.join(format!("{}.cu", m.module));
        let kernels = scan(&cxx, &shim, &cu);
        let gen = dir.join(format!("gen_{}.cpp", m.module));
        write(&gen, &generate(&cu, &kernels));
        jobs.push(Job {
            what: format!("mutant {} ({}.so)", m.name, m.module),
            source: gen,
            output: dir.join(format!("{}.so", m.module)),
            instrumented: true,
            objects: vec![hooks.clone()],
        });
    }

    jobs.push(Job {
        what: "shim_selftest.so".into(),
        source: shim.join("tests/shim_selftest.cpp"),
        output: kdir.join("shim_selftest.so"),
        instrumented: false,
        objects: vec![],
    });

    run_jobs(&cxx, &shim, jobs);
}

/// `RDEMU_CXX`, else `CXX` when it is GCC, else `g++`.
fn compiler() -> String {
    if let Ok(c) = env::var("RDEMU_CXX") {
        return c;
    }
    if let Ok(c) = env::var("CXX") {
        let gcc = Command::new(&c)
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Free Software Foundation"));
        if gcc {
            return c;
        }
    }
    "g++".into()
}

fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    v.sort();
    v
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .unwrap()
        .to_str()
        .expect("non-UTF-8 file name")
        .to_string()
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn write(p: &Path, text: &str) {
    fs::write(p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: running {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{what}: non-UTF-8 output: {e}"))
}

/// The kernels of a `.cu`: its preprocessed text (shim in scan mode), every
/// `extern "C" RDEMU_KERNEL void NAME(PARAMS)`.
fn scan(cxx: &str, shim: &Path, cu: &Path) -> Vec<Kernel> {
    let text = run(
        Command::new(cxx)
            .args([
                "-x",
                "c++",
                "-std=c++17",
                "-E",
                "-P",
                "-DRDEMU_SCAN",
                "-include",
            ])
            .arg(shim.join("cuda_shim.h"))
            .arg("-I")
            .arg(shim)
            .arg(cu),
        &format!("scanning {}", cu.display()),
    );
    parse_kernels(&text).unwrap_or_else(|e| panic!("scanning {}: {e}", cu.display()))
}

fn parse_kernels(text: &str) -> Result<Vec<Kernel>, String> {
    const MARK: &str = "RDEMU_KERNEL";
    if let Some(at) = text.find("extern RDEMU_SHARED") {
        let decl = text[at..]
            .lines()
            .next()
            .unwrap_or("")
            .replace("RDEMU_SHARED", "__shared__");
        return Err(format!(
            "`extern __shared__` (dynamic shared memory) is not supported by rdrop-gpu-emu: {decl}"
        ));
    }
    let mut kernels: Vec<Kernel> = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let before = rest[..at].trim_end();
        let after = &rest[at + MARK.len()..];
        rest = after;
        if !before.ends_with("extern \"C\"") {
            return Err(format!(
                "a __global__ function that is not `extern \"C\" __global__ void`: …{}",
                &after[..after.len().min(80)]
            ));
        }
        let sig = after.trim_start();
        let sig = sig
            .strip_prefix("void")
            .filter(|s| s.starts_with(char::is_whitespace))
            .ok_or_else(|| format!("a kernel not returning void: {}", &sig[..sig.len().min(80)]))?;
        let open = sig.find('(').ok_or("no parameter list")?;
        let name = sig[..open].trim().to_string();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("unexpected kernel name {name:?}"));
        }
        let mut depth = 0usize;
        let mut close = None;
        for (i, c) in sig[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.ok_or_else(|| format!("kernel {name}: unbalanced parameter list"))?;
        let decls = split_params(&sig[open + 1..close]);
        if kernels.iter().any(|k| k.name == name) {
            // a declaration before the definition
            continue;
        }
        kernels.push(Kernel { name, decls });
    }
    Ok(kernels)
}

/// The declarations of a parameter list, split at top-level commas, whitespace collapsed.
fn split_params(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in list.chars() {
        match c {
            '(' | '<' | '[' | '{' => depth += 1,
            ')' | '>' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    let out: Vec<String> = out
        .iter()
        .map(|d| d.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    if out.len() == 1 && (out[0].is_empty() || out[0] == "void") {
        return Vec::new();
    }
    out
}

fn c_string(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            _ => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `gen_<module>.cpp`: the `.cu`, then the kernel table.
fn generate(cu: &Path, kernels: &[Kernel]) -> String {
    let path = cu.to_str().expect("non-UTF-8 path");
    let mut s = String::new();
    writeln!(
        s,
        "// Generated by gpu-emu/build/kernels.rs from {path}: do not edit."
    )
    .unwrap();
    writeln!(s, "#include {}", c_string(path)).unwrap();
    writeln!(s, "#include \"kernel_table.h\"\n").unwrap();
    for k in kernels {
        writeln!(s, "RDEMU_CHECK_COUNT({}, {});", k.name, k.decls.len()).unwrap();
        if !k.decls.is_empty() {
            writeln!(s, "static const rdemu_param rdemu_params_{}[] = {{", k.name).unwrap();
            for (i, d) in k.decls.iter().enumerate() {
                writeln!(s, "    RDEMU_PARAM({}, {i}, {}),", k.name, c_string(d)).unwrap();
            }
            writeln!(s, "}};").unwrap();
        }
    }
    writeln!(s, "\nstatic const rdemu_kernel rdemu_kernels[] = {{").unwrap();
    for k in kernels {
        let params = if k.decls.is_empty() {
            "nullptr".to_string()
        } else {
            format!("rdemu_params_{}", k.name)
        };
        writeln!(s, "    RDEMU_KERNEL_ENTRY({}, {params}),", k.name).unwrap();
    }
    writeln!(s, "}};\n").unwrap();
    writeln!(s, "RDEMU_MODULE({}, rdemu_kernels)", c_string(path)).unwrap();
    s
}

fn run_jobs(cxx: &str, shim: &Path, jobs: Vec<Job>) {
    let queue = Mutex::new(jobs);
    let errors = Mutex::new(Vec::new());
    let n = env::var("NUM_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_JOBS)
        .clamp(1, MAX_JOBS);
    std::thread::scope(|sc| {
        for _ in 0..n {
            sc.spawn(|| loop {
                let Some(job) = queue.lock().unwrap().pop() else {
                    break;
                };
                let mut cmd = Command::new(cxx);
                cmd.args(COMMON_FLAGS);
                if job.instrumented {
                    cmd.args(ASAN_FLAGS);
                }
                cmd.arg("-include")
                    .arg(shim.join("cuda_shim.h"))
                    .arg("-I")
                    .arg(shim)
                    .args(["-x", "c++"])
                    .arg(&job.source)
                    .args(["-x", "none"])
                    .args(&job.objects)
                    .args(LINK_FLAGS)
                    .arg("-o")
                    .arg(&job.output);
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&mut cmd, &job.what)
                }));
                if let Err(e) = res {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| format!("{}: compilation failed", job.what));
                    errors.lock().unwrap().push(msg);
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        panic!(
            "building the kernel modules failed:\n{}",
            errors.join("\n\n")
        );
    }
}
