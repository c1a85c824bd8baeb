//! Global gradient-norm clipping with `torch.nn.utils.clip_grad_norm_` semantics
//! (the R-Drop ViT recipe clips at 1.0, <https://arxiv.org/abs/2106.14448>).
//!
//! ```text
//! n_i   = ‖g_i‖₂                       per tensor
//! total = ‖(n_1, …, n_k)‖₂             = √(Σ_i Σ g²)
//! coef  = min(1, max_norm / (total + 1e-6))
//! g_i   = coef · g_i                    (always multiplied, as torch does)
//! ```
//! Everything stays on the device (no host sync); the norm is returned as a 0-dim f32 tensor.

use candle_core::{DType, Result, Tensor};

/// The global L2 norm of `grads` (`None` entries ignored) as a 0-dim f32 tensor, or `None` when
/// there is no gradient at all.
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<Option<Tensor>> {
    let mut norms = Vec::with_capacity(grads.len());
    for g in grads.iter().flatten() {
        norms.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?);
    }
    if norms.is_empty() {
        return Ok(None);
    }
    // Tensors may live on different devices only in exotic setups; stack needs one device.
    let dev = norms[0].device().clone();
    let norms = norms
        .into_iter()
        .map(|n| n.to_device(&dev))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Tensor::stack(&norms, 0)?.sqr()?.sum_all()?.sqrt()?))
}

/// Clips `grads` in place (replacing the tensors) so that their global norm is at most
/// `max_norm`; returns the norm *before* clipping (`None` without gradients). `max_norm =
/// f64::INFINITY` only measures. A non-finite norm propagates into the gradients, as in torch.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<Option<Tensor>> {
    let Some(total) = global_grad_norm(grads)? else {
        return Ok(None);
    };
    if max_norm.is_infinite() {
        return Ok(Some(total));
    }
    let denom = total.affine(1.0, 1e-6)?;
    let coef =
        (Tensor::new(max_norm as f32, total.device())?.div(&denom))?.clamp(f32::MIN, 1f32)?;
    for g in grads.iter_mut().flatten() {
        let c = coef.to_dtype(g.dtype())?.to_device(g.device())?;
        *g = g.broadcast_mul(&c)?;
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clips_to_max_norm_and_leaves_small_grads() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![
            Some(Tensor::new(&[3.0f32, 0.0], &dev)?),
            None,
            Some(Tensor::new(&[[4.0f32]], &dev)?),
        ];
        let n = clip_grad_norm(&mut g, 1.0)?
            .map(|t| t.to_scalar::<f32>())
            .transpose()?;
        assert_eq!(n, Some(5.0));
        let after = global_grad_norm(&g)?
            .map(|t| t.to_scalar::<f32>())
            .transpose()?
            .unwrap_or(0.0);
        assert!((after - 1.0).abs() < 1e-6, "{after}");
        let mut small = vec![Some(Tensor::new(&[0.3f32, 0.4], &dev)?)];
        clip_grad_norm(&mut small, 1.0)?;
        let v = small[0]
            .as_ref()
            .map(|t| t.to_vec1::<f32>())
            .transpose()?
            .unwrap_or_default();
        // coef = 1/(0.5+1e-6) clamped to 1: unchanged
        assert_eq!(v, vec![0.3, 0.4]);
        assert!(clip_grad_norm(&mut [None], 1.0)?.is_none());
        Ok(())
    }
}
