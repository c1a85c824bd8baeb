//! The engine's flat parameter buffer: one `Vec<f32>` with a named view per checkpoint tensor
//! (Hugging Face `ViTForImageClassification` names), laid out so that each layer's query, key
//! and value weights (and biases) are adjacent: the fused `(3D, D)` projection the attention
//! needs is then a plain slice, with no concatenation on any forward.

use std::ops::Range;

use candle_core::{DType, Tensor};
use rdrop_core::FlatLayout;

use crate::config::ViTConfig;
use crate::error::{Result, VitError};
use crate::model::VisionTransformer;

/// A weight and its bias (`<name>.weight`, `<name>.bias`): a linear layer or a LayerNorm.
#[derive(Debug, Clone)]
pub(crate) struct WeightBias<S = Range<usize>> {
    pub weight: S,
    pub bias: S,
}

/// `vit.embeddings.*`.
#[derive(Debug, Clone)]
pub(crate) struct Embeddings<S = Range<usize>> {
    /// `cls_token`: `(1, 1, D)`.
    pub cls_token: S,
    /// `position_embeddings`: `(1, T, D)`.
    pub position_embeddings: S,
    /// `patch_embeddings.projection`: `(D, C, P, P)`, `(D)`.
    pub projection: WeightBias<S>,
}

/// `vit.encoder.layer.{i}.*`: one encoder block.
#[derive(Debug, Clone)]
pub(crate) struct Layer<S = Range<usize>> {
    pub layernorm_before: WeightBias<S>,
    /// `attention.attention.{query,key,value}` fused: `(3D, D)`, `(3D)`.
    pub query_key_value: WeightBias<S>,
    /// `attention.output.dense`: `(D, D)`, `(D)`.
    pub attention_output: WeightBias<S>,
    pub layernorm_after: WeightBias<S>,
    /// `intermediate.dense` (fc1): `(M, D)`, `(M)`.
    pub intermediate: WeightBias<S>,
    /// `output.dense` (fc2): `(D, M)`, `(D)`.
    pub output: WeightBias<S>,
}

/// Where every tensor of the ViT lies in the flat buffer, named as in the checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Offsets {
    pub embeddings: Embeddings,
    /// `vit.encoder.layer`.
    pub layers: Vec<Layer>,
    /// `vit.layernorm`: the final LayerNorm.
    pub layernorm: WeightBias,
    /// `classifier`: `(C, D)`, `(C)`.
    pub classifier: WeightBias,
}

/// A group of tensors named once: their ranges in the flat buffer, turned into views of any
/// kind (host slices, device views) with the same names.
pub(crate) trait Tensors {
    /// The group with a view `S` per tensor.
    type Of<S>;

    /// Maps each tensor's range, in layout order.
    fn map<S>(&self, f: &mut impl FnMut(&Range<usize>) -> S) -> Self::Of<S>;

    /// The group's views of `buf`.
    fn view<'a>(&self, buf: &'a [f32]) -> Self::Of<&'a [f32]> {
        self.map(&mut |r| &buf[r.clone()])
    }

    /// The group's disjoint mutable views of `buf`.
    fn view_mut<'a>(&self, buf: &'a mut [f32]) -> Self::Of<&'a mut [f32]> {
        let mut rest = Carve { rest: buf, at: 0 };
        self.map(&mut |r| rest.take(r))
    }
}

/// What is left of a buffer after the views cut from its front (in increasing order).
struct Carve<'a> {
    rest: &'a mut [f32],
    /// The offset of `rest` in the buffer.
    at: usize,
}

impl<'a> Carve<'a> {
    fn take(&mut self, r: &Range<usize>) -> &'a mut [f32] {
        let rest = std::mem::take(&mut self.rest);
        let (_, rest) = rest.split_at_mut(r.start - self.at);
        let (view, rest) = rest.split_at_mut(r.len());
        (self.rest, self.at) = (rest, r.end);
        view
    }
}

impl Layer {
    /// The offset of the block's first tensor.
    pub fn start(&self) -> usize {
        self.layernorm_before.weight.start
    }
}

impl Tensors for WeightBias {
    type Of<S> = WeightBias<S>;
    fn map<S>(&self, f: &mut impl FnMut(&Range<usize>) -> S) -> WeightBias<S> {
        WeightBias {
            weight: f(&self.weight),
            bias: f(&self.bias),
        }
    }
}

impl Tensors for Embeddings {
    type Of<S> = Embeddings<S>;
    fn map<S>(&self, f: &mut impl FnMut(&Range<usize>) -> S) -> Embeddings<S> {
        Embeddings {
            cls_token: f(&self.cls_token),
            position_embeddings: f(&self.position_embeddings),
            projection: self.projection.map(f),
        }
    }
}

impl Tensors for Layer {
    type Of<S> = Layer<S>;
    fn map<S>(&self, f: &mut impl FnMut(&Range<usize>) -> S) -> Layer<S> {
        Layer {
            layernorm_before: self.layernorm_before.map(f),
            query_key_value: self.query_key_value.map(f),
            attention_output: self.attention_output.map(f),
            layernorm_after: self.layernorm_after.map(f),
            intermediate: self.intermediate.map(f),
            output: self.output.map(f),
        }
    }
}

/// Appends `name` of `shape` to `l`: its range.
fn push(l: &mut FlatLayout, name: String, shape: &[usize]) -> Range<usize> {
    let at = l.push(name, shape);
    at..l.len()
}

/// Appends `{name}.weight` and `{name}.bias`.
fn push_wb(l: &mut FlatLayout, name: &str, weight: &[usize], bias: &[usize]) -> WeightBias {
    WeightBias {
        weight: push(l, format!("{name}.weight"), weight),
        bias: push(l, format!("{name}.bias"), bias),
    }
}

/// The layout of `cfg`'s parameters and where each tensor lies.
pub(crate) fn layout(cfg: &ViTConfig) -> (FlatLayout, Offsets) {
    let (d, m, c, p) = (
        cfg.hidden_size,
        cfg.mlp_dim,
        cfg.num_channels,
        cfg.patch_size,
    );
    let l = &mut FlatLayout::new();
    let e = "vit.embeddings";
    let embeddings = Embeddings {
        cls_token: push(l, format!("{e}.cls_token"), &[1, 1, d]),
        position_embeddings: push(
            l,
            format!("{e}.position_embeddings"),
            &[1, cfg.num_tokens(), d],
        ),
        projection: push_wb(
            l,
            &format!("{e}.patch_embeddings.projection"),
            &[d, c, p, p],
            &[d],
        ),
    };
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let pre = format!("vit.encoder.layer.{i}");
            let layernorm_before = push_wb(l, &format!("{pre}.layernorm_before"), &[d], &[d]);
            // Query, key and value adjacent: the fused projection is one range.
            let a = format!("{pre}.attention.attention");
            let qkv = |l: &mut FlatLayout, part: &str, shape: &[usize]| {
                let [q, _, v] =
                    ["query", "key", "value"].map(|x| push(l, format!("{a}.{x}.{part}"), shape));
                q.start..v.end
            };
            let query_key_value = WeightBias {
                weight: qkv(l, "weight", &[d, d]),
                bias: qkv(l, "bias", &[d]),
            };
            Layer {
                layernorm_before,
                query_key_value,
                attention_output: push_wb(
                    l,
                    &format!("{pre}.attention.output.dense"),
                    &[d, d],
                    &[d],
                ),
                layernorm_after: push_wb(l, &format!("{pre}.layernorm_after"), &[d], &[d]),
                intermediate: push_wb(l, &format!("{pre}.intermediate.dense"), &[m, d], &[m]),
                output: push_wb(l, &format!("{pre}.output.dense"), &[d, m], &[d]),
            }
        })
        .collect();
    let layernorm = push_wb(l, "vit.layernorm", &[d], &[d]);
    let classifier = push_wb(l, "classifier", &[cfg.num_classes, d], &[cfg.num_classes]);
    (
        std::mem::take(l),
        Offsets {
            embeddings,
            layers,
            layernorm,
            classifier,
        },
    )
}

/// Copies the model's parameters into `buf` (every view must exist in the model).
pub(crate) fn read_from_model(
    layout: &FlatLayout,
    model: &VisionTransformer,
    buf: &mut [f32],
) -> Result<()> {
    for v in layout.views() {
        let var = model.var(&v.name).ok_or_else(|| {
            VitError::Config(format!("the autograd model has no parameter {}", v.name))
        })?;
        if var.dims() != v.shape.as_slice() {
            return Err(VitError::Config(format!(
                "{}: shape {:?}, the engine expects {:?}",
                v.name,
                var.dims(),
                v.shape
            )));
        }
        let data = var
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        buf[v.range()].copy_from_slice(&data);
    }
    Ok(())
}

/// Writes `buf` into the model's parameters (for saving with the model's writers).
pub(crate) fn write_to_model(
    layout: &FlatLayout,
    buf: &[f32],
    model: &VisionTransformer,
) -> Result<()> {
    for v in layout.views() {
        let var = model.var(&v.name).ok_or_else(|| {
            VitError::Config(format!("the autograd model has no parameter {}", v.name))
        })?;
        let t = Tensor::from_slice(&buf[v.range()], v.shape.as_slice(), var.device())?;
        var.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_views_are_the_checkpoint_tensors_in_layout_order() {
        let cfg = ViTConfig {
            image_size: 16,
            patch_size: 8,
            hidden_size: 8,
            num_heads: 2,
            num_layers: 2,
            mlp_dim: 16,
            num_classes: 3,
            ..ViTConfig::default()
        };
        let (layout, off) = layout(&cfg);
        // Every range, in the order the views are cut: the whole buffer, in layout order.
        let mut seen = Vec::new();
        let mut f = |r: &Range<usize>| seen.push(r.clone());
        off.embeddings.map(&mut f);
        for l in &off.layers {
            l.map(&mut f);
        }
        off.layernorm.map(&mut f);
        off.classifier.map(&mut f);
        let end = seen.iter().fold(0, |at, r| {
            assert_eq!(r.start, at, "{r:?}");
            r.end
        });
        assert_eq!(end, layout.len());
        let get = |name: &str| layout.get(name).unwrap().range();
        let a = "vit.encoder.layer.1.attention.attention";
        let qkv = &off.layers[1].query_key_value;
        assert_eq!(
            qkv.weight,
            get(&format!("{a}.query.weight")).start..get(&format!("{a}.value.weight")).end
        );
        assert_eq!(
            qkv.bias,
            get(&format!("{a}.query.bias")).start..get(&format!("{a}.value.bias")).end
        );
        assert_eq!(
            off.layers[0].output.weight,
            get("vit.encoder.layer.0.output.dense.weight")
        );
        assert_eq!(off.classifier.bias, get("classifier.bias"));
        // Mutable views are the same ranges of the buffer.
        let mut buf: Vec<f32> = (0..layout.len()).map(|i| i as f32).collect();
        let g = off.layers[1].view_mut(&mut buf);
        assert_eq!(g.output.bias.len(), cfg.hidden_size);
        assert_eq!(g.output.bias[0] as usize, off.layers[1].output.bias.start);
        assert_eq!(
            g.intermediate.weight[0] as usize,
            off.layers[1].intermediate.weight.start
        );
    }
}
