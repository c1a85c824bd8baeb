//! Launchers of `embed.cu`: patch rows, embeddings with dropout and their backward, class
//! tokens; `s` is the residual stream's `[B, Tk, D]`.

use super::{dims, shape, Compute, CudaKernels, DevicePtr, DevicePtrMut, Dropout, Result};

/// `(B·Tk·D, Tk·D, B·(Tk−1)·D)` of `[B, Tk, D]`: the stream's, an image's, and the patch
/// tokens' elements.
fn lens(k: &'static str, [b, tokens, d]: [usize; 3]) -> Result<(usize, usize, usize)> {
    if tokens == 0 {
        return Err(shape(k, "no tokens".into()));
    }
    Ok((dims(k, &[b, tokens, d])?, tokens * d, b * (tokens - 1) * d))
}

/// The kernels' `b, tokens, d` arguments.
fn ints([b, tokens, d]: [usize; 3]) -> [(&'static str, usize); 3] {
    [("b", b), ("tokens", tokens), ("d", d)]
}

impl CudaKernels {
    /// Patch rows for the patch-embedding GEMM (crate::patch::im2col, cast to `T`):
    /// `out[b·g² + gy·g + gx, c·p·p + py·p + px] = img[b, c, gy·p + py, gx·p + px]`, `g = s/p`.
    /// Shapes: `out` `(B·g², C·p·p)` T, `img` `(B, C, S, S)` f32. Grid: one thread per output
    /// element.
    pub fn im2col<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        img: &impl DevicePtr<f32>,
        [b, c, s, p]: [usize; 4],
    ) -> Result<()> {
        const K: &str = "im2col";
        if p == 0 || !s.is_multiple_of(p) {
            return Err(shape(
                K,
                format!("patch size {p} does not divide image size {s}"),
            ));
        }
        let n = dims(K, &[b, s / p, s / p, c, p, p])?;
        self.typed::<T>(K)
            .output("out", out, n)
            .input("img", img, dims(K, &[b, c, s, s])?)
            .ints([("b", b), ("c", c), ("s", s), ("p", p)])
            .launch(n)
    }

    /// Embeddings with dropout (the CPU engine's `embed` after its GEMM):
    /// `x[b, 0] = cls + pos[0]`, `x[b, 1 + j] = tok[b, j] + pos[1 + j]`, then
    /// `x[b] ← mask(site, row_keys[b]) ⊙ x[b]` over the sample's `tokens·d` elements, the mask
    /// recorded in `keep`. Shapes: `x`, `keep` `(B, Tk, D)`, `tok` `(B, Tk−1, D)` T, `cls`
    /// `(D)`, `pos` `(Tk, D)` f32. Grid: one thread per 4 elements of a sample (a Philox block).
    pub fn embed_fwd<T: Compute>(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        keep: &mut impl DevicePtrMut<u8>,
        tok: &impl DevicePtr<T>,
        [cls, pos]: [&impl DevicePtr<f32>; 2],
        drop: Dropout<'_>,
        s @ [b, _, d]: [usize; 3],
    ) -> Result<()> {
        const K: &str = "embed_fwd";
        let (n, per, ntok) = lens(K, s)?;
        self.typed::<T>(K)
            .output("x", x, n)
            .mask(keep, &drop, n)
            .input("tok", tok, ntok)
            .input("cls", cls, d)
            .input("pos", pos, per)
            .dropout(&drop, b)
            .ints(ints(s))
            .launch(b * per.div_ceil(4))
    }

    /// Backward of [`Self::embed_fwd`], deterministic (sums over samples in sample order, no
    /// atomics): with `g = keep ⊙ dx / (1−p)` (`g = dx` when `p == 0`),
    /// `dtok[b, j] = g[b, 1 + j]` (overwritten), `dcls += Σ_b g[b, 0]`, `dpos += Σ_b g[b]`.
    /// Shapes: `dtok` `(B, Tk−1, D)` T, `dcls` `(D)`, `dpos` `(Tk, D)` f32, `dx`, `keep`
    /// `(B, Tk, D)`. Grids: one thread per `dtok` element; one thread per `dpos` element.
    #[allow(clippy::too_many_arguments)]
    pub fn embed_bwd<T: Compute>(
        &self,
        dtok: &mut impl DevicePtrMut<T>,
        dcls: &mut impl DevicePtrMut<f32>,
        dpos: &mut impl DevicePtrMut<f32>,
        dx: &impl DevicePtr<f32>,
        keep: &impl DevicePtr<u8>,
        p: f32,
        s @ [_, _, d]: [usize; 3],
    ) -> Result<()> {
        let (n, per, ntok) = lens("embed_bwd", s)?;
        self.typed::<T>("embed_bwd_tok")
            .output("dtok", dtok, ntok)
            .input("dx", dx, n)
            .kept(keep, p, n)
            .ints(ints(s))
            .launch(ntok)?;
        self.plain("embed_bwd_params")
            .output("dcls", dcls, d)
            .output("dpos", dpos, per)
            .input("dx", dx, n)
            .kept(keep, p, n)
            .ints(ints(s))
            .launch(if n == 0 { 0 } else { per })
    }

    /// The class tokens of the residual stream: `cls[b] = x[b, 0]`. Shapes: `cls` `(B, D)`,
    /// `x` `(B, Tk, D)` f32. Grid: one thread per element of `cls`.
    pub fn cls_gather(
        &self,
        cls: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<f32>,
        s @ [b, _, d]: [usize; 3],
    ) -> Result<()> {
        const K: &str = "cls_gather";
        let n = dims(K, &[b, d])?;
        self.plain(K)
            .output("cls", cls, n)
            .input("x", x, lens(K, s)?.0)
            .ints(ints(s))
            .launch(n)
    }

    /// The gradient into the residual stream from the class tokens: `dx[b, 0] = dcls[b]`,
    /// `dx[b, t] = 0` for `t > 0` (overwritten). Shapes: `dx` `(B, Tk, D)`, `dcls` `(B, D)`
    /// f32. Grid: one thread per element of `dx`.
    pub fn cls_scatter_grad(
        &self,
        dx: &mut impl DevicePtrMut<f32>,
        dcls: &impl DevicePtr<f32>,
        s @ [b, _, d]: [usize; 3],
    ) -> Result<()> {
        const K: &str = "cls_scatter_grad";
        let n = lens(K, s)?.0;
        self.plain(K)
            .output("dx", dx, n)
            .input("dcls", dcls, dims(K, &[b, d])?)
            .ints(ints(s))
            .launch(n)
    }
}
