//! A minimal reader of the dynamic symbols of an ELF64 little-endian file (`.dynsym`,
//! `.dynstr`, `.gnu.version`, `.gnu.version_d`, `.gnu.version_r`, `.dynamic`), and the check of
//! `check-symbols`: every CUDA symbol a binary imports, against what the emulator exports.
//! Shared by the CLI and `tests/symbols.rs` (`#[path]`).
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One `.dynsym` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynSym {
    pub name: String,
    /// Defined here (`st_shndx != SHN_UNDEF`).
    pub defined: bool,
    /// The version name (its definition when defined, its requirement when undefined).
    pub version: Option<String>,
    /// For an undefined versioned symbol: the file its version is required from.
    pub file: Option<String>,
    /// `VERSYM_HIDDEN`: not the default version.
    pub hidden: bool,
}

/// What the dynamic linker sees of a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfInfo {
    pub soname: Option<String>,
    pub needed: Vec<String>,
    /// Version definitions (`.gnu.version_d`), base included.
    pub verdefs: Vec<String>,
    pub symbols: Vec<DynSym>,
}

impl ElfInfo {
    /// The defined symbol `name` of version `version` (`None`: the default or unversioned one).
    pub fn exports(&self, name: &str, version: Option<&str>) -> bool {
        self.symbols.iter().any(|s| {
            s.defined
                && s.name == name
                && match version {
                    Some(v) => s.version.as_deref() == Some(v),
                    None => !s.hidden,
                }
        })
    }
}

/// Reads and parses `path`.
pub fn read(path: &Path) -> Result<ElfInfo, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

struct Section {
    kind: u32,
    offset: usize,
    size: usize,
    link: usize,
    info: usize,
}

fn u16_at(b: &[u8], o: usize) -> Result<u16, String> {
    b.get(o..o + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("truncated at {o:#x}"))
}

fn u32_at(b: &[u8], o: usize) -> Result<u32, String> {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| format!("truncated at {o:#x}"))
}

fn u64_at(b: &[u8], o: usize) -> Result<u64, String> {
    b.get(o..o + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("truncated at {o:#x}"))
}

fn usize_at(b: &[u8], o: usize) -> Result<usize, String> {
    usize::try_from(u64_at(b, o)?).map_err(|_| format!("offset too large at {o:#x}"))
}

/// The NUL-terminated string at `off` of string table `strtab`.
fn str_at(b: &[u8], strtab: &Section, off: usize) -> Result<String, String> {
    let start = strtab.offset + off;
    let table_end = (strtab.offset + strtab.size).min(b.len());
    let s = b
        .get(start..table_end)
        .ok_or_else(|| format!("string offset {off:#x} out of its table"))?;
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    Ok(String::from_utf8_lossy(&s[..end]).into_owned())
}

const SHT_DYNAMIC: u32 = 6;
const SHT_DYNSYM: u32 = 11;
const SHT_GNU_VERDEF: u32 = 0x6fff_fffd;
const SHT_GNU_VERNEED: u32 = 0x6fff_fffe;
const SHT_GNU_VERSYM: u32 = 0x6fff_ffff;

/// Parses the dynamic symbols of an ELF64 little-endian image.
pub fn parse(b: &[u8]) -> Result<ElfInfo, String> {
    if b.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file".into());
    }
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let shoff = usize_at(b, 0x28)?;
    let shentsize = usize::from(u16_at(b, 0x3a)?);
    let shnum = usize::from(u16_at(b, 0x3c)?);
    let mut sections = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let o = shoff + i * shentsize;
        sections.push(Section {
            kind: u32_at(b, o + 4)?,
            offset: usize_at(b, o + 24)?,
            size: usize_at(b, o + 32)?,
            link: u32_at(b, o + 40)? as usize,
            info: u32_at(b, o + 44)? as usize,
        });
    }
    let find = |kind: u32| sections.iter().find(|s| s.kind == kind);
    let linked = |s: &Section| {
        sections
            .get(s.link)
            .ok_or_else(|| format!("bad section link {}", s.link))
    };
    let mut info = ElfInfo::default();

    if let Some(dynamic) = find(SHT_DYNAMIC) {
        let strtab = linked(dynamic)?;
        for o in (dynamic.offset..dynamic.offset + dynamic.size).step_by(16) {
            let (tag, val) = (u64_at(b, o)?, usize_at(b, o + 8)?);
            match tag {
                0 => break,
                1 => info.needed.push(str_at(b, strtab, val)?),
                14 => info.soname = Some(str_at(b, strtab, val)?),
                _ => {}
            }
        }
    }

    // version index -> (name, file it is needed from)
    let mut versions: HashMap<u16, (String, Option<String>)> = HashMap::new();
    if let Some(verdef) = find(SHT_GNU_VERDEF) {
        let strtab = linked(verdef)?;
        let mut o = verdef.offset;
        for _ in 0..verdef.info {
            let ndx = u16_at(b, o + 4)?;
            let aux = u32_at(b, o + 12)? as usize;
            let name = str_at(b, strtab, u32_at(b, o + aux)? as usize)?;
            info.verdefs.push(name.clone());
            versions.insert(ndx, (name, None));
            let next = u32_at(b, o + 16)? as usize;
            if next == 0 {
                break;
            }
            o += next;
        }
    }
    if let Some(verneed) = find(SHT_GNU_VERNEED) {
        let strtab = linked(verneed)?;
        let mut o = verneed.offset;
        for _ in 0..verneed.info {
            let cnt = u16_at(b, o + 2)?;
            let file = str_at(b, strtab, u32_at(b, o + 4)? as usize)?;
            let mut a = o + u32_at(b, o + 8)? as usize;
            for _ in 0..cnt {
                let other = u16_at(b, a + 6)?;
                let name = str_at(b, strtab, u32_at(b, a + 8)? as usize)?;
                versions.insert(other, (name, Some(file.clone())));
                let next = u32_at(b, a + 12)? as usize;
                if next == 0 {
                    break;
                }
                a += next;
            }
            let next = u32_at(b, o + 12)? as usize;
            if next == 0 {
                break;
            }
            o += next;
        }
    }

    let Some(dynsym) = find(SHT_DYNSYM) else {
        return Ok(info);
    };
    let strtab = linked(dynsym)?;
    let versym = find(SHT_GNU_VERSYM);
    for i in 1..dynsym.size / 24 {
        let o = dynsym.offset + i * 24;
        let name = str_at(b, strtab, u32_at(b, o)? as usize)?;
        let shndx = u16_at(b, o + 6)?;
        let raw = match versym {
            Some(v) => u16_at(b, v.offset + 2 * i)?,
            None => 1,
        };
        let (version, file) = match raw & 0x7fff {
            0 | 1 => (None, None),
            ndx => versions
                .get(&ndx)
                .cloned()
                .map(|(n, f)| (Some(n), f))
                .ok_or_else(|| format!("symbol {name}: unknown version index {ndx}"))?,
        };
        info.symbols.push(DynSym {
            name,
            defined: shndx != 0,
            version,
            file,
            hidden: raw & 0x8000 != 0,
        });
    }
    Ok(info)
}

/// The libraries of the CUDA stack (the emulator's to provide): `libcu*`, `libnv*`,
/// `libnccl*`.
pub fn is_cuda_library(file: &str) -> bool {
    ["libcu", "libnv", "libnccl"]
        .iter()
        .any(|p| file.starts_with(p))
}

/// A symbol a binary takes from the CUDA stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub name: String,
    pub version: Option<String>,
    /// The file that must export it.
    pub library: String,
}

/// The CUDA imports of a binary: undefined symbols versioned against a CUDA library, and
/// unversioned driver symbols (`cu[A-Z]…`, from `libcuda.so.1`, which has no versions).
pub fn cuda_imports(binary: &ElfInfo) -> Vec<Import> {
    let driver = |n: &str| {
        n.strip_prefix("cu")
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_uppercase()))
    };
    binary
        .symbols
        .iter()
        .filter(|s| !s.defined)
        .filter_map(|s| {
            let library = match (&s.file, &s.version) {
                (Some(f), _) if is_cuda_library(f) => f.clone(),
                (None, None) if driver(&s.name) => "libcuda.so.1".to_string(),
                _ => return None,
            };
            Some(Import {
                name: s.name.clone(),
                version: s.version.clone(),
                library,
            })
        })
        .collect()
}

/// The outcome of checking one binary.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per import no emulated file exports (and per CUDA library not provided).
    pub missing: Vec<String>,
    /// Imports found, per library.
    pub found: BTreeMap<String, usize>,
}

/// Checks `binary` (named `label` in the lines) against the emulated files: `provided(lib)`
/// is the parsed file the emulator installs under that name, `None` where it has none.
pub fn check(label: &str, binary: &ElfInfo, provided: &dyn Fn(&str) -> Option<ElfInfo>) -> Report {
    let mut report = Report::default();
    let mut libs: BTreeMap<String, Option<ElfInfo>> = BTreeMap::new();
    for lib in binary.needed.iter().filter(|l| is_cuda_library(l)) {
        let file = libs.entry(lib.clone()).or_insert_with(|| provided(lib));
        if file.is_none() {
            report.missing.push(format!(
                "{label}: needs {lib}, which the emulator does not provide"
            ));
        }
    }
    for import in cuda_imports(binary) {
        let file = libs
            .entry(import.library.clone())
            .or_insert_with(|| provided(&import.library));
        if file
            .as_ref()
            .is_some_and(|f| f.exports(&import.name, import.version.as_deref()))
        {
            *report.found.entry(import.library).or_default() += 1;
        } else {
            let versioned = match &import.version {
                Some(v) => format!("{}@{v}", import.name),
                None => import.name.clone(),
            };
            report.missing.push(format!(
                "{label}: needs {versioned} from {}, which the emulator does not export",
                import.library
            ));
        }
    }
    report
}

/// [`check`] against the files of an install folder.
pub fn check_dir(label: &str, binary: &ElfInfo, dir: &Path) -> Report {
    check(label, binary, &|lib| {
        let path = dir.join(lib);
        path.exists().then(|| read(&path).ok()).flatten()
    })
}
