//! A small MLP implementing `RDropModel` for the integration tests:
//! `x (n, d) → tanh(x W1ᵀ + b1) → dropout → · W2ᵀ + b2 → logits (n, C)`.
//! Dropout uses queued fixed masks when present (to replay PyTorch's), else a `DropoutRng`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor, Var};
use rdrop_core::{DropoutRng, RDropModel, RngState, RowKey};
use rdrop_kernels::philox::{fill_mask, MaskKey};

/// Deterministic ±-noise for test data: `shape` values, each 0 or 2 (Philox, `stream` apart).
pub fn noise(shape: (usize, usize), seed: u64, stream: u32) -> Result<Tensor> {
    let mut v = vec![0f32; shape.0 * shape.1];
    let key = MaskKey {
        seed,
        update: stream,
        site: 0,
        sample: 0,
        pass: 0,
    };
    fill_mask(&key, 0.5, &mut v);
    Tensor::from_vec(v, shape, &Device::Cpu)
}

pub struct Mlp {
    pub w1: Var,
    pub b1: Var,
    pub w2: Var,
    pub b2: Var,
    pub p: f64,
    pub rng: DropoutRng,
    pub masks: Mutex<VecDeque<Tensor>>,
}

impl Mlp {
    pub fn from_tensors(
        w1: &Tensor,
        b1: &Tensor,
        w2: &Tensor,
        b2: &Tensor,
        p: f64,
        seed: u64,
    ) -> Result<Self> {
        Ok(Self {
            w1: Var::from_tensor(w1)?,
            b1: Var::from_tensor(b1)?,
            w2: Var::from_tensor(w2)?,
            b2: Var::from_tensor(b2)?,
            p,
            rng: DropoutRng::new(seed),
            masks: Mutex::new(VecDeque::new()),
        })
    }

    /// Random init from a seed (d_in → hidden → classes).
    pub fn random(d_in: usize, hidden: usize, classes: usize, p: f64, seed: u64) -> Result<Self> {
        // deterministic pseudo-random weights: mask-based noise is enough for tests
        let w = |shape: (usize, usize), stream: u32| -> Result<Tensor> {
            let m = noise(shape, seed ^ 0xABCD, stream)?; // values 0 or 2
            (m.affine(0.5, -0.5)? * 0.6)?.affine(1.0, 0.0) // ±0.3
        };
        let b = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu);
        Self::from_tensors(
            &w((hidden, d_in), 0)?,
            &b(hidden)?,
            &w((classes, hidden), 1)?,
            &b(classes)?,
            p,
            seed,
        )
    }

    pub fn push_masks(&self, masks: impl IntoIterator<Item = Tensor>) {
        self.masks.lock().unwrap().extend(masks);
    }

    pub fn params(&self) -> Vec<Vec<f32>> {
        [&self.w1, &self.b1, &self.w2, &self.b2]
            .iter()
            .map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }
}

impl RDropModel for Mlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dt = x.dtype();
        let w1 = self.w1.as_tensor().to_dtype(dt)?;
        let b1 = self.b1.as_tensor().to_dtype(dt)?;
        let w2 = self.w2.as_tensor().to_dtype(dt)?;
        let b2 = self.b2.as_tensor().to_dtype(dt)?;
        self.rng.begin_forward(x.dim(0)?, train)?;
        let h = x.matmul(&w1.t()?)?.broadcast_add(&b1)?.tanh()?;
        let h = if train {
            let fixed = self.masks.lock().unwrap().pop_front();
            match fixed {
                Some(m) => (h * m.to_dtype(dt)?)?,
                None => self.rng.dropout(&h, self.p, true, 0)?,
            }
        } else {
            h
        };
        h.matmul(&w2.t()?)?.broadcast_add(&b2)
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("w1".into(), self.w1.clone()),
            ("b1".into(), self.b1.clone()),
            ("w2".into(), self.w2.clone()),
            ("b2".into(), self.b2.clone()),
        ]
    }

    fn rng_state(&self) -> RngState {
        self.rng.state()
    }

    fn set_rng_state(&self, state: &RngState) -> Result<()> {
        self.rng.set_state(state)
    }

    fn set_dropout_context(&self, update: u32, rows: Vec<RowKey>) {
        self.rng.set_context(update, rows)
    }
}

/// Deterministic micro-batches: `n` batches of `(m, d)` inputs (±1 noise from a seeded mask
/// plus a smooth offset) and `u32` labels in `0..c`.
pub fn batches(n: usize, m: usize, d: usize, c: usize, seed: u64) -> Vec<(Tensor, Tensor)> {
    let offset = Tensor::arange(0f32, (m * d) as f32, &Device::Cpu)
        .unwrap()
        .reshape((m, d))
        .unwrap();
    let offset = offset
        .affine(0.37, 0.0)
        .unwrap()
        .sin()
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap();
    (0..n)
        .map(|i| {
            let noise = noise((m, d), seed, i as u32).unwrap(); // 0 or 2
            let x = (noise.affine(1.0, -1.0).unwrap() + &offset).unwrap();
            let y: Vec<u32> = (0..m).map(|j| ((i * 7 + j * 3) % c) as u32).collect();
            (x, Tensor::new(y.as_slice(), &Device::Cpu).unwrap())
        })
        .collect()
}
