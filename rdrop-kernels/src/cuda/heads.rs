//! Launchers of `heads.cu`: attention's rows ↔ heads layouts, `(B, Tk, H·Dh)` ↔
//! `(B, H, Tk, Dh)`; `s` is `[B, Tk, H, Dh]`. Grids: one thread per element of a head-major
//! buffer.

use super::{dims, Compute, CudaKernels, DevicePtr, DevicePtrMut, Result};

/// The kernels' `b, tokens, heads, head_dim` arguments.
fn ints([b, t, h, hd]: [usize; 4]) -> [(&'static str, usize); 4] {
    [("b", b), ("tokens", t), ("heads", h), ("head_dim", hd)]
}

impl CudaKernels {
    /// `q, k, v (B, H, Tk, Dh) ← qkv (B, Tk, 3D)`: `q[b, h, t, e] = qkv[b, t, h·Dh + e]`, `k` at
    /// column offset `D`, `v` at `2D`.
    pub fn qkv_split<T: Compute>(
        &self,
        [q, k, v]: [&mut impl DevicePtrMut<T>; 3],
        qkv: &impl DevicePtr<T>,
        s: [usize; 4],
    ) -> Result<()> {
        const K: &str = "qkv_split";
        let n = dims(K, &s)?;
        self.typed::<T>(K)
            .output("q", q, n)
            .output("k", k, n)
            .output("v", v, n)
            .input("qkv", qkv, dims(K, &[3, n])?)
            .ints(ints(s))
            .launch(n)
    }

    /// The inverse of [`Self::qkv_split`] for the gradients: `dqkv (B, Tk, 3D) ← dq, dk, dv
    /// (B, H, Tk, Dh)` (overwritten).
    pub fn qkv_merge_grad<T: Compute>(
        &self,
        dqkv: &mut impl DevicePtrMut<T>,
        [dq, dk, dv]: [&impl DevicePtr<T>; 3],
        s: [usize; 4],
    ) -> Result<()> {
        const K: &str = "qkv_merge_grad";
        let n = dims(K, &s)?;
        self.typed::<T>(K)
            .output("dqkv", dqkv, dims(K, &[3, n])?)
            .input("dq", dq, n)
            .input("dk", dk, n)
            .input("dv", dv, n)
            .ints(ints(s))
            .launch(n)
    }

    /// Heads back into rows: `out[b, t, h·Dh + e] = o[b, h, t, e]`.
    pub fn attn_merge<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        o: &impl DevicePtr<T>,
        s: [usize; 4],
    ) -> Result<()> {
        self.permute::<T>("attn_merge", out, o, s)
    }

    /// The inverse of [`Self::attn_merge`] for the gradient: `do_[b, h, t, e] =
    /// dout[b, t, h·Dh + e]`.
    pub fn attn_split_grad<T: Compute>(
        &self,
        do_: &mut impl DevicePtrMut<T>,
        dout: &impl DevicePtr<T>,
        s: [usize; 4],
    ) -> Result<()> {
        self.permute::<T>("attn_split_grad", do_, dout, s)
    }

    fn permute<T: Compute>(
        &self,
        kernel: &'static str,
        out: &mut impl DevicePtrMut<T>,
        x: &impl DevicePtr<T>,
        s: [usize; 4],
    ) -> Result<()> {
        let n = dims(kernel, &s)?;
        self.typed::<T>(kernel)
            .output("out", out, n)
            .input("in", x, n)
            .ints(ints(s))
            .launch(n)
    }
}
