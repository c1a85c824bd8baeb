//! Behaviour of the composed update: two-pass equivalence, accumulation invariance (both with
//! dropout, whose masks are keyed by sample and pass), the f16 loss scaler (skip + backoff +
//! growth), the typed non-finite error, the bit-exact resume and the refusal of format-1 state.

mod common;

use candle_core::{DType, Tensor};
use rdrop_core::{
    load_vars, save_vars, two_pass_logits, CoreError, LossConfig, OptimConfig, OptimizerKind,
    Precision, RDropModel, ScalerConfig, ScheduleConfig, StepStats, TrainConfig, TrainState,
    Trainer, TwoPass,
};

fn small_cfg(accum: usize) -> TrainConfig {
    TrainConfig {
        loss: LossConfig {
            alpha: 0.5,
            ..Default::default()
        },
        optim: OptimConfig {
            lr: 0.1,
            ..Default::default()
        },
        schedule: ScheduleConfig {
            warmup_steps: 2,
            total_steps: 20,
            ..Default::default()
        },
        clip_norm: Some(1.0),
        accum_steps: accum,
        micro_batch: 4,
        ..Default::default()
    }
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The masks depend on (sample, pass) only, so the concatenated `[x; x]` forward and two
/// sequential forwards compute the same logits: bit for bit on this CPU model (every row's
/// products and sums are computed in the same order whatever the batch size).
#[test]
fn concat_and_sequential_logits_are_identical_with_dropout() {
    let data = common::batches(1, 4, 5, 3, 1);
    let model = common::Mlp::random(5, 8, 3, 0.5, 9).unwrap();
    let (pc, qc) = two_pass_logits(&model, &data[0].0, TwoPass::Concat, 3, 8).unwrap();
    let (ps, qs) = two_pass_logits(&model, &data[0].0, TwoPass::Sequential, 3, 8).unwrap();
    assert_eq!(to_vec(&pc), to_vec(&ps));
    assert_eq!(to_vec(&qc), to_vec(&qs));
    assert_ne!(
        to_vec(&pc),
        to_vec(&qc),
        "the two passes must see different masks"
    );
    // another update or offset gives other masks
    let (p2, _) = two_pass_logits(&model, &data[0].0, TwoPass::Concat, 4, 8).unwrap();
    let (p3, _) = two_pass_logits(&model, &data[0].0, TwoPass::Concat, 3, 12).unwrap();
    assert_ne!(to_vec(&pc), to_vec(&p2));
    assert_ne!(to_vec(&pc), to_vec(&p3));
}

#[test]
fn concat_and_sequential_agree_with_and_without_dropout() {
    for p in [0.0, 0.3] {
        concat_and_sequential_agree(p);
    }
}

/// Whole updates: the losses agree exactly or to float-sum noise (the gradient of a `2m`-row
/// GEMM is one sum, the sequential one two), the parameters to 1e-6.
fn concat_and_sequential_agree(dropout: f64) {
    let data = common::batches(6, 4, 5, 3, 1);
    let mut params = vec![];
    for mode in [TwoPass::Concat, TwoPass::Sequential] {
        let model = common::Mlp::random(5, 8, 3, dropout, 9).unwrap();
        let cfg = TrainConfig {
            two_pass: mode,
            ..small_cfg(2)
        };
        let mut tr = Trainer::new(cfg, model.named_vars()).unwrap();
        let mut losses = vec![];
        for u in 0..3 {
            losses.push(tr.update(&model, &data[2 * u..2 * u + 2]).unwrap().loss);
        }
        params.push((model.params(), losses));
    }
    let d = max_diff(&params[0].0, &params[1].0);
    assert!(
        d < 1e-6,
        "p {dropout}: concat vs sequential parameters differ by {d}"
    );
    for (a, b) in params[0].1.iter().zip(&params[1].1) {
        assert!((a - b).abs() < 1e-6, "p {dropout}: {a} vs {b}");
    }
    // the first update's loss is computed before any parameter differs: identical
    assert_eq!(params[0].1[0], params[1].1[0], "p {dropout}");
    // and training actually moved the parameters
    let init = common::Mlp::random(5, 8, 3, 0.0, 9).unwrap().params();
    assert!(max_diff(&init, &params[0].0) > 1e-3);
}

#[test]
fn mean_mode_is_independent_of_micro_batching() {
    // With dropout too: a sample's masks are keyed by its index in the update, not in its
    // micro-batch.
    for p in [0.0, 0.3] {
        micro_batching_case(p);
    }
}

fn micro_batching_case(dropout: f64) {
    let data = common::batches(2, 4, 5, 3, 2);
    let joined = (
        Tensor::cat(&[&data[0].0, &data[1].0], 0).unwrap(),
        Tensor::cat(&[&data[0].1, &data[1].1], 0).unwrap(),
    );
    let run = |mbs: &[(Tensor, Tensor)]| -> (Vec<Vec<f32>>, StepStats) {
        let model = common::Mlp::random(5, 8, 3, dropout, 4).unwrap();
        let mut tr = Trainer::new(small_cfg(mbs.len()), model.named_vars()).unwrap();
        let st = tr.update(&model, mbs).unwrap();
        (model.params(), st)
    };
    let (pa, sa) = run(&data);
    let (pb, sb) = run(std::slice::from_ref(&joined));
    assert!(max_diff(&pa, &pb) < 1e-6, "p {dropout}");
    assert!(
        (sa.loss - sb.loss).abs() < 1e-6 && (sa.grad_norm - sb.grad_norm).abs() < 1e-6,
        "p {dropout}: {sa:?} vs {sb:?}"
    );
    assert_eq!(
        (sa.micro_batches, sa.samples, sb.micro_batches, sb.samples),
        (2, 8, 1, 8)
    );
}

#[test]
fn f16_overflow_skips_halves_and_grows_back() {
    let data = common::batches(4, 4, 5, 3, 3);
    let model = common::Mlp::random(5, 8, 3, 0.1, 5).unwrap();
    let cfg = TrainConfig {
        precision: Precision::F16,
        scaler: ScalerConfig {
            init_scale: 1024.0,
            growth_interval: 2,
            ..Default::default()
        },
        ..small_cfg(1)
    };
    let mut tr = Trainer::new(cfg, model.named_vars()).unwrap();
    assert_eq!(tr.loss_scale(), 1024.0);
    let before = model.params();
    // an inf in the input makes the f16 gradients inf/NaN
    let bad_x = data[0]
        .0
        .broadcast_mul(
            &Tensor::new(
                &[f32::INFINITY, 1.0, 1.0, 1.0, 1.0],
                &candle_core::Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
    let st = tr.update(&model, &[(bad_x, data[0].1.clone())]).unwrap();
    assert!(
        st.skipped && st.skipped_total == 1 && st.step == 1,
        "{st:?}"
    );
    assert_eq!(st.loss_scale, 1024.0);
    assert_eq!(tr.loss_scale(), 512.0);
    assert_eq!(
        model.params(),
        before,
        "a skipped update must not touch the weights"
    );
    // two clean updates: weights move, the scale doubles after the second
    let st = tr.update(&model, &data[1..2]).unwrap();
    assert!(
        !st.skipped && st.loss.is_finite() && st.loss_scale == 512.0,
        "{st:?}"
    );
    assert_ne!(model.params(), before);
    assert_eq!(tr.loss_scale(), 512.0);
    tr.update(&model, &data[2..3]).unwrap();
    assert_eq!(tr.loss_scale(), 1024.0);
    assert_eq!(tr.step(), 3);
    // The reference's 2^20 overflows f16 on this model (logit gradients 2^20/4 > 65504): the
    // first update is skipped and the scale backs off.
    let m16 = common::Mlp::random(5, 8, 3, 0.0, 6).unwrap();
    let mut t16 = Trainer::new(
        TrainConfig {
            precision: Precision::F16,
            ..small_cfg(1)
        },
        m16.named_vars(),
    )
    .unwrap();
    let st = t16.update(&m16, &data[3..4]).unwrap();
    assert!(
        st.skipped
            && st.loss_scale == (1u64 << 20) as f64
            && t16.loss_scale() == (1u64 << 19) as f64,
        "{st:?}"
    );
    // With a scale that fits, the f16 update is close to the f32 one.
    let m32 = common::Mlp::random(5, 8, 3, 0.0, 6).unwrap();
    let m16 = common::Mlp::random(5, 8, 3, 0.0, 6).unwrap();
    let mut t32 = Trainer::new(small_cfg(1), m32.named_vars()).unwrap();
    let cfg16 = TrainConfig {
        precision: Precision::F16,
        scaler: ScalerConfig {
            init_scale: 256.0,
            ..Default::default()
        },
        ..small_cfg(1)
    };
    let mut t16 = Trainer::new(cfg16, m16.named_vars()).unwrap();
    let a = t32.update(&m32, &data[3..4]).unwrap();
    let b = t16.update(&m16, &data[3..4]).unwrap();
    assert!(!b.skipped);
    assert!(
        (a.grad_norm - b.grad_norm).abs() < 1e-2 * a.grad_norm,
        "{} vs {}",
        a.grad_norm,
        b.grad_norm
    );
    assert!((a.loss - b.loss).abs() < 1e-2, "{} vs {}", a.loss, b.loss);
    let d = max_diff(&m32.params(), &m16.params());
    assert!(d < 1e-3, "f16 vs f32 update differs by {d}");
}

#[test]
fn non_finite_loss_in_f32_is_a_typed_error_naming_the_step() {
    let data = common::batches(2, 4, 5, 3, 3);
    let model = common::Mlp::random(5, 8, 3, 0.0, 5).unwrap();
    let mut tr = Trainer::new(small_cfg(1), model.named_vars()).unwrap();
    tr.update(&model, &data[0..1]).unwrap();
    let before = model.params();
    let nan_x = (&data[1].0 * f64::NAN).unwrap();
    match tr.update(&model, &[(nan_x, data[1].1.clone())]) {
        Err(CoreError::NonFinite {
            step: 2,
            what: "loss",
            ..
        }) => {}
        other => panic!("expected NonFinite at step 2, got {other:?}"),
    }
    assert_eq!(model.params(), before);
    assert_eq!(tr.step(), 1);
    // wrong number of micro-batches is a configuration error
    assert!(matches!(
        tr.update(&model, &data),
        Err(CoreError::Config(_))
    ));
}

fn resume_case(optim: OptimConfig, precision: Precision) {
    let data = common::batches(12, 4, 5, 3, 11);
    let cfg = TrainConfig {
        optim,
        precision,
        // small enough for f16 on this model; grows after updates 2 and 4 (64 → 128 → 256)
        scaler: ScalerConfig {
            init_scale: 64.0,
            growth_interval: 2,
            ..Default::default()
        },
        ..small_cfg(2)
    };
    // uninterrupted: 6 updates
    let full = common::Mlp::random(5, 8, 3, 0.3, 21).unwrap();
    let mut tr = Trainer::new(cfg, full.named_vars()).unwrap();
    let mut full_stats = vec![];
    for u in 0..6 {
        full_stats.push(tr.update(&full, &data[2 * u..2 * u + 2]).unwrap());
    }
    // 3 updates, checkpoint, fresh process-like restore, 3 more
    let dir = tempfile::tempdir().unwrap();
    {
        let a = common::Mlp::random(5, 8, 3, 0.3, 21).unwrap();
        let mut ta = Trainer::new(cfg, a.named_vars()).unwrap();
        for u in 0..3 {
            ta.update(&a, &data[2 * u..2 * u + 2]).unwrap();
        }
        let mut st = ta.state(&a, 0, 6);
        st.extra = serde_json::json!({"best_acc": 0.5});
        st.save(dir.path()).unwrap();
        save_vars(&dir.path().join("model.safetensors"), &a.named_vars()).unwrap();
    }
    let b = common::Mlp::random(5, 8, 3, 0.3, 999).unwrap(); // different init and seed
    load_vars(&dir.path().join("model.safetensors"), &b.named_vars()).unwrap();
    let st = TrainState::load(dir.path()).unwrap();
    assert_eq!((st.step, st.epoch, st.batch_index), (3, 0, 6));
    assert_eq!(st.extra["best_acc"], 0.5);
    let mut tb = Trainer::restore(cfg, &b, &st).unwrap();
    assert_eq!(tb.step(), 3);
    for u in 3..6 {
        let s = tb.update(&b, &data[2 * u..2 * u + 2]).unwrap();
        let f = &full_stats[u];
        assert_eq!(
            (s.step, s.lr, s.loss, s.grad_norm, s.loss_scale),
            (f.step, f.lr, f.loss, f.grad_norm, f.loss_scale)
        );
    }
    assert!(full_stats.iter().all(|s| !s.skipped));
    if precision == Precision::F16 {
        assert_eq!(full_stats[5].loss_scale, 256.0);
    }
    let init = common::Mlp::random(5, 8, 3, 0.3, 21).unwrap().params();
    assert!(max_diff(&init, &full.params()) > 1e-3);
    assert_eq!(
        b.params(),
        full.params(),
        "resumed weights are not bit-identical ({optim:?}, {precision:?})"
    );
    assert_eq!(b.rng_state(), full.rng_state());
    assert_eq!(
        tb.state(&b, 0, 0).optimizer.param_steps,
        tr.state(&full, 0, 0).optimizer.param_steps
    );
    // the optimiser tensors too
    let (sa, sb) = (
        tr.state(&full, 0, 0).optimizer.tensors,
        tb.state(&b, 0, 0).optimizer.tensors,
    );
    assert_eq!(sa.len(), sb.len());
    assert!(!sa.is_empty());
    for (k, v) in &sa {
        let w = &sb[k];
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }
}

#[test]
fn resume_is_bit_identical_sgd() {
    resume_case(
        OptimConfig {
            lr: 0.1,
            nesterov: true,
            weight_decay: 1e-3,
            ..Default::default()
        },
        Precision::F32,
    );
}

#[test]
fn resume_is_bit_identical_adamw_f16_scaler() {
    resume_case(
        OptimConfig {
            kind: OptimizerKind::AdamW,
            lr: 1e-2,
            weight_decay: 0.01,
            ..Default::default()
        },
        Precision::F16,
    );
}

#[test]
fn load_rejects_a_mismatched_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        TrainState::load(dir.path()),
        Err(CoreError::Io { .. })
    ));
    let m = common::Mlp::random(5, 8, 3, 0.0, 1).unwrap();
    let mut tr = Trainer::new(small_cfg(1), m.named_vars()).unwrap();
    tr.update(&m, &common::batches(1, 4, 5, 3, 1)).unwrap();
    tr.state(&m, 0, 1).save(dir.path()).unwrap();
    let st = TrainState::load(dir.path()).unwrap();
    // a model with different shapes cannot take this optimiser state
    let other = common::Mlp::random(5, 9, 3, 0.0, 1).unwrap();
    assert!(Trainer::restore(small_cfg(1), &other, &st).is_err());
    // nor can AdamW take SGD's
    let adam = TrainConfig {
        optim: OptimConfig {
            kind: OptimizerKind::AdamW,
            ..Default::default()
        },
        ..small_cfg(1)
    };
    assert!(Trainer::restore(adam, &m, &st).is_err());
    let _ = DType::F32;
}

/// A train state of format 1 (older rdrop: ChaCha8 masks by call counter) or of another mask
/// generator cannot be continued bit-exactly: a typed error naming the file and the reason.
#[test]
fn load_refuses_format_1_and_other_generators() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::Mlp::random(5, 8, 3, 0.1, 1).unwrap();
    let mut tr = Trainer::new(small_cfg(1), m.named_vars()).unwrap();
    tr.update(&m, &common::batches(1, 4, 5, 3, 1)).unwrap();
    tr.state(&m, 0, 1).save(dir.path()).unwrap();
    let path = dir.path().join(rdrop_core::state::STATE_FILE);
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(good["format"], 2);
    assert_eq!(good["rng"]["generator"], rdrop_core::rng::GENERATOR);

    // format 1 as the previous version wrote it
    let mut old = good.clone();
    old["format"] = 1.into();
    old["rng"] = serde_json::json!({"seed": 1, "calls": 14});
    std::fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();
    match TrainState::load(dir.path()) {
        Err(e @ CoreError::Checkpoint { .. }) => {
            let msg = e.to_string();
            for want in [
                path.display().to_string().as_str(),
                "format 1",
                "ChaCha8",
                "bit-exactly",
                "--weights",
            ] {
                assert!(msg.contains(want), "{want:?} missing in: {msg}");
            }
        }
        other => panic!("expected a Checkpoint error, got {other:?}"),
    }

    // format 2 with another generator
    let mut other = good.clone();
    other["rng"]["generator"] = "chacha8".into();
    std::fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
    match TrainState::load(dir.path()) {
        Err(e @ CoreError::Checkpoint { .. }) => {
            assert!(e.to_string().contains("chacha8"), "{e}")
        }
        other => panic!("expected a Checkpoint error, got {other:?}"),
    }
    // and a model refuses such a state directly
    let st = TrainState {
        rng: rdrop_core::RngState {
            seed: 1,
            generator: "chacha8".into(),
        },
        ..tr.state(&m, 0, 1)
    };
    assert!(Trainer::restore(small_cfg(1), &m, &st).is_err());

    // the untouched file loads
    std::fs::write(&path, serde_json::to_vec(&good).unwrap()).unwrap();
    assert_eq!(TrainState::load(dir.path()).unwrap().rng, m.rng_state());
}

#[test]
fn streaming_accumulate_equals_update() {
    let data = common::batches(3, 4, 5, 3, 8);
    let a = common::Mlp::random(5, 8, 3, 0.2, 3).unwrap();
    let b = common::Mlp::random(5, 8, 3, 0.2, 3).unwrap();
    let mut ta = Trainer::new(small_cfg(3), a.named_vars()).unwrap();
    let mut tb = Trainer::new(small_cfg(3), b.named_vars()).unwrap();
    let sa = ta.update(&a, &data).unwrap();
    for (x, y) in &data {
        tb.accumulate(&b, x, y, 1.0 / 3.0).unwrap();
    }
    let sb = tb.finish_update().unwrap();
    assert_eq!(
        (sa.loss, sa.grad_norm, sa.step),
        (sb.loss, sb.grad_norm, sb.step)
    );
    assert_eq!(a.params(), b.params());
    assert!(tb.finish_update().is_err(), "nothing pending");
}
