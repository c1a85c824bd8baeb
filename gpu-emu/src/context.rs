//! Devices and contexts: one primary context per device (retained / released with a count,
//! destroyed with its memory when the count reaches zero, as the driver does), contexts made by
//! `cuCtxCreate`, and each host thread's current context.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::error::{
    EmuError, CUDA_ERROR_CONTEXT_IS_DESTROYED, CUDA_ERROR_INVALID_CONTEXT,
    CUDA_ERROR_INVALID_DEVICE,
};

/// A context handle's tag (handles are `TAG | id`).
pub const CTX_TAG: u64 = 0x7c7c_0000_0000;

/// One context.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Its id (the handle is `CTX_TAG | id`).
    pub id: u64,
    /// Device ordinal.
    pub device: usize,
    /// Whether it is the device's primary context.
    pub primary: bool,
    /// Retain count (primary) or 1 (created).
    pub refs: u64,
    /// False once destroyed (a primary context released to zero is inactive until retained).
    pub active: bool,
    /// The first error that made it unusable (a kernel's illegal address, …).
    pub sticky: Option<EmuError>,
}

struct State {
    ctxs: HashMap<u64, Ctx>,
    primary: Vec<u64>,
    next: u64,
}

fn state() -> MutexGuard<'static, State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| {
        let n = crate::config::get().devices.len();
        let mut ctxs = HashMap::new();
        let mut primary = Vec::new();
        for d in 0..n {
            let id = d as u64 + 1;
            ctxs.insert(
                id,
                Ctx {
                    id,
                    device: d,
                    primary: true,
                    refs: 0,
                    active: false,
                    sticky: None,
                },
            );
            primary.push(id);
        }
        Mutex::new(State {
            ctxs,
            primary,
            next: n as u64 + 1,
        })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    static CURRENT: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// The handle of context `id`.
pub fn handle(id: u64) -> u64 {
    CTX_TAG | id
}

/// The context id of a handle (0 for null).
pub fn id_of(handle: u64) -> Option<u64> {
    if handle == 0 {
        return Some(0);
    }
    (handle & !0xffff_ffff == CTX_TAG).then_some(handle & 0xffff_ffff)
}

/// The device count.
pub fn device_count() -> usize {
    crate::config::get().devices.len()
}

/// Checks a device ordinal.
pub fn check_device(d: i64) -> Result<usize, EmuError> {
    if d >= 0 && (d as usize) < device_count() {
        Ok(d as usize)
    } else {
        Err(EmuError::new(
            CUDA_ERROR_INVALID_DEVICE,
            format!("device {d} (this process sees {})", device_count()),
        ))
    }
}

/// Device `d`'s primary context.
fn primary_of(st: &mut State, d: usize) -> Result<&mut Ctx, EmuError> {
    let id = *st
        .primary
        .get(d)
        .ok_or_else(|| EmuError::new(CUDA_ERROR_INVALID_DEVICE, format!("device {d}")))?;
    st.ctxs.get_mut(&id).ok_or_else(|| invalid(id))
}

/// The state half of [`crate::lifecycle::primary_retain`] (which holds the teardown lock):
/// activates device `d`'s primary context if it is not active, counts a reference, returns
/// its id.
pub(crate) fn retain_primary(d: usize) -> Result<u64, EmuError> {
    let mut st = state();
    let c = primary_of(&mut st, d)?;
    let id = c.id;
    if !c.active {
        c.active = true;
        c.sticky = None;
        crate::memory::context_count(d, 1);
    }
    c.refs += 1;
    Ok(id)
}

/// The state half of [`crate::lifecycle::primary_release`]: drops a reference of device `d`'s
/// primary context; at zero it is made inactive and its id returned (the caller tears down its
/// streams and memory).
pub(crate) fn release_primary(d: usize) -> Result<Option<u64>, EmuError> {
    let mut st = state();
    let c = primary_of(&mut st, d)?;
    let id = c.id;
    if c.refs == 0 {
        return Err(EmuError::new(
            CUDA_ERROR_INVALID_CONTEXT,
            format!("device {d}'s primary context released more often than retained"),
        ));
    }
    c.refs -= 1;
    if c.refs == 0 {
        c.active = false;
        return Ok(Some(id));
    }
    Ok(None)
}

/// Creates a (non-primary) context on `d`, made current.
pub fn create(d: usize) -> Result<u64, EmuError> {
    let id = {
        let mut st = state();
        let id = st.next;
        st.next += 1;
        st.ctxs.insert(
            id,
            Ctx {
                id,
                device: d,
                primary: false,
                refs: 1,
                active: true,
                sticky: None,
            },
        );
        id
    };
    crate::memory::context_count(d, 1);
    push_current(id);
    Ok(id)
}

/// The state half of [`crate::lifecycle::destroy`]: makes context `id` (made by [`create`],
/// not a primary one) inactive and returns its device.
pub(crate) fn deactivate_created(id: u64) -> Result<usize, EmuError> {
    let mut st = state();
    let c = st.ctxs.get_mut(&id).ok_or_else(|| invalid(id))?;
    if c.primary {
        return Err(EmuError::new(
            CUDA_ERROR_INVALID_CONTEXT,
            "cuCtxDestroy of a primary context (release it instead)",
        ));
    }
    c.active = false;
    Ok(c.device)
}

/// Removes context `id` from the calling thread's stack of current contexts.
pub(crate) fn forget_current(id: u64) {
    CURRENT.with(|c| c.borrow_mut().retain(|&x| x != id));
}

fn invalid(id: u64) -> EmuError {
    EmuError::new(
        CUDA_ERROR_INVALID_CONTEXT,
        format!("context {id} does not exist"),
    )
}

/// A copy of context `id`.
pub fn get(id: u64) -> Result<Ctx, EmuError> {
    state().ctxs.get(&id).cloned().ok_or_else(|| invalid(id))
}

/// Context `id` if it can be used: active, and without a sticky error.
pub fn usable(id: u64) -> Result<Ctx, EmuError> {
    let c = get(id)?;
    if !c.active {
        return Err(EmuError::new(
            CUDA_ERROR_CONTEXT_IS_DESTROYED,
            format!(
                "context of device {} was destroyed{}",
                c.device,
                if c.primary {
                    " (its primary context was released to zero: every retain must be \
                     matched by a release only when the device is no longer used)"
                } else {
                    ""
                }
            ),
        ));
    }
    if let Some(e) = &c.sticky {
        return Err(e.clone());
    }
    Ok(c)
}

/// Makes `e` the sticky error of context `id` (the first one stays).
pub fn set_sticky(id: u64, e: &EmuError) {
    if let Some(c) = state().ctxs.get_mut(&id) {
        if c.sticky.is_none() {
            c.sticky = Some(e.clone());
        }
    }
}

/// Sets the calling thread's current context (`0`: none).
pub fn set_current(id: u64) {
    CURRENT.with(|c| {
        let mut v = c.borrow_mut();
        v.pop();
        if id != 0 {
            v.push(id);
        }
    });
}

/// Pushes a current context.
pub fn push_current(id: u64) {
    CURRENT.with(|c| c.borrow_mut().push(id));
}

/// Pops the current context.
pub fn pop_current() -> Option<u64> {
    CURRENT.with(|c| c.borrow_mut().pop())
}

/// The calling thread's current context id, if any.
pub fn current() -> Option<u64> {
    CURRENT.with(|c| c.borrow().last().copied())
}

/// The current context, usable, or the driver's error for its absence.
pub fn current_usable() -> Result<Ctx, EmuError> {
    let id = current().ok_or_else(|| {
        EmuError::new(
            CUDA_ERROR_INVALID_CONTEXT,
            "no current context on this thread",
        )
    })?;
    usable(id)
}

/// The device of the calling thread's current context (NCCL, cuBLASLt bind to it).
pub fn current_device() -> Option<usize> {
    current().and_then(|id| get(id).ok()).map(|c| c.device)
}
