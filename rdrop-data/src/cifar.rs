//! CIFAR-10 / CIFAR-100 "python version" datasets: the `.tar.gz` read as a stream, or the
//! extracted folder, decoded with the restricted [`crate::pickle`] reader.
//!
//! CIFAR-100 (`cifar-100-python/`): `train` (50000), `test` (10000) and `meta`
//! (`fine_label_names`, `coarse_label_names`); each batch is a dict with `data` (N×3072 uint8:
//! the R plane, then G, then B, 32×32 row-major each), `fine_labels`, `coarse_labels`,
//! `filenames`. CIFAR-10 (`cifar-10-batches-py/`): `data_batch_1..5`, `test_batch` (key
//! `labels`) and `batches.meta` (`label_names`). The format is detected from the files present.
//! The number of classes always comes from the meta file.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::pickle::{self, Buf, Value};
use std::rc::Rc;

/// Side of a CIFAR image in pixels.
pub const SIDE: usize = 32;
/// Bytes per image: 3 channels × 32 × 32.
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;

/// Which dataset layout was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `train` / `test` / `meta`, fine and coarse labels.
    Cifar100,
    /// `data_batch_1..5` / `test_batch` / `batches.meta`, one label per image.
    Cifar10,
}

impl Format {
    /// `"cifar100"` or `"cifar10"`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Cifar100 => "cifar100",
            Format::Cifar10 => "cifar10",
        }
    }
}

/// One split (train or test): images as stored in the file plus labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// N×3×32×32 bytes, CHW (the file's own layout), image after image.
    pub images: Vec<u8>,
    /// Fine label of each image (CIFAR-10: its only label), `< num_classes`.
    pub fine_labels: Vec<u16>,
    /// Coarse label of each image (CIFAR-100 only; empty for CIFAR-10).
    pub coarse_labels: Vec<u16>,
    /// File name of each image as stored in the pickle (may be empty if absent).
    pub filenames: Vec<String>,
    /// Number of fine classes (from the meta file).
    pub num_classes: usize,
    /// Number of coarse classes (0 for CIFAR-10).
    pub num_coarse_classes: usize,
}

impl Split {
    /// Build a split from parts, checking sizes and label ranges.
    pub fn new(
        images: Vec<u8>,
        fine_labels: Vec<u16>,
        num_classes: usize,
        name_for_errors: &str,
    ) -> Result<Split> {
        let s = Split {
            images,
            fine_labels,
            coarse_labels: Vec::new(),
            filenames: Vec::new(),
            num_classes,
            num_coarse_classes: 0,
        };
        s.check(name_for_errors)?;
        Ok(s)
    }

    /// `n` images of uniformly random pixels with labels `i % num_classes` (for benchmarks).
    pub fn random(n: usize, num_classes: usize, seed: u64) -> Split {
        use rand::{RngCore, SeedableRng};
        let mut images = vec![0u8; n * IMAGE_BYTES];
        rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut images);
        let num_classes = num_classes.max(1);
        Split {
            images,
            fine_labels: (0..n).map(|i| (i % num_classes) as u16).collect(),
            coarse_labels: Vec::new(),
            filenames: Vec::new(),
            num_classes,
            num_coarse_classes: 0,
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.fine_labels.len()
    }

    /// True when the split holds no image.
    pub fn is_empty(&self) -> bool {
        self.fine_labels.is_empty()
    }

    /// Number of fine classes (from the meta file).
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The `i`-th image, 3×32×32 CHW bytes. Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Check sizes and label ranges; `name` is used in the error.
    pub fn check(&self, name: &str) -> Result<()> {
        let n = self.fine_labels.len();
        if self.images.len() != n * IMAGE_BYTES {
            return Err(DataError::content(
                name,
                format!(
                    "{} pixel bytes for {n} labels (expected {n}×{IMAGE_BYTES})",
                    self.images.len()
                ),
            ));
        }
        check_labels(name, "fine label", &self.fine_labels, self.num_classes)?;
        if !self.coarse_labels.is_empty() || self.num_coarse_classes > 0 {
            if self.coarse_labels.len() != n {
                return Err(DataError::content(
                    name,
                    format!("{} coarse labels for {n} images", self.coarse_labels.len()),
                ));
            }
            check_labels(
                name,
                "coarse label",
                &self.coarse_labels,
                self.num_coarse_classes,
            )?;
        }
        if !self.filenames.is_empty() && self.filenames.len() != n {
            return Err(DataError::content(
                name,
                format!("{} filenames for {n} images", self.filenames.len()),
            ));
        }
        Ok(())
    }
}

fn check_labels(name: &str, what: &str, labels: &[u16], classes: usize) -> Result<()> {
    match labels.iter().position(|&l| l as usize >= classes) {
        Some(i) => Err(DataError::content(
            name,
            format!(
                "{what} {} of image {i} is out of range (the meta file names {classes} classes)",
                labels[i]
            ),
        )),
        None => Ok(()),
    }
}

/// A decoded dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cifar {
    /// Layout found.
    pub format: Format,
    /// Training split (CIFAR-10: the five data batches in order).
    pub train: Split,
    /// Test split.
    pub test: Split,
    /// Fine class names (CIFAR-10: `label_names`).
    pub fine_label_names: Vec<String>,
    /// Coarse class names (empty for CIFAR-10).
    pub coarse_label_names: Vec<String>,
}

const CIFAR100_FILES: [&str; 3] = ["train", "test", "meta"];
const CIFAR10_FILES: [&str; 7] = [
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
];
const SUBFOLDERS: [&str; 2] = ["cifar-100-python", "cifar-10-batches-py"];

/// One decoded CIFAR pickle file (see [`decode_file`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A data batch (`train`, `test`, `data_batch_N`, `test_batch`).
    Batch(RawBatch),
    /// A meta file (`meta`, `batches.meta`).
    Meta {
        /// `fine_label_names` (CIFAR-10: `label_names`).
        fine: Vec<String>,
        /// `coarse_label_names` (empty for CIFAR-10).
        coarse: Vec<String>,
    },
}

/// A data batch as stored, before the labels are checked against the meta file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBatch {
    /// Where it came from (for errors).
    pub file: String,
    /// N×3072 pixel bytes.
    pub images: Vec<u8>,
    /// `fine_labels` (CIFAR-10: `labels`).
    pub fine: Vec<i64>,
    /// `coarse_labels` (CIFAR-100 only).
    pub coarse: Option<Vec<i64>>,
    /// `filenames` (empty if absent).
    pub filenames: Vec<String>,
}

impl Cifar {
    /// Number of fine classes: as many as there are names (the meta file's), or the training
    /// split's number where a dataset built in memory has more.
    pub fn num_classes(&self) -> usize {
        self.fine_label_names.len().max(self.train.num_classes())
    }

    /// Open a dataset: a `.tar.gz` archive (streamed, nothing extracted) or an extracted
    /// folder (the `cifar-100-python` / `cifar-10-batches-py` folder or its parent).
    pub fn open(path: &Path) -> Result<Cifar> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_dir() {
            Self::open_dir(path)
        } else {
            let f = std::fs::File::open(path).map_err(io)?;
            Self::from_tar_gz_reader(std::io::BufReader::new(f), &path.display().to_string())
        }
    }

    /// Decode a `.tar.gz` stream (e.g. an archive embedded with `include_bytes!`).
    /// `name_for_errors` names the archive in errors.
    pub fn from_tar_gz_reader(r: impl Read, name_for_errors: &str) -> Result<Cifar> {
        let archive_err = |message: String| DataError::Archive {
            archive: name_for_errors.to_string(),
            message,
        };
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(r));
        let mut found: BTreeMap<&'static str, Decoded> = BTreeMap::new();
        let entries = ar.entries().map_err(|e| archive_err(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| archive_err(e.to_string()))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry
                .path()
                .map_err(|e| archive_err(e.to_string()))?
                .into_owned();
            let Some(base) = path.file_name().and_then(|b| b.to_str()) else {
                continue;
            };
            let Some(key) = known_name(base) else {
                continue;
            };
            let member = format!("{name_for_errors}:{}", path.display());
            if found.contains_key(key) {
                return Err(archive_err(format!("two members named `{key}`")));
            }
            let size = entry.size();
            let mut buf = Vec::with_capacity(size.min(1 << 28) as usize);
            entry
                .read_to_end(&mut buf)
                .map_err(|e| archive_err(format!("reading {}: {e}", path.display())))?;
            if buf.len() as u64 != size {
                return Err(archive_err(format!(
                    "member {} is cut short ({} of {size} bytes)",
                    path.display(),
                    buf.len()
                )));
            }
            found.insert(key, decode_file(&buf, &member)?);
        }
        // Read to the end so that a cut-off gzip stream (missing CRC trailer) is an error
        // even when every member we need was complete.
        let mut gz = ar.into_inner();
        std::io::copy(&mut gz, &mut std::io::sink())
            .map_err(|e| archive_err(format!("after the last member: {e}")))?;
        assemble(found, name_for_errors)
    }

    /// Read an extracted folder.
    pub fn open_dir(dir: &Path) -> Result<Cifar> {
        let has = |d: &Path, f: &str| d.join(f).is_file();
        let mut root = dir.to_path_buf();
        if !has(&root, "meta") && !has(&root, "batches.meta") {
            if let Some(sub) = SUBFOLDERS.iter().map(|s| dir.join(s)).find(|p| p.is_dir()) {
                root = sub;
            }
        }
        let names: &[&'static str] = if has(&root, "batches.meta") && !has(&root, "meta") {
            &CIFAR10_FILES
        } else {
            &CIFAR100_FILES
        };
        let missing: Vec<&str> = names.iter().copied().filter(|f| !has(&root, f)).collect();
        if !missing.is_empty() {
            return Err(DataError::NotCifar {
                location: root.display().to_string(),
                message: format!(
                    "missing {} (CIFAR-100 needs train, test, meta; CIFAR-10 needs \
                     data_batch_1..5, test_batch, batches.meta)",
                    missing.join(", ")
                ),
            });
        }
        let mut found = BTreeMap::new();
        for &name in names {
            let p = root.join(name);
            let bytes = std::fs::read(&p).map_err(|source| DataError::Io {
                path: p.clone(),
                source,
            })?;
            found.insert(name, decode_file(&bytes, &p.display().to_string())?);
        }
        assemble(found, &root.display().to_string())
    }
}

fn known_name(base: &str) -> Option<&'static str> {
    CIFAR100_FILES
        .iter()
        .chain(CIFAR10_FILES.iter())
        .find(|&&n| n == base)
        .copied()
}

/// Decode one CIFAR pickle file (a data batch or a meta file, told apart by its keys).
/// `file` names it in errors. Nothing in the file is executed.
pub fn decode_file(bytes: &[u8], file: &str) -> Result<Decoded> {
    let root = pickle::parse(bytes, file)?;
    if !matches!(root, Value::Dict(_)) {
        let kind = root.kind();
        pickle::dismantle(root);
        return Err(DataError::content(
            file,
            format!("top-level object is a {kind}, not a dict"),
        ));
    }
    let out = decode_root(&root, file);
    pickle::dismantle(root);
    out
}

fn decode_root(root: &Value<'_>, file: &str) -> Result<Decoded> {
    if root.get("data").is_some() {
        decode_batch(root, file).map(Decoded::Batch)
    } else if root.get("fine_label_names").is_some() {
        Ok(Decoded::Meta {
            fine: string_list(root, "fine_label_names", file)?,
            coarse: string_list(root, "coarse_label_names", file)?,
        })
    } else if root.get("label_names").is_some() {
        Ok(Decoded::Meta {
            fine: string_list(root, "label_names", file)?,
            coarse: Vec::new(),
        })
    } else {
        Err(DataError::content(
            file,
            "neither a data batch (`data`) nor a meta file (`fine_label_names` / `label_names`)",
        ))
    }
}

fn required<'a>(root: &Value<'a>, key: &str, file: &str) -> Result<Value<'a>> {
    root.get(key)
        .ok_or_else(|| DataError::content(file, format!("no `{key}` entry in the dict")))
}

fn string_list(root: &Value<'_>, key: &str, file: &str) -> Result<Vec<String>> {
    let v = required(root, key, file)?;
    let items = v.items().ok_or_else(|| {
        DataError::content(file, format!("`{key}` is a {}, not a list", v.kind()))
    })?;
    items
        .iter()
        .map(|s| {
            s.as_text()
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .ok_or_else(|| DataError::content(file, format!("`{key}` holds a {}", s.kind())))
        })
        .collect()
}

fn int_list(root: &Value<'_>, key: &str, file: &str) -> Result<Vec<i64>> {
    let v = required(root, key, file)?;
    if let Value::Array(a) = &v {
        let a = a.borrow();
        let dt = a.dtype.as_ref().map(|d| d.name.as_str()).unwrap_or("");
        let width = match dt.trim_start_matches(['<', '|', '=']) {
            "u1" | "i1" | "uint8" | "int8" => 1,
            "u2" | "i2" => 2,
            "u4" | "i4" => 4,
            "u8" | "i8" | "int64" => 8,
            other => {
                return Err(DataError::content(
                    file,
                    format!("`{key}` has dtype {other}, expected integers"),
                ))
            }
        };
        let signed = dt.contains('i');
        let data = a.data.as_ref().map(|b| b.as_slice()).unwrap_or_default();
        if a.shape.len() != 1 || data.len() != a.shape[0] * width {
            return Err(DataError::content(
                file,
                format!("`{key}` is not a 1-D array"),
            ));
        }
        return Ok(data
            .chunks_exact(width)
            .map(|c| {
                let mut v = c.iter().rev().fold(0i64, |acc, &b| (acc << 8) | b as i64);
                if signed && width < 8 && c[width - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * width);
                }
                v
            })
            .collect());
    }
    let items = v.items().ok_or_else(|| {
        DataError::content(file, format!("`{key}` is a {}, not a list", v.kind()))
    })?;
    items
        .iter()
        .map(|x| match x {
            Value::Int(i) => Ok(*i),
            other => Err(DataError::content(
                file,
                format!("`{key}` holds a {}, not an integer", other.kind()),
            )),
        })
        .collect()
}

fn decode_batch(root: &Value<'_>, file: &str) -> Result<RawBatch> {
    let data = required(root, "data", file)?;
    let Value::Array(arr_rc) = &data else {
        return Err(DataError::content(
            file,
            format!("`data` is a {}, not a numpy array", data.kind()),
        ));
    };
    let arr = arr_rc.borrow();
    let dt = arr.dtype.as_ref().map(|d| d.name.as_str()).unwrap_or("?");
    if !matches!(dt, "u1" | "|u1" | "uint8") {
        return Err(DataError::content(
            file,
            format!("`data` has dtype {dt}, expected uint8 (u1)"),
        ));
    }
    let n = match arr.shape.as_slice() {
        [n, 3072] => *n,
        [n, 3, 32, 32] => *n,
        s => {
            return Err(DataError::content(
                file,
                format!("`data` has shape {s:?}, expected (N, 3072)"),
            ))
        }
    };
    if arr.fortran && n > 1 {
        return Err(DataError::content(file, "`data` is in Fortran order"));
    }
    let raw = arr.data.as_ref().map(|b| b.as_slice()).unwrap_or_default();
    if raw.len() != n * IMAGE_BYTES {
        return Err(DataError::content(
            file,
            format!(
                "`data` holds {} bytes, shape ({n}, 3072) needs {}",
                raw.len(),
                n * IMAGE_BYTES
            ),
        ));
    }
    drop(arr);
    let (fine, coarse) = if root.get("fine_labels").is_some() {
        (
            int_list(root, "fine_labels", file)?,
            Some(int_list(root, "coarse_labels", file)?),
        )
    } else {
        (int_list(root, "labels", file)?, None)
    };
    for (what, l) in [("labels", Some(&fine)), ("coarse_labels", coarse.as_ref())] {
        if let Some(l) = l {
            if l.len() != n {
                return Err(DataError::content(
                    file,
                    format!("{} {what} for {n} images", l.len()),
                ));
            }
        }
    }
    let filenames = if root.get("filenames").is_some() {
        string_list(root, "filenames", file)?
    } else {
        Vec::new()
    };
    // Move the pixels out when they were built (protocol 2 `_codecs.encode`): no third copy.
    let taken = arr_rc.borrow_mut().data.take();
    let images = match taken {
        Some(Buf::Owned(rc)) => Rc::try_unwrap(rc).unwrap_or_else(|rc| rc.to_vec()),
        Some(Buf::Borrowed(b)) => b.to_vec(),
        None => Vec::new(),
    };
    if images.len() != n * IMAGE_BYTES {
        return Err(DataError::content(file, "`data` changed while decoding"));
    }
    Ok(RawBatch {
        file: file.to_string(),
        images,
        fine,
        coarse,
        filenames,
    })
}

fn to_labels(file: &str, what: &str, v: &[i64], classes: usize) -> Result<Vec<u16>> {
    v.iter()
        .enumerate()
        .map(|(i, &l)| {
            if l < 0 || l as u64 >= classes as u64 {
                Err(DataError::content(
                    file,
                    format!("{what} {l} of image {i} is out of range (the meta file names {classes} classes)"),
                ))
            } else {
                Ok(l as u16)
            }
        })
        .collect()
}

fn make_split(batches: Vec<RawBatch>, fine_n: usize, coarse_n: usize) -> Result<Split> {
    let total: usize = batches.iter().map(|b| b.fine.len()).sum();
    let mut s = Split {
        images: Vec::with_capacity(total * IMAGE_BYTES),
        fine_labels: Vec::with_capacity(total),
        coarse_labels: Vec::new(),
        filenames: Vec::new(),
        num_classes: fine_n,
        num_coarse_classes: coarse_n,
    };
    let single = batches.len() == 1;
    for b in batches {
        s.fine_labels
            .extend(to_labels(&b.file, "label", &b.fine, fine_n)?);
        if let Some(c) = &b.coarse {
            s.coarse_labels
                .extend(to_labels(&b.file, "coarse label", c, coarse_n)?);
        }
        s.filenames.extend(b.filenames);
        if single {
            s.images = b.images;
        } else {
            s.images.extend_from_slice(&b.images);
        }
    }
    if s.filenames.len() != s.fine_labels.len() {
        s.filenames.clear();
    }
    Ok(s)
}

fn assemble(mut found: BTreeMap<&'static str, Decoded>, location: &str) -> Result<Cifar> {
    let not_cifar = |message: String| DataError::NotCifar {
        location: location.to_string(),
        message,
    };
    let cifar10 = !found.contains_key("meta")
        && (found.contains_key("batches.meta")
            || CIFAR10_FILES.iter().any(|f| found.contains_key(f)));
    let (format, files): (Format, &[&str]) = if cifar10 {
        (Format::Cifar10, &CIFAR10_FILES)
    } else {
        (Format::Cifar100, &CIFAR100_FILES)
    };
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| !found.contains_key(f))
        .collect();
    if !missing.is_empty() {
        return Err(not_cifar(format!(
            "{} layout, but missing {}",
            format.name(),
            missing.join(", ")
        )));
    }
    let meta_key = if format == Format::Cifar100 {
        "meta"
    } else {
        "batches.meta"
    };
    let (fine_names, coarse_names) = match found.remove(meta_key) {
        Some(Decoded::Meta { fine, coarse }) => (fine, coarse),
        _ => return Err(not_cifar(format!("`{meta_key}` is not a meta file"))),
    };
    if fine_names.is_empty() {
        return Err(not_cifar(format!("`{meta_key}` names no classes")));
    }
    let mut take = |k: &str| match found.remove(k) {
        Some(Decoded::Batch(b)) => Ok(b),
        _ => Err(not_cifar(format!("`{k}` is not a data batch"))),
    };
    let (train, test) = match format {
        Format::Cifar100 => (vec![take("train")?], vec![take("test")?]),
        Format::Cifar10 => (
            CIFAR10_FILES[..5]
                .iter()
                .map(|k| take(k))
                .collect::<Result<Vec<_>>>()?,
            vec![take("test_batch")?],
        ),
    };
    for b in train.iter().chain(test.iter()) {
        if (format == Format::Cifar100) != b.coarse.is_some() {
            return Err(DataError::content(
                &b.file,
                match format {
                    Format::Cifar100 => "CIFAR-100 batch without `fine_labels`/`coarse_labels`",
                    Format::Cifar10 => "CIFAR-10 batch without `labels`",
                },
            ));
        }
    }
    let coarse_n = coarse_names.len();
    Ok(Cifar {
        format,
        train: make_split(train, fine_names.len(), coarse_n)?,
        test: make_split(test, fine_names.len(), coarse_n)?,
        fine_label_names: fine_names,
        coarse_label_names: coarse_names,
    })
}
