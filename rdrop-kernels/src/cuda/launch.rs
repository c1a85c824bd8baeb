//! The typed launch builder: a launcher names its kernel and pushes each argument in the
//! order of the kernel's C signature, buffers with the length the dimensions give, so that a
//! mis-sized or swapped buffer is a [`CudaKernelError`] on the host naming the kernel and the
//! buffer, never a launch. The first error is kept and returned by [`Launch::launch`].

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg, SyncOnDrop};

use super::{CudaKernelError, CudaKernels, CudaViewMutT, DevicePtr, DevicePtrMut, Result};
use crate::dropout::Site;
use crate::philox::{drop_threshold, keep_scale};

/// Threads of the kernels' blocks.
pub(super) const THREADS: u32 = 256;

/// The length a buffer must have.
#[derive(Debug, Clone, Copy)]
pub(super) enum Len {
    /// Exactly this many elements.
    Exact(usize),
    /// At least this many (scratch).
    AtLeast(usize),
    /// Not read (e.g. a mask without dropout): any length.
    Any,
}

impl From<usize> for Len {
    fn from(n: usize) -> Self {
        Len::Exact(n)
    }
}

impl Len {
    /// `n` elements when `read`, else any length.
    pub(super) fn when(read: bool, n: usize) -> Self {
        if read {
            Len::Exact(n)
        } else {
            Len::Any
        }
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
        Self {
            kernel,
            stream: &k.stream,
            func,
            args: Vec::with_capacity(16),
            guards: Vec::with_capacity(8),
            err: None,
        }
    }

    fn fail(&mut self, e: CudaKernelError) {
        if self.err.is_none() {
            self.err = Some(e);
        }
    }

    fn check(&mut self, buffer: &'static str, got: usize, want: Len) {
        let (ok, want) = match want {
            Len::Exact(n) => (got == n, n),
            Len::AtLeast(n) => (got >= n, n),
            Len::Any => (true, got),
        };
        if !ok {
            let kernel = self.kernel;
            self.fail(CudaKernelError::Length {
                kernel,
                buffer,
                got,
                want,
            });
        } else if i32::try_from(want).is_err() {
            let message = format!("{buffer} has {want} elements, beyond 32-bit indexing");
            self.fail(super::shape(self.kernel, message));
        }
    }

    /// A buffer the kernel reads.
    pub(super) fn input<X>(
        mut self,
        name: &'static str,
        buf: &'a impl DevicePtr<X>,
        want: impl Into<Len>,
    ) -> Self {
        self.check(name, buf.len(), want.into());
        let (p, g) = buf.device_ptr(self.stream);
        self.guards.push(g);
        self.args.push(Arg::P(p));
        self
    }

    /// A buffer the kernel writes (or reads, for a scratch buffer written before).
    pub(super) fn output<X>(
        self,
        name: &'static str,
        buf: &'a mut impl DevicePtrMut<X>,
        want: impl Into<Len>,
    ) -> Self {
        self.output_at(name, buf, want, 0)
    }

    /// [`Self::output`] from element `offset` on.
    pub(super) fn output_at<X>(
        mut self,
        name: &'static str,
        buf: &'a mut impl DevicePtrMut<X>,
        want: impl Into<Len>,
        offset: usize,
    ) -> Self {
        self.check(name, buf.len(), want.into());
        let (p, g) = buf.device_ptr_mut(self.stream);
        self.guards.push(g);
        self.args
            .push(Arg::P(p + (offset * std::mem::size_of::<X>()) as u64));
        self
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
        mut self,
        name: &'static str,
        buf: &'a mut impl DevicePtrMut<X>,
        want: impl Into<Len>,
    ) -> Self {
        self.check(name, buf.len(), want.into());
        let (p, g) = buf.device_ptr_mut(self.stream);
        self.guards.push(g);
        self.args.extend([Arg::P(p), Arg::P(p)]);
        self
    }

    fn push(mut self, a: Arg) -> Self {
        self.args.push(a);
        self
    }

    /// A dimension, as the kernels' `int`.
    pub(super) fn int(mut self, name: &'static str, v: usize) -> Self {
        match i32::try_from(v) {
            Ok(i) => self.push(Arg::I(i)),
            Err(_) => {
                let message = format!("{name} = {v} exceeds the kernels' 32-bit indexing");
                self.fail(super::shape(self.kernel, message));
                self
            }
        }
    }

    /// Dimensions, as the kernels' `int`s, in order.
    pub(super) fn ints<const N: usize>(mut self, dims: [(&'static str, usize); N]) -> Self {
        for (name, v) in dims {
            self = self.int(name, v);
        }
        self
    }

    /// A flag, as `int` 0 or 1.
    pub(super) fn flag(self, v: bool) -> Self {
        self.push(Arg::I(v as i32))
    }

    /// A `float`.
    pub(super) fn float(self, v: f32) -> Self {
        self.push(Arg::F(v))
    }

    /// A `double`.
    pub(super) fn double(self, v: f64) -> Self {
        self.push(Arg::D(v))
    }

    /// A site's mask parameters (`SITE_PARAMS`: seed lo/hi, update, site, threshold, keep
    /// scale, and whether the site drops anything).
    pub(super) fn site(mut self, site: Option<Site>) -> Self {
        let args = match site.filter(|s| s.p != 0.0) {
            Some(s) => [
                Arg::U(s.seed as u32),
                Arg::U((s.seed >> 32) as u32),
                Arg::U(s.update),
                Arg::U(s.site),
                Arg::U(drop_threshold(s.p)),
                Arg::F(keep_scale(s.p)),
                Arg::I(1),
            ],
            None => [
                Arg::U(0),
                Arg::U(0),
                Arg::U(0),
                Arg::U(0),
                Arg::U(0),
                Arg::F(1.0),
                Arg::I(0),
            ],
        };
        self.args.extend(args);
        self
    }

    /// A recorded mask's use: `use_keep` (`p != 0`) and the keep scale `1/(1−p)`.
    pub(super) fn keep_scale(self, p: f32) -> Self {
        let scale = if p == 0.0 { 1.0 } else { keep_scale(p) };
        self.flag(p != 0.0).float(scale)
    }

    /// Launches one thread per item, in blocks of [`THREADS`]; nothing when `threads == 0`.
    pub(super) fn launch(self, threads: usize) -> Result<()> {
        let blocks = threads.div_ceil(THREADS as usize);
        self.launch_grid(blocks, THREADS, threads == 0)
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
        let Ok(blocks) = u32::try_from(blocks) else {
            let message = format!("{blocks} blocks exceed the grid");
            return Err(super::shape(self.kernel, message));
        };
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
