//! Fused kernels given a gradient: LayerNorm and softmax over the last dimension, forward by
//! candle's fused kernels, backward analytic (the model's two non-GEMM hot spots).
//!
//! `candle_nn::ops::layer_norm` / `softmax_last_dim` are fast fused kernels (CPU and CUDA) but
//! record no backward: their inputs silently get no gradient. Here the forward value comes from
//! those kernels, and a small custom op ([`GradAttach`]) re-attaches the input with the analytic
//! backward. The composites (`layer_norm_slow`, `candle_nn::ops::softmax`) are the reference in
//! the tests.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// Which backward [`GradAttach`] applies.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `res` is x̂ = (x − mean) / sqrt(var + eps) over the last dimension.
    Normalize { eps: f64 },
    /// `res` is softmax(x) over the last dimension.
    Softmax,
}

/// `GradAttach(value, x)`: returns a copy of `value` (computed from `x` by a fused kernel without
/// backward) and back-propagates into `x` with the analytic Jacobian of `kind`.
struct GradAttach(Kind);

fn check_fresh(l: &Layout) -> Result<()> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("GradAttach: the fused value must be a fresh contiguous tensor")
    }
    Ok(())
}

impl CustomOp2 for GradAttach {
    fn name(&self) -> &'static str {
        "rdrop-grad-attach"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_fresh(l1)?;
        Ok((s1.try_clone(l1)?, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_fresh(l1)?;
        Ok((s1.try_clone(l1)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _value: &Tensor,
        x: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Computed in f32 whatever the forward dtype (bf16 reductions lose too much).
        let dt = x.dtype();
        let y = res.to_dtype(DType::F32)?;
        let g = g.to_dtype(DType::F32)?;
        let dx = match self.0 {
            Kind::Normalize { eps } => normalize_backward(&x.to_dtype(DType::F32)?, &y, &g, eps)?,
            Kind::Softmax => softmax_backward(&y, &g)?,
        };
        Ok((None, Some(dx.to_dtype(dt)?)))
    }
}

/// Backward of x̂ = (x − μ)·r, r = (var(x) + eps)^(−1/2), over the last dim of size n:
/// `dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂))`. All tensors `(…, n)`, f32.
pub fn normalize_backward(x: &Tensor, xhat: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let var = x.broadcast_sub(&mu)?.sqr()?.mean_keepdim(D::Minus1)?;
    let r = (var + eps)?.sqrt()?.recip()?;
    let gm = g.mean_keepdim(D::Minus1)?;
    let gxm = (g * xhat)?.mean_keepdim(D::Minus1)?;
    g.broadcast_sub(&gm)?
        .sub(&xhat.broadcast_mul(&gxm)?)?
        .broadcast_mul(&r)
}

/// Backward of y = softmax(x) over the last dim: `dx = y ⊙ (g − Σ_j g_j y_j)`. `(…, n)`, f32.
pub fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let s = (g * y)?.sum_keepdim(D::Minus1)?;
    y * g.broadcast_sub(&s)?
}

/// LayerNorm over the last dimension with affine `w`, `b` (shape `(n,)`):
/// `y = (x − mean) / sqrt(var + eps) · w + b`, biased variance as in PyTorch. Differentiable
/// in `x`, `w` and `b`; the normalisation runs in candle's fused kernel.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let n = x.dim(D::Minus1)?;
    let ones = Tensor::ones(n, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(n, x.dtype(), x.device())?;
    let xhat = candle_nn::ops::layer_norm(&x, &ones, &zeros, eps as f32)?;
    let xhat = xhat.apply_op2(&x, GradAttach(Kind::Normalize { eps }))?;
    xhat.broadcast_mul(w)?.broadcast_add(b)
}

/// Softmax over the last dimension, `y_i = exp(x_i − max) / Σ_j exp(x_j − max)`; differentiable,
/// forward in candle's fused kernel.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::softmax_last_dim(&x)?;
    y.apply_op2(&x, GradAttach(Kind::Softmax))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.gen_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn layer_norm_matches_composite_values_and_gradients() -> Result<()> {
        let x = Var::from_tensor(&rand(&[3, 5, 16], 1))?;
        let w = Var::from_tensor(&(rand(&[16], 2) + 1.0)?)?;
        let b = Var::from_tensor(&rand(&[16], 3))?;
        let up = rand(&[3, 5, 16], 4); // weights of a fixed linear loss
        let ours = layer_norm(&x, &w, &b, 1e-6)?;
        let slow = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-6)?;
        assert!(max_abs_diff(&ours, &slow) < 1e-5);
        // A non-linear loss, so second-order structure of the backward matters.
        let g1 = (ours.sqr()? * &up)?.sum_all()?.backward()?;
        let g2 = (slow.sqr()? * &up)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let (a, s) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let scale: f32 = s.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            assert!(scale > 0.0);
            assert!(
                max_abs_diff(a, s) < 1e-4 * scale.max(1.0),
                "{}",
                max_abs_diff(a, s)
            );
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_composite_values_and_gradients() -> Result<()> {
        let x = Var::from_tensor(&(rand(&[2, 3, 7, 9], 5) * 3.0)?)?;
        let up = rand(&[2, 3, 7, 9], 6);
        let ours = softmax_last_dim(&x)?;
        let slow = candle_nn::ops::softmax(&x, D::Minus1)?;
        assert!(max_abs_diff(&ours, &slow) < 1e-6);
        let g1 = (ours * &up)?.sum_all()?.backward()?;
        let g2 = (slow * &up)?.sum_all()?.backward()?;
        let (a, s) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        assert!(max_abs_diff(a, s) < 1e-5);
        assert!(s.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn works_on_non_contiguous_input() -> Result<()> {
        let x = Var::from_tensor(&rand(&[4, 6], 7))?;
        let xt = x.t()?; // (6, 4), strided
        let y = softmax_last_dim(&xt)?;
        let r = candle_nn::ops::softmax(&xt, D::Minus1)?;
        assert!(max_abs_diff(&y, &r) < 1e-6);
        let g = y.sqr()?.sum_all()?.backward()?;
        assert_eq!(g.get(&x).unwrap().dims(), &[4, 6]);
        Ok(())
    }
}
