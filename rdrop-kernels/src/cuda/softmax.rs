//! Launchers of `softmax.cu`: over materialised scores, rows `ld ≥ Tk` elements apart (row
//! `(b, h, i)` at `((b·H + h)·Tk + i)·ld`); the padding columns `Tk..ld` are never read or
//! written (so a padded, 16-byte aligned leading dimension can serve the attention GEMMs).
//! Grids: 8 lanes per row (four rows a warp).

use super::launch::when;
use super::{dims, shape, Compute, CudaKernels, DevicePtr, DevicePtrMut, Dropout, Result};

/// `B·H·Tk·ld` of `[B, H, Tk, ld]`, checked (`ld ≥ Tk`).
fn softmax_len(k: &'static str, [b, heads, tokens, ld]: [usize; 4]) -> Result<usize> {
    if ld < tokens {
        return Err(shape(
            k,
            format!("leading dimension {ld} is below the {tokens} tokens"),
        ));
    }
    dims(k, &[b, heads, tokens, ld])
}

impl CudaKernels {
    /// Softmax with dropout (crate::attention, bit for bit in f32 before the casts):
    /// `P = softmax(scale · S)` (max and sum in f32, the CPU's lane order), written **in place
    /// over the scores** `probs` (P is what the backward needs), and with dropout `attn = P ⊙ M`
    /// (the input of the `A·V` GEMM) with the mask element `(h, i, j)` = element
    /// `h·Tk·Tk + i·Tk + j` of sample `b`'s key (as crate::attention, the numbering of
    /// `ld = Tk`), recorded in `keep`. Without dropout A = P: `attn` and `keep` are not touched
    /// (they may be empty) and the GEMM reads `probs`. Shapes: `probs`, `attn`, `keep`
    /// `(B, H, Tk, ld)`.
    pub fn softmax_dropout_fwd_ld<T: Compute>(
        &self,
        [probs, attn]: [&mut impl DevicePtrMut<T>; 2],
        keep: &mut impl DevicePtrMut<u8>,
        scale: f32,
        drop: Dropout<'_>,
        [b, heads, tokens, ld]: [usize; 4],
    ) -> Result<()> {
        const K: &str = "softmax_dropout_fwd";
        let n = softmax_len(K, [b, heads, tokens, ld])?;
        self.typed::<T>(K)
            .output("probs", probs, n)
            .output("attn", attn, when(drop.on(), n))
            .mask(keep, &drop, n)
            .floats([scale])
            .dropout(&drop, b)
            .ints([("b", b), ("heads", heads), ("tokens", tokens), ("ld", ld)])
            .launch(if n == 0 { 0 } else { b * heads * tokens * 8 })
    }

    /// Backward of [`Self::softmax_dropout_fwd_ld`], in place: `d` holds `dattn` on entry and
    /// `dscores` on return: with `dP = keep ⊙ dattn / (1−p)` (`dP = dattn` when `p == 0`),
    /// `dscores = scale · P ⊙ (dP − Σ_j dP_j P_j)` (the dot in f32 in the softmax's lane
    /// order). Shapes: all `(B, H, Tk, ld)`, padding untouched.
    pub fn softmax_dropout_bwd_inplace_ld<T: Compute>(
        &self,
        d: &mut impl DevicePtrMut<T>,
        probs: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        scale: f32,
        [b, heads, tokens, ld]: [usize; 4],
    ) -> Result<()> {
        const K: &str = "softmax_dropout_bwd";
        let n = softmax_len(K, [b, heads, tokens, ld])?;
        let rows = b * heads * tokens;
        self.typed::<T>(K)
            .inplace("d", d, n)
            .input("probs", probs, n)
            .kept(keep, p, n)
            .floats([scale])
            .ints([("rows", rows), ("tokens", tokens), ("ld", ld)])
            .launch(if n == 0 { 0 } else { rows * 8 })
    }
}
