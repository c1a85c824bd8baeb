//! The shell libraries: for every `symbols/<soname>.txt`, a shared object with that soname
//! whose every listed function is a trampoline `NAME: jmp rdemu_NAME@PLT`, versioned with the
//! node `<soname>` as the real library versions its exports (`libcublasLt.so.13` & co define
//! one node named after the soname). The trampolines forward whatever the arguments are
//! (signature-agnostic); the `rdemu_*` targets are exports of the emulated driver, the cdylib
//! installed as `libcuda.so.1` beside the shells, which each shell NEEDs (and finds through
//! `$ORIGIN`). Also gives the cdylib its soname `libcuda.so.1`.
//!
//! Output: `OUT_DIR/shells/<soname>` (`RDEMU_SHELLS_DIR` for the crate), built with the C
//! compiler of the `cc` crate; x86-64 Linux only (elsewhere: a warning and no shells).
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn build() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let lists = manifest.join("symbols");
    let shells = out.join("shells");
    println!("cargo:rerun-if-changed=build/shells.rs");
    println!("cargo:rerun-if-changed={}", lists.display());
    println!("cargo:rustc-env=RDEMU_SHELLS_DIR={}", shells.display());
    // The emulated driver is the cdylib: the binaries NEED it by this name.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");

    let _ = fs::remove_dir_all(&shells);
    fs::create_dir_all(&shells).expect("create OUT_DIR/shells");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch != "x86_64" || os != "linux" {
        println!("cargo:warning=rdrop-gpu-emu: shell libraries are x86-64 Linux only; none built for {arch}-{os}");
        return;
    }

    // A link-time stand-in for the emulated driver: an empty object with its soname, so that
    // every shell records DT_NEEDED libcuda.so.1 (the rdemu_* symbols stay undefined until
    // run time, when the real cdylib beside the shell defines them).
    let link_dir = out.join("shells-link");
    fs::create_dir_all(&link_dir).expect("create OUT_DIR/shells-link");
    let empty = link_dir.join("empty.s");
    fs::write(&empty, NOTE_GNU_STACK).expect("write empty.s");
    link(
        &empty,
        &link_dir.join("libcuda.so.1"),
        "libcuda.so.1",
        None,
        None,
    );

    let src_dir = out.join("shells-src");
    fs::create_dir_all(&src_dir).expect("create OUT_DIR/shells-src");
    let mut entries: Vec<PathBuf> = fs::read_dir(&lists)
        .unwrap_or_else(|e| panic!("{}: {e}", lists.display()))
        .map(|e| e.expect("read symbols/").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    entries.sort();
    for list in entries {
        let soname = list
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("symbol list name")
            .to_string();
        let names = read_list(&list);
        let asm = src_dir.join(format!("{soname}.s"));
        let script = src_dir.join(format!("{soname}.map"));
        fs::write(&asm, trampolines(&names)).expect("write shell assembly");
        fs::write(&script, version_script(&soname, &names)).expect("write version script");
        link(
            &asm,
            &shells.join(&soname),
            &soname,
            Some(&script),
            Some(&link_dir),
        );
    }
}

const NOTE_GNU_STACK: &str = "\t.section .note.GNU-stack,\"\",@progbits\n";

/// The symbols of a list: one a line, `#` starts a comment; each checked to be a C identifier
/// and listed once.
fn read_list(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut names: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        let ident = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        assert!(
            ident,
            "{}:{}: `{name}` is not a C identifier",
            path.display(),
            i + 1
        );
        assert!(
            !names.iter().any(|n| n == name),
            "{}:{}: `{name}` is listed twice",
            path.display(),
            i + 1
        );
        names.push(name.to_string());
    }
    assert!(!names.is_empty(), "{}: no symbols", path.display());
    names
}

/// One trampoline per symbol: a tail jump through the PLT to `rdemu_<name>`, which leaves
/// every argument register and the stack as the caller set them.
fn trampolines(names: &[String]) -> String {
    let mut s = String::from("\t.text\n");
    for n in names {
        let _ = write!(
            s,
            "\t.globl {n}\n\t.type {n},@function\n\t.p2align 4\n{n}:\n\tjmp rdemu_{n}@PLT\n\t.size {n}, .-{n}\n"
        );
    }
    s.push_str(NOTE_GNU_STACK);
    s
}

/// Every listed symbol in the node `<soname>`; nothing else exported.
fn version_script(soname: &str, names: &[String]) -> String {
    let mut s = format!("{soname} {{\n  global:\n");
    for n in names {
        let _ = writeln!(s, "    {n};");
    }
    s.push_str("  local: *;\n};\n");
    s
}

/// `cc -shared -nostdlib` of one assembly file into `out` with `soname`; with a version
/// script, and NEEDing the stub libcuda.so.1 of `link_dir` (found at run time in `$ORIGIN`).
fn link(src: &Path, out: &Path, soname: &str, script: Option<&Path>, link_dir: Option<&Path>) {
    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .opt_level(0)
        .debug(false)
        .get_compiler();
    let mut cmd: Command = compiler.to_command();
    cmd.args(["-shared", "-nostdlib", "-fPIC", "-Wl,-z,noexecstack"])
        .arg(format!("-Wl,-soname,{soname}"))
        .arg("-o")
        .arg(out)
        .arg(src);
    if let Some(script) = script {
        cmd.arg(format!("-Wl,--version-script={}", script.display()));
    }
    if let Some(dir) = link_dir {
        // No shell: `$ORIGIN` reaches the linker as written.
        cmd.arg("-Wl,-rpath,$ORIGIN")
            .arg("-Wl,--no-as-needed")
            .arg("-L")
            .arg(dir)
            .arg("-l:libcuda.so.1");
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {cmd:?}: {e}"));
    assert!(
        status.success(),
        "linking {} failed: {cmd:?}",
        out.display()
    );
}
