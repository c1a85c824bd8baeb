//! Launchers of `columns.cu`: deterministic column sums. Grids: one thread per (column, block
//! of [`COLUMN_ROWS`] rows) for the partials; one per column for their sum.

use super::launch::Len;
use super::{dims, Compute, CudaKernels, DevicePtr, DevicePtrMut, Result, COLUMN_ROWS};

impl CudaKernels {
    /// Scratch (f32 elements) that [`Self::bias_grad`] needs: one partial per block of
    /// [`COLUMN_ROWS`] rows.
    pub fn bias_grad_scratch_len(n: usize, c: usize) -> usize {
        n.div_ceil(COLUMN_ROWS) * c
    }

    /// Bias gradient `db[j] += Σ_i dy[i, j]`, deterministic: partial sums of [`COLUMN_ROWS`]
    /// rows in row order, then added to `db` in block order. Shapes: `db` `(C)` f32, `dy`
    /// `(N, C)` T, `scratch` ≥ [`Self::bias_grad_scratch_len`].
    pub fn bias_grad<T: Compute>(
        &self,
        db: &mut impl DevicePtrMut<f32>,
        scratch: &mut impl DevicePtrMut<f32>,
        dy: &impl DevicePtr<T>,
        [n, c]: [usize; 2],
    ) -> Result<()> {
        let need = Self::bias_grad_scratch_len(n, c);
        self.typed::<T>("column_partials")
            .output("scratch", scratch, Len::AtLeast(need))
            .input("dy", dy, dims("column_partials", &[n, c])?)
            .ints([("n", n), ("c", c)])
            .launch(need)?;
        self.column_reduce(db, scratch, 0, [n.div_ceil(COLUMN_ROWS), c, c])
    }

    /// `out[j] += part[offset + blk·stride + j]` for `blk = 0 .. blocks` in order (`out`
    /// `(c)`).
    pub(super) fn column_reduce(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        part: &mut impl DevicePtrMut<f32>,
        offset: usize,
        [blocks, c, stride]: [usize; 3],
    ) -> Result<()> {
        let need = if blocks == 0 {
            0
        } else {
            offset + (blocks - 1) * stride + c
        };
        self.plain("column_reduce")
            .output("out", out, c)
            .output("scratch", part, Len::AtLeast(need))
            .ints([
                ("offset", offset),
                ("blocks", blocks),
                ("c", c),
                ("stride", stride),
            ])
            .launch(if blocks == 0 { 0 } else { c })
    }
}
