#!/usr/bin/env python3
"""Golden fixtures for rdrop-kernels, computed with PyTorch (independent of the Rust code).

Writes rdrop-kernels/tests/fixtures/kernels.json:
  optim      a few updates of torch.optim.SGD (plain, momentum, Nesterov, weight decay) and
             torch.optim.AdamW (with and without weight decay) on random float32 tensors, the
             gradient multiplied by a per-step factor first (as clip_grad_norm_ does); the
             parameters after every update.
  attention  multi-head attention on a fused qkv (B, T, 3D) in float64 with torch autograd:
             P = softmax(Q K^T / sqrt(dh)), O = (P * M) V, heads concatenated, and the gradient
             of sum(O * R) w.r.t. qkv. The dropout mask M is an input: it is generated here by
             an independent Python Philox4x32-10 under the key convention of
             rdrop-kernels/src/philox.rs (checked against Random123's known answers).

Run: python3 scripts/gen_kernel_fixtures.py
"""
import json
import math
import os

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "rdrop-kernels", "tests", "fixtures")
U32 = 0xFFFFFFFF


# ---- Philox4x32-10 (Salmon et al. 2011) ----
def philox(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0 = (k0 + 0x9E3779B9) & U32
            k1 = (k1 + 0xBB67AE85) & U32
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & U32, p1 & U32, ((p0 >> 32) ^ c3 ^ k1) & U32, p0 & U32
    return [c0, c1, c2, c3]


assert philox([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
assert philox([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
    0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def f32(x):
    return torch.tensor(x, dtype=torch.float32).item()


def mask(n, seed, update, site, sample, pass_, p):
    """Mask values (0 or float32(1/(1-p))) of elements 0..n of one (site, sample, pass) key."""
    p = f32(p)
    thr = min(int(math.floor(p * 2.0 ** 32 + 0.5)), U32)
    keep = f32(1.0 / (1.0 - p))
    key = [seed & U32, seed >> 32]
    out = []
    for e in range(n):
        w = philox([e // 4, sample, (site << 1) | (pass_ & 1), update], key)[e % 4]
        out.append(0.0 if w < thr else keep)
    return out


# ---- optimisers ----
def gen_optim(g):
    n, steps = 37, 3
    p0 = torch.randn(n, generator=g, dtype=torch.float32)
    grads = [torch.randn(n, generator=g, dtype=torch.float32) for _ in range(steps)]
    scales = [1.0, 0.6, 0.25]
    cases = []
    sgd = [dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0),
           dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.05),
           dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0),
           dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)]
    adamw = [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
             dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)]
    for kind, hs in [("sgd", sgd), ("adamw", adamw)]:
        for h in hs:
            w = torch.nn.Parameter(p0.clone())
            opt = torch.optim.SGD([w], **h) if kind == "sgd" else torch.optim.AdamW([w], **h)
            after = []
            for k in range(steps):
                w.grad = grads[k].clone().mul_(scales[k])  # clip_grad_norm_ multiplies in place
                opt.step()
                after.append(w.detach().tolist())
            hh = dict(h)
            if "betas" in hh:
                hh["beta1"], hh["beta2"] = hh.pop("betas")
            cases.append({"kind": kind, "hyper": hh, "params": after})
    return {"p0": p0.tolist(), "grads": [x.tolist() for x in grads], "scales": scales, "cases": cases}


# ---- attention ----
def gen_attention(g):
    B, T, H, dh = 2, 7, 2, 8
    D = H * dh
    site = dict(seed=0x1234_5678_9ABC, update=3, site=4, p=0.25)
    rows = [dict(sample=5, pass_=0), dict(sample=5, pass_=1)]
    # float32 inputs (exact in the Rust kernels), computed on in float64
    qkv0 = torch.randn(B, T, 3 * D, generator=g, dtype=torch.float32).double()
    r = torch.randn(B, T, D, generator=g, dtype=torch.float32).double()
    out = []
    for with_dropout in [False, True]:
        if with_dropout:
            m = torch.tensor([mask(H * T * T, site["seed"], site["update"], site["site"], rw["sample"],
                                   rw["pass_"], site["p"]) for rw in rows], dtype=torch.float64)
            m = m.view(B, H, T, T)
        else:
            m = torch.ones(B, H, T, T, dtype=torch.float64)
        qkv = qkv0.clone().requires_grad_(True)
        q, k, v = qkv.split(D, dim=-1)
        heads = lambda x: x.view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        s = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dh)
        probs = torch.softmax(s, dim=-1)
        o = (probs * m) @ heads(v)  # (B, H, T, dh)
        o = o.transpose(1, 2).reshape(B, T, D)
        (o * r).sum().backward()
        out.append({"dropout": with_dropout, "out": o.detach().flatten().tolist(),
                    "probs": probs.detach().flatten().tolist(), "dqkv": qkv.grad.flatten().tolist()})
    return {"dims": dict(batch=B, tokens=T, heads=H, head_dim=dh), "site": site,
            "rows": [[rw["sample"], rw["pass_"]] for rw in rows], "qkv": qkv0.flatten().tolist(),
            "dout": r.flatten().tolist(), "cases": out}


def main():
    g = torch.Generator().manual_seed(9)
    doc = {"optim": gen_optim(g), "attention": gen_attention(g), "torch": torch.__version__}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "kernels.json"), "w") as f:
        json.dump(doc, f)


if __name__ == "__main__":
    main()
