//! Launchers of `layernorm.cu`. Grids: 16 lanes per row (two rows a warp), 256-thread blocks;
//! the backward's partials one thread per (column, block of rows), their sum one per column.

use super::launch::Len;
use super::{dims, Compute, CudaKernels, DevicePtr, DevicePtrMut, Result, COLUMN_ROWS};

impl CudaKernels {
    /// LayerNorm forward (crate::layernorm::layernorm_fwd, bit for bit in f32 before the cast
    /// of `y`): per row, `μ = Σx/D`, `r = 1/√(Σ(x−μ)²/D + eps)`, `y = (x−μ)·r·γ + β` cast to
    /// T; `mean`, `rstd` overwritten. Shapes: `y` `(N, D)` T, `x` `(N, D)` f32, `w`, `b` `(D)`,
    /// `mean`, `rstd` `(N)`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_fwd<T: Compute>(
        &self,
        y: &mut impl DevicePtrMut<T>,
        [mean, rstd]: [&mut impl DevicePtrMut<f32>; 2],
        x: &impl DevicePtr<f32>,
        [w, b]: [&impl DevicePtr<f32>; 2],
        eps: f32,
        [n, d]: [usize; 2],
    ) -> Result<()> {
        const K: &str = "layernorm_fwd";
        let nd = dims(K, &[n, d])?;
        self.typed::<T>(K)
            .output("y", y, nd)
            .output("mean", mean, n)
            .output("rstd", rstd, n)
            .input("x", x, nd)
            .input("w", w, d)
            .input("b", b, d)
            .floats([eps])
            .ints([("n", n), ("d", d)])
            .launch(if nd == 0 { 0 } else { n * 16 })
    }

    /// Scratch (f32 elements) that [`Self::layernorm_bwd`] needs: a dγ and a dβ partial per
    /// block of [`COLUMN_ROWS`] rows.
    pub fn layernorm_bwd_scratch_len(n: usize, d: usize) -> usize {
        n.div_ceil(COLUMN_ROWS) * 2 * d
    }

    /// LayerNorm backward (crate::layernorm::layernorm_bwd, bit for bit in f32 when `dy` is f32):
    /// `g = dy⊙γ`, `x̂ = (x−μ)·r`, `dx (+)= r·(g − Σg/D − x̂·Σ(g⊙x̂)/D)` (`+=` when
    /// `accumulate`, else overwritten), `[dγ, dβ] += Σ_rows [dy⊙x̂, dy]` (partials of
    /// [`COLUMN_ROWS`] rows in row order, then added in block order: no atomics).
    /// Shapes: `dx`, `x` `(N, D)` f32, `dy` `(N, D)` T, `w`, `dw`, `db` `(D)`, `mean`, `rstd`
    /// `(N)`, `scratch` ≥ [`Self::layernorm_bwd_scratch_len`].
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_bwd<T: Compute>(
        &self,
        dx: &mut impl DevicePtrMut<f32>,
        [dw, db]: [&mut impl DevicePtrMut<f32>; 2],
        scratch: &mut impl DevicePtrMut<f32>,
        dy: &impl DevicePtr<T>,
        x: &impl DevicePtr<f32>,
        w: &impl DevicePtr<f32>,
        [mean, rstd]: [&impl DevicePtr<f32>; 2],
        [n, d]: [usize; 2],
        accumulate: bool,
    ) -> Result<()> {
        const K: &str = "layernorm_bwd";
        let nd = dims(K, &[n, d])?;
        let need = Self::layernorm_bwd_scratch_len(n, d);
        let blocks = if nd == 0 { 0 } else { n.div_ceil(COLUMN_ROWS) };
        self.typed::<T>(K)
            .output("dx", dx, nd)
            .input("dy", dy, nd)
            .input("x", x, nd)
            .input("w", w, d)
            .input("mean", mean, n)
            .input("rstd", rstd, n)
            .ints([("n", n), ("d", d)])
            .flag(accumulate)
            .launch(if nd == 0 { 0 } else { n * 16 })?;
        self.typed::<T>("layernorm_bwd_partials")
            .output("scratch", scratch, Len::AtLeast(need))
            .input("dy", dy, nd)
            .input("x", x, nd)
            .input("mean", mean, n)
            .input("rstd", rstd, n)
            .ints([("n", n), ("d", d)])
            .launch(blocks * d)?;
        // partial c of column j: dγ at scratch[c·2D + j], dβ at scratch[c·2D + D + j]
        self.column_reduce(dw, scratch, 0, [blocks, d, 2 * d])?;
        self.column_reduce(db, scratch, d, [blocks, d, 2 * d])
    }
}
