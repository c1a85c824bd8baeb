//! Device memory: every device's allocations live in one reserved range of the host's address
//! space (so device pointers of different devices never overlap), each allocation on its own
//! pages followed by at least one inaccessible guard page. Freed allocations stay inaccessible
//! in a quarantine before their pages are reused, so a late access is reported as a use after
//! free rather than landing in a new buffer.
//!
//! [`resolve`] is the one check every copy, GEMM, collective and kernel access goes through:
//! it names the allocation, the offset and what is wrong (past the end, freed, another
//! device's memory, not device memory).
#![allow(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::error::{
    EmuError, CUDA_ERROR_ILLEGAL_ADDRESS, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_OUT_OF_MEMORY,
};

/// Page size of the guard layout.
pub const PAGE: u64 = 4096;
/// Bytes counted against the device's memory per allocation are rounded up to this.
pub const GRANULE: u64 = 512;
/// Bytes of device memory the driver keeps per context (reported as used by `cuMemGetInfo`).
pub const CONTEXT_RESERVE: u64 = 512 << 20;
/// Quarantine of freed allocations before their pages are reused.
const QUARANTINE_BYTES: u64 = 1 << 30;
const QUARANTINE_COUNT: usize = 4096;
/// Allocations up to this size are filled with 0xff when created (poison).
const POISON_LIMIT: u64 = 256 << 20;

/// How an allocation was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `cuMemAlloc`.
    Sync,
    /// `cuMemAllocAsync` (stream ordered).
    Async,
}

/// One allocation.
#[derive(Debug, Clone)]
pub struct Alloc {
    /// Sequence number in the process (1, 2, …), for reports.
    pub id: u64,
    /// Device ordinal.
    pub device: usize,
    /// First byte.
    pub base: u64,
    /// Requested bytes.
    pub size: u64,
    /// How it was made.
    pub kind: Kind,
    /// Set when freed (the call that freed it).
    pub freed_by: Option<&'static str>,
}

impl Alloc {
    fn pages(&self) -> u64 {
        self.size.max(1).div_ceil(PAGE) * PAGE
    }

    /// `allocation #7 (1024 bytes at 0x…, device 0, cuMemAllocAsync)`.
    pub fn describe(&self) -> String {
        format!(
            "allocation #{} ({} bytes at {:#x}, device {}, {})",
            self.id,
            self.size,
            self.base,
            self.device,
            match self.kind {
                Kind::Sync => "cuMemAlloc",
                Kind::Async => "cuMemAllocAsync",
            }
        )
    }
}

struct Region {
    start: u64,
    len: u64,
    /// Free page runs (start → length), coalesced.
    free: BTreeMap<u64, u64>,
    used: u64,
    capacity: u64,
    /// Contexts alive on the device (each keeps CONTEXT_RESERVE).
    contexts: u64,
}

struct State {
    regions: Vec<Region>,
    live: BTreeMap<u64, Alloc>,
    /// Freed allocations still quarantined (their pages inaccessible), oldest first.
    quarantine: VecDeque<Alloc>,
    quarantined_bytes: u64,
    next_id: u64,
    /// The last allocation (for the `alias-alloc` fault injection).
    last: Option<(u64, u64)>,
    /// Bases handed out twice by `alias-alloc` (their second free is a no-op).
    aliases: Vec<u64>,
}

fn state() -> MutexGuard<'static, State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| {
        let devices = &crate::config::get().devices;
        let regions = devices
            .iter()
            .map(|d| reserve(d.memory))
            .collect::<Vec<_>>();
        Mutex::new(State {
            regions,
            live: BTreeMap::new(),
            quarantine: VecDeque::new(),
            quarantined_bytes: 0,
            next_id: 1,
            last: None,
            aliases: Vec::new(),
        })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

/// Reserves the address range of a device of `memory` bytes: twice that plus 4 GiB of
/// inaccessible, unbacked pages (allocations make their own pages accessible).
fn reserve(memory: u64) -> Region {
    let len = (2 * memory + (4 << 30)).div_ceil(PAGE) * PAGE;
    // SAFETY: an anonymous private mapping with no access and no swap reservation; it is
    // never unmapped (the process's device memory lives as long as the process).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        crate::error::report(&format!(
            "cannot reserve {} GiB of address space for a device",
            len >> 30
        ));
        return Region {
            start: 0,
            len: 0,
            free: BTreeMap::new(),
            used: 0,
            capacity: memory,
            contexts: 0,
        };
    }
    let start = p as u64;
    let mut free = BTreeMap::new();
    // The first page stays a guard too.
    free.insert(start + PAGE, len - PAGE);
    Region {
        start,
        len,
        free,
        used: 0,
        capacity: memory,
        contexts: 0,
    }
}

fn protect(base: u64, len: u64, rw: bool) {
    let prot = if rw {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_NONE
    };
    // SAFETY: `base..base+len` lies inside a reserved region this module owns.
    unsafe {
        if !rw {
            libc::madvise(base as *mut _, len as usize, libc::MADV_DONTNEED);
        }
        libc::mprotect(base as *mut _, len as usize, prot);
    }
}

fn accounted(size: u64) -> u64 {
    size.max(1).div_ceil(GRANULE) * GRANULE
}

/// Allocates `size` bytes on `device`; fails as the driver does when the device's memory is
/// exhausted.
pub fn alloc(device: usize, size: u64, kind: Kind) -> Result<u64, EmuError> {
    let poison = crate::config::get().poison;
    let mut st = state();
    // Fault injection `alias-alloc`: an allocation of the same size as the one before it
    // (and over 4 KiB) gets that one's memory, as a plan that lays two buffers over each
    // other would.
    if crate::config::mutate("alias-alloc") && size > 4096 {
        if let Some((base, prev_size)) = st.last {
            if prev_size == size && st.live.contains_key(&base) {
                st.aliases.push(base);
                st.last = None;
                return Ok(base);
            }
        }
    }
    let id = st.next_id;
    let Some(region) = st.regions.get_mut(device) else {
        return Err(EmuError::new(
            CUDA_ERROR_INVALID_VALUE,
            format!("no device {device}"),
        ));
    };
    let need = accounted(size);
    let reserve = region.contexts.max(1) * CONTEXT_RESERVE;
    if region.used + need + reserve > region.capacity {
        return Err(EmuError::new(
            CUDA_ERROR_OUT_OF_MEMORY,
            format!(
                "out of memory: {} bytes requested on device {device}, {} of {} bytes in use \
                 (+{} MiB per context)",
                size,
                region.used,
                region.capacity,
                CONTEXT_RESERVE >> 20
            ),
        ));
    }
    let pages = size.max(1).div_ceil(PAGE) * PAGE;
    let span = pages + PAGE; // + guard
    let slot = region
        .free
        .iter()
        .find(|(_, &len)| len >= span)
        .map(|(&s, &l)| (s, l));
    let Some((start, len)) = slot else {
        return Err(EmuError::new(
            CUDA_ERROR_OUT_OF_MEMORY,
            format!("out of address space for {size} bytes on device {device} (fragmented)"),
        ));
    };
    region.free.remove(&start);
    if len > span {
        region.free.insert(start + span, len - span);
    }
    region.used += need;
    protect(start, pages, true);
    if poison && size <= POISON_LIMIT {
        // SAFETY: just made accessible, `size` bytes from `start`.
        unsafe { std::ptr::write_bytes(start as *mut u8, 0xff, size as usize) };
    }
    st.next_id += 1;
    st.last = Some((start, size));
    st.live.insert(
        start,
        Alloc {
            id,
            device,
            base: start,
            size,
            kind,
            freed_by: None,
        },
    );
    Ok(start)
}

/// Frees the allocation that starts at `ptr` (`call` names the freeing call in reports).
pub fn free(ptr: u64, call: &'static str) -> Result<(), EmuError> {
    let mut st = state();
    if let Some(i) = st.aliases.iter().position(|&a| a == ptr) {
        st.aliases.swap_remove(i);
        return Ok(());
    }
    let Some(mut a) = st.live.remove(&ptr) else {
        let why = match find_any(&st, ptr) {
            Some(a) if a.freed_by.is_some() => format!("{} was already freed", a.describe()),
            Some(a) => format!("{ptr:#x} is inside {}, not its start", a.describe()),
            None => format!("{ptr:#x} is not a device allocation"),
        };
        return Err(EmuError::new(
            CUDA_ERROR_INVALID_VALUE,
            format!("{call}: {why}"),
        ));
    };
    protect(a.base, a.pages(), false);
    let need = accounted(a.size);
    if let Some(r) = st.regions.get_mut(a.device) {
        r.used = r.used.saturating_sub(need);
    }
    a.freed_by = Some(call);
    st.quarantined_bytes += a.pages();
    st.quarantine.push_back(a);
    while st.quarantined_bytes > QUARANTINE_BYTES || st.quarantine.len() > QUARANTINE_COUNT {
        let Some(old) = st.quarantine.pop_front() else {
            break;
        };
        st.quarantined_bytes -= old.pages();
        give_back(&mut st, old.device, old.base, old.pages() + PAGE);
    }
    Ok(())
}

fn give_back(st: &mut State, device: usize, start: u64, len: u64) {
    let Some(r) = st.regions.get_mut(device) else {
        return;
    };
    let (mut s, mut l) = (start, len);
    if let Some((&ps, &pl)) = r.free.range(..s).next_back() {
        if ps + pl == s {
            r.free.remove(&ps);
            s = ps;
            l += pl;
        }
    }
    if let Some(&nl) = r.free.get(&(s + l)) {
        r.free.remove(&(s + l));
        l += nl;
    }
    r.free.insert(s, l);
}

/// The live or quarantined allocation containing `ptr` (or whose guard page holds it).
fn find_any(st: &State, ptr: u64) -> Option<Alloc> {
    if let Some((_, a)) = st.live.range(..=ptr).next_back() {
        if ptr < a.base + a.pages() + PAGE {
            return Some(a.clone());
        }
    }
    st.quarantine
        .iter()
        .rev()
        .find(|a| ptr >= a.base && ptr < a.base + a.pages() + PAGE)
        .cloned()
}

/// The device whose reserved range holds `ptr`, if any.
fn device_of(st: &State, ptr: u64) -> Option<usize> {
    st.regions
        .iter()
        .position(|r| r.len > 0 && ptr >= r.start && ptr < r.start + r.len)
}

/// The live allocation containing byte `ptr`.
pub fn lookup(ptr: u64) -> Option<Alloc> {
    let st = state();
    let (_, a) = st.live.range(..=ptr).next_back()?;
    (ptr < a.base + a.size.max(1)).then(|| a.clone())
}

/// Checks that `[ptr, ptr + bytes)` lies in one live allocation of `device` and returns it as
/// a host pointer. The error says what the range is instead (for `CUDA_ERROR_ILLEGAL_ADDRESS`).
pub fn resolve(device: usize, ptr: u64, bytes: u64, write: bool) -> Result<*mut u8, EmuError> {
    let st = state();
    if let Some((_, a)) = st.live.range(..=ptr).next_back() {
        if ptr < a.base + a.size.max(1) {
            if a.device != device {
                return Err(illegal(format!(
                    "{} of {bytes} bytes at {ptr:#x}: {} belongs to device {}, used on device {device}",
                    rw(write),
                    a.describe(),
                    a.device
                )));
            }
            if ptr + bytes <= a.base + a.size {
                return Ok(ptr as *mut u8);
            }
            return Err(illegal(format!(
                "{} of {bytes} bytes at offset {} of {}: {} bytes past its end",
                rw(write),
                ptr - a.base,
                a.describe(),
                ptr + bytes - (a.base + a.size)
            )));
        }
    }
    Err(illegal(explain(&st, ptr, bytes, write)))
}

fn rw(write: bool) -> &'static str {
    if write {
        "write"
    } else {
        "read"
    }
}

fn illegal(message: String) -> EmuError {
    EmuError::new(CUDA_ERROR_ILLEGAL_ADDRESS, message)
}

/// What `ptr` is when it is not inside a live allocation.
fn explain(st: &State, ptr: u64, bytes: u64, write: bool) -> String {
    let what = rw(write);
    match find_any(st, ptr) {
        Some(a) if a.freed_by.is_some() => format!(
            "{what} of {bytes} bytes at offset {} of {}, freed by {}",
            ptr.wrapping_sub(a.base),
            a.describe(),
            a.freed_by.unwrap_or("?")
        ),
        Some(a) => format!(
            "{what} of {bytes} bytes at {ptr:#x}: {} bytes past the end of {}",
            ptr - (a.base + a.size),
            a.describe()
        ),
        None => match device_of(st, ptr) {
            Some(d) => {
                // before the first allocation of a page run: name the next allocation
                let next = st.live.range(ptr..).next().map(|(_, a)| a.clone());
                match next {
                    Some(a) if a.device == d && a.base - ptr <= PAGE => format!(
                        "{what} of {bytes} bytes at {ptr:#x}: {} bytes before the start of {}",
                        a.base - ptr,
                        a.describe()
                    ),
                    _ => format!(
                        "{what} of {bytes} bytes at {ptr:#x}: device {d}'s memory, but no allocation"
                    ),
                }
            }
            None if ptr < 65536 => format!(
                "{what} of {bytes} bytes at {ptr:#x}: a null or small integer used as a pointer"
            ),
            None => {
                format!("{what} of {bytes} bytes at {ptr:#x}: not device memory (a host pointer?)")
            }
        },
    }
}

/// `(free, total)` bytes of `device` as `cuMemGetInfo` reports them.
pub fn info(device: usize) -> (u64, u64) {
    let st = state();
    match st.regions.get(device) {
        Some(r) => {
            let reserve = r.contexts.max(1) * CONTEXT_RESERVE;
            (r.capacity.saturating_sub(r.used + reserve), r.capacity)
        }
        None => (0, 0),
    }
}

/// Bytes allocated on `device` now (without the context reserve).
pub fn used(device: usize) -> u64 {
    state().regions.get(device).map_or(0, |r| r.used)
}

/// A context was created (`+1`) or destroyed (`-1`) on `device`.
pub fn context_count(device: usize, delta: i64) {
    let mut st = state();
    if let Some(r) = st.regions.get_mut(device) {
        r.contexts = (r.contexts as i64 + delta).max(0) as u64;
    }
}

/// Frees every live allocation of `device` (its primary context was destroyed).
pub fn free_all(device: usize) {
    let bases: Vec<u64> = state()
        .live
        .values()
        .filter(|a| a.device == device)
        .map(|a| a.base)
        .collect();
    for b in bases {
        let _ = free(b, "the destruction of its context");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_names_what_is_wrong() {
        let a = alloc(0, 100, Kind::Sync).unwrap();
        assert!(resolve(0, a, 100, false).is_ok());
        let e = resolve(0, a + 96, 8, false).unwrap_err();
        assert!(e.message.contains("4 bytes past its end"), "{}", e.message);
        let e = resolve(0, a + 100, 4, true).unwrap_err();
        assert!(e.message.contains("past the end"), "{}", e.message);
        assert_eq!(e.code, CUDA_ERROR_ILLEGAL_ADDRESS);
        free(a, "cuMemFree").unwrap();
        let e = resolve(0, a, 4, false).unwrap_err();
        assert!(e.message.contains("freed by cuMemFree"), "{}", e.message);
        let host = 5u32;
        let e = resolve(0, &host as *const u32 as u64, 4, false).unwrap_err();
        assert!(e.message.contains("not device memory"), "{}", e.message);
        assert!(free(a, "cuMemFree")
            .unwrap_err()
            .message
            .contains("already freed"));
    }

    #[test]
    fn new_memory_is_poisoned_and_accounted() {
        let (free0, total) = info(0);
        let a = alloc(0, 1000, Kind::Async).unwrap();
        // SAFETY: the allocation is 1000 accessible bytes.
        let b = unsafe { *(a as *const u8).add(999) };
        assert_eq!(b, 0xff);
        let (free1, total1) = info(0);
        assert_eq!(total, total1);
        assert!(free1 < free0);
        free(a, "cuMemFreeAsync").unwrap();
    }

    #[test]
    fn too_much_memory_fails_like_the_driver() {
        let (_, total) = info(0);
        let e = alloc(0, total, Kind::Sync).unwrap_err();
        assert_eq!(e.code, CUDA_ERROR_OUT_OF_MEMORY);
    }
}
