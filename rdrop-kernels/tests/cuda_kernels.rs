//! The CUDA kernels on a GPU against the Rust kernels (feature `cuda`; every test is ignored
//! without a GPU: `scripts/gpu-check.sh` runs them with `--ignored`). Reads no file, so the test
//! binary runs anywhere. Tolerances: f32 outputs that the CPU computes in the same order
//! (masks, dropout rows, GELU, LayerNorm, softmax, SGD/AdamW, casts) are compared **bitwise**;
//! bf16/f16 outputs must equal the CPU's f32 value rounded to nearest even (bitwise too); sums
//! in another order (bias gradient, norm, loss, softmax backward) within the stated relative
//! tolerances.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use half::bf16;
use rdrop_kernels::attention::softmax_row;
use rdrop_kernels::cuda::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr};
use rdrop_kernels::cuda::{CudaKernelError, CudaKernels, Dropout, LOSS_HEADER, SUM_SQUARES_BLOCKS};
use rdrop_kernels::dropout::{
    apply_keep, apply_keep_to, dropout_apply_keep, residual_dropout_add_keep, RowKey, Site,
};
use rdrop_kernels::gelu::{gelu_bwd_inplace, gelu_fwd};
use rdrop_kernels::layernorm::{layernorm_bwd, layernorm_bwd_scratch_len, layernorm_fwd};
use rdrop_kernels::loss::{rdrop_loss, LossConfig, LossMode};
use rdrop_kernels::optim::{
    adamw_step, clip_coef, sgd_step, sum_squares_reference, AdamWHyper, SgdHyper,
};
use rdrop_kernels::patch::im2col;
use rdrop_kernels::philox::{drop_threshold, keep_scale};

struct Rng(u64);

impl Rng {
    fn u32(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }
    fn f(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.u32() >> 8) as f32 / (1u32 << 24) as f32
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f(lo, hi)).collect()
    }
}

fn setup() -> (Arc<CudaStream>, CudaKernels) {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let stream = ctx.default_stream();
    let k = CudaKernels::new(stream.clone()).expect("kernels load");
    (stream, k)
}

fn up<T: DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    s.clone_htod(v).expect("upload")
}

fn down<T: DeviceRepr + Default + Clone>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<T> {
    s.clone_dtoh(d).expect("download")
}

fn keys(rows: &[RowKey]) -> Vec<u32> {
    rows.iter().flat_map(|r| [r.sample, r.pass]).collect()
}

fn site(p: f32, id: u32) -> Site {
    Site {
        seed: 0xfeed_0000_0000_beef,
        update: 3,
        site: id,
        p,
    }
}

fn same_bits(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (a, b)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            a.to_bits() == b.to_bits(),
            "{what}[{i}]: GPU {a:e} vs CPU {b:e}"
        );
    }
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn rows_keys(b: usize) -> Vec<RowKey> {
    (0..b)
        .map(|i| RowKey {
            sample: (i / 2) as u32 + 5,
            pass: (i % 2) as u32,
        })
        .collect()
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it with --ignored (or the emulator: scripts/gpu-emu-check.sh)"]
fn dropout_rows_masks_and_residual_bitwise() {
    let (s, k) = setup();
    let mut r = Rng(1);
    let rows = rows_keys(4);
    let n = 197 * 13 + 2; // not a multiple of 4
    for &p in &[0.0f32, 0.1] {
        let st = site(p, 6);
        let rk = up(&s, &keys(&rows));
        let drop = Dropout {
            site: Some(st),
            row_keys: &rk,
        };
        let x = r.vec(rows.len() * n, -2.0, 2.0);
        let y = r.vec(rows.len() * n, -2.0, 2.0);
        // residual (out of place and in place)
        let mut cpu = x.clone();
        let mut cpu_keep = vec![0u8; x.len()];
        residual_dropout_add_keep(&mut cpu, &mut cpu_keep, &y, n, &st, &rows);
        let (dx, dy) = (up(&s, &x), up(&s, &y));
        let mut out = s.alloc_zeros::<f32>(x.len()).unwrap();
        let mut keep = s.alloc_zeros::<u8>(x.len()).unwrap();
        k.residual_dropout_add(&mut out, &mut keep, &dx, &dy, drop, [rows.len(), n])
            .unwrap();
        same_bits("residual", &down(&s, &out), &cpu);
        if p != 0.0 {
            assert_eq!(down(&s, &keep), cpu_keep, "residual mask");
        }
        // bf16 branch input: the CPU on the bf16-rounded y
        let yb = to_bf16(&y);
        let yr: Vec<f32> = yb.iter().map(|v| v.to_f32()).collect();
        let mut cpu_b = x.clone();
        residual_dropout_add_keep(&mut cpu_b, &mut cpu_keep, &yr, n, &st, &rows);
        k.residual_dropout_add(
            &mut out,
            &mut keep,
            &dx,
            &up(&s, &yb),
            drop,
            [rows.len(), n],
        )
        .unwrap();
        same_bits("residual bf16", &down(&s, &out), &cpu_b);
        // the recorded mask applied again
        if p != 0.0 {
            let ck = down(&s, &keep);
            assert_eq!(ck, cpu_keep, "residual bf16 mask");
            let dropped = ck.iter().filter(|&&v| v == 0).count() as f64 / ck.len() as f64;
            assert!((dropped - 0.1).abs() < 0.01, "drop rate {dropped}");
            // apply_keep / dropout_grad = apply_keep_to
            let mut cpu2 = y.clone();
            apply_keep(&mut cpu2, &ck, p);
            let mut o = s.alloc_zeros::<f32>(x.len()).unwrap();
            k.apply_keep(&mut o, &dy, &keep, p).unwrap();
            same_bits("apply_keep", &down(&s, &o), &cpu2);
            let mut cpu3 = vec![0f32; y.len()];
            apply_keep_to(&mut cpu3, &y, &ck, p);
            let mut ob = s.alloc_zeros::<bf16>(x.len()).unwrap();
            k.dropout_grad(&mut ob, &dy, &keep, p).unwrap();
            assert_eq!(down(&s, &ob), to_bf16(&cpu3), "dropout_grad bf16");
        }
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it with --ignored (or the emulator: scripts/gpu-emu-check.sh)"]
fn gelu_dropout_forward_backward_bitwise() {
    let (s, k) = setup();
    let mut r = Rng(2);
    let rows = rows_keys(2);
    let n = 65 * 768;
    for &p in &[0.0f32, 0.1] {
        let st = site(p, 9);
        let rk = up(&s, &keys(&rows));
        let drop = Dropout {
            site: Some(st),
            row_keys: &rk,
        };
        let pre = r.vec(rows.len() * n, -6.0, 6.0);
        let mut h = vec![0f32; pre.len()];
        gelu_fwd(&mut h, &pre);
        let mut ck = vec![1u8; pre.len()];
        dropout_apply_keep(&mut h, &mut ck, n, &st, &rows);
        let dpre_in = up(&s, &pre);
        let mut gh = s.alloc_zeros::<f32>(pre.len()).unwrap();
        let mut keep = s.alloc_zeros::<u8>(pre.len()).unwrap();
        k.gelu_dropout_fwd(&mut gh, &mut keep, &dpre_in, drop, [rows.len(), n])
            .unwrap();
        same_bits("gelu fwd", &down(&s, &gh), &h);
        if p != 0.0 {
            assert_eq!(down(&s, &keep), ck, "gelu mask");
        } else {
            ck.iter_mut().for_each(|v| *v = 1);
        }
        // bf16: the same f32 values rounded (pre rounded first)
        let pb = to_bf16(&pre);
        let pr: Vec<f32> = pb.iter().map(|v| v.to_f32()).collect();
        let mut hb = vec![0f32; pr.len()];
        gelu_fwd(&mut hb, &pr);
        let mut ck2 = vec![1u8; pr.len()];
        dropout_apply_keep(&mut hb, &mut ck2, n, &st, &rows);
        let mut ghb = s.alloc_zeros::<bf16>(pre.len()).unwrap();
        k.gelu_dropout_fwd(&mut ghb, &mut keep, &up(&s, &pb), drop, [rows.len(), n])
            .unwrap();
        assert_eq!(down(&s, &ghb), to_bf16(&hb), "gelu fwd bf16");
        // backward (in place)
        let dh = r.vec(pre.len(), -1.0, 1.0);
        let mut cpu = dh.clone();
        apply_keep(&mut cpu, &ck, p);
        gelu_bwd_inplace(&mut cpu, &pre);
        let keep_d = up(&s, &ck);
        // h again from the recorded mask (the backward's recomputation)
        let mut h2 = s.alloc_zeros::<f32>(pre.len()).unwrap();
        k.gelu_apply_keep(&mut h2, &dpre_in, &keep_d, p).unwrap();
        same_bits("gelu_apply_keep", &down(&s, &h2), &h);
        let mut g2 = up(&s, &dh);
        k.gelu_dropout_bwd_inplace(&mut g2, &dpre_in, &keep_d, p)
            .unwrap();
        same_bits("gelu bwd in place", &down(&s, &g2), &cpu);
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it with --ignored (or the emulator: scripts/gpu-emu-check.sh)"]
fn layernorm_forward_backward_bitwise() {
    let (s, k) = setup();
    let mut r = Rng(3);
    for &(n, d) in &[(197usize * 3, 768usize), (70, 192), (5, 37)] {
        let x = r.vec(n * d, -3.0, 3.0);
        let w = r.vec(d, 0.5, 1.5);
        let b = r.vec(d, -0.5, 0.5);
        let eps = 1e-12f32;
        let (mut y, mut m, mut rs) = (vec![0f32; n * d], vec![0f32; n], vec![0f32; n]);
        layernorm_fwd(&mut y, &mut m, &mut rs, &x, &w, &b, eps, d);
        let (dx_, dw_, db_) = (up(&s, &x), up(&s, &w), up(&s, &b));
        let mut gy = s.alloc_zeros::<f32>(n * d).unwrap();
        let mut gm = s.alloc_zeros::<f32>(n).unwrap();
        let mut gr = s.alloc_zeros::<f32>(n).unwrap();
        k.layernorm_fwd(&mut gy, [&mut gm, &mut gr], &dx_, [&dw_, &db_], eps, [n, d])
            .unwrap();
        same_bits("ln y", &down(&s, &gy), &y);
        same_bits("ln mean", &down(&s, &gm), &m);
        same_bits("ln rstd", &down(&s, &gr), &rs);
        let mut gyb = s.alloc_zeros::<bf16>(n * d).unwrap();
        k.layernorm_fwd(
            &mut gyb,
            [&mut gm, &mut gr],
            &dx_,
            [&dw_, &db_],
            eps,
            [n, d],
        )
        .unwrap();
        assert_eq!(down(&s, &gyb), to_bf16(&y), "ln y bf16");

        let dy = r.vec(n * d, -1.0, 1.0);
        let dx0 = r.vec(n * d, -1.0, 1.0);
        let (dw0, db0) = (r.vec(d, -1.0, 1.0), r.vec(d, -1.0, 1.0));
        let (mut cdx, mut cdw, mut cdb) = (dx0.clone(), dw0.clone(), db0.clone());
        let mut scratch = vec![0f32; layernorm_bwd_scratch_len(n, d)];
        layernorm_bwd(
            &mut cdx,
            &mut cdw,
            &mut cdb,
            &mut scratch,
            &dy,
            &x,
            &m,
            &rs,
            &w,
            d,
        );
        let (mut gdx, mut gdw, mut gdb) = (up(&s, &dx0), up(&s, &dw0), up(&s, &db0));
        let mut gs = s
            .alloc_zeros::<f32>(CudaKernels::layernorm_bwd_scratch_len(n, d))
            .unwrap();
        k.layernorm_bwd(
            &mut gdx,
            [&mut gdw, &mut gdb],
            &mut gs,
            &up(&s, &dy),
            &dx_,
            &dw_,
            [&gm, &gr],
            [n, d],
            true,
        )
        .unwrap();
        same_bits("ln dx", &down(&s, &gdx), &cdx);
        same_bits("ln dw", &down(&s, &gdw), &cdw);
        same_bits("ln db", &down(&s, &gdb), &cdb);
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it with --ignored (or the emulator: scripts/gpu-emu-check.sh)"]
fn softmax_dropout_forward_backward() {
    let (s, k) = setup();
    let mut r = Rng(4);
    let (b, h, t) = (4usize, 3usize, 197usize);
    let rows = rows_keys(b);
    let rk = up(&s, &keys(&rows));
    for &p in &[0.0f32, 0.1] {
        let st = site(p, 40);
        let drop = Dropout {
            site: Some(st),
            row_keys: &rk,
        };
        let scores = r.vec(b * h * t * t, -6.0, 6.0);
        let mut cpu = scores.clone();
        cpu.chunks_mut(t).for_each(softmax_row);
        let mut probs = up(&s, &scores);
        let n = scores.len();
        let mut attn = s.alloc_zeros::<f32>(n).unwrap();
        let mut keep = s.alloc_zeros::<u8>(n).unwrap();
        k.softmax_dropout_fwd_ld([&mut probs, &mut attn], &mut keep, 1.0, drop, [b, h, t, t])
            .unwrap();
        let gp = down(&s, &probs);
        same_bits("softmax P", &gp, &cpu);
        let gk = down(&s, &keep);
        let ga = down(&s, &attn);
        if p != 0.0 {
            for (bi, &row) in rows.iter().enumerate() {
                let key = st.key(row);
                for e in 0..h * t * t {
                    let i = bi * h * t * t + e;
                    let kept = key.word(e) >= drop_threshold(p);
                    assert_eq!(gk[i] != 0, kept, "mask element {i}");
                    let want = if kept { keep_scale(p) * cpu[i] } else { 0.0 };
                    assert_eq!(ga[i].to_bits(), want.to_bits(), "A[{i}]");
                }
            }
        } else {
            assert!(
                ga.iter().all(|&v| v == 0.0),
                "attn untouched without dropout"
            );
        }
        // backward against f64
        let da = r.vec(n, -1.0, 1.0);
        let scale = 0.125f32;
        let mut ds = up(&s, &da);
        k.softmax_dropout_bwd_inplace_ld(&mut ds, &probs, &keep, p, scale, [b, h, t, t])
            .unwrap();
        let gds = down(&s, &ds);
        for row in 0..b * h * t {
            let o = row * t;
            let dp: Vec<f64> = (0..t)
                .map(|j| match (p != 0.0, gk[o + j] != 0) {
                    (false, _) => da[o + j] as f64,
                    (true, true) => da[o + j] as f64 * keep_scale(p) as f64,
                    (true, false) => 0.0,
                })
                .collect();
            let dot: f64 = (0..t).map(|j| dp[j] * gp[o + j] as f64).sum();
            for j in 0..t {
                let want = scale as f64 * gp[o + j] as f64 * (dp[j] - dot);
                let got = gds[o + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * (1e-3 + want.abs()) + 1e-9,
                    "dS[{row}, {j}] {got} vs {want}"
                );
            }
        }
        // padded rows (ld = 200 > 197): the same P, A, keep and dS; padding untouched
        let ld = t + 3;
        let pad = |v: &[f32], fill: f32| -> Vec<f32> {
            v.chunks(t)
                .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(fill, ld - t)))
                .collect()
        };
        let np = b * h * t * ld;
        let mut pp = up(&s, &pad(&scores, 7.0));
        let mut pa = up(&s, &vec![7f32; np]);
        let mut pk = up(&s, &vec![7u8; np]);
        k.softmax_dropout_fwd_ld([&mut pp, &mut pa], &mut pk, 1.0, drop, [b, h, t, ld])
            .unwrap();
        let (gpp, gpa, gpk) = (down(&s, &pp), down(&s, &pa), down(&s, &pk));
        let mut pd = up(&s, &pad(&da, 7.0));
        k.softmax_dropout_bwd_inplace_ld(&mut pd, &pp, &pk, p, scale, [b, h, t, ld])
            .unwrap();
        let gpd = down(&s, &pd);
        for row in 0..b * h * t {
            let (o, q) = (row * t, row * ld);
            same_bits("P ld", &gpp[q..q + t], &gp[o..o + t]);
            same_bits("dS ld", &gpd[q..q + t], &gds[o..o + t]);
            if p != 0.0 {
                same_bits("A ld", &gpa[q..q + t], &ga[o..o + t]);
                assert_eq!(&gpk[q..q + t], &gk[o..o + t], "keep ld");
            }
            assert!(gpp[q + t..q + ld].iter().all(|&v| v == 7.0), "P padding");
            assert!(gpa[q + t..q + ld].iter().all(|&v| v == 7.0), "A padding");
            assert!(gpd[q + t..q + ld].iter().all(|&v| v == 7.0), "dS padding");
        }
        // bf16 scores: P equals the CPU's on the rounded scores, rounded
        let sb = to_bf16(&scores);
        let mut cpu_b: Vec<f32> = sb.iter().map(|v| v.to_f32()).collect();
        cpu_b.chunks_mut(t).for_each(softmax_row);
        let mut pb = up(&s, &sb);
        let mut ab = s.alloc_zeros::<bf16>(n).unwrap();
        k.softmax_dropout_fwd_ld([&mut pb, &mut ab], &mut keep, 1.0, drop, [b, h, t, t])
            .unwrap();
        assert_eq!(down(&s, &pb), to_bf16(&cpu_b), "softmax P bf16");
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it with --ignored (or the emulator: scripts/gpu-emu-check.sh)"]
fn embeddings_im2col_layouts_and_class_tokens() {
    let (s, k) = setup();
    let mut r = Rng(5);
    let (b, c, sz, p) = (3usize, 3usize, 32usize, 4usize);
    let g = sz / p;
    let img = r.vec(b * c * sz * sz, -1.0, 1.0);
    let mut cpu = vec![0f32; b * g * g * c * p * p];
    im2col(&mut cpu, &img, b, c, sz, p);
    let mut out = s.alloc_zeros::<f32>(cpu.len()).unwrap();
    k.im2col(&mut out, &up(&s, &img), [b, c, sz, p]).unwrap();
    same_bits("im2col", &down(&s, &out), &cpu);

    // embeddings: x[b,0] = cls + pos[0], x[b,1+j] = tok[b,j] + pos[1+j], dropout
    let (t, d) = (g * g + 1, 24usize);
    let rows = rows_keys(b);
    let rk = up(&s, &keys(&rows));
    let tok = r.vec(b * (t - 1) * d, -1.0, 1.0);
    let cls = r.vec(d, -1.0, 1.0);
    let pos = r.vec(t * d, -1.0, 1.0);
    let st = site(0.1, 0);
    let drop = Dropout {
        site: Some(st),
        row_keys: &rk,
    };
    let mut x = vec![0f32; b * t * d];
    for bi in 0..b {
        for j in 0..d {
            x[bi * t * d + j] = cls[j] + pos[j];
        }
        for e in d..t * d {
            x[bi * t * d + e] = tok[bi * (t - 1) * d + e - d] + pos[e];
        }
    }
    let mut ck = vec![0u8; x.len()];
    dropout_apply_keep(&mut x, &mut ck, t * d, &st, &rows);
    let mut gx = s.alloc_zeros::<f32>(x.len()).unwrap();
    let mut keep = s.alloc_zeros::<u8>(x.len()).unwrap();
    let (gcls, gpos) = (up(&s, &cls), up(&s, &pos));
    k.embed_fwd(
        &mut gx,
        &mut keep,
        &up(&s, &tok),
        [&gcls, &gpos],
        drop,
        [b, t, d],
    )
    .unwrap();
    same_bits("embed x", &down(&s, &gx), &x);
    assert_eq!(down(&s, &keep), ck, "embed mask");
    // backward: g = mask ⊙ dx; dtok = g[:, 1:], dcls += Σ_b g[b, 0], dpos += Σ_b g[b]
    let dx = r.vec(x.len(), -1.0, 1.0);
    let mut gm = dx.clone();
    apply_keep(&mut gm, &ck, 0.1);
    let (dcls0, dpos0) = (r.vec(d, -1.0, 1.0), r.vec(t * d, -1.0, 1.0));
    let (mut dcls, mut dpos) = (dcls0.clone(), dpos0.clone());
    for bi in 0..b {
        for e in 0..t * d {
            dpos[e] += gm[bi * t * d + e];
        }
    }
    for bi in 0..b {
        for j in 0..d {
            dcls[j] += gm[bi * t * d + j];
        }
    }
    let mut gdtok = s.alloc_zeros::<f32>(tok.len()).unwrap();
    let (mut gdcls, mut gdpos) = (up(&s, &dcls0), up(&s, &dpos0));
    k.embed_bwd(
        &mut gdtok,
        &mut gdcls,
        &mut gdpos,
        &up(&s, &dx),
        &keep,
        0.1,
        [b, t, d],
    )
    .unwrap();
    let dtok: Vec<f32> = (0..b)
        .flat_map(|bi| gm[bi * t * d + d..(bi + 1) * t * d].to_vec())
        .collect();
    same_bits("embed dtok", &down(&s, &gdtok), &dtok);
    same_bits("embed dcls", &down(&s, &gdcls), &dcls);
    same_bits("embed dpos", &down(&s, &gdpos), &dpos);

    // head layouts: split then merge-grad is the identity; attn_merge ∘ attn_split_grad too
    let (hh, hd) = (4usize, 6usize);
    let dm = hh * hd;
    let qkv = r.vec(b * t * 3 * dm, -1.0, 1.0);
    let gq = up(&s, &qkv);
    let n = b * t * dm;
    let (mut q, mut kk, mut v) = (
        s.alloc_zeros::<f32>(n).unwrap(),
        s.alloc_zeros::<f32>(n).unwrap(),
        s.alloc_zeros::<f32>(n).unwrap(),
    );
    k.qkv_split([&mut q, &mut kk, &mut v], &gq, [b, t, hh, hd])
        .unwrap();
    let hq = down(&s, &kk);
    // k[b, h, t, e] = qkv[b, t, D + h·hd + e]
    let (bi, h1, t1, e1) = (2usize, 3usize, 5usize, 4usize);
    assert_eq!(
        hq[((bi * hh + h1) * t + t1) * hd + e1],
        qkv[(bi * t + t1) * 3 * dm + dm + h1 * hd + e1]
    );
    let mut back = s.alloc_zeros::<f32>(qkv.len()).unwrap();
    k.qkv_merge_grad(&mut back, [&q, &kk, &v], [b, t, hh, hd])
        .unwrap();
    same_bits("qkv round trip", &down(&s, &back), &qkv);
    let rows_in = r.vec(n, -1.0, 1.0);
    let mut heads = s.alloc_zeros::<f32>(n).unwrap();
    k.attn_split_grad(&mut heads, &up(&s, &rows_in), [b, t, hh, hd])
        .unwrap();
    let mut merged = s.alloc_zeros::<f32>(n).unwrap();
    k.attn_merge(&mut merged, &heads, [b, t, hh, hd]).unwrap();
    same_bits("heads round trip", &down(&s, &merged), &rows_in);

    // class tokens
    let mut gc = s.alloc_zeros::<f32>(b * d).unwrap();
    k.cls_gather(&mut gc, &gx, [b, t, d]).unwrap();
    let cl = down(&s, &gc);
    for bi in 0..b {
        same_bits(
            "cls",
            &cl[bi * d..(bi + 1) * d],
            &x[bi * t * d..bi * t * d + d],
        );
    }
    let mut dxs = up(&s, &vec![7f32; x.len()]);
    k.cls_scatter_grad(&mut dxs, &gc, [b, t, d]).unwrap();
    let ds = down(&s, &dxs);
    for bi in 0..b {
        same_bits(
            "cls grad",
            &ds[bi * t * d..bi * t * d + d],
            &cl[bi * d..(bi + 1) * d],
        );
        assert!(ds[bi * t * d + d..(bi + 1) * t * d]
            .iter()
            .all(|&v| v == 0.0));
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it with --ignored (or the emulator: scripts/gpu-emu-check.sh)"]
fn bias_grad_casts_and_loss() {
    let (s, k) = setup();
    let mut r = Rng(6);
    let (n, c) = (197 * 4 + 3, 768usize);
    let dy = r.vec(n * c, -1.0, 1.0);
    let db0 = r.vec(c, -1.0, 1.0);
    let mut db = up(&s, &db0);
    let mut scratch = s
        .alloc_zeros::<f32>(CudaKernels::bias_grad_scratch_len(n, c))
        .unwrap();
    k.bias_grad(&mut db, &mut scratch, &up(&s, &to_bf16(&dy)), [n, c])
        .unwrap();
    let got = down(&s, &db);
    for j in 0..c {
        let want: f64 = db0[j] as f64
            + (0..n)
                .map(|i| bf16::from_f32(dy[i * c + j]).to_f32() as f64)
                .sum::<f64>();
        assert!(
            (got[j] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "db[{j}]"
        );
    }

    // casts
    let x = r.vec(10_001, -100.0, 100.0);
    let gx = up(&s, &x);
    let mut xb = s.alloc_zeros::<bf16>(x.len()).unwrap();
    k.cast_from_f32(&mut xb, &gx).unwrap();
    assert_eq!(down(&s, &xb), to_bf16(&x));
    let mut xh = s.alloc_zeros::<half::f16>(x.len()).unwrap();
    k.cast_from_f32(&mut xh, &gx).unwrap();
    let want: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    assert_eq!(down(&s, &xh), want);
    let mut xf = s.alloc_zeros::<f32>(x.len()).unwrap();
    k.cast_from_f32(&mut xf, &gx).unwrap();
    same_bits("f32 → f32", &down(&s, &xf), &x);

    // loss against crate::loss
    for reduction in [LossMode::Mean, LossMode::Reference] {
        let (m, cl) = (37usize, 1000usize);
        let cfg = LossConfig {
            alpha: 0.3,
            mode: reduction,
            label_smoothing: 0.1,
        };
        let logits = r.vec(2 * m * cl, -5.0, 5.0);
        let labels: Vec<u32> = (0..m).map(|_| r.u32() % cl as u32).collect();
        let (mut dp, mut dq) = (vec![0f32; m * cl], vec![0f32; m * cl]);
        let v = rdrop_loss(
            &mut dp,
            &mut dq,
            &logits[..m * cl],
            &logits[m * cl..],
            &labels,
            cl,
            &cfg,
            0.5,
        )
        .unwrap();
        let mut dl = s.alloc_zeros::<f32>(logits.len()).unwrap();
        let mut out = s
            .alloc_zeros::<f64>(CudaKernels::rdrop_loss_out_len(m))
            .unwrap();
        k.rdrop_loss(
            &mut dl,
            &mut out,
            &up(&s, &logits),
            &up(&s, &labels),
            [m, cl],
            &cfg,
            0.5,
        )
        .unwrap();
        let o = down(&s, &out);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + b.abs());
        assert!(
            close(o[0], v.loss) && close(o[1], v.ce) && close(o[2], v.kl),
            "{o:?} vs {v:?}"
        );
        assert_eq!(o[3], 0.0);
        assert_eq!(o.len(), LOSS_HEADER + 3 * m);
        let g = down(&s, &dl);
        let scale = dp.iter().chain(&dq).fold(0f32, |a, &b| a.max(b.abs()));
        for (i, (&a, &b)) in g.iter().zip(dp.iter().chain(&dq)).enumerate() {
            assert!((a - b).abs() <= 1e-6 * scale, "dlogits[{i}] {a} vs {b}");
        }
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it with --ignored (or the emulator: scripts/gpu-emu-check.sh)"]
fn update_norm_clip_sgd_adamw() {
    let (s, k) = setup();
    let mut r = Rng(7);
    let n = 1_000_003;
    let g = r.vec(n, -1e-2, 1e-2);
    let gg = up(&s, &g);
    let mut sumsq = s.alloc_zeros::<f64>(1).unwrap();
    let mut scratch = s.alloc_zeros::<f64>(SUM_SQUARES_BLOCKS).unwrap();
    k.sum_squares(&mut sumsq, &mut scratch, &gg, false).unwrap();
    k.sum_squares(&mut sumsq, &mut scratch, &gg, true).unwrap();
    let want = 2.0 * sum_squares_reference(&g);
    let got = down(&s, &sumsq)[0];
    assert!((got - want).abs() <= 1e-12 * want, "Σg² {got} vs {want}");
    let (mut coef, mut norm) = (
        s.alloc_zeros::<f32>(1).unwrap(),
        s.alloc_zeros::<f64>(1).unwrap(),
    );
    k.clip_coef(&mut coef, &mut norm, &sumsq, 1.0).unwrap();
    let c = down(&s, &coef)[0];
    assert_eq!(c.to_bits(), clip_coef(got.sqrt(), 1.0).to_bits());
    assert!(c < 1.0);

    let p0 = r.vec(n, -1.0, 1.0);
    let mom0 = r.vec(n, -0.1, 0.1);
    let h = SgdHyper {
        lr: 0.01,
        momentum: 0.9,
        nesterov: true,
        weight_decay: 1e-4,
    };
    let (mut cp, mut cm) = (p0.clone(), mom0.clone());
    sgd_step(&mut cp, &g, &mut cm, false, c, &h);
    let (mut gp, mut gm) = (up(&s, &p0), up(&s, &mom0));
    let mut pt = s.alloc_zeros::<bf16>(n).unwrap();
    k.sgd_update(
        &mut gp,
        Some(&mut pt.slice_mut(..)),
        &gg,
        &mut gm,
        &coef,
        false,
        &h,
    )
    .unwrap();
    same_bits("sgd params", &down(&s, &gp), &cp);
    same_bits("sgd momentum", &down(&s, &gm), &cm);
    assert_eq!(down(&s, &pt), to_bf16(&cp), "sgd bf16 copy");
    // momentum 0 with an empty momentum view
    let h0 = SgdHyper {
        momentum: 0.0,
        nesterov: false,
        ..h
    };
    let mut cp0 = p0.clone();
    sgd_step(&mut cp0, &g, &mut [], true, c, &h0);
    let mut gp0 = up(&s, &p0);
    let mut empty = s.alloc_zeros::<f32>(1).unwrap();
    k.sgd_update::<f32>(
        &mut gp0,
        None,
        &gg,
        &mut empty.slice_mut(0..0),
        &coef,
        true,
        &h0,
    )
    .unwrap();
    same_bits("sgd μ = 0", &down(&s, &gp0), &cp0);

    let ha = AdamWHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
    };
    let (m0, v0) = (r.vec(n, -0.01, 0.01), r.vec(n, 0.0, 1e-4));
    let (mut ap, mut am, mut av) = (p0.clone(), m0.clone(), v0.clone());
    adamw_step(&mut ap, &g, &mut am, &mut av, 5, c, &ha);
    let (mut gp, mut gm, mut gv) = (up(&s, &p0), up(&s, &m0), up(&s, &v0));
    k.adamw_update(
        &mut gp,
        Some(&mut pt.slice_mut(..)),
        &gg,
        [&mut gm, &mut gv],
        &coef,
        5,
        &ha,
    )
    .unwrap();
    same_bits("adamw params", &down(&s, &gp), &ap);
    same_bits("adamw m", &down(&s, &gm), &am);
    same_bits("adamw v", &down(&s, &gv), &av);
    assert_eq!(down(&s, &pt), to_bf16(&ap), "adamw bf16 copy");

    // scale
    let mut sg = up(&s, &g);
    k.scale_grads(&mut sg, 0.5).unwrap();
    let want: Vec<f32> = g.iter().map(|v| v * 0.5).collect();
    same_bits("scale", &down(&s, &sg), &want);
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it with --ignored (or the emulator: scripts/gpu-emu-check.sh)"]
fn wrong_lengths_are_errors_not_launches() {
    let (s, k) = setup();
    let x = s.alloc_zeros::<f32>(10).unwrap();
    let w = s.alloc_zeros::<f32>(5).unwrap();
    let mut y = s.alloc_zeros::<f32>(9).unwrap();
    let (mut m, mut r) = (
        s.alloc_zeros::<f32>(2).unwrap(),
        s.alloc_zeros::<f32>(2).unwrap(),
    );
    let e = k
        .layernorm_fwd(&mut y, [&mut m, &mut r], &x, [&w, &w], 1e-5, [2, 5])
        .unwrap_err();
    assert!(
        matches!(
            e,
            CudaKernelError::Length {
                buffer: "y",
                got: 9,
                want: 10,
                ..
            }
        ),
        "{e}"
    );
    let mut out = s.alloc_zeros::<f32>(10).unwrap();
    let e = k.im2col(&mut out, &x, [1, 1, 5, 2]).unwrap_err();
    assert!(matches!(e, CudaKernelError::Shape { .. }), "{e}");
}
