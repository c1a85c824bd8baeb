//! Launchers of `softmax.cu`.

use super::launch::Len;
use super::{check_p, dims, shape, Compute, CudaKernels, DevicePtr, DevicePtrMut, Result};
use crate::dropout::Site;

/// `B·H·Tk·ld`, checked (`ld ≥ Tk`).
fn softmax_len(k: &'static str, b: usize, heads: usize, tokens: usize, ld: usize) -> Result<usize> {
    if ld < tokens {
        return Err(shape(
            k,
            format!("leading dimension {ld} is below the {tokens} tokens"),
        ));
    }
    dims(k, &[b, heads, tokens, ld])
}

impl CudaKernels {
    /// Softmax with dropout over materialised scores (crate::attention, bit for bit in f32
    /// before the casts), rows `ld ≥ Tk` elements apart: per row `(b, h, i)` at
    /// `((b·H + h)·Tk + i)·ld`, `P = softmax(scale · S)` (max and sum in f32, the CPU's lane
    /// order), written **in place over the scores** `probs` (P is what the backward needs), and
    /// with dropout `attn = P ⊙ M` (the input of the `A·V` GEMM) with the mask element
    /// `(h, i, j)` = element `h·Tk·Tk + i·Tk + j` of sample `b`'s key (as crate::attention, the
    /// numbering of `ld = Tk`), recorded in `keep`. Without dropout (`site` `None` or `p == 0`)
    /// A = P: `attn` and `keep` are not touched (they may be empty) and the GEMM reads `probs`.
    /// The padding columns `Tk..ld` are never read or written (so a padded, 16-byte aligned
    /// leading dimension can serve the attention GEMMs). Shapes: `probs`, `attn`, `keep`
    /// `(B, H, Tk, ld)`, `row_keys` `2·B` u32. Grid: 8 lanes per row (four rows a warp).
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_dropout_fwd_ld<T: Compute>(
        &self,
        probs: &mut impl DevicePtrMut<T>,
        attn: &mut impl DevicePtrMut<T>,
        keep: &mut impl DevicePtrMut<u8>,
        scale: f32,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        b: usize,
        heads: usize,
        tokens: usize,
        ld: usize,
    ) -> Result<()> {
        const K: &str = "softmax_dropout_fwd";
        let n = softmax_len(K, b, heads, tokens, ld)?;
        let on = site.is_some_and(|s| s.p != 0.0);
        self.typed::<T>(K)
            .output("probs", probs, n)
            .output("attn", attn, Len::when(on, n))
            .output("keep", keep, Len::when(on, n))
            .input("row_keys", row_keys, Len::when(on, 2 * b))
            .float(scale)
            .site(site)
            .ints([("b", b), ("heads", heads), ("tokens", tokens), ("ld", ld)])
            .launch(if n == 0 { 0 } else { b * heads * tokens * 8 })
    }

    /// Backward of [`Self::softmax_dropout_fwd_ld`], in place: `d` holds `dattn` on entry and
    /// `dscores` on return: with `dP = keep ⊙ dattn / (1−p)` (`dP = dattn` when `p == 0`),
    /// `dscores = scale · P ⊙ (dP − Σ_j dP_j P_j)` (the dot in f32 in the softmax's lane
    /// order). Shapes: all `(B, H, Tk, ld)`, padding untouched. Grid: 8 lanes per row.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_dropout_bwd_inplace_ld<T: Compute>(
        &self,
        d: &mut impl DevicePtrMut<T>,
        probs: &impl DevicePtr<T>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        scale: f32,
        b: usize,
        heads: usize,
        tokens: usize,
        ld: usize,
    ) -> Result<()> {
        const K: &str = "softmax_dropout_bwd";
        check_p(K, p)?;
        let n = softmax_len(K, b, heads, tokens, ld)?;
        let rows = b * heads * tokens;
        self.typed::<T>(K)
            .inplace("d", d, n)
            .input("probs", probs, n)
            .input("keep", keep, Len::when(p != 0.0, n))
            .keep_scale(p)
            .float(scale)
            .ints([("rows", rows), ("tokens", tokens), ("ld", ld)])
            .launch(if n == 0 { 0 } else { rows * 8 })
    }
}
