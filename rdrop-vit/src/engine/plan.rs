//! The activations one training forward saves, planned once per (architecture, batch rows).
//! Each buffer is declared once, in the tables below ([`plan_table`]); the CUDA plan uses the
//! same macro.
//!
//! With `B` rows (an R-Drop micro-batch of `m` samples runs `B = 2m` rows), `T` tokens, width
//! `D`, MLP width `M`, `H` heads, `L` layers, `N = B·T`, the plan holds, in f32:
//! ```text
//! per layer:  x (N·D)  residual stream entering the block
//!             μ₁, r₁, μ₂, r₂ (N each)  LayerNorm statistics (the LN outputs are recomputed)
//!             qkv (3·N·D), P (B·H·T·T) softmax before dropout, attn (N·D) heads' output
//!             mid (N·D)  residual after attention, pre (N·M) fc1 before GELU,
//!             h (N·M) dropout(GELU(pre)) (fc2's input)
//!             masks, one byte an element where the rate is > 0: attention output (N·D),
//!             MLP hidden (N·M), MLP output (N·D)
//! once:       x_L (N·D), final LN of the class rows (B·D + 2B), logits (B·C), embeddings'
//!             mask (N·D bytes), patch rows (B·g²·C·p²),
//!             scratch: N·M + 6·N·D + 3·N·D + attention/LN scratch
//! ```
//! so `L·(N·(6D + 2M + 4) + B·H·T²)` floats plus `L·N·(2D + M)` mask bytes and the rest.
//! Attention-probability masks are regenerated from their Philox keys (`B·H·T²` bytes a
//! layer would be the largest mask). LayerNorm outputs are recomputed in the backward (one
//! cheap pass) instead of being stored.

use rdrop_kernels::attention::{attention_bwd_scratch_len, AttnDims};
use rdrop_kernels::layernorm::layernorm_bwd_scratch_len;

use crate::config::ViTConfig;

/// The padded row length `⌈T/8⌉·8` of the `(T, T)` attention matrices (probabilities, their
/// mask, `A`, `dA`/`dS`): 16 bytes in bf16/f16, 32 in f32 (cuBLASLt's alignment on CUDA).
pub fn attn_ld(tokens: usize) -> usize {
    tokens.div_ceil(8) * 8
}

/// The dimensions the plans' buffer lengths are written in (the module docs' letters).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    /// `B` rows, `T` tokens, `D` width, `M` MLP width, `H` heads, `Dh = D/H`, `C` classes.
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub m: usize,
    pub h: usize,
    pub dh: usize,
    pub c: usize,
    /// `N = B·T` token rows.
    pub n: usize,
    /// `G = T − 1` patches of `K = C_in·P²` pixels; `I = B·C_in·S²` pixels of the images.
    pub g: usize,
    pub k: usize,
    pub img: usize,
    /// `A = B·H·T·T₈`: the elements of the CUDA plan's `(T, T)` attention matrices, their
    /// rows padded to `T₈` ([`attn_ld`]).
    pub a: usize,
    /// 1 for a training plan (it keeps masks and the backward's buffers), else 0.
    pub tr: usize,
    /// 1 when a training plan drops something there, else 0: hidden (embeddings, MLP),
    /// attention probabilities, attention output.
    pub pd: usize,
    pub pa: usize,
    pub po: usize,
}

impl Dims {
    /// The dimensions of `cfg` at `rows` rows.
    pub fn new(cfg: &ViTConfig, rows: usize, train: bool) -> Self {
        let t = cfg.num_tokens();
        let tr = usize::from(train);
        let on = |p: f64| tr * usize::from(p > 0.0);
        Self {
            b: rows,
            t,
            d: cfg.hidden_size,
            m: cfg.mlp_dim,
            h: cfg.num_heads,
            dh: cfg.head_dim(),
            c: cfg.num_classes,
            n: rows * t,
            g: t - 1,
            k: cfg.num_channels * cfg.patch_size * cfg.patch_size,
            img: rows * cfg.num_channels * cfg.image_size * cfg.image_size,
            a: rows * cfg.num_heads * t * attn_ld(t),
            tr,
            pd: on(cfg.dropout),
            pa: on(cfg.attention_dropout),
            po: on(cfg.attention_output_dropout),
        }
    }
}

/// Bytes a planned buffer holds.
pub(crate) trait Held {
    fn held(&self) -> usize;
}

impl<X> Held for Vec<X> {
    fn held(&self) -> usize {
        self.len() * std::mem::size_of::<X>()
    }
}

/// Bytes of one element of type `$ty`; `T`, the compute type, is `$elem` bytes.
macro_rules! elem_bytes {
    (T, $elem:expr) => {
        $elem
    };
    ($ty:ty, $elem:expr) => {
        std::mem::size_of::<$ty>()
    };
}
pub(crate) use elem_bytes;

/// Declares a plan's buffers once, each with its doc, element type and length (a formula in
/// the fields of [`Dims`] it names), and generates from that one list, for each table:
/// - `$Spec`: every buffer's element count (`sizes`) and their bytes (`buffer_bytes`);
/// - `$Bufs`: the buffers (`$Buf<type>`), allocated by `$zeros` for a `$Spec` (`alloc`), and
///   the bytes they hold (`held`).
///
/// Both structs start with the extra fields listed in their braces (passed to `sizes` and
/// `alloc` in that order). `storage [...]` says once, for the tables that follow, what holds
/// a buffer and what allocates it.
macro_rules! plan_table {
    (storage $st:tt $($tables:tt)*) => {
        $crate::engine::plan::plan_table!(@tables $st $($tables)*);
    };
    (@tables $st:tt) => {};
    (
        @tables $st:tt
        $(#[$sm:meta])*
        $svis:vis struct $Spec:ident $sx:tt sizes $D:ident $f:tt;
        $(#[$bm:meta])*
        struct $Bufs:ident $bx:tt;
        buffers $body:tt
        $($rest:tt)*
    ) => {
        $crate::engine::plan::plan_table!(
            @one $st $(#[$sm])* $svis struct $Spec $sx sizes $D $f; $(#[$bm])* struct $Bufs $bx;
            buffers $body
        );
        $crate::engine::plan::plan_table!(@tables $st $($rest)*);
    };
    (
        @one [
            $(#[$cm:meta])* $Buf:ident $(<$T:ident>)? $(where [$($w:tt)*])?
            alloc $zeros:ident($A:ty) -> $E:ty
        ]
        $(#[$sm:meta])*
        $svis:vis struct $Spec:ident { $($(#[$sxm:meta])* $sx:ident: $sxt:ty,)* }
            sizes $D:ident { $($f:ident),* $(,)? };
        $(#[$bm:meta])*
        struct $Bufs:ident { $($(#[$bxm:meta])* $bx:ident: $bxt:ty,)* };
        buffers {
            $( $(#[$fm:meta])* $name:ident: $ty:ident = $len:expr, )*
        }
    ) => {
        $(#[$sm])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        $svis struct $Spec {
            $( $(#[$sxm])* pub $sx: $sxt, )*
            $( $(#[$fm])* pub $name: usize, )*
        }

        #[allow(dead_code)] // not every backend reads both
        impl $Spec {
            /// Every buffer's element count for `dims`.
            fn sizes(dims: &$D, $($sx: $sxt),*) -> Self {
                let $D { $($f,)* .. } = *dims;
                Self { $($sx,)* $($name: $len,)* }
            }

            /// Bytes of the buffers, with `elem`-byte compute-type elements.
            fn buffer_bytes(&self, elem: usize) -> usize {
                let _ = elem;
                0 $(+ self.$name * $crate::engine::plan::elem_bytes!($ty, elem))*
            }
        }

        $(#[$cm])*
        $(#[$bm])*
        #[derive(Debug)]
        pub(crate) struct $Bufs $(<$T>)? {
            $( $(#[$bxm])* pub $bx: $bxt, )*
            $( $(#[$fm])* pub $name: $Buf<$ty>, )*
        }

        $(#[$cm])*
        impl $(<$T>)? $Bufs $(<$T>)? $(where $($w)*)? {
            /// Allocates every buffer of `sizes` with `at`.
            fn alloc(at: $A, sizes: &$Spec, $($bx: $bxt),*) -> std::result::Result<Self, $E> {
                Ok(Self {
                    $($bx,)*
                    $($name: $zeros::<$ty>(at, sizes.$name)?,)*
                })
            }

            /// Bytes the buffers hold.
            fn held(&self) -> usize {
                use $crate::engine::plan::Held as _;
                0 $(+ self.$name.held())*
            }
        }
    };
}
pub(crate) use plan_table;

/// A zeroed host buffer of `len` elements (for [`plan_table`]).
fn zeros<X: Copy + Default>(_: (), len: usize) -> Result<Vec<X>, std::convert::Infallible> {
    Ok(vec![X::default(); len])
}

plan_table! {
    storage [Vec alloc zeros(()) -> std::convert::Infallible]

    /// Element counts of one block's saved activations.
    pub(crate) struct LayerSizes {} sizes Dims { b, t, n, d, m, h, tr, pd, po };
    /// One block's saved activations.
    struct LayerActs {};
    buffers {
        /// Residual stream entering the block.
        x: f32 = n * d,
        /// LayerNorm statistics (the LayerNorm outputs are recomputed).
        mean1: f32 = n,
        rstd1: f32 = n,
        qkv: f32 = 3 * n * d,
        /// Softmax before dropout.
        probs: f32 = b * h * t * t,
        /// The heads' output.
        attn: f32 = n * d,
        /// Residual after attention.
        mid: f32 = n * d,
        mean2: f32 = n,
        rstd2: f32 = n,
        /// fc1 before GELU.
        pre: f32 = n * m,
        /// dropout(GELU(pre)), fc2's input.
        h: f32 = n * m,
        /// Dropout masks, one byte an element: attention output, MLP hidden, MLP output.
        keep_attn_out: u8 = tr * po * n * d,
        keep_hidden: u8 = tr * pd * n * m,
        keep_out: u8 = tr * pd * n * d,
    }

    /// Element counts of the buffers a plan holds once.
    pub(crate) struct PlanSizes {} sizes Dims { b, t, n, d, m, h, dh, c, g, k, tr, pd };
    /// Every buffer of a forward and backward at `rows` rows.
    struct Plan {
        rows: usize,
        /// Whether the plan can run a backward (every block's activations and the scratch).
        train: bool,
        layers: Vec<LayerActs>,
    };
    buffers {
        /// Residual stream after the last block.
        x_out: f32 = n * d,
        /// Class-token rows of `x_out`, their final LayerNorm and its statistics.
        cls: f32 = b * d,
        lnf: f32 = b * d,
        meanf: f32 = b,
        rstdf: f32 = b,
        logits: f32 = b * c,
        /// The embeddings' dropout mask.
        keep_embed: u8 = tr * pd * n * d,
        /// im2col rows of the images.
        patches: f32 = b * g * k,
        /// Scratch (forward and backward).
        tok: f32 = b * g * d,
        ln: f32 = n * d,
        proj: f32 = n * d,
        dres: f32 = tr * n * d,
        dtmp: f32 = tr * n * d,
        dln: f32 = tr * n * d,
        dattn: f32 = tr * n * d,
        dqkv: f32 = tr * 3 * n * d,
        dhidden: f32 = tr * n * m,
        dcls: f32 = tr * b * d,
        dlogits: f32 = tr * b * c,
        attn_scratch: f32 = tr * attention_bwd_scratch_len(AttnDims {
            batch: b,
            tokens: t,
            heads: h,
            head_dim: dh,
        }),
        ln_scratch: f32 = tr * layernorm_bwd_scratch_len(n, d).max(layernorm_bwd_scratch_len(b, d)),
    }
}

/// The attention shape of `rows` rows of `cfg`.
pub(crate) fn attn_dims(cfg: &ViTConfig, rows: usize) -> AttnDims {
    AttnDims {
        batch: rows,
        tokens: cfg.num_tokens(),
        heads: cfg.num_heads,
        head_dim: cfg.head_dim(),
    }
}

impl Plan {
    /// Allocates every buffer for `rows` rows (the only allocation of a training step). An
    /// inference plan (`!train`) keeps one block's activations and no backward scratch.
    pub fn new(cfg: &ViTConfig, rows: usize, train: bool) -> Self {
        let dims = Dims::new(cfg, rows, train);
        let slots = if train { cfg.num_layers } else { 1 };
        let layer = LayerSizes::sizes(&dims);
        let layers = (0..slots)
            .map(|_| {
                let Ok(a) = LayerActs::alloc((), &layer);
                a
            })
            .collect();
        let Ok(plan) = Self::alloc((), &PlanSizes::sizes(&dims), rows, train, layers);
        plan
    }

    /// Bytes held by the plan.
    pub fn bytes(&self) -> usize {
        self.held() + self.layers.iter().map(LayerActs::held).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_costs_the_module_docs_formula() {
        let cfg = ViTConfig {
            image_size: 32,
            patch_size: 8,
            hidden_size: 32,
            num_heads: 4,
            num_layers: 3,
            mlp_dim: 128,
            num_classes: 10,
            dropout: 0.1,
            attention_output_dropout: 0.1,
            ..ViTConfig::default()
        };
        let rows = 6;
        let (b, t, d, m, h) = (rows, cfg.num_tokens(), 32, 128, 4);
        let n = b * t;
        let floats = n * (6 * d + 2 * m + 4) + b * h * t * t;
        let masks = n * (2 * d + m);
        let layer = LayerSizes::sizes(&Dims::new(&cfg, rows, true));
        assert_eq!(layer.buffer_bytes(4), 4 * floats + masks);
        let plan = Plan::new(&cfg, rows, true);
        assert_eq!(plan.layers.len(), 3);
        assert_eq!(plan.layers[0].held(), 4 * floats + masks);
        let once = PlanSizes::sizes(&Dims::new(&cfg, rows, true));
        assert_eq!(
            plan.bytes(),
            3 * (4 * floats + masks) + once.buffer_bytes(4)
        );
        // Inference: one slot, no masks, no backward buffers.
        let eval = Plan::new(&cfg, rows, false);
        assert_eq!(eval.layers.len(), 1);
        assert_eq!(eval.layers[0].held(), 4 * floats);
        assert!(eval.dres.is_empty() && eval.keep_embed.is_empty());
    }
}
