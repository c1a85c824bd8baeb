//! rdrop-vit: a trainable Vision Transformer in candle that loads the ImageNet-21k checkpoints
//! people actually have (Hugging Face, timm, Google's `.npz`, this project's own runs).
//!
//! Part of rdrop, R-Drop fine-tuning ([Liang et al., 2021](https://arxiv.org/abs/2106.14448)).
//! The model mirrors the R-Drop reference code (ViT-pytorch): pre-LN blocks, exact GELU,
//! dropout after the position embeddings and after both MLP linears, classifier on the class
//! token. Unlike `candle_nn::LayerNorm` / `softmax_last_dim`, its LayerNorm and softmax have
//! gradients ([`ops`]). Parameters are f32 [`candle_core::Var`]s in a [`candle_nn::VarMap`]
//! named like Hugging Face's `ViTForImageClassification`; the forward may run in bf16/f16 on CUDA.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod engine;
pub mod error;
pub mod fused_grad;
pub mod hub;
pub mod layouts;
pub mod load;
pub mod model;
pub mod posembed;
pub mod save;
pub mod sites;

pub use config::ViTConfig;
pub use engine::{Engine, EngineKind};
pub use error::{Result, VitError};
pub use load::{load_model, HeadStatus, LoadOptions, LoadReport, Loaded, WeightsLayout};
pub use model::VisionTransformer;
pub use posembed::resize_pos_embed;
pub use save::{save_hf, save_tensors_hf};
