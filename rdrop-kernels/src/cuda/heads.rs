//! Launchers of `heads.cu`: attention's rows ↔ heads layouts.

use super::{dims, Compute, CudaKernels, DevicePtr, DevicePtrMut, Result};

/// The kernels' `b, tokens, heads, head_dim` arguments.
fn head_dims(b: usize, t: usize, h: usize, hd: usize) -> [(&'static str, usize); 4] {
    [("b", b), ("tokens", t), ("heads", h), ("head_dim", hd)]
}

impl CudaKernels {
    /// `q, k, v (B, H, Tk, Dh) ← qkv (B, Tk, 3D)`: `q[b, h, t, e] = qkv[b, t, h·Dh + e]`, `k` at
    /// column offset `D`, `v` at `2D`. Grid: one thread per element of `q`.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_split<T: Compute>(
        &self,
        q: &mut impl DevicePtrMut<T>,
        k: &mut impl DevicePtrMut<T>,
        v: &mut impl DevicePtrMut<T>,
        qkv: &impl DevicePtr<T>,
        b: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        const K: &str = "qkv_split";
        let n = dims(K, &[b, tokens, heads, head_dim])?;
        self.typed::<T>(K)
            .output("q", q, n)
            .output("k", k, n)
            .output("v", v, n)
            .input("qkv", qkv, dims(K, &[3, n])?)
            .ints(head_dims(b, tokens, heads, head_dim))
            .launch(n)
    }

    /// The inverse of [`Self::qkv_split`] for the gradients: `dqkv (B, Tk, 3D) ← dq, dk, dv
    /// (B, H, Tk, Dh)` (overwritten). Grid: one thread per element of `dq`.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_merge_grad<T: Compute>(
        &self,
        dqkv: &mut impl DevicePtrMut<T>,
        dq: &impl DevicePtr<T>,
        dk: &impl DevicePtr<T>,
        dv: &impl DevicePtr<T>,
        b: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        const K: &str = "qkv_merge_grad";
        let n = dims(K, &[b, tokens, heads, head_dim])?;
        self.typed::<T>(K)
            .output("dqkv", dqkv, dims(K, &[3, n])?)
            .input("dq", dq, n)
            .input("dk", dk, n)
            .input("dv", dv, n)
            .ints(head_dims(b, tokens, heads, head_dim))
            .launch(n)
    }

    /// Heads back into rows: `out[b, t, h·Dh + e] = o[b, h, t, e]`, `out` `(B, Tk, D)`, `o`
    /// `(B, H, Tk, Dh)`. Grid: one thread per element.
    pub fn attn_merge<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        o: &impl DevicePtr<T>,
        b: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.permute::<T>("attn_merge", out, o, [b, tokens, heads, head_dim])
    }

    /// The inverse of [`Self::attn_merge`] for the gradient: `do_[b, h, t, e] =
    /// dout[b, t, h·Dh + e]`. Grid: one thread per element.
    pub fn attn_split_grad<T: Compute>(
        &self,
        do_: &mut impl DevicePtrMut<T>,
        dout: &impl DevicePtr<T>,
        b: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.permute::<T>("attn_split_grad", do_, dout, [b, tokens, heads, head_dim])
    }

    fn permute<T: Compute>(
        &self,
        kernel: &'static str,
        out: &mut impl DevicePtrMut<T>,
        x: &impl DevicePtr<T>,
        [b, tokens, heads, head_dim]: [usize; 4],
    ) -> Result<()> {
        let n = dims(kernel, &[b, tokens, heads, head_dim])?;
        self.typed::<T>(kernel)
            .output("out", out, n)
            .input("in", x, n)
            .ints(head_dims(b, tokens, heads, head_dim))
            .launch(n)
    }
}
