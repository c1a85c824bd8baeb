//! One `--weights SPEC` for every place ViT-B/16 ImageNet-21k weights live: a Hugging Face
//! folder or hub repo id, a timm safetensors file, Google's original `.npz`, or a checkpoint /
//! run folder written by this project. The layout is detected from the tensor names, converted
//! to the canonical HF names ([`crate::layouts`]) and copied into a fresh trainable model
//! (a `VarMap` of f32 `Var`s), with a report of what was loaded, skipped and re-initialised.
//!
//! Recipe details (arXiv 2106.14448, `vit_src`): a head of another size is replaced by a zero
//! head; position embeddings are resized with `scipy.ndimage.zoom(order=1)` when the image size
//! differs; `pre_logits` / `pooler` are ignored.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::{DropoutRng, RunFolder};

use crate::config::{ViTConfig, PRESETS};
use crate::error::{Result, VitError};
use crate::layouts::{self, Converted, Detected};
use crate::model::VisionTransformer;
use crate::{hub, posembed};

/// How to build the model around the loaded weights. `None` fields keep what the weights say
/// (their `config.json`, else the preset's / the recipe's values).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Architecture preset the weights must have (an explicit `--model`): checked against the
    /// tensor shapes, and against `config.json` when there is one (a mismatch is an error
    /// naming both). For files without a config (timm, npz) it also gives the head count.
    pub preset: Option<String>,
    /// Architecture preset for files without a `config.json` (timm, npz) when `preset` is
    /// `None` (a run preset's model). Ignored when the weights have a `config.json`: that
    /// decides the architecture.
    pub fallback_preset: Option<String>,
    /// Attention heads for files that do not record them (timm) when no preset matches.
    pub num_heads: Option<usize>,
    /// Classes of the task. A checkpoint head of another size is replaced by a zero head.
    /// `None`: keep the checkpoint's head (an error if it has none).
    pub num_classes: Option<usize>,
    /// Input size; position embeddings are resized when it differs from the checkpoint's.
    pub image_size: Option<usize>,
    /// Always start from a new zero head.
    pub reset_head: bool,
    /// LayerNorm epsilon (HF in21k configs say 1e-12; the recipe uses 1e-6).
    pub layer_norm_eps: Option<f64>,
    /// Dropout after position embeddings and MLP linears.
    pub dropout: Option<f64>,
    /// Attention-probability dropout.
    pub attention_dropout: Option<f64>,
    /// Dropout after the attention output projection.
    pub attention_output_dropout: Option<f64>,
    /// Where the parameters live.
    pub device: Device,
    /// Seed of the dropout RNG (and of the initialisation of anything not loaded).
    pub seed: u64,
    /// Hub cache folder (default: [`hub::cache_dir`] from the environment).
    pub hub_cache: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            preset: None,
            fallback_preset: None,
            num_heads: None,
            num_classes: None,
            image_size: None,
            reset_head: false,
            layer_norm_eps: None,
            dropout: None,
            attention_dropout: None,
            attention_output_dropout: None,
            device: Device::Cpu,
            seed: 42,
            hub_cache: None,
        }
    }
}

/// The layout the weights were found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsLayout {
    /// HF `ViTForImageClassification` (`vit.*`, `classifier.*`) with `config.json`.
    HfClassifier,
    /// HF `ViTModel` (no prefix, pooler, no head) with `config.json`.
    HfBase,
    /// timm `VisionTransformer` safetensors.
    Timm,
    /// Google's original `.npz`.
    GoogleNpz,
    /// A checkpoint written by this project (HF layout + `rdrop` block in `config.json`).
    Rdrop,
}

impl fmt::Display for WeightsLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HfClassifier => "Hugging Face ViTForImageClassification",
            Self::HfBase => "Hugging Face ViTModel",
            Self::Timm => "timm VisionTransformer",
            Self::GoogleNpz => "Google ViT npz",
            Self::Rdrop => "rdrop checkpoint",
        })
    }
}

/// What happened to the classifier.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadStatus {
    /// Taken from the checkpoint.
    Loaded,
    /// A new zero-initialised head, and why.
    New(String),
}

/// What a load did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// The weights file read.
    pub path: PathBuf,
    /// Its layout.
    pub layout: WeightsLayout,
    /// Canonical names of the parameters taken from the file.
    pub loaded: Vec<String>,
    /// Source tensors not used, with the reason.
    pub skipped: Vec<(String, String)>,
    /// The classifier.
    pub head: HeadStatus,
    /// Position-embedding grid resized `(from, to)`.
    pub pos_embed_resized: Option<(usize, usize)>,
    /// Other remarks (e.g. an HF config's eps of 1e-12).
    pub notes: Vec<String>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "weights: {} ({})", self.path.display(), self.layout)?;
        writeln!(f, "  loaded {} tensors", self.loaded.len())?;
        for (n, why) in &self.skipped {
            writeln!(f, "  skipped {n}: {why}")?;
        }
        match &self.head {
            HeadStatus::Loaded => writeln!(f, "  head: loaded")?,
            HeadStatus::New(why) => writeln!(f, "  head: new, zero-initialised ({why})")?,
        }
        if let Some((a, b)) = self.pos_embed_resized {
            writeln!(f, "  position embeddings resized {a}x{a} -> {b}x{b} (bilinear, as scipy.ndimage.zoom order 1)")?;
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}

/// A loaded model with its parameters.
pub struct Loaded {
    /// The model (parameters are the `varmap`'s Vars).
    pub model: VisionTransformer,
    /// Its f32 master parameters.
    pub varmap: VarMap,
    /// The final configuration.
    pub config: ViTConfig,
    /// What was loaded.
    pub report: LoadReport,
    /// Class names from the checkpoint's `config.json` (`id2label`), when real names.
    pub class_names: Option<Vec<String>>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("config", &self.config)
            .field("report", &self.report)
            .field("class_names", &self.class_names)
            .finish_non_exhaustive()
    }
}

/// Files a spec resolved to.
#[derive(Debug, Clone)]
struct Resolved {
    weights: PathBuf,
    config: Option<PathBuf>,
}

fn spec_err(spec: &str, msg: impl Into<String>) -> VitError {
    VitError::Spec {
        spec: spec.into(),
        msg: msg.into(),
    }
}

/// In a run folder: `final/`, else `best/`, else the newest `checkpoints/step-N/`
/// ([`RunFolder::model_folder`]).
pub fn resolve_run_folder(dir: &Path) -> Option<PathBuf> {
    RunFolder::new(dir).model_folder()
}

fn resolve(spec: &str, cache: &Path) -> Result<Resolved> {
    let p = Path::new(spec);
    if p.is_dir() {
        let st = p.join("model.safetensors");
        if st.is_file() {
            let cfg = p.join("config.json");
            return Ok(Resolved {
                weights: st,
                config: cfg.is_file().then_some(cfg),
            });
        }
        if let Some(inner) = resolve_run_folder(p) {
            return resolve(&inner.to_string_lossy(), cache);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| VitError::io(p, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                matches!(
                    f.extension().and_then(|e| e.to_str()),
                    Some("safetensors" | "npz")
                )
            })
            .collect();
        found.sort();
        return match found.as_slice() {
            [one] => resolve(&one.to_string_lossy(), cache),
            [] => Err(spec_err(
                spec,
                "folder has no model.safetensors, no .npz, and no final/, best/ or checkpoints/step-N/ with one",
            )),
            _ => Err(spec_err(spec, "folder has several weight files: name one")),
        };
    }
    if p.is_file() {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "safetensors" | "npz") {
            return Err(spec_err(
                spec,
                format!("unsupported file type `.{ext}` (use .safetensors or Google's .npz; PyTorch .bin/.pth pickles are not read)"),
            ));
        }
        let cfg = p.with_file_name("config.json");
        let use_cfg =
            p.file_name().and_then(|n| n.to_str()) == Some("model.safetensors") && cfg.is_file();
        return Ok(Resolved {
            weights: p.to_path_buf(),
            config: use_cfg.then_some(cfg),
        });
    }
    if hub::looks_like_repo_id(spec) {
        let weights = hub::get(cache, spec, "model.safetensors", false)?
            .ok_or_else(|| spec_err(spec, "the hub repo has no model.safetensors"))?;
        let config = hub::get(cache, spec, "config.json", true)?;
        return Ok(Resolved { weights, config });
    }
    Err(spec_err(
        spec,
        "no such file or folder, and not a hub repo id (org/name)",
    ))
}

fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let is_npz = path.extension().and_then(|e| e.to_str()) == Some("npz");
    let raw = if is_npz {
        Tensor::read_npz(path)
            .map_err(|e| VitError::parse(path, format!("cannot read npz: {e}")))?
    } else {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| VitError::parse(path, format!("cannot read safetensors: {e}")))?
            .into_iter()
            .collect()
    };
    raw.into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
        .collect()
}

/// Architecture from tensor shapes (canonical names) and a head count: the npz's, else the
/// preset's, else the preset with the same width, depth and MLP.
fn infer_config(
    src: &str,
    t: &layouts::Tensors,
    heads: Option<usize>,
    preset: Option<&ViTConfig>,
) -> Result<ViTConfig> {
    let get = |n: &str| {
        t.get(n).ok_or_else(|| VitError::Missing {
            source_name: src.into(),
            names: vec![n.into()],
        })
    };
    let patch = get("vit.embeddings.patch_embeddings.projection.weight")?;
    let (d, c, p, _) = patch.dims4()?;
    let tokens = get("vit.embeddings.position_embeddings")?.dim(1)?;
    let grid = ((tokens.saturating_sub(1)) as f64).sqrt().round() as usize;
    if grid * grid + 1 != tokens {
        return Err(VitError::parse(
            src,
            format!("{tokens} position embeddings are not 1 + a square grid"),
        ));
    }
    let layers = t
        .keys()
        .filter_map(|k| {
            k.strip_prefix("vit.encoder.layer.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    let mlp = get("vit.encoder.layer.0.intermediate.dense.weight")?.dim(0)?;
    let classes = t
        .get("classifier.weight")
        .map(|w| w.dim(0))
        .transpose()?
        .unwrap_or(0);
    let base = match preset {
        Some(p) => p.clone(),
        None => {
            let m = PRESETS
                .iter()
                .filter_map(|n| ViTConfig::preset(n).ok())
                .find(|c| c.hidden_size == d && c.num_layers == layers && c.mlp_dim == mlp);
            match (m, heads) {
                (Some(m), _) => m,
                (None, Some(_)) => ViTConfig::default(),
                (None, None) => {
                    return Err(VitError::Config(format!(
                        "{src}: no preset has width {d}, {layers} layers and MLP {mlp}, and the file does not say the head count: pass a preset (--model) or the head count (--num-heads)"
                    )))
                }
            }
        }
    };
    let heads = heads.unwrap_or(base.num_heads);
    if let Some(pc) = preset {
        let checks = [
            ("hidden size", pc.hidden_size, d),
            ("layers", pc.num_layers, layers),
            ("MLP width", pc.mlp_dim, mlp),
            ("patch size", pc.patch_size, p),
            ("heads", pc.num_heads, heads),
        ];
        for (what, want, got) in checks {
            if want != got {
                return Err(VitError::Config(format!(
                    "{src}: the preset says {what} {want}, the weights have {got}"
                )));
            }
        }
    }
    Ok(ViTConfig {
        image_size: grid * p,
        patch_size: p,
        num_channels: c,
        hidden_size: d,
        num_layers: layers,
        num_heads: heads,
        mlp_dim: mlp,
        num_classes: classes,
        ..base
    })
}

/// Loads `spec` (HF folder / hub repo id / timm `.safetensors` / Google `.npz` / our checkpoint
/// or run folder) into a fresh trainable model; see [`LoadOptions`].
pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<Loaded> {
    let cache = opts.hub_cache.clone().unwrap_or_else(hub::cache_dir);
    let res = resolve(spec, &cache)?;
    let src = res.weights.display().to_string();
    let raw = read_tensors(&res.weights)?;
    let detected = layouts::detect(raw.iter().map(|(n, _)| n.as_str())).ok_or_else(|| {
        VitError::parse(
            &res.weights,
            "not a ViT checkpoint (no known layout: HF, timm or Google npz)",
        )
    })?;
    let Converted {
        tensors,
        skipped,
        num_heads,
    } = match detected {
        Detected::HfClassifier | Detected::HfBase => layouts::from_hf(raw),
        Detected::Timm => layouts::from_timm(raw)?,
        Detected::GoogleNpz => layouts::from_google_npz(raw)?,
    };
    let mut notes = Vec::new();
    let preset = opts.preset.as_deref().map(ViTConfig::preset).transpose()?;
    let fallback = match &preset {
        Some(_) => None,
        None => opts
            .fallback_preset
            .as_deref()
            .map(ViTConfig::preset)
            .transpose()?,
    };

    // The checkpoint's own configuration.
    let json = match &res.config {
        Some(p) => {
            let s = std::fs::read_to_string(p).map_err(|e| VitError::io(p, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&s).map_err(|e| VitError::parse(p, e.to_string()))?;
            // timm hub repos ship a config.json of their own (no `model_type`): ignore it.
            v.get("hidden_size").is_some().then_some((p.clone(), v))
        }
        None => None,
    };
    let ours = json.as_ref().is_some_and(|(_, v)| v.get("rdrop").is_some());
    let (mut cfg, class_names) = match &json {
        Some((p, v)) if matches!(detected, Detected::HfClassifier | Detected::HfBase) => {
            let mut c = ViTConfig::from_hf_json(v).map_err(|m| VitError::parse(p, m))?;
            let inferred = infer_config(&src, &tensors, Some(c.num_heads), None)?;
            if (
                inferred.hidden_size,
                inferred.num_layers,
                inferred.mlp_dim,
                inferred.patch_size,
            ) != (c.hidden_size, c.num_layers, c.mlp_dim, c.patch_size)
            {
                return Err(VitError::parse(
                    p,
                    format!(
                        "config.json (hidden {}, layers {}, MLP {}, patch {}) does not match the weights (hidden {}, layers {}, MLP {}, patch {})",
                        c.hidden_size, c.num_layers, c.mlp_dim, c.patch_size,
                        inferred.hidden_size, inferred.num_layers, inferred.mlp_dim, inferred.patch_size
                    ),
                ));
            }
            if let Some(pc) = &preset {
                if (
                    pc.hidden_size,
                    pc.num_layers,
                    pc.num_heads,
                    pc.mlp_dim,
                    pc.patch_size,
                ) != (
                    c.hidden_size,
                    c.num_layers,
                    c.num_heads,
                    c.mlp_dim,
                    c.patch_size,
                ) {
                    let arch = |c: &ViTConfig| {
                        format!(
                            "hidden {}, layers {}, heads {}, MLP {}, patch {}",
                            c.hidden_size, c.num_layers, c.num_heads, c.mlp_dim, c.patch_size
                        )
                    };
                    return Err(VitError::Config(format!(
                        "the model `{}` ({}) does not match {} ({}); its config.json decides the \
                         architecture, so leave the model unset or name the matching one",
                        opts.preset.as_deref().unwrap_or_default(),
                        arch(pc),
                        p.display(),
                        arch(&c)
                    )));
                }
            }
            // The weights' grid is authoritative for the checkpoint image size.
            c.image_size = inferred.image_size;
            c.num_classes = inferred.num_classes;
            if !ours && opts.layer_norm_eps.is_none() && c.layer_norm_eps != 1e-6 {
                notes.push(format!(
                    "layer_norm_eps {:e} from config.json (the recipe and the original weights use 1e-6; override it to match)",
                    c.layer_norm_eps
                ));
            }
            let names: Option<Vec<String>> =
                v.get("id2label").and_then(|m| m.as_object()).and_then(|m| {
                    let mut names = Vec::with_capacity(m.len());
                    for i in 0..m.len() {
                        names.push(m.get(&i.to_string())?.as_str()?.to_string());
                    }
                    let generic = names
                        .iter()
                        .enumerate()
                        .all(|(i, n)| *n == format!("LABEL_{i}"));
                    (!generic && !names.is_empty()).then_some(names)
                });
            (c, names)
        }
        _ => {
            if let (Some(a), Some(b)) = (num_heads, opts.num_heads) {
                if a != b {
                    return Err(VitError::Config(format!(
                        "{src}: the weights have {a} heads, {b} were requested"
                    )));
                }
            }
            let heads = num_heads.or(opts.num_heads);
            let given = preset.as_ref().or(fallback.as_ref());
            (infer_config(&src, &tensors, heads, given)?, None)
        }
    };
    let layout = match detected {
        _ if ours => WeightsLayout::Rdrop,
        Detected::HfClassifier => WeightsLayout::HfClassifier,
        Detected::HfBase => WeightsLayout::HfBase,
        Detected::Timm => WeightsLayout::Timm,
        Detected::GoogleNpz => WeightsLayout::GoogleNpz,
    };

    // Overrides.
    let ckpt_classes = cfg.num_classes;
    let ckpt_grid = cfg.grid_size();
    cfg.num_classes = match opts.num_classes {
        Some(n) => n,
        None if ckpt_classes > 0 && !opts.reset_head => ckpt_classes,
        None => {
            return Err(VitError::Config(format!(
                "{src} has no classifier head (or it is being reset): the number of classes must be given"
            )))
        }
    };
    if let Some(s) = opts.image_size {
        cfg.image_size = s;
    }
    if let Some(e) = opts.layer_norm_eps {
        cfg.layer_norm_eps = e;
    }
    if let Some(p) = opts.dropout {
        cfg.dropout = p;
    }
    if let Some(p) = opts.attention_dropout {
        cfg.attention_dropout = p;
    }
    if let Some(p) = opts.attention_output_dropout {
        cfg.attention_output_dropout = p;
    }
    cfg.validate()?;

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &opts.device);
    let model = VisionTransformer::new_zeroed(&cfg, vb, DropoutRng::new(opts.seed))?;

    let mut loaded = Vec::new();
    let mut missing = Vec::new();
    let mut head = HeadStatus::Loaded;
    let mut pos_embed_resized = None;
    for (name, var) in model.named_vars() {
        let Some(t) = tensors.get(&name) else {
            if name.starts_with("classifier.") {
                head = HeadStatus::New(if opts.reset_head {
                    "--reset-head".into()
                } else {
                    "the weights have no classifier".into()
                });
            } else {
                missing.push(name);
            }
            continue;
        };
        let mut t = t.clone();
        if name.starts_with("classifier.") {
            if opts.reset_head {
                head = HeadStatus::New("reset on request".into());
                continue;
            }
            if ckpt_classes != cfg.num_classes {
                head = HeadStatus::New(format!(
                    "the checkpoint head has {ckpt_classes} classes, the task {}",
                    cfg.num_classes
                ));
                continue;
            }
        }
        if name == "vit.embeddings.position_embeddings"
            && cfg.grid_size() != ckpt_grid
            && t.dims().len() == 3
        {
            t = posembed::resize_pos_embed(&t, cfg.grid_size())?;
            pos_embed_resized = Some((ckpt_grid, cfg.grid_size()));
        }
        if t.dims() != var.dims() {
            return Err(VitError::Shape {
                source_name: src.clone(),
                name,
                found: t.dims().to_vec(),
                expected: var.dims().to_vec(),
            });
        }
        var.set(&t.to_device(&opts.device)?)?;
        loaded.push(name);
    }
    if !missing.is_empty() {
        return Err(VitError::Missing {
            source_name: src,
            names: missing,
        });
    }
    let mut skipped = skipped;
    for name in tensors.keys() {
        if model.var(name).is_none() {
            if name.starts_with("vit.encoder.layer.") {
                return Err(VitError::Config(format!(
                    "{src}: tensor `{name}` has no place in a {}-layer model",
                    cfg.num_layers
                )));
            }
            skipped.push((name.clone(), "not part of the model".into()));
        }
    }
    let report = LoadReport {
        path: res.weights.clone(),
        layout,
        loaded,
        skipped,
        head,
        pos_embed_resized,
        notes,
    };
    let class_names = class_names.filter(|n| n.len() == cfg.num_classes);
    Ok(Loaded {
        model,
        varmap,
        config: cfg,
        report,
        class_names,
    })
}
