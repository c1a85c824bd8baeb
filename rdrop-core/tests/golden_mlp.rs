//! Five updates of a small MLP against PyTorch (`scripts/gen_core_fixtures.py`): SGD momentum
//! with clipping and 2-step accumulation (reference loss), Nesterov SGD with weight decay and
//! label smoothing (mean loss), and AdamW; parameters within 1e-6 after every update.

mod common;

use candle_core::{DType, Device, Tensor};
use rdrop_core::{
    DecayKind, LossConfig, LossMode, OptimConfig, OptimizerKind, Precision, ScheduleConfig,
    TrainConfig, Trainer, TwoPass, WeightDecayScope,
};
use serde_json::Value;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn config(s: &Value, accum: usize, mb: usize) -> TrainConfig {
    let f = |k: &str| s[k].as_f64().unwrap();
    let kind = if s["opt"] == "sgd" {
        OptimizerKind::Sgd
    } else {
        OptimizerKind::AdamW
    };
    let mut optim = OptimConfig {
        kind,
        lr: f("lr"),
        weight_decay: f("wd"),
        weight_decay_scope: if s["wd_rank2"].as_bool().unwrap() {
            WeightDecayScope::RankAtLeast2
        } else {
            WeightDecayScope::All
        },
        ..Default::default()
    };
    if kind == OptimizerKind::Sgd {
        optim.momentum = f("momentum");
        optim.nesterov = s["nesterov"].as_bool().unwrap();
    } else {
        optim.beta1 = s["betas"][0].as_f64().unwrap();
        optim.beta2 = s["betas"][1].as_f64().unwrap();
        optim.eps = f("eps");
    }
    TrainConfig {
        loss: LossConfig {
            alpha: f("alpha"),
            mode: if s["mode"] == "mean" {
                LossMode::Mean
            } else {
                LossMode::Reference
            },
            label_smoothing: f("ls"),
        },
        optim,
        schedule: ScheduleConfig {
            decay: if s["sched"] == "cosine" {
                DecayKind::Cosine
            } else {
                DecayKind::Linear
            },
            warmup_steps: s["warmup"].as_u64().unwrap(),
            total_steps: s["total"].as_u64().unwrap(),
            cycles: 0.5,
        },
        clip_norm: s["clip"].as_f64(),
        accum_steps: accum,
        micro_batch: mb,
        two_pass: TwoPass::Concat,
        precision: Precision::F32,
        ..Default::default()
    }
}

#[test]
fn five_updates_match_pytorch() {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mlp_scenarios.json")).unwrap())
            .unwrap();
    let t = candle_core::safetensors::load(fixture("mlp.safetensors"), &Device::Cpu).unwrap();
    let accum = meta["accum"].as_u64().unwrap() as usize;
    let mb = meta["micro_batch"].as_u64().unwrap() as usize;
    let updates = meta["updates"].as_u64().unwrap() as usize;
    let x = &t["x"];
    let y = t["y"].to_dtype(DType::U32).unwrap();
    let masks = &t["masks"];
    let scenarios = meta["scenarios"].as_object().unwrap();
    assert_eq!(scenarios.len(), 3);
    for (name, s) in scenarios {
        let cfg = config(s, accum, mb);
        let model = common::Mlp::from_tensors(
            &t["init.w1"],
            &t["init.b1"],
            &t["init.w2"],
            &t["init.b2"],
            0.0,
            0,
        )
        .unwrap();
        model.push_masks((0..updates * accum).map(|i| masks.get(i).unwrap()));
        let mut trainer = Trainer::new(cfg, rdrop_core::RDropModel::named_vars(&model)).unwrap();
        let series = |k: &str| t[&format!("{name}.{k}")].to_vec1::<f64>().unwrap();
        let (loss, ce, kl, norm, lr) = (
            series("loss"),
            series("ce"),
            series("kl"),
            series("grad_norm"),
            series("lr"),
        );
        for u in 0..updates {
            let mbs: Vec<(Tensor, Tensor)> = (0..accum)
                .map(|a| (x.get(u * accum + a).unwrap(), y.get(u * accum + a).unwrap()))
                .collect();
            let st = trainer.update(&model, &mbs).unwrap();
            assert_eq!(st.step, u as u64 + 1);
            assert!(
                (st.lr - lr[u]).abs() < 1e-12,
                "{name} update {}: lr {} vs {}",
                u + 1,
                st.lr,
                lr[u]
            );
            for (what, got, want) in [
                ("loss", st.loss, loss[u]),
                ("ce", st.ce, ce[u]),
                ("kl", st.kl, kl[u]),
                ("grad_norm", st.grad_norm, norm[u]),
            ] {
                assert!(
                    (got - want).abs() < 2e-6 * want.abs().max(1.0),
                    "{name} update {} {what}: {got} vs torch {want}",
                    u + 1
                );
            }
            let mut worst = 0f32;
            for (pname, v) in rdrop_core::RDropModel::named_vars(&model) {
                let want = t[&format!("{name}.step{}.{pname}", u + 1)]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let got = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (a, b) in got.iter().zip(&want) {
                    worst = worst.max((a - b).abs());
                }
            }
            eprintln!("{name} update {}: max |θ − θ_torch| = {worst:e}", u + 1);
            assert!(
                worst < 1e-6,
                "{name} update {}: max |θ − θ_torch| = {worst}",
                u + 1
            );
        }
        // the masks were all consumed: one forward of [x; x] per micro-batch
        assert!(model.masks.lock().unwrap().is_empty());
    }
}

/// The MLP behind the flat-buffer interface of an explicit engine: parameters live in one
/// flat buffer, the R-Drop loss and its logit gradients come from `rdrop_kernels::loss`, the
/// MLP's own backward is the vector–Jacobian product `Σ dlogits ⊙ logits` through candle, and
/// the update (accumulation, clipping, schedule, SGD/AdamW) is `FlatTrainer`'s.
struct FlatMlp {
    mlp: common::Mlp,
    layout: rdrop_core::FlatLayout,
    params: Vec<f32>,
    grads: Vec<f32>,
}

impl FlatMlp {
    fn new(mlp: common::Mlp) -> Self {
        let mut layout = rdrop_core::FlatLayout::new();
        let mut params = Vec::new();
        for (name, v) in rdrop_core::RDropModel::named_vars(&mlp) {
            layout.push(name, v.dims());
            params.extend(
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
        let grads = vec![0.0; params.len()];
        Self {
            mlp,
            layout,
            params,
            grads,
        }
    }
}

impl rdrop_core::FlatRDropModel for FlatMlp {
    fn layout(&self) -> &rdrop_core::FlatLayout {
        &self.layout
    }

    fn params_and_grads(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.params, &mut self.grads)
    }

    fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }

    fn accumulate(
        &mut self,
        mb: &rdrop_core::MicroStep<'_>,
    ) -> rdrop_core::Result<rdrop_core::MicroLoss> {
        use rdrop_core::RDropModel;
        let (x, y, weight) = (mb.x, mb.y, mb.weight);
        let vars = self.mlp.named_vars();
        for ((_, var), v) in vars.iter().zip(self.layout.views()) {
            let t = Tensor::from_slice(&self.params[v.range()], v.shape.as_slice(), &Device::Cpu)?;
            var.set(&t)?;
        }
        let m = x.dim(0)?;
        let logits = self.mlp.forward_t(&Tensor::cat(&[x, x], 0)?, true)?;
        let c = logits.dim(1)?;
        let l = logits.flatten_all()?.to_vec1::<f32>()?;
        let labels = y.to_vec1::<u32>()?;
        let mut dl = vec![0f32; l.len()];
        let (dp, dq) = dl.split_at_mut(m * c);
        let v = rdrop_kernels::loss::rdrop_loss(
            dp,
            dq,
            &l[..m * c],
            &l[m * c..],
            &labels,
            c,
            mb.loss,
            weight as f32,
        )
        .unwrap();
        let dlogits = Tensor::from_vec(dl, (2 * m, c), &Device::Cpu)?;
        let g = (logits * dlogits)?.sum_all()?.backward()?;
        for ((_, var), view) in vars.iter().zip(self.layout.views()) {
            let gv = g
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (a, b) in self.grads[view.range()].iter_mut().zip(gv) {
                *a += b;
            }
        }
        Ok(rdrop_core::MicroLoss {
            loss: v.loss,
            ce: v.ce,
            kl: v.kl,
            forward_s: 0.0,
            backward_s: 0.0,
        })
    }

    fn rng_state(&self) -> rdrop_core::RngState {
        rdrop_core::RDropModel::rng_state(&self.mlp)
    }
}

#[test]
fn five_updates_match_pytorch_through_flat_buffers() {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mlp_scenarios.json")).unwrap())
            .unwrap();
    let t = candle_core::safetensors::load(fixture("mlp.safetensors"), &Device::Cpu).unwrap();
    let accum = meta["accum"].as_u64().unwrap() as usize;
    let mb = meta["micro_batch"].as_u64().unwrap() as usize;
    let updates = meta["updates"].as_u64().unwrap() as usize;
    let x = &t["x"];
    let y = t["y"].to_dtype(DType::U32).unwrap();
    let masks = &t["masks"];
    for (name, s) in meta["scenarios"].as_object().unwrap() {
        let cfg = config(s, accum, mb);
        let mlp = common::Mlp::from_tensors(
            &t["init.w1"],
            &t["init.b1"],
            &t["init.w2"],
            &t["init.b2"],
            0.0,
            0,
        )
        .unwrap();
        mlp.push_masks((0..updates * accum).map(|i| masks.get(i).unwrap()));
        let mut model = FlatMlp::new(mlp);
        let mut trainer = rdrop_core::FlatTrainer::new(cfg, &model).unwrap();
        let series = |k: &str| t[&format!("{name}.{k}")].to_vec1::<f64>().unwrap();
        let (loss, norm) = (series("loss"), series("grad_norm"));
        for u in 0..updates {
            let mbs: Vec<(Tensor, Tensor)> = (0..accum)
                .map(|a| (x.get(u * accum + a).unwrap(), y.get(u * accum + a).unwrap()))
                .collect();
            let st = trainer.update(&mut model, &mbs).unwrap();
            for (what, got, want) in [
                ("loss", st.loss, loss[u]),
                ("grad_norm", st.grad_norm, norm[u]),
            ] {
                assert!(
                    (got - want).abs() < 2e-6 * want.abs().max(1.0),
                    "{name} update {} {what}: {got} vs torch {want}",
                    u + 1
                );
            }
            let mut worst = 0f32;
            for v in model.layout.views() {
                let want = t[&format!("{name}.step{}.{}", u + 1, v.name)]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (a, b) in model.params[v.range()].iter().zip(&want) {
                    worst = worst.max((a - b).abs());
                }
            }
            eprintln!(
                "{name} (flat) update {}: max |θ − θ_torch| = {worst:e}",
                u + 1
            );
            assert!(worst < 1e-6, "{name} (flat) update {}: {worst}", u + 1);
        }
        // The state exports in the autograd optimiser's format and loads back.
        let st = trainer.state(&model, 0, 0).unwrap();
        let back = rdrop_core::FlatTrainer::restore(cfg, &mut model, &st).unwrap();
        assert_eq!(back.step(), updates as u64);
        let mut opt =
            rdrop_core::Optimizer::new(cfg.optim, rdrop_core::RDropModel::named_vars(&model.mlp))
                .unwrap();
        opt.load_state(&st.optimizer).unwrap();
    }
}
