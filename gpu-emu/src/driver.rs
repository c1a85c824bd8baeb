//! The driver API (`libcuda.so.1`): the `cu*` functions rdrop, cudarc and candle call, under
//! their real names. Each validates its arguments as the driver does, returns the driver's
//! code, and (with `RDROP_EMU_LOG=1`) reports failures on stderr.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::abi::Dim3;
use crate::error::*;
use crate::memory::{self, Kind};
use crate::{context, lifecycle, module, stream};

type R = Result<(), EmuError>;

static INIT: AtomicBool = AtomicBool::new(false);

fn inited() -> R {
    if INIT.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(EmuError::new(
            CUDA_ERROR_NOT_INITIALIZED,
            "cuInit was not called",
        ))
    }
}

/// Runs `f`, turning its error (or a panic) into the driver's code.
fn call(name: &str, f: impl FnOnce() -> R) -> CUresult {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => CUDA_SUCCESS,
        Ok(Err(e)) => {
            if crate::config::get().log >= 1 {
                report(&format!("{name}: {} ({})", e.message, e.code));
            }
            e.code
        }
        Err(_) => {
            report(&format!("{name}: internal error (a panic in the emulator)"));
            CUDA_ERROR_UNKNOWN
        }
    }
}

fn invalid(msg: impl Into<String>) -> EmuError {
    EmuError::new(CUDA_ERROR_INVALID_VALUE, msg)
}

fn out<T>(p: *mut T, what: &str) -> Result<*mut T, EmuError> {
    if p.is_null() {
        Err(invalid(format!("{what} is null")))
    } else {
        Ok(p)
    }
}

// ------------------------------------------------------------------- init and devices

#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    call("cuInit", || {
        if flags != 0 {
            return Err(invalid("cuInit flags must be 0"));
        }
        if !INIT.swap(true, Ordering::AcqRel) {
            let c = crate::config::get();
            for p in &c.problems {
                report(p);
            }
            for p in module::lib_problems() {
                report(&format!("kernel module: {p}"));
            }
            if c.log >= 1 {
                report(&format!(
                    "{} device(s): {}; {} host kernels; memcheck {}",
                    c.devices.len(),
                    c.devices
                        .iter()
                        .map(|d| format!(
                            "{} (cc {}.{}, {} MiB)",
                            d.name,
                            d.cc.0,
                            d.cc.1,
                            d.memory >> 20
                        ))
                        .collect::<Vec<_>>()
                        .join(", "),
                    module::host_kernel_count(),
                    if c.memcheck { "on" } else { "off" }
                ));
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    call("cuDriverGetVersion", || {
        *out(v, "version")? = 13000;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    call("cuDeviceGetCount", || {
        inited()?;
        *out(n, "count")? = context::device_count() as c_int;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(d: *mut c_int, ordinal: c_int) -> CUresult {
    call("cuDeviceGet", || {
        inited()?;
        let o = out(d, "device")?;
        if context::device_count() == 0 {
            return Err(EmuError::new(CUDA_ERROR_NO_DEVICE, "no emulated device"));
        }
        *o = context::check_device(ordinal as i64)? as c_int;
        Ok(())
    })
}

fn spec(d: c_int) -> Result<crate::config::DeviceSpec, EmuError> {
    inited()?;
    let i = context::check_device(d as i64)?;
    Ok(crate::config::get().devices[i].clone())
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, d: c_int) -> CUresult {
    call("cuDeviceGetName", || {
        let s = spec(d)?;
        let o = out(name, "name")?;
        if len <= 0 {
            return Err(invalid("name length ≤ 0"));
        }
        let b = s.name.as_bytes();
        let n = b.len().min(len as usize - 1);
        std::ptr::copy_nonoverlapping(b.as_ptr(), o as *mut u8, n);
        *o.add(n) = 0;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, d: c_int) -> CUresult {
    call("cuDeviceTotalMem", || {
        *out(bytes, "bytes")? = spec(d)?.memory as usize;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceComputeCapability(
    major: *mut c_int,
    minor: *mut c_int,
    d: c_int,
) -> CUresult {
    call("cuDeviceComputeCapability", || {
        let s = spec(d)?;
        *out(major, "major")? = s.cc.0;
        *out(minor, "minor")? = s.cc.1;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut u8, d: c_int) -> CUresult {
    cuDeviceGetUuid_v2(uuid, d)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut u8, d: c_int) -> CUresult {
    call("cuDeviceGetUuid", || {
        spec(d)?;
        let o = out(uuid, "uuid")?;
        for i in 0..16 {
            *o.add(i) = if i == 0 {
                0xe0
            } else if i == 15 {
                d as u8
            } else {
                i as u8
            };
        }
        Ok(())
    })
}

/// The attribute values of an emulated device (`None`: not emulated).
pub fn attribute(s: &crate::config::DeviceSpec, ordinal: usize, attr: c_int) -> Option<c_int> {
    let (maj, min) = s.cc;
    let smem_optin = match (maj, min) {
        (9, _) => 232_448,
        (8, 0) => 166_912,
        (8, 6) | (8, 9) => 101_376,
        (7, 0) => 98_304,
        (7, 5) => 65_536,
        _ => 49_152,
    };
    Some(match attr {
        1 => 1024,
        2 | 3 => 1024,
        4 => 64,
        5 => i32::MAX,
        6 | 7 => 65_535,
        8 => 49_152,
        9 => 65_536,
        10 => 32,
        11 => i32::MAX,
        12 => 65_536,
        13 => 1_980_000,
        14 => 512,
        15 => 1,
        16 => s.sms,
        17 => 0,
        18 => 0,
        19 => 1,
        20 => 0,
        31 => 1,
        32 => 1,
        33 => 0x18 + ordinal as c_int,
        34 => 0,
        36 => 2_619_000,
        37 => 5120,
        38 => 50 << 20,
        39 => {
            if maj >= 8 && min == 0 || maj == 9 {
                2048
            } else {
                1536
            }
        }
        40 => 2,
        41 => 1,
        50 => 0,
        75 => maj,
        76 => min,
        81 => smem_optin + 1024,
        82 => 65_536,
        83 => 1,
        89 => 1,
        95 => 1,
        97 => smem_optin,
        106 => 32,
        115 => 1,
        _ => return None,
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(pi: *mut c_int, attr: c_int, d: c_int) -> CUresult {
    call("cuDeviceGetAttribute", || {
        let s = spec(d)?;
        let o = out(pi, "value")?;
        match attribute(&s, d as usize, attr) {
            Some(v) => {
                *o = v;
                Ok(())
            }
            None => Err(invalid(format!(
                "device attribute {attr} is not emulated (add it to driver::attribute)"
            ))),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceCanAccessPeer(can: *mut c_int, d: c_int, peer: c_int) -> CUresult {
    call("cuDeviceCanAccessPeer", || {
        spec(d)?;
        spec(peer)?;
        *out(can, "result")? = 0;
        Ok(())
    })
}

// ---------------------------------------------------------------------------- contexts

fn ctx_of(handle: *mut c_void) -> Result<u64, EmuError> {
    match context::id_of(handle as u64) {
        Some(0) | None => Err(EmuError::new(
            CUDA_ERROR_INVALID_CONTEXT,
            format!("{handle:?} is not a context"),
        )),
        Some(id) => Ok(id),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut *mut c_void, d: c_int) -> CUresult {
    call("cuDevicePrimaryCtxRetain", || {
        inited()?;
        let o = out(pctx, "context")?;
        let dev = context::check_device(d as i64)?;
        let id = lifecycle::primary_retain(dev)?;
        *o = context::handle(id) as *mut c_void;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(d: c_int) -> CUresult {
    call("cuDevicePrimaryCtxRelease", || {
        inited()?;
        lifecycle::primary_release(context::check_device(d as i64)?)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    d: c_int,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    call("cuDevicePrimaryCtxGetState", || {
        inited()?;
        let dev = context::check_device(d as i64)?;
        let id = dev as u64 + 1;
        let c = context::get(id)?;
        *out(flags, "flags")? = 0;
        *out(active, "active")? = c_int::from(c.active);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(
    pctx: *mut *mut c_void,
    _flags: c_uint,
    d: c_int,
) -> CUresult {
    call("cuCtxCreate", || {
        inited()?;
        let o = out(pctx, "context")?;
        let id = context::create(context::check_device(d as i64)?)?;
        *o = context::handle(id) as *mut c_void;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: *mut c_void) -> CUresult {
    call("cuCtxDestroy", || {
        inited()?;
        lifecycle::destroy(ctx_of(ctx)?)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut *mut c_void) -> CUresult {
    call("cuCtxGetCurrent", || {
        inited()?;
        *out(pctx, "context")? = context::current().map_or(0, context::handle) as *mut c_void;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: *mut c_void) -> CUresult {
    call("cuCtxSetCurrent", || {
        inited()?;
        if ctx.is_null() {
            context::set_current(0);
            return Ok(());
        }
        let id = ctx_of(ctx)?;
        context::get(id)?;
        context::set_current(id);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: *mut c_void) -> CUresult {
    call("cuCtxPushCurrent", || {
        inited()?;
        let id = ctx_of(ctx)?;
        context::get(id)?;
        context::push_current(id);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut *mut c_void) -> CUresult {
    call("cuCtxPopCurrent", || {
        inited()?;
        let id = context::pop_current()
            .ok_or_else(|| EmuError::new(CUDA_ERROR_INVALID_CONTEXT, "no current context"))?;
        if !pctx.is_null() {
            *pctx = context::handle(id) as *mut c_void;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(d: *mut c_int) -> CUresult {
    call("cuCtxGetDevice", || {
        inited()?;
        let c = context::current_usable()?;
        *out(d, "device")? = c.device as c_int;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    call("cuCtxSynchronize", || {
        inited()?;
        let c = context::current_usable()?;
        stream::synchronize_context(c.id)
    })
}

// ----------------------------------------------------------------------------- streams

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ps: *mut *mut c_void, flags: c_uint) -> CUresult {
    call("cuStreamCreate", || {
        inited()?;
        let o = out(ps, "stream")?;
        if flags > 1 {
            return Err(invalid(format!("stream flags {flags:#x}")));
        }
        *o = stream::create(flags == 1)? as *mut c_void;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    ps: *mut *mut c_void,
    flags: c_uint,
    _priority: c_int,
) -> CUresult {
    cuStreamCreate(ps, flags)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(s: *mut c_void) -> CUresult {
    call("cuStreamDestroy", || {
        inited()?;
        stream::destroy(s as u64)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(s: *mut c_void) -> CUresult {
    call("cuStreamSynchronize", || {
        inited()?;
        stream::synchronize(s as u64)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(s: *mut c_void) -> CUresult {
    call("cuStreamQuery", || {
        inited()?;
        if stream::query(s as u64)? {
            Ok(())
        } else {
            Err(EmuError::new(CUDA_ERROR_NOT_READY, "work pending"))
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(
    s: *mut c_void,
    ev: *mut c_void,
    flags: c_uint,
) -> CUresult {
    call("cuStreamWaitEvent", || {
        inited()?;
        if flags != 0 {
            return Err(invalid("cuStreamWaitEvent flags must be 0"));
        }
        stream::stream_wait_event(s as u64, ev as u64)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(s: *mut c_void, status: *mut c_int) -> CUresult {
    call("cuStreamIsCapturing", || {
        inited()?;
        stream::resolve(s as u64)?;
        *out(status, "status")? = 0; // CU_STREAM_CAPTURE_STATUS_NONE
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCtx(s: *mut c_void, pctx: *mut *mut c_void) -> CUresult {
    call("cuStreamGetCtx", || {
        inited()?;
        let st = stream::resolve(s as u64)?;
        *out(pctx, "context")? = context::handle(st.ctx) as *mut c_void;
        Ok(())
    })
}

type HostFn = unsafe extern "C" fn(*mut c_void);

struct SendPtr(*mut c_void);
// SAFETY: the user data pointer is handed back to the user's callback, as the driver does.
unsafe impl Send for SendPtr {}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(
    s: *mut c_void,
    f: Option<HostFn>,
    data: *mut c_void,
) -> CUresult {
    call("cuLaunchHostFunc", || {
        inited()?;
        let f = f.ok_or_else(|| invalid("null host function"))?;
        let d = SendPtr(data);
        stream::enqueue(
            s as u64,
            "a host function".into(),
            Box::new(move || {
                let d = d;
                f(d.0);
                Ok(())
            }),
        )?;
        Ok(())
    })
}

// ------------------------------------------------------------------------------ events

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(pe: *mut *mut c_void, flags: c_uint) -> CUresult {
    call("cuEventCreate", || {
        inited()?;
        let o = out(pe, "event")?;
        *o = stream::event_create(flags)? as *mut c_void;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(e: *mut c_void) -> CUresult {
    call("cuEventDestroy", || {
        inited()?;
        stream::event_destroy(e as u64)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(e: *mut c_void, s: *mut c_void) -> CUresult {
    call("cuEventRecord", || {
        inited()?;
        stream::event_record(e as u64, s as u64)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(e: *mut c_void) -> CUresult {
    call("cuEventSynchronize", || {
        inited()?;
        stream::event_synchronize(e as u64)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(e: *mut c_void) -> CUresult {
    call("cuEventQuery", || {
        inited()?;
        if stream::event_query(e as u64)? {
            Ok(())
        } else {
            Err(EmuError::new(CUDA_ERROR_NOT_READY, "not yet"))
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    a: *mut c_void,
    b: *mut c_void,
) -> CUresult {
    call("cuEventElapsedTime", || {
        inited()?;
        *out(ms, "milliseconds")? = stream::event_elapsed(a as u64, b as u64)?;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    a: *mut c_void,
    b: *mut c_void,
) -> CUresult {
    cuEventElapsedTime(ms, a, b)
}

// ------------------------------------------------------------------------------ memory

/// Pinned host allocations (start → length).
fn pinned() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<usize, usize>> {
    static P: OnceLock<Mutex<std::collections::BTreeMap<usize, usize>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(Default::default()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn is_pinned(p: usize, n: usize) -> bool {
    pinned()
        .range(..=p)
        .next_back()
        .is_some_and(|(&s, &l)| p + n <= s + l)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut u64, bytes: usize) -> CUresult {
    call("cuMemAlloc", || {
        inited()?;
        let o = out(dptr, "pointer")?;
        let c = context::current_usable()?;
        if bytes == 0 {
            return Err(invalid("cuMemAlloc of 0 bytes"));
        }
        *o = memory::alloc(c.device, bytes as u64, Kind::Sync)?;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(p: u64) -> CUresult {
    call("cuMemFree", || {
        inited()?;
        if p == 0 {
            return Ok(());
        }
        // cuMemFree synchronises the device first
        if let Ok(c) = context::current_usable() {
            let _ = stream::synchronize_context(c.id);
        }
        memory::free(p, "cuMemFree")
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(dptr: *mut u64, bytes: usize, s: *mut c_void) -> CUresult {
    call("cuMemAllocAsync", || {
        inited()?;
        let o = out(dptr, "pointer")?;
        let st = stream::resolve(s as u64)?;
        if bytes == 0 {
            return Err(invalid("cuMemAllocAsync of 0 bytes"));
        }
        *o = memory::alloc(st.device, bytes as u64, Kind::Async)?;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(p: u64, s: *mut c_void) -> CUresult {
    call("cuMemFreeAsync", || {
        inited()?;
        let st = stream::resolve(s as u64)?;
        match memory::lookup(p) {
            Some(a) if a.base == p => {}
            _ => {
                return Err(invalid(format!(
                    "cuMemFreeAsync of {p:#x}, not an allocation"
                )))
            }
        }
        stream::enqueue_on(
            &st,
            "cuMemFreeAsync".into(),
            Box::new(move || memory::free(p, "cuMemFreeAsync")),
        );
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    call("cuMemGetInfo", || {
        inited()?;
        let c = context::current_usable()?;
        let (f, t) = memory::info(c.device);
        *out(free, "free")? = f as usize;
        *out(total, "total")? = t as usize;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    call("cuMemHostAlloc", || {
        inited()?;
        let o = out(pp, "pointer")?;
        let p = libc::calloc(bytes.max(1), 1);
        if p.is_null() {
            return Err(EmuError::new(CUDA_ERROR_OUT_OF_MEMORY, "host memory"));
        }
        pinned().insert(p as usize, bytes);
        *o = p;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytes: usize) -> CUresult {
    cuMemHostAlloc(pp, bytes, 0)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    call("cuMemFreeHost", || {
        inited()?;
        if pinned().remove(&(p as usize)).is_none() {
            return Err(invalid("cuMemFreeHost of memory not from cuMemHostAlloc"));
        }
        libc::free(p);
        Ok(())
    })
}

struct HostPtr(usize);
// SAFETY: a host address the caller keeps valid as CUDA requires (pinned, async) or that was
// copied before the call returned (pageable).
unsafe impl Send for HostPtr {}

/// A copy's stream operation: `f` gets the stream's device.
fn copy_op(
    device: usize,
    f: impl FnOnce(usize) -> R + Send + 'static,
) -> Box<dyn FnOnce() -> R + Send> {
    Box::new(move || f(device))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: u64,
    src: *const c_void,
    n: usize,
    s: *mut c_void,
) -> CUresult {
    call("cuMemcpyHtoDAsync", || htod(dst, src, n, s as u64, false))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: u64, src: *const c_void, n: usize) -> CUresult {
    call("cuMemcpyHtoD", || {
        htod(dst, src, n, stream::STREAM_LEGACY, true)
    })
}

unsafe fn htod(dst: u64, src: *const c_void, n: usize, s: u64, sync: bool) -> R {
    inited()?;
    if n == 0 {
        return Ok(());
    }
    if src.is_null() {
        return Err(invalid("null host source"));
    }
    let st = stream::resolve(s)?;
    let device = st.device;
    memory::resolve(device, dst, n as u64, true)
        .map_err(|e| invalid(format!("destination: {}", e.message)))?;
    let op: Box<dyn FnOnce() -> R + Send> = if is_pinned(src as usize, n) && !sync {
        let sp = HostPtr(src as usize);
        copy_op(device, move |d| {
            let sp = sp;
            let p = memory::resolve(d, dst, n as u64, true)?;
            std::ptr::copy_nonoverlapping(sp.0 as *const u8, p, n);
            Ok(())
        })
    } else {
        // pageable: staged now, so the caller may reuse its buffer when this returns
        let staged = std::slice::from_raw_parts(src as *const u8, n).to_vec();
        copy_op(device, move |d| {
            let p = memory::resolve(d, dst, n as u64, true)?;
            std::ptr::copy_nonoverlapping(staged.as_ptr(), p, n);
            Ok(())
        })
    };
    let seq = stream::enqueue_on(&st, format!("cuMemcpyHtoD of {n} bytes to {dst:#x}"), op);
    if sync {
        st.wait_for(seq);
        context::usable(st.ctx)?;
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: u64,
    n: usize,
    s: *mut c_void,
) -> CUresult {
    call("cuMemcpyDtoHAsync", || dtoh(dst, src, n, s as u64, false))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: u64, n: usize) -> CUresult {
    call("cuMemcpyDtoH", || {
        dtoh(dst, src, n, stream::STREAM_LEGACY, true)
    })
}

unsafe fn dtoh(dst: *mut c_void, src: u64, n: usize, s: u64, sync: bool) -> R {
    inited()?;
    if n == 0 {
        return Ok(());
    }
    if dst.is_null() {
        return Err(invalid("null host destination"));
    }
    let st = stream::resolve(s)?;
    let device = st.device;
    memory::resolve(device, src, n as u64, false)
        .map_err(|e| invalid(format!("source: {}", e.message)))?;
    let dp = HostPtr(dst as usize);
    let seq = stream::enqueue_on(
        &st,
        format!("cuMemcpyDtoH of {n} bytes from {src:#x}"),
        copy_op(device, move |d| {
            let dp = dp;
            let p = memory::resolve(d, src, n as u64, false)?;
            std::ptr::copy_nonoverlapping(p as *const u8, dp.0 as *mut u8, n);
            Ok(())
        }),
    );
    // to pageable memory the driver returns only once the copy is done
    if sync || !is_pinned(dst as usize, n) {
        st.wait_for(seq);
        context::usable(st.ctx)?;
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: u64,
    src: u64,
    n: usize,
    s: *mut c_void,
) -> CUresult {
    call("cuMemcpyDtoDAsync", || dtod(dst, src, n, s as u64, false))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: u64, src: u64, n: usize) -> CUresult {
    call("cuMemcpyDtoD", || {
        dtod(dst, src, n, stream::STREAM_LEGACY, true)
    })
}

fn dtod(dst: u64, src: u64, n: usize, s: u64, sync: bool) -> R {
    inited()?;
    if n == 0 {
        return Ok(());
    }
    let st = stream::resolve(s)?;
    let seq = stream::enqueue_on(
        &st,
        format!("cuMemcpyDtoD of {n} bytes {src:#x} → {dst:#x}"),
        copy_op(st.device, move |d| {
            let sp = memory::resolve(d, src, n as u64, false)?;
            let dp = memory::resolve(d, dst, n as u64, true)?;
            // SAFETY: both ranges resolved; `copy` allows overlap as cuMemcpy leaves it undefined
            unsafe { std::ptr::copy(sp as *const u8, dp, n) };
            Ok(())
        }),
    );
    if sync {
        st.wait_for(seq);
        context::usable(st.ctx)?;
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeerAsync(
    dst: u64,
    dst_ctx: *mut c_void,
    src: u64,
    src_ctx: *mut c_void,
    n: usize,
    s: *mut c_void,
) -> CUresult {
    call("cuMemcpyPeerAsync", || {
        inited()?;
        let (dc, sc) = (
            context::usable(ctx_of(dst_ctx)?)?,
            context::usable(ctx_of(src_ctx)?)?,
        );
        let st = stream::resolve(s as u64)?;
        let (dd, sd) = (dc.device, sc.device);
        stream::enqueue_on(
            &st,
            format!("cuMemcpyPeerAsync of {n} bytes"),
            Box::new(move || {
                let sp = memory::resolve(sd, src, n as u64, false)?;
                let dp = memory::resolve(dd, dst, n as u64, true)?;
                // SAFETY: both ranges resolved.
                unsafe { std::ptr::copy(sp as *const u8, dp, n) };
                Ok(())
            }),
        );
        Ok(())
    })
}

fn memset(dst: u64, value: u32, width: usize, count: usize, s: u64, sync: bool) -> R {
    inited()?;
    let n = width * count;
    if n == 0 {
        return Ok(());
    }
    let st = stream::resolve(s)?;
    let seq = stream::enqueue_on(
        &st,
        format!("cuMemset of {n} bytes at {dst:#x}"),
        copy_op(st.device, move |d| {
            let p = memory::resolve(d, dst, n as u64, true)?;
            if !dst.is_multiple_of(width as u64) {
                return Err(EmuError::new(
                    CUDA_ERROR_MISALIGNED_ADDRESS,
                    "cuMemsetD32 of a misaligned pointer",
                ));
            }
            // SAFETY: resolved range of n bytes.
            unsafe {
                match width {
                    1 => std::ptr::write_bytes(p, value as u8, n),
                    2 => std::slice::from_raw_parts_mut(p as *mut u16, count).fill(value as u16),
                    _ => std::slice::from_raw_parts_mut(p as *mut u32, count).fill(value),
                }
            }
            Ok(())
        }),
    );
    if sync {
        st.wait_for(seq);
        context::usable(st.ctx)?;
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(dst: u64, v: u8, n: usize, s: *mut c_void) -> CUresult {
    call("cuMemsetD8Async", || {
        memset(dst, v as u32, 1, n, s as u64, false)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: u64, v: u8, n: usize) -> CUresult {
    call("cuMemsetD8", || {
        memset(dst, v as u32, 1, n, stream::STREAM_LEGACY, true)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(dst: u64, v: u32, n: usize, s: *mut c_void) -> CUresult {
    call("cuMemsetD32Async", || memset(dst, v, 4, n, s as u64, false))
}

#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttribute(data: *mut c_void, attr: c_int, p: u64) -> CUresult {
    call("cuPointerGetAttribute", || {
        inited()?;
        let a = memory::lookup(p).ok_or_else(|| invalid(format!("{p:#x} is not device memory")))?;
        let o = out(data, "data")?;
        match attr {
            1 => *(o as *mut u64) = context::handle(a.device as u64 + 1),
            2 => *(o as *mut u32) = 2, // CU_MEMORYTYPE_DEVICE
            3 => *(o as *mut u64) = p,
            9 => *(o as *mut i32) = a.device as i32,
            11 => *(o as *mut u64) = a.base,
            12 => *(o as *mut usize) = a.size as usize,
            8 => *(o as *mut u32) = 0,
            _ => return Err(invalid(format!("pointer attribute {attr} is not emulated"))),
        }
        Ok(())
    })
}

// ----------------------------------------------------------------------- modules, launch

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(pm: *mut *mut c_void, image: *const c_void) -> CUresult {
    call("cuModuleLoadData", || {
        inited()?;
        let o = out(pm, "module")?;
        let c = context::current_usable()?;
        let cc = crate::config::get().devices[c.device].cc;
        let img = module::pick(module::parse_image(image)?, cc)?;
        *o = module::load(c.id, cc, img)? as *mut c_void;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(pm: *mut *mut c_void, fname: *const c_char) -> CUresult {
    call("cuModuleLoad", || {
        inited()?;
        if fname.is_null() {
            return Err(invalid("null file name"));
        }
        let path = CStr::from_ptr(fname).to_string_lossy().into_owned();
        let mut bytes = std::fs::read(&path)
            .map_err(|e| EmuError::new(CUDA_ERROR_NOT_FOUND, format!("{path}: {e}")))?;
        bytes.push(0);
        let o = out(pm, "module")?;
        let c = context::current_usable()?;
        let cc = crate::config::get().devices[c.device].cc;
        let img = module::pick(module::parse_image(bytes.as_ptr() as *const c_void)?, cc)?;
        *o = module::load(c.id, cc, img)? as *mut c_void;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(m: *mut c_void) -> CUresult {
    call("cuModuleUnload", || {
        inited()?;
        module::unload(m as u64)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    pf: *mut *mut c_void,
    m: *mut c_void,
    name: *const c_char,
) -> CUresult {
    call("cuModuleGetFunction", || {
        inited()?;
        let o = out(pf, "function")?;
        if name.is_null() {
            return Err(invalid("null name"));
        }
        let n = CStr::from_ptr(name).to_string_lossy().into_owned();
        *o = module::get_function(m as u64, &n)? as *mut c_void;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    pi: *mut c_int,
    attr: c_int,
    f: *mut c_void,
) -> CUresult {
    call("cuFuncGetAttribute", || {
        inited()?;
        let func = module::func(f as u64)?;
        let o = out(pi, "value")?;
        *o = match attr {
            0 => 1024,
            1 => func.static_shared as c_int,
            2 | 3 => 0,
            4 => 32,
            5 | 6 => {
                let c = context::get(func.ctx)?;
                let cc = crate::config::get().devices[c.device].cc;
                cc.0 * 10 + cc.1
            }
            8 => func.max_dynamic_shared as c_int,
            _ => {
                return Err(invalid(format!(
                    "function attribute {attr} is not emulated"
                )))
            }
        };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(f: *mut c_void, attr: c_int, value: c_int) -> CUresult {
    call("cuFuncSetAttribute", || {
        inited()?;
        let func = module::func(f as u64)?;
        match attr {
            8 => {
                let c = context::get(func.ctx)?;
                let s = &crate::config::get().devices[c.device];
                let max = attribute(s, c.device, 97).unwrap_or(49_152) as u64;
                if value < 0 || value as u64 + func.static_shared > max {
                    return Err(invalid(format!(
                        "dynamic shared memory {value} + static {} exceeds the device's {max}",
                        func.static_shared
                    )));
                }
                module::set_max_dynamic_shared(f as u64, value as u64)
            }
            9 => Ok(()),
            _ => Err(invalid(format!(
                "function attribute {attr} is not settable here"
            ))),
        }
    })
}

/// Launch limits of an H100-class device (as every emulated device: they are the same from
/// Volta to Hopper).
fn check_launch(f: &module::Func, grid: Dim3, block: Dim3, shared: u32) -> R {
    let threads = block.x as u64 * block.y as u64 * block.z as u64;
    if grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 {
        return Err(invalid(format!(
            "launch of `{}` with an empty grid ({},{},{}) or block ({},{},{})",
            f.name, grid.x, grid.y, grid.z, block.x, block.y, block.z
        )));
    }
    if threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 {
        return Err(invalid(format!(
            "launch of `{}` with a block of ({},{},{}) = {threads} threads: at most 1024, and \
             (1024, 1024, 64) per dimension",
            f.name, block.x, block.y, block.z
        )));
    }
    if grid.x > i32::MAX as u32 || grid.y > 65_535 || grid.z > 65_535 {
        return Err(invalid(format!(
            "launch of `{}` with a grid of ({},{},{}): at most (2^31 − 1, 65535, 65535)",
            f.name, grid.x, grid.y, grid.z
        )));
    }
    if f.static_shared > 48 << 10 {
        return Err(invalid(format!(
            "`{}` has {} bytes of static shared memory: at most 48 KiB",
            f.name, f.static_shared
        )));
    }
    if shared as u64 > f.max_dynamic_shared || shared as u64 + f.static_shared > 227 << 10 {
        return Err(invalid(format!(
            "launch of `{}` with {shared} bytes of dynamic shared memory: at most {} without \
             cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
            f.name,
            f.max_dynamic_shared.min((48 << 10) - f.static_shared)
        )));
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    s: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    call("cuLaunchKernel", || {
        inited()?;
        let func = module::func(f as u64)?;
        let grid = Dim3 {
            x: gx,
            y: gy,
            z: gz,
        };
        let block = Dim3 {
            x: bx,
            y: by,
            z: bz,
        };
        check_launch(&func, grid, block, shared)?;
        let st = stream::resolve(s as u64)?;
        if st.ctx != func.ctx {
            return Err(EmuError::new(
                CUDA_ERROR_INVALID_HANDLE,
                format!("`{}` belongs to another context than the stream", func.name),
            ));
        }
        if !extra.is_null() {
            return Err(invalid(format!(
                "launch of `{}` with `extra` arguments: not emulated (use kernelParams)",
                func.name
            )));
        }
        let Some(host) = func.host.clone() else {
            let e = EmuError::new(
                CUDA_ERROR_NOT_SUPPORTED,
                format!(
                    "kernel `{}` has no host implementation (a candle kernel, out of the \
                     emulator's scope: rdrop's explicit engine must not launch it)",
                    func.name
                ),
            );
            report(&e.message);
            return Err(e);
        };
        if shared > 0 {
            return Err(invalid(format!(
                "launch of `{}` with dynamic shared memory: not emulated",
                func.name
            )));
        }
        if !host.params.is_empty() && params.is_null() {
            return Err(invalid(format!(
                "launch of `{}` without kernelParams",
                func.name
            )));
        }
        // Fault injection `swap-args`: the first two pointer arguments swapped, as a launcher
        // that pushes them in the wrong order.
        let mut swapped: Vec<*mut c_void> = Vec::new();
        let params = if crate::config::mutate("swap-args") && !params.is_null() {
            swapped = (0..host.params.len()).map(|i| *params.add(i)).collect();
            let ptrs: Vec<usize> = host
                .params
                .iter()
                .enumerate()
                .filter(|(_, p)| p.is_pointer)
                .map(|(i, _)| i)
                .collect();
            if ptrs.len() >= 2 {
                swapped.swap(ptrs[0], ptrs[1]);
            }
            swapped.as_mut_ptr()
        } else {
            params
        };
        let launch = crate::launch::Launch::new(
            host,
            grid,
            block,
            st.device,
            params as *const *const c_void,
        );
        drop(swapped);
        let name = func.name.clone();
        stream::enqueue_on(
            &st,
            format!("kernel `{name}`"),
            Box::new(move || crate::launch::execute(launch)),
        );
        Ok(())
    })
}

// ------------------------------------------------------------------------------ errors

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: CUresult, p: *mut *const c_char) -> CUresult {
    error_text(code, p, false)
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: CUresult, p: *mut *const c_char) -> CUresult {
    error_text(code, p, true)
}

unsafe fn error_text(code: CUresult, p: *mut *const c_char, name: bool) -> CUresult {
    static TEXTS: OnceLock<Mutex<std::collections::HashMap<(i32, bool), std::ffi::CString>>> =
        OnceLock::new();
    if p.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Some((n, s)) = describe(code) else {
        *p = std::ptr::null();
        return CUDA_ERROR_INVALID_VALUE;
    };
    let mut t = TEXTS
        .get_or_init(|| Mutex::new(Default::default()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let c = t
        .entry((code, name))
        .or_insert_with(|| std::ffi::CString::new(if name { n } else { s }).unwrap_or_default());
    *p = c.as_ptr();
    CUDA_SUCCESS
}
