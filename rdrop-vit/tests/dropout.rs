//! Dropout in train mode: rate and 1/(1−p) scaling; eval mode bit-identical across calls; the
//! masks are rdrop-kernels' keyed Philox masks `(seed, update, site, sample, pass)` at the
//! sites of `rdrop_vit::sites`, whatever the thread count and the two-pass mode.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::{two_pass_logits, DropoutContext, DropoutRng, RDropModel, RowKey, TwoPass};
use rdrop_kernels::philox::{fill_mask, MaskKey};
use rdrop_vit::{sites, ViTConfig, VisionTransformer};

const SEED: u64 = 9;

/// The tiny ViT with every dropout rate `p` and a non-zero head (so logits depend on all).
fn model(p: f64) -> VisionTransformer {
    let cfg = ViTConfig {
        dropout: p,
        attention_dropout: p,
        attention_output_dropout: p,
        ..ViTConfig::preset("tiny").unwrap()
    };
    let vm = VarMap::new();
    let m = VisionTransformer::new(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        DropoutRng::new(SEED),
    )
    .unwrap();
    let w = Tensor::randn(0f32, 0.5, (5, 32), &Device::Cpu).unwrap();
    m.var("classifier.weight").unwrap().set(&w).unwrap();
    m
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// `fill_mask` of one row's key: the mask rdrop-kernels (and the explicit engine) compute.
fn kernel_mask(update: u32, site: u32, row: RowKey, p: f64, n: usize) -> Vec<f32> {
    let key = MaskKey {
        seed: SEED,
        update,
        site,
        sample: row.sample,
        pass: row.pass,
    };
    let mut out = vec![0f32; n];
    fill_mask(&key, p as f32, &mut out);
    out
}

fn rows() -> Vec<RowKey> {
    [(10, 1), (3, 0), (7, 1), (0, 0)]
        .map(|(sample, pass)| RowKey { sample, pass })
        .to_vec()
}

/// End to end at the embeddings: `train = eval ⊙ mask` exactly, with each sample's mask the
/// kernel's for its key.
#[test]
fn embeddings_apply_the_keyed_kernel_mask() {
    let p = 0.3;
    let m = model(p);
    let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let eval = to_vec(&m.embeddings(&x, false).unwrap());
    m.set_dropout_context(5, rows());
    let train = to_vec(&m.embeddings(&x, true).unwrap());
    let n = eval.len() / 4;
    assert_eq!(
        sites::per_sample_dims(m.config(), sites::EMBEDDINGS)
            .unwrap()
            .iter()
            .product::<usize>(),
        n
    );
    for (r, row) in rows().into_iter().enumerate() {
        let mask = kernel_mask(5, sites::EMBEDDINGS, row, p, n);
        for i in 0..n {
            assert_eq!(
                train[r * n + i],
                eval[r * n + i] * mask[i],
                "row {r} element {i}"
            );
        }
    }
}

/// At every site, with the site's activation shape, the mask the model would apply is the
/// kernel's for (seed, update, site, sample, pass), with 1 or 2 rayon threads.
#[test]
fn mask_at_every_site_is_the_kernel_mask_on_any_thread_count() {
    let p = 0.1;
    let m = model(p);
    let cfg = m.config().clone();
    let rng = m.rng();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for site in 0..sites::count(cfg.num_layers as u32) {
            let dims = sites::per_sample_dims(&cfg, site).unwrap();
            let n: usize = dims.iter().product();
            let shape = [vec![4], dims].concat();
            rng.set_context(6, rows());
            rng.begin_forward(4, true).unwrap();
            let got = pool.install(|| {
                to_vec(
                    &rng.mask(shape.as_slice(), p, site, DType::F32, &Device::Cpu)
                        .unwrap(),
                )
            });
            for (r, row) in rows().into_iter().enumerate() {
                let want = kernel_mask(6, site, row, p, n);
                assert_eq!(
                    got[r * n..(r + 1) * n],
                    want[..],
                    "{threads} threads, site {site}, row {r}"
                );
            }
        }
    }
    assert!(sites::per_sample_dims(&cfg, sites::count(cfg.num_layers as u32)).is_none());
}

/// With masks keyed by (sample, pass), the concatenated and the sequential passes compute
/// the same logits with dropout on (bit for bit here: see the assertion).
#[test]
fn concat_and_sequential_passes_agree_with_dropout() {
    let m = model(0.1);
    let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let (pc, qc) = two_pass_logits(&m, &x, TwoPass::Concat, 2, 6).unwrap();
    let (ps, qs) = two_pass_logits(&m, &x, TwoPass::Sequential, 2, 6).unwrap();
    let (pc, qc, ps, qs) = (to_vec(&pc), to_vec(&qc), to_vec(&ps), to_vec(&qs));
    let diff = pc
        .iter()
        .chain(&qc)
        .zip(ps.iter().chain(&qs))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(diff, 0.0, "concat vs sequential logits differ by {diff}");
    assert_ne!(pc, qc, "the two passes must see different masks");
    let eval = to_vec(&m.forward_t(&x, false).unwrap());
    assert_ne!(pc, eval);
}

/// A whole train-mode forward with a given context is the same on 1 and 2 threads.
#[test]
fn train_forward_does_not_depend_on_the_thread_count() {
    let m = model(0.1);
    let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            m.set_dropout_context(1, rows());
            to_vec(&m.forward_t(&x, true).unwrap())
        })
    };
    assert_eq!(run(1), run(2));
    // and the context decides: pass 0 everywhere gives other logits
    m.set_dropout_context(1, DropoutContext::pass_rows(0, 4, 0));
    assert_ne!(to_vec(&m.forward_t(&x, true).unwrap()), run(1));
}

#[test]
fn embedding_dropout_rate_and_scaling() {
    let p = 0.3;
    let cfg = ViTConfig {
        dropout: p,
        ..ViTConfig::preset("tiny").unwrap()
    };
    let vm = VarMap::new();
    let m = VisionTransformer::new(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        DropoutRng::new(9),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (16, 3, 32, 32), &Device::Cpu).unwrap();
    let eval: Vec<f32> = m
        .embeddings(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let eval2: Vec<f32> = m
        .embeddings(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(eval, eval2);
    let train: Vec<f32> = m
        .embeddings(&x, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut dropped, mut n) = (0usize, 0usize);
    for (t, e) in train.iter().zip(&eval) {
        if *e == 0.0 {
            continue;
        }
        n += 1;
        if *t == 0.0 {
            dropped += 1;
        } else {
            assert!(
                (t - e / (1.0 - p as f32)).abs() <= 1e-5 * e.abs().max(1.0),
                "{t} vs {e}"
            );
        }
    }
    let rate = dropped as f64 / n as f64;
    assert!(n > 8000 && (rate - p).abs() < 0.02, "rate {rate} over {n}");
    // Whole-model eval forward is bit-identical across calls, train forward is not.
    let a: Vec<f32> = m
        .features(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = m
        .features(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
    let c: Vec<f32> = m
        .features(&x, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(a, c);
}
