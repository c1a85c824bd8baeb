//! Golden tests against PyTorch (fixtures from `scripts/gen_core_fixtures.py`): the R-Drop loss
//! in both conventions (value and gradients w.r.t. both logits) and `lr_lambda` at every step.

use candle_core::{DType, Device, Tensor, Var};
use rdrop_core::{lr_lambda, rdrop_loss, DecayKind, LossConfig, LossMode, ScheduleConfig};
use serde_json::Value;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(r, s)| {
            assert_eq!(r.len(), s.len());
            r.iter().zip(s).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f64::max)
}

fn check_loss(dtype: DType, tol: f64) {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("loss.json")).unwrap()).unwrap();
    let dev = Device::Cpu;
    let p0 = matrix(&doc["p"]);
    let q0 = matrix(&doc["q"]);
    let (m, c) = (p0.len(), p0[0].len());
    let flat = |x: &[Vec<f64>]| x.iter().flatten().copied().collect::<Vec<f64>>();
    let y: Vec<u32> = doc["y"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let y = Tensor::new(y.as_slice(), &dev).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let p = Var::from_tensor(
            &Tensor::from_vec(flat(&p0), (m, c), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let q = Var::from_tensor(
            &Tensor::from_vec(flat(&q0), (m, c), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let mode = match case["mode"].as_str().unwrap() {
            "mean" => LossMode::Mean,
            "reference" => LossMode::Reference,
            other => panic!("unknown mode {other}"),
        };
        let cfg = LossConfig {
            alpha: case["alpha"].as_f64().unwrap(),
            mode,
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
        };
        let parts = rdrop_loss(p.as_tensor(), q.as_tensor(), &y, &cfg).unwrap();
        let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        for (name, t) in [("loss", &parts.loss), ("ce", &parts.ce), ("kl", &parts.kl)] {
            let want = case[name].as_f64().unwrap();
            let got = scalar(t);
            assert!(
                (got - want).abs() < tol,
                "{cfg:?} {name}: {got} vs torch {want}"
            );
        }
        let grads = parts.loss.backward().unwrap();
        for (name, v) in [("grad_p", &p), ("grad_q", &q)] {
            let g = grads
                .get(v.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            let d = max_abs_diff(&g, &matrix(&case[name]));
            assert!(d < tol, "{cfg:?} {name}: max |diff| {d}");
        }
    }
}

#[test]
fn loss_matches_pytorch_f64() {
    check_loss(DType::F64, 1e-6);
}

#[test]
fn loss_matches_pytorch_f32() {
    check_loss(DType::F32, 1e-5);
}

#[test]
fn lr_lambda_matches_reference_schedulers_at_every_step() {
    let t = candle_core::safetensors::load(fixture("schedule.safetensors"), &Device::Cpu).unwrap();
    for (name, decay) in [("cosine", DecayKind::Cosine), ("linear", DecayKind::Linear)] {
        let want = t[name].to_vec1::<f64>().unwrap();
        assert_eq!(want.len(), 10_000);
        let cfg = ScheduleConfig {
            decay,
            warmup_steps: 500,
            total_steps: 10_000,
            cycles: 0.5,
        };
        for (i, w) in want.iter().enumerate() {
            let k = i as u64 + 1;
            let got = lr_lambda(k, &cfg);
            assert!(
                (got - w).abs() < 1e-12,
                "{name} step {k}: {got} vs torch {w}"
            );
        }
    }
}
