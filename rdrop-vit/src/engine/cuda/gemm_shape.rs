//! The attention GEMMs' shapes ([`AttnShapes`]) as [`RowGemm`]s (pure, compiled in every build
//! so that CI tests them).

use rdrop_kernels::gemm_shape::RowGemm;

/// The attention GEMMs, batched over the `B·H` (image, head) pairs: `q, k, v, o` are dense
/// `(T, Dh)` matrices, the `(T, T)` ones (`S`/`P`, `A`, `dA`/`dS`) have rows `ld` = `⌈T/8⌉·8`
/// elements apart ([`super::plan::attn_ld`]).
pub struct AttnShapes {
    /// Tokens.
    pub t: usize,
    /// Head width.
    pub dh: usize,
    /// Matrices: images × heads.
    pub bh: usize,
    /// Row length of the `(T, T)` matrices.
    pub ld: usize,
}

impl AttnShapes {
    /// The shapes of `rows` rows of `cfg`.
    pub fn new(cfg: &crate::config::ViTConfig, rows: usize) -> Self {
        let t = cfg.num_tokens();
        Self {
            t,
            dh: cfg.head_dim(),
            bh: rows * cfg.num_heads,
            ld: super::plan::attn_ld(t),
        }
    }

    /// `(T, T) = (T, Dh) · (T, Dh)ᵀ`: the scores `q·kᵀ`, and `dA = do·vᵀ`.
    pub fn qk(&self) -> RowGemm {
        let (t, dh) = (self.t, self.dh);
        RowGemm::new(t, t, dh, false, true)
            .with_ld(dh, dh, self.ld)
            .batched(self.bh, t * dh, t * dh, t * self.ld)
    }

    /// `(T, Dh) = op(X) · (T, Dh)` with `X` a `(T, T)` matrix (`Xᵀ` when `trans`): `o = A·v`,
    /// `dq = dS·k`; transposed `dv = Aᵀ·do`, `dk = dSᵀ·q`.
    pub fn sx(&self, trans: bool) -> RowGemm {
        let (t, dh) = (self.t, self.dh);
        RowGemm::new(t, dh, t, trans, false)
            .with_ld(self.ld, dh, dh)
            .batched(self.bh, t * self.ld, t * dh, t * dh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attention_gemms_on_padded_rows() {
        // T = 10 tokens (rows padded to 16), Dh = 3, 2 images × 2 heads.
        let cfg = crate::config::ViTConfig {
            image_size: 12,
            patch_size: 4,
            hidden_size: 6,
            num_heads: 2,
            ..crate::config::ViTConfig::default()
        };
        let g = AttnShapes::new(&cfg, 2);
        let (t, dh, bh, ld) = (g.t, g.dh, g.bh, g.ld);
        assert_eq!((t, dh, bh, ld), (10, 3, 4, 16));
        let val = |i: usize, s: usize| ((i * 31 + s * 7) % 13) as f32 - 6.0;
        let dense = |s: usize| (0..bh * t * dh).map(|i| val(i, s)).collect::<Vec<f32>>();
        let (q, k) = (dense(1), dense(2));
        let at = |x: &[f32], m: usize, i: usize, j: usize| x[m * t * dh + i * dh + j];
        // S = q·kᵀ lands at [m·T·ld + i·ld + j]; the padding is never written.
        let s = g.qk().reference(&q, &k);
        for m in 0..bh {
            for i in 0..t {
                for j in 0..ld {
                    let got = s.get(m * t * ld + i * ld + j).copied();
                    if j < t {
                        let want: f32 = (0..dh).map(|e| at(&q, m, i, e) * at(&k, m, j, e)).sum();
                        assert_eq!(got, Some(want), "S[{m}, {i}, {j}]");
                    } else if let Some(v) = got {
                        assert!(v.is_nan(), "padding written at [{m}, {i}, {j}]");
                    }
                }
            }
        }
        // o = A·v and dv = Aᵀ·v with A the padded S.
        let v = dense(3);
        let o = g.sx(false).reference(&s, &v);
        let ot = g.sx(true).reference(&s, &v);
        let sm = |m: usize, i: usize, j: usize| s[m * t * ld + i * ld + j];
        for m in 0..bh {
            for i in 0..t {
                for e in 0..dh {
                    let want: f32 = (0..t).map(|j| sm(m, i, j) * at(&v, m, j, e)).sum();
                    assert_eq!(o[m * t * dh + i * dh + e], want, "o[{m}, {i}, {e}]");
                    let want_t: f32 = (0..t).map(|j| sm(m, j, i) * at(&v, m, j, e)).sum();
                    assert_eq!(ot[m * t * dh + i * dh + e], want_t, "dv[{m}, {i}, {e}]");
                }
            }
        }
    }
}
