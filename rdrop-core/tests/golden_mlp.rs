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
