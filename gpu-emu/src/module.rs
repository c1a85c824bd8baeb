//! Modules: the images `cuModuleLoadData` receives (an nvcc cubin, a fat binary of cubins and
//! PTX, or PTX text) mapped to the kernels compiled for the host from the same `.cu` files
//! (`build/kernels.rs`).
//!
//! The image decides which kernels a module has and whether it may load on the device: a
//! cubin for `sm_XY` loads on devices of the same major version and minor ≥ Y (`sm_90a` on 9.0
//! only), PTX for `sm_XY` on any device of capability ≥ X.Y, as the driver's JIT; otherwise
//! `CUDA_ERROR_NO_BINARY_FOR_GPU` / `CUDA_ERROR_INVALID_PTX`. From a fat binary the driver
//! takes the best cubin that runs, else the best PTX ([`pick`]). A cubin also gives each
//! kernel's static shared memory (`.nv.shared.<name>`). Entries that no host module implements
//! (candle's own PTX kernels) load, and their launch is refused naming them.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::abi::{self, HostKernel, ParamInfo};
use crate::error::{
    EmuError, CUDA_ERROR_INVALID_IMAGE, CUDA_ERROR_INVALID_PTX, CUDA_ERROR_NOT_FOUND,
    CUDA_ERROR_NO_BINARY_FOR_GPU,
};

/// A loaded host kernel library (one `.cu` file).
pub struct HostLib {
    /// Its path.
    pub path: String,
    /// The module table.
    pub module: &'static abi::Module,
}

struct Libs {
    libs: Vec<HostLib>,
    by_name: HashMap<String, HostKernel>,
    problems: Vec<String>,
}

/// The folders searched for kernel modules, first wins: `RDROP_EMU_KERNELS` (`:`-separated),
/// then the build's own.
pub fn kernel_dirs() -> Vec<String> {
    let mut v: Vec<String> = crate::config::get()
        .kernels_dir
        .as_deref()
        .map(|s| s.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    if let Some(d) = option_env!("RDEMU_KERNELS_DIR") {
        v.push(d.to_string());
    }
    v
}

fn libs() -> MutexGuard<'static, Libs> {
    static L: OnceLock<Mutex<Libs>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(load_libs()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn load_libs() -> Libs {
    let fast = !crate::config::get().memcheck;
    let mut out = Libs {
        libs: Vec::new(),
        by_name: HashMap::new(),
        problems: Vec::new(),
    };
    for dir in kernel_dirs() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            out.problems
                .push(format!("kernel folder {dir} cannot be read"));
            continue;
        };
        let mut files: Vec<_> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.ends_with(".so") && n != "shim_selftest.so" && (n.ends_with(".fast.so") == fast)
            })
            .collect();
        files.sort();
        for p in files {
            match load_lib(&p.to_string_lossy()) {
                Ok(lib) => {
                    let idx = out.libs.len();
                    let m = lib.module;
                    let source = cstr(m.source);
                    for i in 0..m.nkernels as usize {
                        // SAFETY: the module's table has `nkernels` entries (ABI contract).
                        let k: &'static abi::Kernel = unsafe { &*m.kernels.add(i) };
                        let name = cstr(k.name);
                        if out.by_name.contains_key(&name) {
                            continue; // an earlier folder (a mutant) wins
                        }
                        let params = (0..k.nparams as usize)
                            .map(|j| {
                                // SAFETY: `nparams` entries.
                                let p = unsafe { &*k.params.add(j) };
                                ParamInfo {
                                    decl: cstr(p.decl),
                                    size: p.size as usize,
                                    is_pointer: p.is_pointer != 0,
                                }
                            })
                            .collect();
                        out.by_name.insert(
                            name.clone(),
                            HostKernel {
                                name,
                                source: source.clone(),
                                params,
                                entry: k,
                                lib: idx,
                                module: m,
                            },
                        );
                    }
                    out.libs.push(lib);
                }
                Err(e) => out.problems.push(e),
            }
        }
    }
    out
}

fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: NUL-terminated static strings of a kernel module.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn load_lib(path: &str) -> Result<HostLib, String> {
    let c = CString::new(path).map_err(|_| format!("{path}: bad path"))?;
    // SAFETY: loading a kernel module built by this crate's build script.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a static message or null.
        let msg = unsafe { libc::dlerror() };
        return Err(format!("{path}: {}", cstr(msg)));
    }
    // SAFETY: a symbol lookup on a live handle.
    let f = unsafe { libc::dlsym(h, c"rdemu_module_init".as_ptr()) };
    if f.is_null() {
        return Err(format!("{path}: no rdemu_module_init"));
    }
    // SAFETY: the ABI's signature of rdemu_module_init.
    let init: extern "C" fn(*const abi::Api) -> *const abi::Module =
        unsafe { std::mem::transmute(f) };
    let m = init(crate::launch::api());
    if m.is_null() {
        return Err(format!("{path}: rdemu_module_init returned null"));
    }
    // SAFETY: a static table of the module.
    let module: &'static abi::Module = unsafe { &*m };
    if module.version != abi::ABI_VERSION {
        return Err(format!(
            "{path}: ABI version {} (this emulator: {})",
            module.version,
            abi::ABI_VERSION
        ));
    }
    Ok(HostLib {
        path: path.to_string(),
        module,
    })
}

/// The host kernel called `name`.
pub fn host_kernel(name: &str) -> Option<HostKernel> {
    libs().by_name.get(name).cloned()
}

/// Problems met while loading the kernel modules (reported once).
pub fn lib_problems() -> Vec<String> {
    libs().problems.clone()
}

/// Number of host kernels available.
pub fn host_kernel_count() -> usize {
    libs().by_name.len()
}

// ------------------------------------------------------------------------------- images

/// What an image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Entry names.
    pub entries: Vec<String>,
    /// Static shared bytes per entry (cubins only).
    pub shared: HashMap<String, u64>,
    /// `(major, minor, arch-specific 'a')` of the target.
    pub target: (i32, i32, bool),
    /// Whether it is PTX (JIT) rather than SASS.
    pub ptx: bool,
}

fn rd16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn rd32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn rd64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Parses an nvcc cubin (ELF64).
pub fn parse_cubin(b: &[u8]) -> Option<Image> {
    if b.get(0..4)? != b"\x7fELF" || *b.get(4)? != 2 {
        return None;
    }
    let flags = rd32(b, 0x30)?;
    let sm = if flags & 0xff >= 20 {
        flags & 0xff
    } else {
        (flags >> 8) & 0xff
    };
    let shoff = rd64(b, 0x28)? as usize;
    let shentsize = rd16(b, 0x3a)? as usize;
    let shnum = rd16(b, 0x3c)? as usize;
    let shstrndx = rd16(b, 0x3e)? as usize;
    let sec = |i: usize| -> Option<(u32, u64, u64)> {
        let o = shoff + i * shentsize;
        Some((rd32(b, o)?, rd64(b, o + 0x18)?, rd64(b, o + 0x20)?))
    };
    let (_, stroff, strsize) = sec(shstrndx)?;
    let name_at = |off: u32| -> Option<String> {
        let start = stroff as usize + off as usize;
        let end = (stroff + strsize) as usize;
        let s = b.get(start..end)?;
        let n = s.iter().position(|&c| c == 0)?;
        Some(String::from_utf8_lossy(&s[..n]).into_owned())
    };
    let mut entries = Vec::new();
    let mut shared = HashMap::new();
    for i in 0..shnum {
        let (nm, _, size) = sec(i)?;
        let name = name_at(nm)?;
        if let Some(k) = name.strip_prefix(".nv.info.") {
            entries.push(k.to_string());
        } else if let Some(k) = name.strip_prefix(".nv.shared.") {
            shared.insert(k.to_string(), size);
        }
    }
    entries.sort();
    entries.dedup();
    Some(Image {
        entries,
        shared,
        target: (
            (sm / 10) as i32,
            (sm % 10) as i32,
            flags & 0x8 != 0 && sm >= 90,
        ),
        ptx: false,
    })
}

/// Parses PTX text: `.target sm_XY[a]` and the `.entry` names.
pub fn parse_ptx(text: &str) -> Option<Image> {
    let mut target = None;
    let mut entries = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(t) = l.strip_prefix(".target") {
            let t = t
                .trim()
                .split(|c: char| c == ',' || c.is_whitespace())
                .next()?;
            let t = t.strip_prefix("sm_")?;
            let arch_specific = t.ends_with('a') || t.ends_with('f');
            let v: i32 = t.trim_end_matches(['a', 'f']).parse().ok()?;
            target = Some((v / 10, v % 10, arch_specific));
        } else if let Some(pos) = l.find(".entry") {
            let rest = l[pos + 6..].trim();
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$')
                .collect();
            if !name.is_empty() {
                entries.push(name);
            }
        }
    }
    Some(Image {
        entries,
        shared: HashMap::new(),
        target: target?,
        ptx: true,
    })
}

/// The magic number of an nvcc fat binary.
const FATBIN_MAGIC: u32 = 0xba55_ed50;

/// Parses an nvcc fat binary (`nvcc -fatbin`): its cubins and PTX, each an [`Image`]. Entries
/// are a 64-byte (cubin) or longer (PTX) header — kind (1 PTX, 2 ELF), header size, payload
/// size, flags (bit 13: compressed) — followed by the payload. Compressed entries are refused
/// (rdrop builds with `--no-compress`): the emulator reads the entries' kernel names.
pub fn parse_fatbin(b: &[u8]) -> Result<Vec<Image>, String> {
    let bad = |what: &str| format!("a damaged fat binary ({what})");
    if rd32(b, 0) != Some(FATBIN_MAGIC) {
        return Err(bad("magic"));
    }
    let header = rd16(b, 6).ok_or_else(|| bad("header"))? as usize;
    let size = rd64(b, 8).ok_or_else(|| bad("header"))? as usize;
    let end = header
        .checked_add(size)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| bad("size"))?;
    let mut images = Vec::new();
    let mut at = header;
    while at + 64 <= end {
        let kind = rd16(b, at).ok_or_else(|| bad("entry"))?;
        let eh = rd32(b, at + 4).ok_or_else(|| bad("entry"))? as usize;
        let len = rd64(b, at + 8).ok_or_else(|| bad("entry"))? as usize;
        let arch = rd32(b, at + 28).ok_or_else(|| bad("entry"))?;
        let flags = rd64(b, at + 40).ok_or_else(|| bad("entry"))?;
        let payload = at
            .checked_add(eh)
            .and_then(|p| b.get(p..p.checked_add(len)?))
            .ok_or_else(|| bad("entry extent"))?;
        if flags & 0x2000 != 0 {
            return Err(format!(
                "a fat binary with compressed entries (sm_{arch}): not emulated (build with nvcc \
                 --no-compress)"
            ));
        }
        let img = match kind {
            1 => {
                let n = payload
                    .iter()
                    .position(|&c| c == 0)
                    .unwrap_or(payload.len());
                parse_ptx(&String::from_utf8_lossy(&payload[..n]))
            }
            2 => parse_cubin(payload),
            k => return Err(bad(&format!("entry kind {k}"))),
        };
        images.push(img.ok_or_else(|| bad(&format!("its sm_{arch} entry")))?);
        at += eh + len;
    }
    if images.is_empty() {
        return Err(bad("no entries"));
    }
    Ok(images)
}

/// Parses an image given to `cuModuleLoadData`: a cubin, a fat binary (its images) or
/// NUL-terminated PTX.
///
/// # Safety
/// `image` must point to a cubin or a fat binary (their headers give their extent) or a
/// NUL-terminated string.
pub unsafe fn parse_image(image: *const c_void) -> Result<Vec<Image>, EmuError> {
    let p = image as *const u8;
    if p.is_null() {
        return Err(EmuError::new(CUDA_ERROR_INVALID_IMAGE, "null image"));
    }
    let head = std::slice::from_raw_parts(p, 4);
    if head == b"\x7fELF" {
        // the extent: the section headers end the file
        let h = std::slice::from_raw_parts(p, 64);
        let shoff = rd64(h, 0x28).unwrap_or(0) as usize;
        let n = rd16(h, 0x3c).unwrap_or(0) as usize * rd16(h, 0x3a).unwrap_or(0) as usize;
        let len = shoff + n;
        let b = std::slice::from_raw_parts(p, len.max(64));
        return parse_cubin(b)
            .map(|i| vec![i])
            .ok_or_else(|| EmuError::new(CUDA_ERROR_INVALID_IMAGE, "a damaged cubin"));
    }
    if u32::from_le_bytes([head[0], head[1], head[2], head[3]]) == FATBIN_MAGIC {
        let h = std::slice::from_raw_parts(p, 16);
        let len = rd16(h, 6).unwrap_or(16) as usize + rd64(h, 8).unwrap_or(0) as usize;
        let b = std::slice::from_raw_parts(p, len.max(16));
        return parse_fatbin(b).map_err(|e| EmuError::new(CUDA_ERROR_INVALID_IMAGE, e));
    }
    let text = CStr::from_ptr(p as *const std::ffi::c_char).to_string_lossy();
    parse_ptx(&text).map(|i| vec![i]).ok_or_else(|| {
        EmuError::new(
            CUDA_ERROR_INVALID_PTX,
            "an image that is neither a cubin nor PTX with a .target",
        )
    })
}

/// The image the driver loads from `images` (one image, or a fat binary's) on a device of
/// capability `cc`: a cubin that runs there (the highest), else PTX it can JIT (the highest),
/// else the error of the driver naming what the images hold.
pub fn pick(images: Vec<Image>, cc: (i32, i32)) -> Result<Image, EmuError> {
    if images.len() == 1 {
        let img = images
            .into_iter()
            .next()
            .ok_or_else(|| EmuError::new(CUDA_ERROR_INVALID_IMAGE, "an empty image"))?;
        check_arch(&img, cc)?;
        return Ok(img);
    }
    let best = |ptx: bool| {
        images
            .iter()
            .filter(|i| i.ptx == ptx && check_arch(i, cc).is_ok())
            .max_by_key(|i| (i.target.0, i.target.1))
            .cloned()
    };
    if let Some(img) = best(false).or_else(|| best(true)) {
        if crate::config::get().log >= 1 {
            crate::error::report(&format!(
                "fat binary: {} {}{} for compute capability {}.{}",
                if img.ptx { "PTX" } else { "cubin" },
                if img.ptx { "compute_" } else { "sm_" },
                img.target.0 * 10 + img.target.1,
                cc.0,
                cc.1
            ));
        }
        return Ok(img);
    }
    let held: Vec<String> = images
        .iter()
        .map(|i| {
            format!(
                "{}{}",
                if i.ptx { "PTX compute_" } else { "cubin sm_" },
                i.target.0 * 10 + i.target.1
            )
        })
        .collect();
    Err(EmuError::new(
        CUDA_ERROR_NO_BINARY_FOR_GPU,
        format!(
            "no kernel image for compute capability {}.{} in a fat binary of {}",
            cc.0,
            cc.1,
            held.join(", ")
        ),
    ))
}

/// Whether `img` runs on a device of capability `cc` (the driver's rule).
pub fn check_arch(img: &Image, cc: (i32, i32)) -> Result<(), EmuError> {
    let (maj, min, specific) = img.target;
    let ok = if img.ptx {
        (cc.0, cc.1) >= (maj, min) && (!specific || (cc.0, cc.1) == (maj, min))
    } else {
        cc.0 == maj && cc.1 >= min && (!specific || cc.1 == min)
    };
    if ok {
        return Ok(());
    }
    let what = format!(
        "{} for sm_{maj}{min}{} on a device of compute capability {}.{}",
        if img.ptx { "PTX" } else { "a cubin" },
        if specific { "a" } else { "" },
        cc.0,
        cc.1
    );
    Err(if img.ptx {
        EmuError::new(CUDA_ERROR_INVALID_PTX, format!("cannot JIT {what}"))
    } else {
        EmuError::new(
            CUDA_ERROR_NO_BINARY_FOR_GPU,
            format!("no kernel image: {what}"),
        )
    })
}

// ------------------------------------------------------------------------- loaded modules

/// A module loaded in a context.
#[derive(Debug)]
pub struct LoadedModule {
    /// Its context.
    pub ctx: u64,
    /// The image's description.
    pub image: Image,
}

/// A function handle's target.
#[derive(Debug, Clone)]
pub struct Func {
    /// Its module.
    pub module: u64,
    /// Its context.
    pub ctx: u64,
    /// Its name.
    pub name: String,
    /// The host kernel, if one implements it.
    pub host: Option<HostKernel>,
    /// Static shared bytes (from the cubin, else the host module's thread-local block).
    pub static_shared: u64,
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
    pub max_dynamic_shared: u64,
}

struct Registry {
    modules: HashMap<u64, LoadedModule>,
    funcs: HashMap<u64, Func>,
    next: u64,
}

fn reg() -> MutexGuard<'static, Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| {
        Mutex::new(Registry {
            modules: HashMap::new(),
            funcs: HashMap::new(),
            next: 1,
        })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

/// Module handles' tag.
pub const MODULE_TAG: u64 = 0x6d6d_0000_0000;
/// Function handles' tag.
pub const FUNC_TAG: u64 = 0xf0f0_0000_0000;

/// Loads `image` into context `ctx` (on a device of capability `cc`).
pub fn load(ctx: u64, cc: (i32, i32), image: Image) -> Result<u64, EmuError> {
    check_arch(&image, cc)?;
    let mut r = reg();
    let id = r.next;
    r.next += 1;
    r.modules.insert(id, LoadedModule { ctx, image });
    Ok(MODULE_TAG | id)
}

/// Unloads a module.
pub fn unload(handle: u64) -> Result<(), EmuError> {
    let mut r = reg();
    let id = handle & 0xffff_ffff;
    if handle & !0xffff_ffff != MODULE_TAG || r.modules.remove(&id).is_none() {
        return Err(EmuError::new(
            crate::error::CUDA_ERROR_INVALID_HANDLE,
            format!("module {handle:#x} is not loaded"),
        ));
    }
    r.funcs.retain(|_, f| f.module != id);
    Ok(())
}

/// The function `name` of a module.
pub fn get_function(module: u64, name: &str) -> Result<u64, EmuError> {
    let mid = module & 0xffff_ffff;
    let (ctx, shared) = {
        let r = reg();
        let m = r
            .modules
            .get(&mid)
            .filter(|_| module & !0xffff_ffff == MODULE_TAG)
            .ok_or_else(|| {
                EmuError::new(
                    crate::error::CUDA_ERROR_INVALID_HANDLE,
                    format!("module {module:#x} is not loaded"),
                )
            })?;
        if !m.image.entries.iter().any(|e| e == name) {
            return Err(EmuError::new(
                CUDA_ERROR_NOT_FOUND,
                format!("cuModuleGetFunction: no kernel `{name}` in the module"),
            ));
        }
        (m.ctx, m.image.shared.get(name).copied())
    };
    let host = host_kernel(name);
    let static_shared = shared.unwrap_or(0);
    let mut r = reg();
    let id = r.next;
    r.next += 1;
    r.funcs.insert(
        id,
        Func {
            module: mid,
            ctx,
            name: name.to_string(),
            host,
            static_shared,
            max_dynamic_shared: 48 << 10,
        },
    );
    Ok(FUNC_TAG | id)
}

/// A function handle's target.
pub fn func(handle: u64) -> Result<Func, EmuError> {
    let r = reg();
    if handle & !0xffff_ffff != FUNC_TAG {
        return Err(bad_func(handle));
    }
    r.funcs
        .get(&(handle & 0xffff_ffff))
        .cloned()
        .ok_or_else(|| bad_func(handle))
}

/// Sets a function's maximum dynamic shared memory.
pub fn set_max_dynamic_shared(handle: u64, bytes: u64) -> Result<(), EmuError> {
    let mut r = reg();
    let f = r
        .funcs
        .get_mut(&(handle & 0xffff_ffff))
        .ok_or_else(|| bad_func(handle))?;
    f.max_dynamic_shared = bytes;
    Ok(())
}

fn bad_func(handle: u64) -> EmuError {
    EmuError::new(
        crate::error::CUDA_ERROR_INVALID_HANDLE,
        format!("function {handle:#x} is not a loaded kernel"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_targets_and_entries() {
        let img = parse_ptx(
            ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry fill_f32(\n.param .u64 p)\n{}\n.entry foo_bar(\n",
        )
        .unwrap();
        assert_eq!(img.entries, vec!["fill_f32", "foo_bar"]);
        assert_eq!(img.target, (8, 0, false));
        assert!(check_arch(&img, (9, 0)).is_ok());
        assert_eq!(
            check_arch(&img, (7, 5)).unwrap_err().code,
            CUDA_ERROR_INVALID_PTX
        );
        let img = parse_ptx(".target sm_90a\n.entry k(\n").unwrap();
        assert_eq!(img.target, (9, 0, true));
    }

    /// `tests/fixtures/tiny.fatbin` (nvcc, `make_fatbin.sh`): cubins for sm_75, 80 and 90 and
    /// PTX for compute_75; the driver's choice per GPU, and a refusal naming what it holds.
    #[test]
    fn fat_binaries_give_the_drivers_image_for_each_gpu() {
        let b = include_bytes!("../tests/fixtures/tiny.fatbin");
        let images = parse_fatbin(b).unwrap();
        let kinds: Vec<(bool, i32)> = images
            .iter()
            .map(|i| (i.ptx, i.target.0 * 10 + i.target.1))
            .collect();
        assert_eq!(
            kinds
                .iter()
                .filter(|k| !k.0)
                .map(|k| k.1)
                .collect::<Vec<_>>(),
            [75, 80, 90]
        );
        assert_eq!(
            kinds
                .iter()
                .filter(|k| k.0)
                .map(|k| k.1)
                .collect::<Vec<_>>(),
            [75]
        );
        for img in &images {
            let mut e = img.entries.clone();
            e.sort();
            assert_eq!(e, ["block_sum", "fill_f32"], "{img:?}");
        }
        let chosen = |cc| {
            let i = pick(images.clone(), cc).unwrap();
            (i.ptx, i.target.0 * 10 + i.target.1)
        };
        assert_eq!(chosen((7, 5)), (false, 75));
        assert_eq!(chosen((8, 0)), (false, 80));
        assert_eq!(chosen((8, 9)), (false, 80));
        assert_eq!(chosen((9, 0)), (false, 90));
        assert_eq!(chosen((12, 0)), (true, 75));
        let e = pick(images.clone(), (7, 0)).unwrap_err();
        assert_eq!(e.code, CUDA_ERROR_NO_BINARY_FOR_GPU);
        assert!(
            e.message.contains("7.0") && e.message.contains("cubin sm_75, cubin sm_80"),
            "{}",
            e.message
        );
        // a cubin's shared memory comes through the fat binary
        let sm80 = images
            .iter()
            .find(|i| !i.ptx && i.target == (8, 0, false))
            .unwrap();
        assert_eq!(sm80.shared.get("block_sum"), Some(&512));
        // damaged: truncated, or an entry claiming more than there is
        assert!(parse_fatbin(&b[..100]).is_err());
        let mut c = b.to_vec();
        c[16 + 8..16 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_fatbin(&c).is_err());
    }

    #[test]
    fn cubins_load_only_on_their_major_version() {
        let img = Image {
            entries: vec![],
            shared: HashMap::new(),
            target: (9, 0, false),
            ptx: false,
        };
        assert!(check_arch(&img, (9, 0)).is_ok());
        assert_eq!(
            check_arch(&img, (8, 0)).unwrap_err().code,
            CUDA_ERROR_NO_BINARY_FOR_GPU
        );
        let img = Image {
            target: (8, 0, false),
            ..img
        };
        assert!(check_arch(&img, (8, 6)).is_ok());
        assert!(check_arch(&img, (9, 0)).is_err());
    }
}
