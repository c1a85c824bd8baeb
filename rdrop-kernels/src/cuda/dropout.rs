//! Launchers of `dropout.cu`.

use super::{dims, Compute, CudaKernels, DevicePtr, DevicePtrMut, Dropout, Result};

impl CudaKernels {
    /// The residual branch with dropout (crate::dropout::residual_dropout_add_keep, bit for bit
    /// when `y` is f32): `out = res + m ⊙ y`, `m ∈ {0, 1/(1−p)}` (`out = res + y` without
    /// dropout), the mask of sample row `r` over its `n` elements recorded in `keep`. Shapes:
    /// `out`, `res` f32, `y` T, `keep` `(rows, n)` (`n = Tk·D`). Grid: one thread per 4
    /// elements (a Philox block).
    pub fn residual_dropout_add<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        keep: &mut impl DevicePtrMut<u8>,
        res: &impl DevicePtr<f32>,
        y: &impl DevicePtr<T>,
        drop: Dropout<'_>,
        [rows, n]: [usize; 2],
    ) -> Result<()> {
        const K: &str = "residual_dropout_add";
        let total = dims(K, &[rows, n])?;
        self.typed::<T>(K)
            .output("out", out, total)
            .mask(keep, &drop, total)
            .input("res", res, total)
            .input("y", y, total)
            .dropout(&drop, rows)
            .ints([("rows", rows), ("n", n)])
            .launch(rows * n.div_ceil(4))
    }

    /// A recorded mask applied again: `out = keep ? x/(1−p) : 0` (`out = x` when `p == 0`),
    /// e.g. `A = P ⊙ M` regenerated in the backward. Shapes: `out`, `x`, `keep` `(len)`. Grid:
    /// one thread per element.
    pub fn apply_keep<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        x: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
    ) -> Result<()> {
        let n = out.len();
        self.typed::<T>("apply_keep")
            .output("out", out, n)
            .input("x", x, n)
            .kept(keep, p, n)
            .ints([("elements", n)])
            .launch(n)
    }

    /// The gradient of a residual branch: `dy = cast_T(keep ? dres/(1−p) : 0)` (`dy = dres`
    /// when `p == 0`; crate::dropout::apply_keep_to). Shapes: `dy` T, `dres` f32, `keep`, all
    /// `(len)`. Grid: one thread per element.
    pub fn dropout_grad<T: Compute>(
        &self,
        dy: &mut impl DevicePtrMut<T>,
        dres: &impl DevicePtr<f32>,
        keep: &impl DevicePtr<u8>,
        p: f32,
    ) -> Result<()> {
        let n = dy.len();
        self.typed::<T>("dropout_grad")
            .output("dy", dy, n)
            .input("dres", dres, n)
            .kept(keep, p, n)
            .ints([("elements", n)])
            .launch(n)
    }
}
