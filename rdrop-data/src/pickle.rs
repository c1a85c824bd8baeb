//! A restricted reader for Python pickles (protocols 2–5) that executes nothing.
//!
//! CIFAR's `python` archives are pickled dicts holding lists, strings and one numpy array.
//! Python's `pickle.load` would call whatever callable the file names; this reader instead
//! builds a plain [`Value`] tree and recognises an allow-list of five constructors
//! ([`Global`]): numpy's `_reconstruct` / `ndarray` / `dtype` / `_frombuffer` (under both
//! numpy 1's `numpy.core` and numpy 2's `numpy._core` names), `_codecs.encode` (how Python 3
//! writes `bytes` at protocol 2) and `bytes`/`bytearray`. Any other global is an error naming it.
//!
//! The parser works on an in-memory slice and borrows large strings (the pixel data) from it,
//! so decoding holds the file plus one copy of the pixels. Every opcode consumes input, so it
//! always terminates; every length is checked against what is left, so a truncated or
//! corrupted file is an error, never a panic.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::error::{DataError, Result};

/// Bytes: borrowed from the pickle, or produced by `_codecs.encode`.
#[derive(Debug, Clone)]
pub enum Buf<'a> {
    /// A slice of the pickle itself (no copy).
    Borrowed(&'a [u8]),
    /// Bytes that had to be built (latin-1 encoding of a unicode string).
    Owned(Rc<Vec<u8>>),
}

impl Buf<'_> {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Borrowed(b) => b,
            Buf::Owned(v) => v,
        }
    }
}

/// The allow-listed globals (everything else is rejected by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `numpy.core.multiarray._reconstruct` (numpy 2: `numpy._core.multiarray`).
    Reconstruct,
    /// `numpy.ndarray`.
    Ndarray,
    /// `numpy.dtype`.
    Dtype,
    /// `numpy.core.numeric._frombuffer` (numpy 2: `numpy._core.numeric`), protocol 5.
    FromBuffer,
    /// `_codecs.encode`: Python 3's way of pickling `bytes` at protocol 2.
    CodecsEncode,
    /// `builtins.bytes` / `__builtin__.bytes` (empty bytes at protocol 2).
    Bytes,
    /// `builtins.bytearray` / `__builtin__.bytearray`.
    Bytearray,
}

impl Global {
    fn lookup(module: &str, name: &str) -> Option<Global> {
        let numpy_core = |sub: &str| {
            module == format!("numpy.core.{sub}") || module == format!("numpy._core.{sub}")
        };
        Some(match name {
            "_reconstruct" if numpy_core("multiarray") => Global::Reconstruct,
            "ndarray" if module == "numpy" || numpy_core("multiarray") => Global::Ndarray,
            "dtype" if module == "numpy" || numpy_core("multiarray") => Global::Dtype,
            "_frombuffer" if numpy_core("numeric") => Global::FromBuffer,
            "encode" if module == "_codecs" => Global::CodecsEncode,
            "bytes" if module == "builtins" || module == "__builtin__" => Global::Bytes,
            "bytearray" if module == "builtins" || module == "__builtin__" => Global::Bytearray,
            _ => return None,
        })
    }
}

/// A numpy dtype as pickled: `dtype(name, align, copy)` then BUILD with its byte order.
#[derive(Debug, Clone, Default)]
pub struct Dtype {
    /// Type code as pickled, e.g. `u1`, `i8`, `f4`.
    pub name: String,
    /// Byte order from the BUILD state (`|`, `<`, `>`, `=`), if given.
    pub byteorder: Option<String>,
}

/// A numpy array: shape, dtype, memory order and the raw element bytes.
#[derive(Debug, Clone, Default)]
pub struct Array<'a> {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Element type (None until BUILD supplied it).
    pub dtype: Option<Dtype>,
    /// Fortran (column-major) order.
    pub fortran: bool,
    /// Raw element bytes (None until BUILD supplied them).
    pub data: Option<Buf<'a>>,
}

/// A decoded pickle object.
#[derive(Debug, Clone)]
pub enum Value<'a> {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in i64.
    Int(i64),
    /// A float.
    Float(f64),
    /// A unicode string (Python 3 `str`) as the pickle's UTF-8 bytes. Not validated up front
    /// (a protocol-2 pixel string is 232 MB); decoded where text is needed.
    Str(&'a [u8]),
    /// Bytes: Python 3 `bytes`/`bytearray`, or a Python 2 `str`.
    Bytes(Buf<'a>),
    /// A tuple.
    Tuple(Rc<Vec<Value<'a>>>),
    /// A list (shared and mutable, as pickle's memo requires).
    List(Rc<RefCell<Vec<Value<'a>>>>),
    /// A dict, in insertion order.
    Dict(Rc<RefCell<Vec<(Value<'a>, Value<'a>)>>>),
    /// An allow-listed global.
    Global(Global),
    /// A numpy dtype.
    Dtype(Rc<RefCell<Dtype>>),
    /// A numpy array.
    Array(Rc<RefCell<Array<'a>>>),
}

impl<'a> Value<'a> {
    /// Text of a `str` or (Python 2) byte string, for dict keys and names.
    pub fn as_text(&self) -> Option<&[u8]> {
        match self {
            Value::Str(s) => Some(s),
            Value::Bytes(b) => Some(b.as_slice()),
            _ => None,
        }
    }

    /// Look up `key` in a dict whose keys are `str` or `bytes` (order does not matter).
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        match self {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .find(|(k, _)| k.as_text() == Some(key.as_bytes()))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }

    /// Short description of the kind of object, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Dtype(_) => "numpy dtype",
            Value::Array(_) => "numpy array",
        }
    }

    /// Elements of a list or tuple.
    pub fn items(&self) -> Option<Vec<Value<'a>>> {
        match self {
            Value::List(l) => Some(l.borrow().clone()),
            Value::Tuple(t) => Some(t.as_ref().clone()),
            _ => None,
        }
    }
}

struct Parser<'a, 'f> {
    data: &'a [u8],
    pos: usize,
    op_pos: usize,
    file: &'f str,
    stack: Vec<Value<'a>>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value<'a>>,
}

/// Decode one pickle (protocol 2–5) without executing anything.
///
/// `file` names the source in errors. Returns the object the pickle's STOP yields.
pub fn parse<'a>(data: &'a [u8], file: &str) -> Result<Value<'a>> {
    Parser {
        data,
        pos: 0,
        op_pos: 0,
        file,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

impl<'a> Parser<'a, '_> {
    fn err(&self, message: impl Into<String>) -> DataError {
        DataError::Pickle {
            file: self.file.to_string(),
            offset: self.op_pos,
            message: message.into(),
        }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(self.err(format!(
                "truncated: needs {n} more bytes, only {left} left in the file"
            )));
        }
        let n = n as usize;
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n as u64)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("truncated: GLOBAL name without a newline"))?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| self.err("GLOBAL name is not valid text"))
    }

    fn pop(&mut self) -> Result<Value<'a>> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value<'a>> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        let e = self.err("stack underflow");
        self.stack.last_mut().ok_or(e)
    }

    fn pop_mark(&mut self) -> Result<Vec<Value<'a>>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, idx: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {idx} was never stored")))?;
        self.stack.push(v);
        Ok(())
    }

    fn bytes(&mut self, len: u64) -> Result<()> {
        let b = self.take(len)?;
        self.stack.push(Value::Bytes(Buf::Borrowed(b)));
        Ok(())
    }

    fn unicode(&mut self, len: u64) -> Result<()> {
        let b = self.take(len)?;
        self.stack.push(Value::Str(b));
        Ok(())
    }

    fn long(&mut self, n: u64) -> Result<()> {
        let b = self.take(n)?;
        if b.len() > 8 {
            return Err(self.err(format!("integer of {} bytes is too large", b.len())));
        }
        let mut v: i64 = 0;
        for (i, &x) in b.iter().enumerate() {
            v |= (x as i64) << (8 * i);
        }
        if let Some(&last) = b.last() {
            if last & 0x80 != 0 && b.len() < 8 {
                v -= 1i64 << (8 * b.len());
            }
        }
        self.stack.push(Value::Int(v));
        Ok(())
    }

    fn set_items(&mut self, dict: &Value<'a>, items: Vec<Value<'a>>) -> Result<()> {
        let Value::Dict(d) = dict else {
            return Err(self.err(format!("SETITEM(S) on a {}, not a dict", dict.kind())));
        };
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            match d.iter_mut().find(|(old, _)| same_key(old, &k)) {
                Some(slot) => slot.1 = v,
                None => d.push((k, v)),
            }
        }
        Ok(())
    }

    fn append(&mut self, list: &Value<'a>, items: Vec<Value<'a>>) -> Result<()> {
        let Value::List(l) = list else {
            return Err(self.err(format!("APPEND(S) on a {}, not a list", list.kind())));
        };
        l.borrow_mut().extend(items);
        Ok(())
    }

    fn run(mut self) -> Result<Value<'a>> {
        loop {
            self.op_pos = self.pos;
            let op = self
                .u8()
                .map_err(|_| self.err("truncated: the pickle ends without STOP"))?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    self.le(8)?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.le(4)? as u32 as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as u64;
                    self.long(n)?;
                }
                0x8b => {
                    let n = self.le(4)? as u32 as i32;
                    if n < 0 {
                        return Err(self.err("negative LONG4 length"));
                    }
                    self.long(n as u64)?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'U' => {
                    let n = self.u8()? as u64;
                    self.bytes(n)?;
                }
                b'T' => {
                    let n = self.le(4)? as u32 as i32;
                    if n < 0 {
                        return Err(self.err("negative BINSTRING length"));
                    }
                    self.bytes(n as u64)?;
                }
                b'C' => {
                    let n = self.u8()? as u64;
                    self.bytes(n)?;
                }
                b'B' => {
                    let n = self.le(4)?;
                    self.bytes(n)?;
                }
                0x8e | 0x96 => {
                    let n = self.le(8)?;
                    self.bytes(n)?;
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    self.unicode(n)?;
                }
                b'X' => {
                    let n = self.le(4)?;
                    self.unicode(n)?;
                }
                0x8d => {
                    let n = self.le(8)?;
                    self.unicode(n)?;
                }
                0x97 => {
                    return Err(self
                        .err("out-of-band buffer (NEXT_BUFFER): re-pickle with in-band buffers"))
                }
                0x98 => {
                    // READONLY_BUFFER: only meaningful for out-of-band buffers
                    let t = self.top()?;
                    if !matches!(t, Value::Bytes(_)) {
                        let k = t.kind();
                        return Err(self.err(format!("READONLY_BUFFER on a {k}")));
                    }
                }
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b']' => self.stack.push(Value::List(Rc::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::default());
                    self.set_items(&d, items)?;
                    self.stack.push(d);
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?.clone();
                    self.append(&l, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let l = self.top()?.clone();
                    self.append(&l, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?.clone();
                    self.set_items(&d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?.clone();
                    self.set_items(&d, items)?;
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.le(4)?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u64;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.le(4)?;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.stack.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    let g = self.global(&text(module), &text(name))?;
                    self.stack.push(g);
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.top()?.clone();
                    self.build(obj, state)?;
                }
                _ => {
                    return Err(self.err(format!(
                        "unsupported opcode 0x{op:02x} (only protocol 2-5 data pickles are read)"
                    )))
                }
            }
        }
    }

    fn global(&self, module: &str, name: &str) -> Result<Value<'a>> {
        Global::lookup(module, name)
            .map(Value::Global)
            .ok_or_else(|| {
                self.err(format!(
                    "global `{module}.{name}` is not allowed (nothing in the file is executed; \
                 only numpy arrays, lists, dicts and strings are decoded)"
                ))
            })
    }

    fn reduce(&self, f: Value<'a>, args: Value<'a>) -> Result<Value<'a>> {
        let Value::Global(g) = f else {
            return Err(self.err(format!("REDUCE on a {}, not a callable", f.kind())));
        };
        let Value::Tuple(args) = args else {
            return Err(self.err(format!("REDUCE arguments are a {}", args.kind())));
        };
        let args = args.as_slice();
        match (g, args) {
            (Global::Reconstruct, [Value::Global(Global::Ndarray), ..]) => {
                Ok(Value::Array(Rc::default()))
            }
            (Global::Dtype, [name, ..]) => {
                let name = name
                    .as_text()
                    .ok_or_else(|| self.err("numpy.dtype needs a type name"))?;
                Ok(Value::Dtype(Rc::new(RefCell::new(Dtype {
                    name: String::from_utf8_lossy(name).into_owned(),
                    byteorder: None,
                }))))
            }
            (Global::FromBuffer, [Value::Bytes(buf), Value::Dtype(dt), shape, order]) => {
                let shape = self.shape(shape)?;
                let fortran = order.as_text() == Some(b"F");
                Ok(Value::Array(Rc::new(RefCell::new(Array {
                    shape,
                    dtype: Some(dt.borrow().clone()),
                    fortran,
                    data: Some(buf.clone()),
                }))))
            }
            (Global::CodecsEncode, [Value::Str(s), enc]) => {
                let enc = enc.as_text().unwrap_or_default();
                if !matches!(enc, b"latin1" | b"latin-1" | b"latin_1" | b"iso-8859-1") {
                    return Err(self.err(format!(
                        "_codecs.encode with encoding {:?}: only latin1 is used for bytes",
                        String::from_utf8_lossy(enc)
                    )));
                }
                Ok(Value::Bytes(Buf::Owned(Rc::new(self.latin1(s)?))))
            }
            (Global::Bytes | Global::Bytearray, []) => Ok(Value::Bytes(Buf::Borrowed(&[]))),
            (Global::Bytes | Global::Bytearray, [Value::Bytes(b)]) => Ok(Value::Bytes(b.clone())),
            (Global::Bytearray, [Value::Str(s), _enc]) => {
                Ok(Value::Bytes(Buf::Owned(Rc::new(self.latin1(s)?))))
            }
            (g, args) => Err(self.err(format!(
                "unexpected arguments to {g:?}: ({})",
                args.iter().map(Value::kind).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Latin-1 encoding of a UTF-8 string: code points < 256 are one byte, or the two bytes
    /// `0xC2/0xC3, 0x80..0xBF`; anything else (other code points, invalid UTF-8) is an error.
    fn latin1(&self, b: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let x = b[i];
            if x < 0x80 {
                out.push(x);
                i += 1;
            } else if (x == 0xC2 || x == 0xC3) && i + 1 < b.len() && b[i + 1] & 0xC0 == 0x80 {
                out.push(((x & 0x1F) << 6) | (b[i + 1] & 0x3F));
                i += 2;
            } else {
                return Err(self.err("bytes string holds a non-latin-1 character or bad UTF-8"));
            }
        }
        Ok(out)
    }

    fn shape(&self, v: &Value<'a>) -> Result<Vec<usize>> {
        let items = v
            .items()
            .ok_or_else(|| self.err(format!("array shape is a {}", v.kind())))?;
        items
            .iter()
            .map(|d| match d {
                Value::Int(n) if *n >= 0 => Ok(*n as usize),
                _ => Err(self.err("array shape holds a non-integer or a negative size")),
            })
            .collect()
    }

    fn build(&self, obj: Value<'a>, state: Value<'a>) -> Result<()> {
        match obj {
            Value::Dtype(dt) => {
                // state = (version, byteorder, subarray, names, fields, elsize, alignment, flags)
                if let Some(items) = state.items() {
                    if let Some(bo) = items.get(1).and_then(Value::as_text) {
                        dt.borrow_mut().byteorder = Some(String::from_utf8_lossy(bo).into_owned());
                    }
                }
                Ok(())
            }
            Value::Array(arr) => {
                // state = (version, shape, dtype, is_fortran, rawdata)
                let items = state
                    .items()
                    .ok_or_else(|| self.err("ndarray state is not a tuple"))?;
                let (shape, dtype, fortran, raw) = match items.as_slice() {
                    [Value::Int(_), shape, dtype, fortran, raw] => (shape, dtype, fortran, raw),
                    [shape, dtype, fortran, raw] => (shape, dtype, fortran, raw),
                    _ => {
                        return Err(
                            self.err("ndarray state is not (version, shape, dtype, fortran, data)")
                        )
                    }
                };
                let Value::Dtype(dtype) = dtype else {
                    return Err(self.err(format!("ndarray dtype is a {}", dtype.kind())));
                };
                let fortran = match fortran {
                    Value::Bool(b) => *b,
                    Value::Int(i) => *i != 0,
                    _ => return Err(self.err("ndarray fortran flag is not a bool")),
                };
                let Value::Bytes(raw) = raw else {
                    return Err(self.err(format!(
                        "ndarray data is a {} (object arrays are not supported)",
                        raw.kind()
                    )));
                };
                let mut a = arr.borrow_mut();
                a.shape = self.shape(shape)?;
                a.dtype = Some(dtype.borrow().clone());
                a.fortran = fortran;
                a.data = Some(raw.clone());
                Ok(())
            }
            other => Err(self.err(format!("BUILD on a {} is not supported", other.kind()))),
        }
    }
}

/// Drop a value tree without recursion: a hostile pickle can nest lists a million deep, and
/// the default recursive drop would overflow the stack.
pub fn dismantle(v: Value<'_>) {
    let mut work = vec![v];
    while let Some(v) = work.pop() {
        match v {
            Value::List(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    work.extend(cell.into_inner());
                }
            }
            Value::Tuple(rc) => {
                if let Ok(items) = Rc::try_unwrap(rc) {
                    work.extend(items);
                }
            }
            Value::Dict(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    for (k, v) in cell.into_inner() {
                        work.push(k);
                        work.push(v);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Drop for Parser<'_, '_> {
    fn drop(&mut self) {
        let stack = std::mem::take(&mut self.stack);
        let memo = std::mem::take(&mut self.memo);
        dismantle(Value::List(Rc::new(RefCell::new(
            stack.into_iter().chain(memo.into_values()).collect(),
        ))));
    }
}

fn same_key(a: &Value<'_>, b: &Value<'_>) -> bool {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => matches!((a.as_text(), b.as_text()), (Some(x), Some(y)) if x == y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_small_protocol2_dict() {
        // {'a': [1, 300], b'k': 'x'} hand-written with protocol-2 opcodes
        let p = b"\x80\x02}q\x00(U\x01aq\x01]q\x02(K\x01M\x2c\x01eU\x01kX\x01\x00\x00\x00xu.";
        let v = parse(p, "t").unwrap();
        let a = v.get("a").unwrap().items().unwrap();
        assert!(matches!(a[..], [Value::Int(1), Value::Int(300)]));
        assert_eq!(v.get("k").unwrap().as_text(), Some(&b"x"[..]));
    }

    #[test]
    fn rejects_unknown_global_by_name() {
        let p = b"\x80\x02cos\nsystem\nq\x00.";
        let e = parse(p, "evil.pkl").unwrap_err().to_string();
        assert!(e.contains("os.system"), "{e}");
        assert!(e.contains("evil.pkl"), "{e}");
    }

    #[test]
    fn truncation_is_an_error() {
        let p = b"\x80\x02T\xff\x00\x00\x00abc";
        let e = parse(p, "t").unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        assert!(parse(b"\x80\x02]", "t").is_err());
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        // [[[[...]]]] a million deep: EMPTY_LIST then (EMPTY_LIST, APPEND) repeated... built
        // as MARK-less nesting: ] ] a ] a ... keeps appending into the newest list
        let mut p = b"\x80\x02]".to_vec();
        for _ in 0..1_000_000 {
            p.extend_from_slice(b"]q\x00");
        }
        p.extend(std::iter::repeat_n(b'a', 1_000_000));
        p.push(b'.');
        let v = parse(&p, "deep").unwrap();
        dismantle(v);
        // and on the error path (no STOP)
        p.pop();
        assert!(parse(&p, "deep").is_err());
    }

    #[test]
    fn codecs_encode_latin1() {
        // _codecs.encode('\x00\xe9\xff', 'latin1') at protocol 2
        let mut b = vec![0x80, 2];
        b.extend_from_slice(b"c_codecs\nencode\n");
        b.push(b'X');
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&[0x00, 0xC3, 0xA9, 0xC3, 0xBF]);
        b.push(b'X');
        b.extend_from_slice(&6u32.to_le_bytes());
        b.extend_from_slice(b"latin1");
        b.extend_from_slice(&[0x86, b'R', b'.']);
        let v = parse(&b, "t").unwrap();
        assert_eq!(v.as_text(), Some(&[0x00, 0xE9, 0xFF][..]));
        // U+0100 is not latin-1
        let bad: Vec<u8> = b
            .iter()
            .map(|&x| if x == 0xC3 { 0xC4 } else { x })
            .collect();
        assert!(parse(&bad, "t").is_err());
    }

    #[test]
    fn negative_long1() {
        let v = parse(b"\x80\x02\x8a\x02\x00\xff.", "t").unwrap();
        assert!(matches!(v, Value::Int(-256)));
    }
}
