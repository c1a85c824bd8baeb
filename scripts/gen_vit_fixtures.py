#!/usr/bin/env python3
"""Golden fixtures for rdrop-vit, from independent implementations.

A tiny ViT (image 32, patch 8, hidden 32, 2 layers, 4 heads, MLP 64, 5 classes, LayerNorm eps
1e-6) with random weights is built with Hugging Face `transformers`' ViTForImageClassification
and written in three layouts:

- `hf/`            ViTForImageClassification folder (config.json + model.safetensors)
- `hf_base/`       ViTModel folder (no `vit.` prefix, with `pooler.*`, no head)
- `timm.safetensors` timm VisionTransformer state dict (fused qkv), checked by loading it into
                   timm and comparing logits with transformers
- `google.npz`     Google's original layout (HWIO conv kernel, per-head q/k/v/out kernels),
                   checked by loading it into timm with timm's own npz loader
                   (`timm.models.vision_transformer._load_weights`)

plus `io.safetensors` (input `x`, labels `y`, eval-mode logits `logits`, base-model
final hidden state of the class token `cls_hidden`), `grads.safetensors` (gradient of
mean cross-entropy(logits, y) w.r.t. every parameter, HF ViTForImageClassification names)
and `posembed.safetensors` (position-embedding resizes with scipy.ndimage.zoom(order=1),
class token untouched, as the R-Drop reference code does).

Usage: python3 scripts/gen_vit_fixtures.py [OUT_DIR]
(default rdrop-vit/tests/fixtures). Deterministic (seeded).
"""
import json
import os
import sys

import numpy as np
import scipy.ndimage
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import _load_weights
from transformers import ViTConfig, ViTForImageClassification

OUT = sys.argv[1] if len(sys.argv) > 1 else "rdrop-vit/tests/fixtures"
IMG, PATCH, DIM, DEPTH, HEADS, MLP, CLASSES, EPS = 32, 8, 32, 2, 4, 64, 5, 1e-6


def to_timm(sd, depth):
    """HF ViTForImageClassification state dict (on-disk names) -> timm VisionTransformer."""
    t = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "head.weight": sd["classifier.weight"],
        "head.bias": sd["classifier.bias"],
    }
    for i in range(depth):
        h = f"vit.encoder.layer.{i}."
        b = f"blocks.{i}."
        for s in ("weight", "bias"):
            t[b + "norm1." + s] = sd[h + "layernorm_before." + s]
            t[b + "norm2." + s] = sd[h + "layernorm_after." + s]
            t[b + "attn.qkv." + s] = torch.cat([sd[h + f"attention.attention.{q}." + s]
                                                for q in ("query", "key", "value")])
            t[b + "attn.proj." + s] = sd[h + "attention.output.dense." + s]
            t[b + "mlp.fc1." + s] = sd[h + "intermediate.dense." + s]
            t[b + "mlp.fc2." + s] = sd[h + "output.dense." + s]
    return t


def to_google(sd, depth, heads):
    """HF ViTForImageClassification state dict -> Google's original npz layout (float32)."""
    dim = sd["vit.embeddings.cls_token"].shape[-1]
    dh = dim // heads
    g = {
        "cls": sd["vit.embeddings.cls_token"].numpy(),
        "embedding/kernel": sd["vit.embeddings.patch_embeddings.projection.weight"].permute(2, 3, 1, 0).numpy(),
        "embedding/bias": sd["vit.embeddings.patch_embeddings.projection.bias"].numpy(),
        "Transformer/posembed_input/pos_embedding": sd["vit.embeddings.position_embeddings"].numpy(),
        "Transformer/encoder_norm/scale": sd["vit.layernorm.weight"].numpy(),
        "Transformer/encoder_norm/bias": sd["vit.layernorm.bias"].numpy(),
        "head/kernel": sd["classifier.weight"].t().numpy(),
        "head/bias": sd["classifier.bias"].numpy(),
    }
    for i in range(depth):
        h = f"vit.encoder.layer.{i}."
        b = f"Transformer/encoderblock_{i}/"
        for ln, hn in (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")):
            g[b + ln + "/scale"] = sd[h + hn + ".weight"].numpy()
            g[b + ln + "/bias"] = sd[h + hn + ".bias"].numpy()
        a = b + "MultiHeadDotProductAttention_1/"
        for q in ("query", "key", "value"):
            w = sd[h + f"attention.attention.{q}.weight"]  # [out, in]
            g[a + q + "/kernel"] = w.t().reshape(dim, heads, dh).numpy()
            g[a + q + "/bias"] = sd[h + f"attention.attention.{q}.bias"].reshape(heads, dh).numpy()
        g[a + "out/kernel"] = sd[h + "attention.output.dense.weight"].t().reshape(heads, dh, dim).numpy()
        g[a + "out/bias"] = sd[h + "attention.output.dense.bias"].numpy()
        m = b + "MlpBlock_3/"
        g[m + "Dense_0/kernel"] = sd[h + "intermediate.dense.weight"].t().numpy()
        g[m + "Dense_0/bias"] = sd[h + "intermediate.dense.bias"].numpy()
        g[m + "Dense_1/kernel"] = sd[h + "output.dense.weight"].t().numpy()
        g[m + "Dense_1/bias"] = sd[h + "output.dense.bias"].numpy()
    return g


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = ViTConfig(
        image_size=IMG, patch_size=PATCH, num_channels=3, hidden_size=DIM,
        num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=EPS, qkv_bias=True, num_labels=CLASSES,
    )
    hf = ViTForImageClassification(cfg).eval()
    # Random everything (default init has unit LayerNorms and zero biases, which would hide bugs).
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for n, p in hf.named_parameters():
            if "layernorm" in n and n.endswith("weight"):
                p.add_(1.0)
    hf.save_pretrained(os.path.join(OUT, "hf"), safe_serialization=True)
    # The ViTModel layout (no prefix, pooler, no head): what google/vit-*-in21k ships.
    # ViTForImageClassification builds `vit` without a pooler; give the base one random values.
    from transformers import ViTModel

    base = ViTModel(cfg, add_pooling_layer=True)
    base.load_state_dict(hf.vit.state_dict(), strict=False)
    with torch.no_grad():
        base.pooler.dense.weight.normal_()
        base.pooler.dense.bias.normal_()
    base.save_pretrained(os.path.join(OUT, "hf_base"), safe_serialization=True)

    x = torch.randn(2, 3, IMG, IMG)
    y = torch.tensor([1, 3])
    logits = hf(pixel_values=x).logits
    loss = torch.nn.functional.cross_entropy(logits, y)
    hf.zero_grad()
    loss.backward()
    # transformers 5 renames modules in memory (`vit.layers.N.attention.q_proj`) but writes the
    # classic names to disk; name each gradient after the on-disk tensor holding its parameter.
    sd = load_file(os.path.join(OUT, "hf", "model.safetensors"))
    grads = {}
    for n, p in hf.named_parameters():
        (key,) = [k for k, v in sd.items() if v.shape == p.shape and torch.equal(v, p.detach())]
        grads[key] = p.grad.detach().clone().contiguous()
    assert len(grads) == len(sd)
    with torch.no_grad():
        cls_hidden = hf.vit(pixel_values=x).last_hidden_state[:, 0].contiguous()
    save_file({"x": x, "y": y.to(torch.int64), "logits": logits.detach(), "cls_hidden": cls_hidden},
              os.path.join(OUT, "io.safetensors"))
    save_file(grads, os.path.join(OUT, "grads.safetensors"))


    # timm layout.
    tm = timm.models.vision_transformer.VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        mlp_ratio=MLP / DIM, qkv_bias=True, num_classes=CLASSES, global_pool="token",
    ).eval()
    t = to_timm(sd, DEPTH)
    tm.load_state_dict(t, strict=True)
    with torch.no_grad():
        tl = tm(x)
    assert torch.allclose(tl, logits, atol=1e-5), (tl - logits).abs().max()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()},
              os.path.join(OUT, "timm.safetensors"))

    # Google npz layout (float32, as in ViT-B_16.npz), plus a pre_logits layer that loaders skip.
    g = to_google(sd, DEPTH, HEADS)
    g["pre_logits/kernel"] = np.random.randn(DIM, DIM).astype(np.float32)
    g["pre_logits/bias"] = np.random.randn(DIM).astype(np.float32)
    npz = os.path.join(OUT, "google.npz")
    np.savez(npz, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in g.items()})
    # Independent check of the layout: timm's own Google-npz loader.
    tm2 = timm.models.vision_transformer.VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        mlp_ratio=MLP / DIM, qkv_bias=True, num_classes=CLASSES, global_pool="token",
    ).eval()
    _load_weights(tm2, npz)
    with torch.no_grad():
        tl2 = tm2(x)
    assert torch.allclose(tl2, logits, atol=1e-5), (tl2 - logits).abs().max()

    # Position-embedding resize as the R-Drop reference code (ViT-pytorch) does it.
    pe = {}
    for name, (n_dim, g_old, g_new) in {"up": (8, 4, 7), "down": (8, 6, 4), "vit": (6, 14, 24)}.items():
        posemb = np.random.randn(1, 1 + g_old * g_old, n_dim).astype(np.float32)
        tok, grid = posemb[:, :1], posemb[0, 1:]
        grid = grid.reshape(g_old, g_old, -1)
        zoom = (g_new / g_old, g_new / g_old, 1)
        grid = scipy.ndimage.zoom(grid.astype(np.float64), zoom, order=1)
        assert grid.shape[:2] == (g_new, g_new)
        out = np.concatenate([tok, grid.reshape(1, g_new * g_new, -1).astype(np.float32)], axis=1)
        pe[f"{name}.in"] = torch.from_numpy(posemb)
        pe[f"{name}.out"] = torch.from_numpy(np.ascontiguousarray(out))
    save_file(pe, os.path.join(OUT, "posembed.safetensors"))

    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("Generated by `scripts/gen_vit_fixtures.py` (transformers "
                f"{__import__('transformers').__version__}, timm {timm.__version__}, "
                f"torch {torch.__version__}, scipy {scipy.__version__}). Do not edit.\n")
    print(json.dumps({"logits": logits.tolist(), "loss": loss.item()}))


if __name__ == "__main__":
    main()
