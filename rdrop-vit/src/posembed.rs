//! Position-embedding resize for another image size, as the R-Drop reference code does it
//! (arXiv 2106.14448, `vit_src` / ViT-pytorch `load_from`): split off the class token, reshape
//! the rest to its `g × g` grid, `scipy.ndimage.zoom(grid, (g'/g, g'/g, 1), order=1)`, and
//! concatenate the class token back.

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, VitError};

/// Linear interpolation positions of `scipy.ndimage.zoom(order=1, grid_mode=False)` along one
/// axis: output index `o` samples input coordinate `c = o · (n_in − 1) / (n_out − 1)`; returns
/// `(i0, i1, frac)` so that `out[o] = (1 − frac)·in[i0] + frac·in[i1]`.
fn axis_weights(n_in: usize, n_out: usize) -> Vec<(usize, usize, f64)> {
    (0..n_out)
        .map(|o| {
            let c = if n_out > 1 {
                o as f64 * (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
            } else {
                0.0
            };
            let c = c.clamp(0.0, (n_in - 1) as f64);
            let i0 = (c.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, c - i0 as f64)
        })
        .collect()
}

/// Resizes position embeddings `(1, 1 + g·g, D)` to `(1, 1 + new_grid², D)`: class token
/// untouched, the `g × g × D` grid bilinearly zoomed like `scipy.ndimage.zoom(order=1)`.
/// Computed in f64 on the CPU, returned as f32 on `pos`'s device.
pub fn resize_pos_embed(pos: &Tensor, new_grid: usize) -> Result<Tensor> {
    let (one, t, d) = pos.dims3()?;
    let g = ((t.saturating_sub(1)) as f64).sqrt().round() as usize;
    if one != 1 || g * g + 1 != t || g == 0 || new_grid == 0 {
        return Err(VitError::Config(format!(
            "position embeddings of shape {:?} are not (1, 1 + g², D) with a square grid, or the new grid {new_grid} is empty",
            pos.dims()
        )));
    }
    let v: Vec<f64> = pos
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let w = axis_weights(g, new_grid);
    let at = |r: usize, c: usize, k: usize| v[d * (1 + r * g + c) + k];
    let mut out = Vec::with_capacity((1 + new_grid * new_grid) * d);
    out.extend(v[..d].iter().map(|&x| x as f32));
    for &(r0, r1, fr) in &w {
        for &(c0, c1, fc) in &w {
            for k in 0..d {
                let top = (1.0 - fc) * at(r0, c0, k) + fc * at(r0, c1, k);
                let bot = (1.0 - fc) * at(r1, c0, k) + fc * at(r1, c1, k);
                out.push(((1.0 - fr) * top + fr * bot) as f32);
            }
        }
    }
    Ok(
        Tensor::from_vec(out, (1, 1 + new_grid * new_grid, d), &Device::Cpu)?
            .to_device(pos.device())?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_grid_is_identity_and_shapes() {
        let p = Tensor::arange(0f32, 17.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 17, 3))
            .unwrap();
        let same = resize_pos_embed(&p, 4).unwrap();
        assert_eq!(
            same.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let up = resize_pos_embed(&p, 7).unwrap();
        assert_eq!(up.dims(), &[1, 50, 3]);
        assert!(resize_pos_embed(&p.narrow(1, 0, 16).unwrap(), 7).is_err());
    }
}
