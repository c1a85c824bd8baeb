//! Default-stream semantics as the driver defines them: the legacy default stream waits for
//! earlier work of blocking streams (not of non-blocking ones), and the per-thread default
//! stream is a different stream on each host thread.
#![allow(unsafe_code)]

mod common;

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use rdrop_gpu_emu::driver::*;

static SLOW_DONE: AtomicBool = AtomicBool::new(false);

unsafe extern "C" fn slow(flag: *mut c_void) {
    std::thread::sleep(Duration::from_millis(800));
    (*(flag as *const AtomicBool)).store(true, Ordering::SeqCst);
}

unsafe extern "C" fn probe(out: *mut c_void) {
    let seen = SLOW_DONE.load(Ordering::SeqCst);
    (*(out as *const AtomicBool)).store(seen, Ordering::SeqCst);
}

fn enqueue(s: *mut c_void, f: unsafe extern "C" fn(*mut c_void), data: &AtomicBool) {
    // SAFETY: `data` outlives the stream's work (statics and joined threads).
    ok(
        unsafe { cuLaunchHostFunc(s, Some(f), data as *const AtomicBool as *mut c_void) },
        "host function",
    );
}

#[test]
fn the_legacy_stream_waits_for_blocking_streams_only() {
    context(0);
    static SEEN_BLOCKING: AtomicBool = AtomicBool::new(false);
    static SEEN_NONBLOCKING: AtomicBool = AtomicBool::new(true);
    // SAFETY: valid out-pointers.
    unsafe {
        let (mut blocking, mut nonblocking) = (std::ptr::null_mut(), std::ptr::null_mut());
        ok(cuStreamCreate(&mut blocking, 0), "stream");
        ok(cuStreamCreate(&mut nonblocking, 1), "stream");
        // a non-blocking stream's slow work: the legacy stream does not wait for it
        SLOW_DONE.store(false, Ordering::SeqCst);
        enqueue(nonblocking, slow, &SLOW_DONE);
        enqueue(std::ptr::null_mut(), probe, &SEEN_NONBLOCKING);
        ok(cuStreamSynchronize(std::ptr::null_mut()), "sync legacy");
        assert!(
            !SEEN_NONBLOCKING.load(Ordering::SeqCst),
            "waited for a non-blocking stream"
        );
        ok(cuStreamSynchronize(nonblocking), "sync");
        // a blocking stream's slow work: the legacy stream's next operation runs after it
        SLOW_DONE.store(false, Ordering::SeqCst);
        enqueue(blocking, slow, &SLOW_DONE);
        enqueue(std::ptr::null_mut(), probe, &SEEN_BLOCKING);
        ok(cuStreamSynchronize(std::ptr::null_mut()), "sync legacy");
        assert!(
            SEEN_BLOCKING.load(Ordering::SeqCst),
            "did not wait for a blocking stream"
        );
    }
}

#[test]
fn the_per_thread_stream_is_one_stream_per_host_thread() {
    static A_DONE: AtomicBool = AtomicBool::new(false);
    static B_SAW_A: AtomicBool = AtomicBool::new(true);
    // a context of its own: the other test's legacy-stream work would order the streams of a
    // shared context (rightly: blocking streams wait for the legacy stream)
    context(0);
    let mut c = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    ok(unsafe { cuCtxCreate_v2(&mut c, 0, 0) }, "cuCtxCreate");
    let ctx = c as usize;
    const PER_THREAD: usize = 2; // CU_STREAM_PER_THREAD
    let a = std::thread::spawn(move || {
        let per_thread = PER_THREAD as *mut c_void;
        // SAFETY: the context handle from `context`.
        ok(unsafe { cuCtxSetCurrent(ctx as *mut c_void) }, "current");
        enqueue(per_thread, slow, &A_DONE);
        // SAFETY: plain driver call.
        ok(unsafe { cuStreamSynchronize(per_thread) }, "sync a");
    });
    std::thread::sleep(Duration::from_millis(50));
    let b = std::thread::spawn(move || {
        let per_thread = PER_THREAD as *mut c_void;
        // SAFETY: as above.
        ok(unsafe { cuCtxSetCurrent(ctx as *mut c_void) }, "current");
        enqueue(per_thread, probe_a, &B_SAW_A);
        // SAFETY: plain driver call.
        ok(unsafe { cuStreamSynchronize(per_thread) }, "sync b");
    });
    b.join().unwrap();
    assert!(
        !B_SAW_A.load(Ordering::SeqCst),
        "thread b's per-thread stream waited for thread a's"
    );
    a.join().unwrap();
    assert!(A_DONE.load(Ordering::SeqCst));

    unsafe extern "C" fn probe_a(out: *mut c_void) {
        (*(out as *const AtomicBool)).store(A_DONE.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}
