//! Launchers of `embed.cu`: patch rows, embeddings with dropout and their backward, class
//! tokens.

use super::launch::Len;
use super::{check_p, dims, shape, Compute, CudaKernels, DevicePtr, DevicePtrMut, Result};
use crate::dropout::Site;

impl CudaKernels {
    /// Patch rows for the patch-embedding GEMM (crate::patch::im2col, cast to `T`):
    /// `out[b·g² + gy·g + gx, c·p·p + py·p + px] = img[b, c, gy·p + py, gx·p + px]`, `g = s/p`.
    /// Shapes: `out` `(B·g², C·p·p)` T, `img` `(B, C, S, S)` f32. Grid: one thread per output
    /// element.
    pub fn im2col<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        img: &impl DevicePtr<f32>,
        b: usize,
        c: usize,
        s: usize,
        p: usize,
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
    /// recorded in `keep` (untouched without dropout).
    /// Shapes: `x` `(B, Tk, D)` f32, `keep` `(B, Tk, D)` u8, `tok` `(B, Tk−1, D)` T, `cls` `(D)`,
    /// `pos` `(Tk, D)` f32, `row_keys` `2·B` u32. Grid: one thread per 4 elements of a sample
    /// (one Philox block).
    #[allow(clippy::too_many_arguments)]
    pub fn embed_fwd<T: Compute>(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        keep: &mut impl DevicePtrMut<u8>,
        tok: &impl DevicePtr<T>,
        cls: &impl DevicePtr<f32>,
        pos: &impl DevicePtr<f32>,
        site: Option<Site>,
        row_keys: &impl DevicePtr<u32>,
        b: usize,
        tokens: usize,
        d: usize,
    ) -> Result<()> {
        const K: &str = "embed_fwd";
        if tokens == 0 {
            return Err(shape(K, "no tokens".into()));
        }
        let (n, per) = (dims(K, &[b, tokens, d])?, dims(K, &[tokens, d])?);
        let on = site.is_some_and(|s| s.p != 0.0);
        self.typed::<T>(K)
            .output("x", x, n)
            .output("keep", keep, Len::when(on, n))
            .input("tok", tok, dims(K, &[b, tokens - 1, d])?)
            .input("cls", cls, d)
            .input("pos", pos, per)
            .input("row_keys", row_keys, Len::when(on, 2 * b))
            .site(site)
            .ints([("b", b), ("tokens", tokens), ("d", d)])
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
        b: usize,
        tokens: usize,
        d: usize,
    ) -> Result<()> {
        const K: &str = "embed_bwd";
        check_p(K, p)?;
        if tokens == 0 {
            return Err(shape(K, "no tokens".into()));
        }
        let (n, per) = (dims(K, &[b, tokens, d])?, dims(K, &[tokens, d])?);
        let ntok = dims(K, &[b, tokens - 1, d])?;
        self.typed::<T>("embed_bwd_tok")
            .output("dtok", dtok, ntok)
            .input("dx", dx, n)
            .input("keep", keep, Len::when(p != 0.0, n))
            .keep_scale(p)
            .ints([("b", b), ("tokens", tokens), ("d", d)])
            .launch(ntok)?;
        self.plain("embed_bwd_params")
            .output("dcls", dcls, d)
            .output("dpos", dpos, per)
            .input("dx", dx, n)
            .input("keep", keep, Len::when(p != 0.0, n))
            .keep_scale(p)
            .ints([("b", b), ("tokens", tokens), ("d", d)])
            .launch(if n == 0 { 0 } else { per })
    }

    /// The class tokens of the residual stream: `cls[b] = x[b, 0]`. Shapes: `cls` `(B, D)`,
    /// `x` `(B, Tk, D)` f32. Grid: one thread per element of `cls`.
    pub fn cls_gather(
        &self,
        cls: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<f32>,
        b: usize,
        tokens: usize,
        d: usize,
    ) -> Result<()> {
        const K: &str = "cls_gather";
        let n = dims(K, &[b, d])?;
        self.plain(K)
            .output("cls", cls, n)
            .input("x", x, dims(K, &[b, tokens, d])?)
            .ints([("b", b), ("tokens", tokens), ("d", d)])
            .launch(n)
    }

    /// The gradient into the residual stream from the class tokens: `dx[b, 0] = dcls[b]`,
    /// `dx[b, t] = 0` for `t > 0` (overwritten). Shapes: `dx` `(B, Tk, D)`, `dcls` `(B, D)`
    /// f32. Grid: one thread per element of `dx`.
    pub fn cls_scatter_grad(
        &self,
        dx: &mut impl DevicePtrMut<f32>,
        dcls: &impl DevicePtr<f32>,
        b: usize,
        tokens: usize,
        d: usize,
    ) -> Result<()> {
        const K: &str = "cls_scatter_grad";
        let n = dims(K, &[b, tokens, d])?;
        self.plain(K)
            .output("dx", dx, n)
            .input("dcls", dcls, dims(K, &[b, d])?)
            .ints([("b", b), ("tokens", tokens), ("d", d)])
            .launch(n)
    }
}
