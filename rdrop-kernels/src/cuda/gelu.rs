//! Launchers of `gelu.cu`.

use super::launch::Len;
use super::{check_p, dims, Compute, CudaKernels, DevicePtr, DevicePtrMut, Result};
use crate::dropout::Site;

impl CudaKernels {
    /// Exact GELU with dropout after the fc1 GEMM (`pre = x·Wᵀ + b`): `h = mask ⊙ gelu(pre)`
    /// (crate::gelu's erf GELU bit for bit in f32, then the cast), the mask of sample row `r`
    /// over its `n` elements recorded in `keep`. Shapes: `h`, `pre`, `keep` `(rows, n)`
    /// (`n = Tk·M`), `row_keys` `2·rows`. Grid: one thread per 4 elements (a Philox block).
    #[allow(clippy::too_many_arguments)]
    pub fn gelu_dropout_fwd<T: Compute>(
        &self,
        h: &mut impl DevicePtrMut<T>,
        keep: &mut impl DevicePtrMut<u8>,
        pre: &impl DevicePtr<T>,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        const K: &str = "gelu_dropout_fwd";
        let total = dims(K, &[rows, n])?;
        let on = site.is_some_and(|s| s.p != 0.0);
        self.typed::<T>(K)
            .output("h", h, total)
            .output("keep", keep, Len::when(on, total))
            .input("pre", pre, total)
            .input("row_keys", row_keys, Len::when(on, 2 * rows))
            .site(site)
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
        const K: &str = "gelu_apply_keep";
        check_p(K, p)?;
        let n = h.len();
        self.typed::<T>(K)
            .output("h", h, n)
            .input("pre", pre, n)
            .input("keep", keep, Len::when(p != 0.0, n))
            .keep_scale(p)
            .int("elements", n)
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
        const K: &str = "gelu_dropout_bwd";
        check_p(K, p)?;
        let n = d.len();
        self.typed::<T>(K)
            .inplace("d", d, n)
            .input("pre", pre, n)
            .input("keep", keep, Len::when(p != 0.0, n))
            .keep_scale(p)
            .int("elements", n)
            .launch(n)
    }
}
