//! Optimisers with exportable state: SGD with momentum (PyTorch semantics) and AdamW.
//!
//! candle's `SGD` has no momentum and its `AdamW` keeps its moments private; these keep their
//! state as named tensors so a checkpoint can restore it bit-exactly
//! (R-Drop recipe, <https://arxiv.org/abs/2106.14448>: SGD, momentum 0.9, weight decay 0).
//!
//! **SGD** (`torch.optim.SGD`, dampening 0), for gradient `g` of parameter `θ`, rate `lr`:
//! ```text
//! d = g + wd · θ
//! b = d                      (first step)        b = μ · b + d   (later steps)
//! d = d + μ · b  (nesterov)  or  d = b
//! θ = θ − lr · d
//! ```
//! **AdamW** (`torch.optim.AdamW`), `t` = this parameter's step count:
//! ```text
//! θ = θ · (1 − lr · wd)
//! m = β1 · m + (1 − β1) · g          v = β2 · v + (1 − β2) · g²
//! θ = θ − lr / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε)
//! ```
//! A parameter without a gradient is skipped entirely (as PyTorch skips `grad is None`).
//! Updates run as tensor ops on the parameters' device.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Which algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with (optionally Nesterov) momentum.
    #[default]
    Sgd,
    /// AdamW (decoupled weight decay).
    #[cfg_attr(feature = "clap", value(name = "adamw"))]
    AdamW,
}

/// Which parameters weight decay applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightDecayScope {
    /// Every parameter (PyTorch's default).
    #[default]
    All,
    /// Only parameters of rank ≥ 2 (weight matrices and kernels; not biases, LayerNorm or
    /// embeddings of rank 1).
    RankAtLeast2,
}

/// Optimiser configuration. `Default` is the R-Drop ViT recipe: SGD, momentum 0.9,
/// no Nesterov, weight decay 0, lr 1e-2.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Algorithm.
    pub kind: OptimizerKind,
    /// Base learning rate (multiplied by the schedule's `lr_lambda(k)`).
    pub lr: f64,
    /// SGD momentum μ (0 = plain SGD).
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Weight decay (L2 added to the gradient for SGD; decoupled for AdamW).
    pub weight_decay: f64,
    /// Which parameters decay.
    pub weight_decay_scope: WeightDecayScope,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Sgd,
            lr: 1e-2,
            momentum: 0.9,
            nesterov: false,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            weight_decay_scope: WeightDecayScope::All,
        }
    }
}

impl OptimConfig {
    /// Checks the hyper-parameters.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(format!(
                "learning rate must be finite and ≥ 0, got {}",
                self.lr
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if self.nesterov && self.momentum <= 0.0 {
            return Err("Nesterov momentum requires momentum > 0".into());
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(format!(
                "AdamW betas must be in [0, 1), got ({}, {})",
                self.beta1, self.beta2
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("AdamW eps must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!(
                "weight decay must be finite and ≥ 0, got {}",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// SGD momentum buffer, or AdamW's first moment.
    m: Option<Tensor>,
    /// AdamW's second moment.
    v: Option<Tensor>,
    /// Updates applied to this parameter (AdamW bias correction).
    steps: u64,
}

/// The optimiser's state: per-parameter step counts (JSON) and named tensors (safetensors):
/// `momentum.<name>` (SGD), `exp_avg.<name>` / `exp_avg_sq.<name>` (AdamW).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OptimizerState {
    /// The algorithm the state belongs to.
    pub kind: OptimizerKind,
    /// Updates applied per parameter name.
    pub param_steps: BTreeMap<String, u64>,
    /// State tensors (stored separately as safetensors).
    #[serde(skip)]
    pub tensors: BTreeMap<String, Tensor>,
}

/// SGD-momentum / AdamW over a fixed list of named variables.
pub struct Optimizer {
    cfg: OptimConfig,
    params: Vec<Param>,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("cfg", &self.cfg)
            .field("params", &self.params.len())
            .finish()
    }
}

impl Optimizer {
    /// An optimiser for `vars` (name, variable), in that order.
    pub fn new(cfg: OptimConfig, vars: Vec<(String, Var)>) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = cfg.weight_decay > 0.0
                    && match cfg.weight_decay_scope {
                        WeightDecayScope::All => true,
                        WeightDecayScope::RankAtLeast2 => var.rank() >= 2,
                    };
                Param {
                    name,
                    var,
                    decay,
                    m: None,
                    v: None,
                    steps: 0,
                }
            })
            .collect();
        Ok(Self { cfg, params })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// The variables, in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of the i-th variable
    /// (`None`: skipped). Gradients must have the variables' shapes and dtypes.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "optimizer: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )
        }
        let cfg = self.cfg;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            if g.shape() != p.var.shape() {
                candle_core::bail!(
                    "optimizer: gradient of {} has shape {:?}, parameter {:?}",
                    p.name,
                    g.dims(),
                    p.var.dims()
                )
            }
            let theta = p.var.as_tensor().detach();
            let wd = if p.decay { cfg.weight_decay } else { 0.0 };
            p.steps += 1;
            match cfg.kind {
                OptimizerKind::Sgd => {
                    let d = if wd != 0.0 {
                        (g + theta.affine(wd, 0.0)?)?
                    } else {
                        g.clone()
                    };
                    let d = if cfg.momentum != 0.0 {
                        let buf = match &p.m {
                            None => d.clone(), // shares storage: tensors are never mutated in place
                            Some(b) => (b.affine(cfg.momentum, 0.0)? + &d)?,
                        };
                        let d = if cfg.nesterov {
                            (&d + buf.affine(cfg.momentum, 0.0)?)?
                        } else {
                            buf.clone()
                        };
                        p.m = Some(buf);
                        d
                    } else {
                        d
                    };
                    p.var.set(&(theta - d.affine(lr, 0.0)?)?)?;
                }
                OptimizerKind::AdamW => {
                    let theta = if wd != 0.0 {
                        theta.affine(1.0 - lr * wd, 0.0)?
                    } else {
                        theta
                    };
                    let m = match &p.m {
                        None => g.affine(1.0 - cfg.beta1, 0.0)?,
                        // torch's lerp_: m + (1 − β1)(g − m)
                        Some(m) => (m + (g - m)?.affine(1.0 - cfg.beta1, 0.0)?)?,
                    };
                    let g2 = g.sqr()?.affine(1.0 - cfg.beta2, 0.0)?;
                    let v = match &p.v {
                        None => g2,
                        Some(v) => (v.affine(cfg.beta2, 0.0)? + g2)?,
                    };
                    let t = p.steps as i32;
                    let bc1 = 1.0 - cfg.beta1.powi(t);
                    let bc2_sqrt = (1.0 - cfg.beta2.powi(t)).sqrt();
                    let step_size = lr / bc1;
                    let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, cfg.eps)?;
                    let upd = (&m / denom)?.affine(step_size, 0.0)?;
                    p.var.set(&(theta - upd)?)?;
                    p.m = Some(m);
                    p.v = Some(v);
                }
            }
        }
        Ok(())
    }

    /// Exports the state (tensors are shared, not copied: they are never modified in place).
    pub fn state(&self) -> OptimizerState {
        let mut s = OptimizerState {
            kind: self.cfg.kind,
            ..Default::default()
        };
        for p in &self.params {
            s.param_steps.insert(p.name.clone(), p.steps);
            let (mn, vn) = match self.cfg.kind {
                OptimizerKind::Sgd => ("momentum", "unused"),
                OptimizerKind::AdamW => ("exp_avg", "exp_avg_sq"),
            };
            if let Some(m) = &p.m {
                s.tensors.insert(format!("{mn}.{}", p.name), m.clone());
            }
            if let Some(v) = &p.v {
                s.tensors.insert(format!("{vn}.{}", p.name), v.clone());
            }
        }
        s
    }

    /// Restores a state exported by [`Optimizer::state`] for the same variables; tensors are
    /// moved to each parameter's device and checked for shape and dtype.
    pub fn load_state(&mut self, s: &OptimizerState) -> Result<()> {
        if s.kind != self.cfg.kind {
            candle_core::bail!(
                "optimizer state is for {:?}, the configuration says {:?}",
                s.kind,
                self.cfg.kind
            )
        }
        let (mn, vn) = match self.cfg.kind {
            OptimizerKind::Sgd => ("momentum", "unused"),
            OptimizerKind::AdamW => ("exp_avg", "exp_avg_sq"),
        };
        let known: std::collections::HashSet<String> = self
            .params
            .iter()
            .flat_map(|p| [format!("{mn}.{}", p.name), format!("{vn}.{}", p.name)])
            .collect();
        if let Some(extra) = s.tensors.keys().find(|k| !known.contains(*k)) {
            candle_core::bail!("optimizer state has a tensor for an unknown parameter: {extra}")
        }
        let fetch = |key: String, var: &Var| -> Result<Option<Tensor>> {
            match s.tensors.get(&key) {
                None => Ok(None),
                Some(t) => {
                    if t.shape() != var.shape() || t.dtype() != var.dtype() {
                        candle_core::bail!(
                            "optimizer state {key}: {:?} {:?}, parameter is {:?} {:?}",
                            t.dims(),
                            t.dtype(),
                            var.dims(),
                            var.dtype()
                        )
                    }
                    Ok(Some(t.to_device(var.device())?))
                }
            }
        };
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let steps = s.param_steps.get(&p.name).copied().unwrap_or(0);
            let m = fetch(format!("{mn}.{}", p.name), &p.var)?;
            let v = fetch(format!("{vn}.{}", p.name), &p.var)?;
            if steps > 0
                && (m.is_none()
                    && (self.cfg.kind == OptimizerKind::AdamW || self.cfg.momentum != 0.0))
            {
                candle_core::bail!(
                    "optimizer state lacks the moment of {} (stepped {steps} times)",
                    p.name
                )
            }
            restored.push((steps, m, v));
        }
        for (p, (steps, m, v)) in self.params.iter_mut().zip(restored) {
            p.steps = steps;
            p.m = m;
            p.v = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sgd_momentum_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f64, -2.0], &dev)?;
        let cfg = OptimConfig {
            lr: 0.1,
            momentum: 0.5,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = Optimizer::new(cfg, vec![("w".into(), w.clone())])?;
        let g = Tensor::new(&[1.0f64, 1.0], &dev)?;
        opt.step(&[Some(g.clone())], 0.1)?;
        // d = 1 + 0.1·θ = [1.1, 0.8]; b = d; θ = θ − 0.1·b
        let v = w.to_vec1::<f64>()?;
        assert!(
            (v[0] - 0.89).abs() < 1e-12 && (v[1] + 2.08).abs() < 1e-12,
            "{v:?}"
        );
        opt.step(&[Some(g)], 0.1)?;
        // d = 1 + 0.1·θ = [1.089, 0.792]; b = 0.5·[1.1, 0.8] + d = [1.639, 1.192]
        let v = w.to_vec1::<f64>()?;
        assert!(
            (v[0] - (0.89 - 0.1639)).abs() < 1e-12 && (v[1] - (-2.08 - 0.1192)).abs() < 1e-12,
            "{v:?}"
        );
        Ok(())
    }

    #[test]
    fn rank2_scope_skips_vectors_and_none_grads_skip() -> Result<()> {
        let dev = Device::Cpu;
        let m = Var::ones((2, 2), candle_core::DType::F32, &dev)?;
        let b = Var::ones(2, candle_core::DType::F32, &dev)?;
        let c = Var::ones(2, candle_core::DType::F32, &dev)?;
        let cfg = OptimConfig {
            momentum: 0.0,
            weight_decay: 1.0,
            weight_decay_scope: WeightDecayScope::RankAtLeast2,
            ..Default::default()
        };
        let mut opt = Optimizer::new(
            cfg,
            vec![
                ("m".into(), m.clone()),
                ("b".into(), b.clone()),
                ("c".into(), c.clone()),
            ],
        )?;
        let z2 = Tensor::zeros((2, 2), candle_core::DType::F32, &dev)?;
        let z1 = Tensor::zeros(2, candle_core::DType::F32, &dev)?;
        opt.step(&[Some(z2), Some(z1), None], 0.5)?;
        assert_eq!(m.flatten_all()?.to_vec1::<f32>()?, vec![0.5; 4]);
        assert_eq!(b.to_vec1::<f32>()?, vec![1.0; 2]);
        assert_eq!(c.to_vec1::<f32>()?, vec![1.0; 2]);
        assert_eq!(opt.state().param_steps["c"], 0);
        Ok(())
    }

    #[test]
    fn state_round_trip_and_mismatch() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, 2.0, 3.0], &dev)?;
        let cfg = OptimConfig {
            kind: OptimizerKind::AdamW,
            ..Default::default()
        };
        let mut opt = Optimizer::new(cfg, vec![("w".into(), w.clone())])?;
        opt.step(&[Some(Tensor::new(&[0.1f32, -0.2, 0.3], &dev)?)], 1e-2)?;
        let s = opt.state();
        assert_eq!(s.tensors.len(), 2);
        let w2 = Var::from_tensor(w.as_tensor())?;
        let mut opt2 = Optimizer::new(cfg, vec![("w".into(), w2.clone())])?;
        opt2.load_state(&s)?;
        let g = Tensor::new(&[0.3f32, 0.1, -0.2], &dev)?;
        opt.step(&[Some(g.clone())], 1e-2)?;
        opt2.step(&[Some(g)], 1e-2)?;
        assert_eq!(w.to_vec1::<f32>()?, w2.to_vec1::<f32>()?);
        let mut sgd = Optimizer::new(OptimConfig::default(), vec![("w".into(), w)])?;
        assert!(sgd.load_state(&s).is_err());
        Ok(())
    }
}
