//! Launchers of `gelu.cu`.

use super::{dims, Compute, CudaKernels, DevicePtr, DevicePtrMut, Dropout, Result};

impl CudaKernels {
    /// Exact GELU with dropout after the fc1 GEMM (`pre = x·Wᵀ + b`): `h = mask ⊙ gelu(pre)`
    /// (crate::gelu's erf GELU bit for bit in f32, then the cast), the mask of sample row `r`
    /// over its `n` elements recorded in `keep`. Shapes: `h`, `pre`, `keep` `(rows, n)`
    /// (`n = Tk·M`). Grid: one thread per 4 elements (a Philox block).
    pub fn gelu_dropout_fwd<T: Compute>(
        &self,
        h: &mut impl DevicePtrMut<T>,
        keep: &mut impl DevicePtrMut<u8>,
        pre: &impl DevicePtr<T>,
        drop: Dropout<'_>,
        [rows, n]: [usize; 2],
    ) -> Result<()> {
        const K: &str = "gelu_dropout_fwd";
        let total = dims(K, &[rows, n])?;
        self.typed::<T>(K)
            .output("h", h, total)
            .mask(keep, &drop, total)
            .input("pre", pre, total)
            .dropout(&drop, rows)
            .ints([("rows", rows), ("n", n)])
            .launch(rows * n.div_ceil(4))
    }

    /// [`Self::gelu_dropout_fwd`] with the mask it recorded (no Philox): `h = keep ?
    /// gelu(pre)/(1−p) : 0` (`h = gelu(pre)` when `p == 0`, `keep` then unread), bit for bit the
    /// forward's `h`; for recomputing `h` in the backward. Shapes: all `(len)`. Grid: one thread
    /// per element.
    pub fn gelu_apply_keep<T: Compute>(
        &self,
        h: &mut impl DevicePtrMut<T>,
        pre: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
    ) -> Result<()> {
        let n = h.len();
        self.typed::<T>("gelu_apply_keep")
            .output("h", h, n)
            .input("pre", pre, n)
            .kept(keep, p, n)
            .ints([("elements", n)])
            .launch(n)
    }

    /// Backward of [`Self::gelu_dropout_fwd`], in place: `d` holds `dh` on entry and
    /// `dpre = gelu'(pre) ⊙ (keep ? dh/(1−p) : 0)` on return (`keep` ignored when `p == 0`;
    /// crate::gelu's derivative bit for bit in f32). Shapes: all `(len)`. Grid: one thread per
    /// element.
    pub fn gelu_dropout_bwd_inplace<T: Compute>(
        &self,
        d: &mut impl DevicePtrMut<T>,
        pre: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
    ) -> Result<()> {
        let n = d.len();
        self.typed::<T>("gelu_dropout_bwd")
            .inplace("d", d, n)
            .input("pre", pre, n)
            .kept(keep, p, n)
            .ints([("elements", n)])
            .launch(n)
    }
}
