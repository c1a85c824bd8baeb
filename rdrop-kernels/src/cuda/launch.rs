//! The typed launch builder: a launcher names its kernel and pushes each argument in the
//! order of the kernel's C signature, buffers with the length the dimensions give, so that a
//! mis-sized or swapped buffer is a [`CudaKernelError`] on the host naming the kernel and the
//! buffer, never a launch. The first error is kept and returned by [`Launch::launch`].

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg, SyncOnDrop};

use super::Result;
use super::{shape, CudaKernelError, CudaKernels, CudaViewMutT, DevicePtr, DevicePtrMut, Dropout};
use crate::dropout::KernelSite;
use crate::philox::keep_scale;

/// Threads of the kernels' blocks.
pub(super) const THREADS: u32 = 256;

/// The length a buffer must have: exactly, at least (scratch), or any (not read).
#[derive(Debug, Clone, Copy)]
pub(super) enum Len {
    Exact(usize),
    AtLeast(usize),
    Any,
}

impl From<usize> for Len {
    fn from(n: usize) -> Self {
        Len::Exact(n)
    }
}

/// `n` elements when `read`, else any length.
pub(super) fn when(read: bool, n: usize) -> Len {
    if read {
        Len::Exact(n)
    } else {
        Len::Any
    }
}

/// A kernel argument (all are passed by value).
enum Arg {
    P(u64),
    I(i32),
    U(u32),
    F(f32),
    D(f64),
}

/// One launch being built (see the module doc).
pub(super) struct Launch<'a> {
    kernel: &'static str,
    stream: &'a CudaStream,
    func: Result<CudaFunction>,
    args: Vec<Arg>,
    /// The device pointers' stream guards, alive until after the launch.
    guards: Vec<SyncOnDrop<'a>>,
    err: Option<CudaKernelError>,
}

impl<'a> Launch<'a> {
    pub(super) fn new(
        k: &'a CudaKernels,
        kernel: &'static str,
        func: Result<CudaFunction>,
    ) -> Self {
        let (args, guards) = (Vec::with_capacity(16), Vec::with_capacity(8));
        Self {
            kernel,
            stream: &k.stream,
            func,
            args,
            guards,
            err: None,
        }
    }

    fn fail(&mut self, e: CudaKernelError) {
        self.err.get_or_insert(e);
    }

    /// Checks a buffer of `got` elements against `want`, then pushes its address.
    fn buffer(
        mut self,
        buffer: &'static str,
        got: usize,
        want: Len,
        (p, g): (u64, SyncOnDrop<'a>),
    ) -> Self {
        let (ok, want) = match want {
            Len::Exact(n) => (got == n, n),
            Len::AtLeast(n) => (got >= n, n),
            Len::Any => (true, got),
        };
        let kernel = self.kernel;
        if !ok {
            self.fail(CudaKernelError::Length {
                kernel,
                buffer,
                got,
                want,
            });
        } else if i32::try_from(want).is_err() {
            self.fail(shape(
                kernel,
                format!("{buffer} has {want} elements, beyond 32-bit indexing"),
            ));
        }
        self.guards.push(g);
        self.push(Arg::P(p))
    }

    /// A buffer the kernel reads.
    pub(super) fn input<X>(
        self,
        name: &'static str,
        buf: &'a impl DevicePtr<X>,
        want: impl Into<Len>,
    ) -> Self {
        let p = buf.device_ptr(self.stream);
        self.buffer(name, buf.len(), want.into(), p)
    }

    /// A buffer the kernel writes (or reads, for a scratch buffer written before).
    pub(super) fn output<X>(
        self,
        name: &'static str,
        buf: &'a mut impl DevicePtrMut<X>,
        want: impl Into<Len>,
    ) -> Self {
        let (len, p) = (buf.len(), buf.device_ptr_mut(self.stream));
        self.buffer(name, len, want.into(), p)
    }

    /// An output that may be absent (a null pointer, which the kernel skips).
    pub(super) fn output_opt<X>(
        self,
        name: &'static str,
        buf: Option<&'a mut CudaViewMutT<'_, X>>,
        want: usize,
    ) -> Self {
        match buf {
            Some(b) => self.output(name, b, want),
            None => self.push(Arg::P(0)),
        }
    }

    /// A buffer updated in place: passed as the kernel's output and as its input.
    pub(super) fn inplace<X>(
        self,
        name: &'static str,
        buf: &'a mut impl DevicePtrMut<X>,
        want: usize,
    ) -> Self {
        let (len, (p, g)) = (buf.len(), buf.device_ptr_mut(self.stream));
        self.buffer(name, len, want.into(), (p, g)).push(Arg::P(p))
    }

    /// The mask a forward records for `drop`: `n` bytes, or any length (unwritten) without
    /// dropout.
    pub(super) fn mask(
        self,
        keep: &'a mut impl DevicePtrMut<u8>,
        drop: &Dropout<'a>,
        n: usize,
    ) -> Self {
        self.output("keep", keep, when(drop.on(), n))
    }

    /// `drop`'s rows' keys (`2·rows`, unread without dropout) and site (`SITE_PARAMS`: seed
    /// lo/hi, update, site, threshold, keep scale, and whether the site drops anything).
    pub(super) fn dropout(mut self, drop: &Dropout<'a>, rows: usize) -> Self {
        self = self.input("row_keys", drop.row_keys, when(drop.on(), 2 * rows));
        let k = KernelSite::of(drop.site);
        let words = [k.seed_lo, k.seed_hi, k.update, k.site, k.threshold];
        self.args.extend(words.map(Arg::U));
        self.floats([k.scale]).flag(k.active)
    }

    /// A recorded mask read back for drop probability `p`: `keep` (`n` bytes, unread when
    /// `p == 0`), then `use_keep` and the keep scale `1/(1−p)`.
    pub(super) fn kept(mut self, keep: &'a impl DevicePtr<u8>, p: f32, n: usize) -> Self {
        if !(0.0..1.0).contains(&p) {
            self.fail(shape(
                self.kernel,
                format!("drop probability {p} is not in [0, 1)"),
            ));
        }
        // keep_scale(0) = 1: no mask, no scaling
        self.input("keep", keep, when(p != 0.0, n))
            .flag(p != 0.0)
            .floats([keep_scale(p)])
    }

    fn push(mut self, a: Arg) -> Self {
        self.args.push(a);
        self
    }

    /// Dimensions, as the kernels' `int`s, in order.
    pub(super) fn ints<const N: usize>(mut self, dims: [(&'static str, usize); N]) -> Self {
        for (name, v) in dims {
            match i32::try_from(v) {
                Ok(i) => self.args.push(Arg::I(i)),
                Err(_) => self.fail(shape(
                    self.kernel,
                    format!("{name} = {v} exceeds the kernels' 32-bit indexing"),
                )),
            }
        }
        self
    }

    /// A flag, as `int` 0 or 1.
    pub(super) fn flag(self, v: bool) -> Self {
        self.push(Arg::I(v as i32))
    }

    /// `float`s, in order.
    pub(super) fn floats<const N: usize>(mut self, v: [f32; N]) -> Self {
        self.args.extend(v.map(Arg::F));
        self
    }

    /// `double`s, in order.
    pub(super) fn doubles<const N: usize>(mut self, v: [f64; N]) -> Self {
        self.args.extend(v.map(Arg::D));
        self
    }

    /// Launches one thread per item, in blocks of [`THREADS`]; nothing when `threads == 0`.
    pub(super) fn launch(self, threads: usize) -> Result<()> {
        self.launch_grid(threads.div_ceil(THREADS as usize), THREADS, threads == 0)
    }

    /// Launches `blocks` blocks of `threads` threads (skipped when `skip`, after the checks).
    pub(super) fn launch_grid(self, blocks: usize, threads: u32, skip: bool) -> Result<()> {
        if let Some(e) = self.err {
            return Err(e);
        }
        let f = self.func?;
        if skip {
            return Ok(());
        }
        let blocks = u32::try_from(blocks)
            .map_err(|_| shape(self.kernel, format!("{blocks} blocks exceed the grid")))?;
        let mut b = self.stream.launch_builder(&f);
        for a in &self.args {
            match a {
                Arg::P(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::U(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
                Arg::D(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every buffer was checked above to hold the elements its kernel indexes (the
        // `.cu` kernels index only below the dims passed, which are those checked); the
        // launchers push the arguments in the order and with the types of the kernel's C
        // signature (u64 device pointers, int, unsigned, float, double); the device pointers'
        // stream guards (`self.guards`) live until after this returns.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
