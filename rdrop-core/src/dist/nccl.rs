//! NCCL, loaded at run time: [`Nccl`] (the library) and [`NcclCollective`] (a communicator
//! whose id travels over a [`Group`]).
//!
//! Loaded with `libloading` from `libnccl.so.2` (or the path in `RDROP_NCCL_LIBRARY`) rather
//! than through cudarc's `nccl` feature: candle builds cudarc with `dynamic-linking`, which would
//! link libnccl at build time and stop the binary starting on a machine without it. Compiled in
//! every build (no CUDA headers needed); only CUDA builds call it.
//!
//! The only module of the crate that allows `unsafe`: each FFI call has a SAFETY comment.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex};

use super::collective::Collective;
use super::error::DistError;
use super::rendezvous::Group;

/// The library's file name.
pub const NCCL_LIBRARY: &str = "libnccl.so.2";
/// The variable that overrides [`NCCL_LIBRARY`] (a file name or a path).
pub const NCCL_LIBRARY_VAR: &str = "RDROP_NCCL_LIBRARY";
/// Bytes of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId` (passed by value to `ncclCommInitRank`).
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

type Comm = *mut c_void;
type NcclResult = c_int;
const NCCL_SUCCESS: NcclResult = 0;
/// `ncclFloat32` of `ncclDataType_t`.
const NCCL_FLOAT32: c_int = 7;
/// `ncclSum` of `ncclRedOp_t`.
const NCCL_SUM: c_int = 0;

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> NcclResult;
type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> NcclResult;
type CommInitRankFn = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> NcclResult;
type CommFn = unsafe extern "C" fn(Comm) -> NcclResult;
type ErrorStringFn = unsafe extern "C" fn(NcclResult) -> *const c_char;

/// The NCCL functions rdrop uses, resolved from the loaded library.
pub struct Nccl {
    get_version: GetVersionFn,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    all_reduce: AllReduceFn,
    comm_abort: CommFn,
    comm_destroy: CommFn,
    error_string: ErrorStringFn,
    /// Keeps the symbols above valid.
    _lib: libloading::Library,
    /// Where it was loaded from.
    name: String,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl").field("library", &self.name).finish()
    }
}

impl Nccl {
    /// Loads NCCL from `RDROP_NCCL_LIBRARY` if set, else [`NCCL_LIBRARY`].
    pub fn load() -> Result<Nccl, DistError> {
        let name = std::env::var(NCCL_LIBRARY_VAR)
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| NCCL_LIBRARY.to_string());
        Self::load_from(&name)
    }

    /// Loads NCCL from `name` (a file name searched on the loader's path, or a path).
    pub fn load_from(name: &str) -> Result<Nccl, DistError> {
        let missing = |message: String| DistError::NcclMissing {
            library: name.to_string(),
            message,
        };
        // SAFETY: loading a shared library runs its initialisers; NCCL's have no preconditions
        // on the caller. The library is kept alive in `_lib` for as long as the pointers.
        let lib = unsafe { libloading::Library::new(name) }.map_err(|e| missing(e.to_string()))?;
        macro_rules! sym {
            ($t:ty, $s:literal) => {{
                // SAFETY: `$t` is the C signature of `$s` in nccl.h (NCCL 2.x); the pointer is
                // only used while `lib` is alive (both are moved into the returned `Nccl`).
                let f: libloading::Symbol<$t> = unsafe { lib.get(concat!($s, "\0").as_bytes()) }
                    .map_err(|e| missing(format!("symbol {}: {e}", $s)))?;
                *f
            }};
        }
        let nccl = Nccl {
            get_version: sym!(GetVersionFn, "ncclGetVersion"),
            get_unique_id: sym!(GetUniqueIdFn, "ncclGetUniqueId"),
            comm_init_rank: sym!(CommInitRankFn, "ncclCommInitRank"),
            all_reduce: sym!(AllReduceFn, "ncclAllReduce"),
            comm_abort: sym!(CommFn, "ncclCommAbort"),
            comm_destroy: sym!(CommFn, "ncclCommDestroy"),
            error_string: sym!(ErrorStringFn, "ncclGetErrorString"),
            name: name.to_string(),
            _lib: lib,
        };
        Ok(nccl)
    }

    /// The library it was loaded from.
    pub fn library(&self) -> &str {
        &self.name
    }

    fn check(&self, op: &'static str, code: NcclResult) -> Result<(), DistError> {
        if code == NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString accepts any ncclResult_t and returns a static C string
        // (or null, checked).
        let p = unsafe { (self.error_string)(code) };
        let message = if p.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated, static (see above).
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        Err(DistError::Nccl { op, code, message })
    }

    /// NCCL's version code (e.g. 22105 for 2.21.5).
    pub fn version(&self) -> Result<i32, DistError> {
        let mut v: c_int = 0;
        // SAFETY: writes one int through a valid pointer.
        let code = unsafe { (self.get_version)(&mut v) };
        self.check("ncclGetVersion", code)?;
        Ok(v)
    }

    /// A new communicator id (rank 0), as bytes to broadcast.
    pub fn unique_id(&self) -> Result<Vec<u8>, DistError> {
        let mut id = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: writes one ncclUniqueId through a valid pointer.
        let code = unsafe { (self.get_unique_id)(&mut id) };
        self.check("ncclGetUniqueId", code)?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }
}

/// The communicator pointer, shared by the collective and the abort hook: whoever takes it
/// (abort or destroy) is the only one to free it.
struct CommSlot(Mutex<Option<usize>>);

/// Device all-reduce through NCCL; host metrics and the barrier through its [`Group`]. A
/// peer's death (seen by the group's watchdog) aborts the communicator, so a rank blocked in an
/// NCCL all-reduce returns.
pub struct NcclCollective {
    nccl: Arc<Nccl>,
    comm: Arc<CommSlot>,
    group: Group,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("group", &self.group)
            .field("nccl", &self.nccl)
            .finish()
    }
}

impl NcclCollective {
    /// Creates the communicator of `group`'s ranks: rank 0 makes the id and broadcasts it,
    /// every rank calls `ncclCommInitRank`. The caller must have made this rank's CUDA device
    /// current on this thread (NCCL binds the communicator to it).
    pub fn init(group: Group, nccl: Arc<Nccl>) -> Result<NcclCollective, DistError> {
        let id = if group.rank() == 0 {
            Some(nccl.unique_id()?)
        } else {
            None
        };
        let bytes = group.broadcast(id.as_deref())?;
        if bytes.len() != UNIQUE_ID_BYTES {
            return Err(DistError::Protocol {
                rank: group.rank(),
                msg: format!(
                    "the NCCL id from rank 0 has {} bytes, not {UNIQUE_ID_BYTES}",
                    bytes.len()
                ),
            });
        }
        let mut id = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (d, s) in id.internal.iter_mut().zip(&bytes) {
            *d = *s as c_char;
        }
        let world = c_int::try_from(group.world_size())
            .map_err(|_| DistError::Unsupported("world size beyond i32".into()))?;
        let rank = c_int::try_from(group.rank())
            .map_err(|_| DistError::Unsupported("rank beyond i32".into()))?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; `id` is the 128-byte id from rank 0, passed by
        // value as nccl.h declares; every rank calls this with the same id and world size.
        let code = unsafe { (nccl.comm_init_rank)(&mut comm, world, id, rank) };
        nccl.check("ncclCommInitRank", code)?;
        let slot = Arc::new(CommSlot(Mutex::new(Some(comm as usize))));
        let (hook_slot, hook_nccl) = (slot.clone(), nccl.clone());
        group.set_abort_hook(move |_dead| {
            let taken = hook_slot.0.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(c) = taken {
                // SAFETY: `c` is the live communicator (taken out of the slot, so no one else
                // frees it); ncclCommAbort may be called from another thread while an operation
                // is pending, which is the point here.
                let _ = unsafe { (hook_nccl.comm_abort)(c as Comm) };
            }
        });
        Ok(NcclCollective {
            nccl,
            comm: slot,
            group,
        })
    }

    /// The control-plane group.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Says goodbye through the group and destroys the communicator.
    pub fn finish(self) -> Result<(), DistError> {
        self.destroy();
        self.group.finish()
    }

    fn destroy(&self) {
        let taken = self.comm.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = taken {
            // SAFETY: the live communicator, taken out of the slot (no one else frees it).
            let _ = unsafe { (self.nccl.comm_destroy)(c as Comm) };
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        self.destroy();
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn world_size(&self) -> usize {
        self.group.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.group.all_reduce_f32(buf)
    }

    fn all_reduce_sum_device(&self, ptr: u64, len: usize, stream: u64) -> Result<(), DistError> {
        if let Some(r) = self.group.dead_peer() {
            return Err(DistError::PeerDied {
                rank: r,
                how: "seen by the watchdog before the all-reduce".into(),
            });
        }
        let comm = *self.comm.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(comm) = comm else {
            return Err(DistError::Unsupported(
                "the NCCL communicator was aborted or destroyed".into(),
            ));
        };
        let p = ptr as usize as *mut c_void;
        // SAFETY: the caller passes `len` f32s of device memory at `ptr` on this rank's device
        // and a stream of that device (the trait's contract); in place (send = receive buffer)
        // is allowed by NCCL.
        let code = unsafe {
            (self.nccl.all_reduce)(
                p,
                p,
                len,
                NCCL_FLOAT32,
                NCCL_SUM,
                comm as Comm,
                stream as usize as *mut c_void,
            )
        };
        if code != NCCL_SUCCESS {
            if let Some(r) = self.group.dead_peer() {
                return Err(DistError::PeerDied {
                    rank: r,
                    how: "the NCCL all-reduce was aborted".into(),
                });
            }
        }
        self.nccl.check("ncclAllReduce", code)
    }

    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<(), DistError> {
        self.group.all_reduce_f64(v)
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.group.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let name = "libnccl-not-here-rdrop-test.so.2";
        let e = Nccl::load_from(name).unwrap_err();
        assert!(
            matches!(&e, DistError::NcclMissing { library, .. } if library == name),
            "{e:?}"
        );
        let msg = e.to_string();
        for part in [name, "RDROP_NCCL_LIBRARY", "Install NCCL"] {
            assert!(msg.contains(part), "{msg}");
        }
        // The default name, where it is not installed (as on CI), is named too.
        match Nccl::load_from(NCCL_LIBRARY) {
            Err(e) => assert!(e.to_string().contains("libnccl.so.2"), "{e}"),
            Ok(n) => assert!(n.version().unwrap() >= 20000),
        }
    }

    #[test]
    fn a_library_without_the_symbols_is_refused() {
        let e = Nccl::load_from("libc.so.6").unwrap_err();
        assert!(
            matches!(&e, DistError::NcclMissing { message, .. } if message.contains("ncclGetVersion")),
            "{e:?}"
        );
    }

    /// With `RDROP_TEST_NCCL_LIBRARY=/path/to/libnccl.so.2` (e.g. PyTorch's
    /// `nvidia/nccl/lib`), the calls that need no GPU: version, unique ids, error strings; and
    /// a communicator of one rank (an NCCL error naming the call where there is no GPU).
    #[test]
    fn a_real_library_when_given() {
        let Ok(path) = std::env::var("RDROP_TEST_NCCL_LIBRARY") else {
            eprintln!("RDROP_TEST_NCCL_LIBRARY not set: skipped");
            return;
        };
        let nccl = Arc::new(Nccl::load_from(&path).unwrap());
        let v = nccl.version().unwrap();
        assert!(v >= 20000, "{v}");
        let (a, b) = (nccl.unique_id().unwrap(), nccl.unique_id().unwrap());
        assert_eq!(a.len(), UNIQUE_ID_BYTES);
        assert!(a != b && a.iter().any(|&x| x != 0));
        let e = nccl.check("ncclTest", 5).unwrap_err();
        assert!(
            matches!(&e, DistError::Nccl { op: "ncclTest", code: 5, message } if message.contains("invalid usage")),
            "{e:?}"
        );
        let spec = crate::dist::WorldSpec::single();
        let group = Group::join(&spec, std::time::Duration::from_secs(1)).unwrap();
        match NcclCollective::init(group, nccl) {
            Ok(c) => {
                assert_eq!(c.world_size(), 1);
                c.finish().unwrap();
            }
            Err(e) => {
                eprintln!("no communicator here: {e}");
                let ok = matches!(
                    &e,
                    DistError::Nccl {
                        op: "ncclCommInitRank",
                        ..
                    }
                );
                assert!(ok, "{e:?}");
            }
        }
    }
}
