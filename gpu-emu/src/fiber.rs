//! Fibers: the threads of a block as stackful coroutines on one host thread, so that
//! `__syncthreads`, `__syncwarp` and the shuffles are real barriers (a thread stops there and
//! the others run) rather than loops that only happen to work.
//!
//! x86-64 System V only: [`switch`] saves the callee-saved registers on the current stack,
//! stores the stack pointer and loads the other one. The floating-point control state (MXCSR,
//! x87 control word) is not switched: no fiber changes it, they all run with the thread's. A new
//! fiber's stack is laid out so that the first switch to it "returns" into `entry(arg)`.
#![allow(unsafe_code)]

/// log2 of a fiber stack's slot: every stack is one slot of this size, aligned to it, with a
/// guard page at its low end, so that the kernel modules' memory hooks recognise the calling
/// thread's own stack by its address alone (`shim/asan_hooks.cpp`, RDEMU_STACK_SLOT_SHIFT).
pub const SLOT_SHIFT: u32 = 18;
/// Bytes of a fiber's stack slot.
pub const SLOT: usize = 1 << SLOT_SHIFT;
/// Usable bytes of a fiber's stack (the slot less its guard page).
pub const STACK_BYTES: usize = SLOT - 4096;

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl rdemu_fiber_switch",
    ".hidden rdemu_fiber_switch",
    ".type rdemu_fiber_switch,@function",
    "rdemu_fiber_switch:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi], rsp",
    "mov rsp, rsi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size rdemu_fiber_switch, .-rdemu_fiber_switch",
    ".p2align 4",
    ".globl rdemu_fiber_start",
    ".hidden rdemu_fiber_start",
    ".type rdemu_fiber_start,@function",
    "rdemu_fiber_start:",
    "mov rdi, r12",
    "call r13",
    "ud2",
    ".size rdemu_fiber_start, .-rdemu_fiber_start",
);

#[cfg(target_arch = "x86_64")]
extern "C" {
    fn rdemu_fiber_switch(save_sp: *mut usize, load_sp: usize);
    fn rdemu_fiber_start();
}

/// Whether fibers work on this architecture.
pub const SUPPORTED: bool = cfg!(target_arch = "x86_64");

/// A fiber stack: an mmap'd region with a guard page at its low end.
pub struct Stack {
    base: *mut u8,
    len: usize,
}

// SAFETY: the stack is plain memory owned by one host thread at a time.
unsafe impl Send for Stack {}

impl Stack {
    /// A new stack: one [`SLOT`]-aligned slot (guard page at its low end).
    pub fn new() -> Option<Stack> {
        let len = 2 * SLOT;
        // SAFETY: a fresh anonymous mapping; the parts outside the aligned slot are unmapped
        // and its first page made inaccessible below.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return None;
            }
            let start = p as usize;
            let base = (start + SLOT - 1) & !(SLOT - 1);
            if base > start {
                libc::munmap(p, base - start);
            }
            let end = start + len;
            if end > base + SLOT {
                libc::munmap((base + SLOT) as *mut libc::c_void, end - base - SLOT);
            }
            libc::mprotect(base as *mut libc::c_void, 4096, libc::PROT_NONE);
            Some(Stack {
                base: base as *mut u8,
                len: SLOT,
            })
        }
    }

    /// The usable range `[lo, hi)`.
    pub fn range(&self) -> (usize, usize) {
        (self.base as usize + 4096, self.base as usize + self.len)
    }

    /// Prepares the stack so that switching to the returned stack pointer calls
    /// `entry(arg)`; `entry` must never return (it switches away for good).
    pub fn prepare(&self, entry: extern "C" fn(usize), arg: usize) -> usize {
        let (_, hi) = self.range();
        let top = hi & !15;
        // Frame popped by `rdemu_fiber_switch`: r15, r14, r13, r12, rbx, rbp, return address.
        let words: [usize; 7] = [
            0,                           // r15
            0,                           // r14
            entry as *const () as usize, // r13
            arg,                         // r12
            0,                           // rbx
            0,                           // rbp
            fiber_start_addr(),          // return address
        ];
        // after the switch pops these 7 words, rsp = top - 16: the `call r13` in
        // `rdemu_fiber_start` is made with rsp ≡ 0 (mod 16), as the ABI wants
        let sp = top - 16 - words.len() * 8;
        for (i, w) in words.iter().enumerate() {
            // SAFETY: inside the stack's usable range (checked by construction above).
            unsafe { *((sp + i * 8) as *mut usize) = *w };
        }
        sp
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base as *mut _, self.len) };
    }
}

#[cfg(target_arch = "x86_64")]
fn fiber_start_addr() -> usize {
    rdemu_fiber_start as *const () as usize
}

#[cfg(not(target_arch = "x86_64"))]
fn fiber_start_addr() -> usize {
    0
}

/// Saves the current context's stack pointer into `*save` and switches to `load`.
///
/// # Safety
/// `load` must be a stack pointer saved by this function or returned by
/// [`Stack::prepare`], on a stack that is still alive.
#[cfg(target_arch = "x86_64")]
pub unsafe fn switch(save: *mut usize, load: usize) {
    rdemu_fiber_switch(save, load);
}

/// See the x86-64 version.
///
/// # Safety
/// Never callable: fibers are not supported on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn switch(_save: *mut usize, _load: usize) {
    unreachable!("fibers need x86-64")
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static MAIN: Cell<usize> = const { Cell::new(0) };
        static FIB: Cell<usize> = const { Cell::new(0) };
        static LOG: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    extern "C" fn body(arg: usize) {
        for i in 0..3 {
            LOG.with(|l| l.borrow_mut().push(arg * 10 + i));
            let f = FIB.with(|f| f.as_ptr());
            // SAFETY: MAIN holds the scheduler's saved stack pointer.
            unsafe { switch(f, MAIN.with(|m| m.get())) };
        }
        LOG.with(|l| l.borrow_mut().push(999));
        let f = FIB.with(|f| f.as_ptr());
        // SAFETY: as above; never resumed after this.
        unsafe { switch(f, MAIN.with(|m| m.get())) };
    }

    #[test]
    fn a_fiber_runs_interleaved_with_its_scheduler() {
        let s = Stack::new().unwrap();
        FIB.with(|f| f.set(s.prepare(body, 7)));
        for _ in 0..4 {
            let m = MAIN.with(|m| m.as_ptr());
            // SAFETY: FIB holds the fiber's prepared or saved stack pointer.
            unsafe { switch(m, FIB.with(|f| f.get())) };
            LOG.with(|l| l.borrow_mut().push(1));
        }
        let log = LOG.with(|l| l.borrow().clone());
        assert_eq!(log, vec![70, 1, 71, 1, 72, 1, 999, 1]);
        // floating point still works after switches
        let x: f64 = (2.0f64).sqrt();
        assert!((x * x - 2.0).abs() < 1e-12);
    }
}
