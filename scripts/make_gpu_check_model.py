#!/usr/bin/env python3
"""Write the small model that scripts/gpu-check.sh evaluates on CPU and on CUDA.

A tiny ViT (transformers' ViTForImageClassification: image 32, patch 4, hidden 64, 4 layers,
4 heads, MLP 128, LayerNorm eps 1e-6, exact GELU, 10 classes) trained for a few epochs on
rdrop's embedded demo dataset (rdrop-cli/assets/digits-demo.tar.gz) with the recipe's test
transform (x/255 - 0.5)/0.5, so its predictions have real margins (random weights give
near-ties, and "identical predictions on CPU and GPU" would test noise). Saved in the HF layout
(config.json + model.safetensors, about 0.6 MB) under scripts/fixtures/gpu-check-vit/.
Deterministic on CPU (seed 0, one thread).

usage: python3 scripts/make_gpu_check_model.py [OUT_DIR]
"""
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "scripts/fixtures/gpu-check-vit"
ARCHIVE = ROOT / "rdrop-cli/assets/digits-demo.tar.gz"


def split(tar, name):
    d = pickle.loads(tar.extractfile(f"cifar-100-python/{name}").read())
    x = torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return (x.float() / 255 - 0.5) / 0.5, torch.tensor(d["fine_labels"])


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tarfile.open(ARCHIVE) as tar:
        meta = pickle.loads(tar.extractfile("cifar-100-python/meta").read())
        xtr, ytr = split(tar, "train")
        xte, yte = split(tar, "test")
    names = meta["fine_label_names"]
    cfg = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=64,
                    num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                    hidden_act="gelu", layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, num_labels=len(names),
                    id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = ViTForImageClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for epoch in range(20):
        perm = torch.randperm(len(ytr))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(pixel_values=xtr[idx]).logits, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            top1 = (model(pixel_values=xte).logits.argmax(-1) == yte).float().mean().item()
        model.train()
        print(f"epoch {epoch}: loss {loss.item():.3f}, test top-1 {top1:.3f}")
    model.eval()
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    with torch.no_grad():
        logits = model(pixel_values=xte).logits
    s = logits.sort(-1, descending=True).values
    print(f"wrote {OUT}: test top-1 {top1:.3f}, smallest top-2 margin {(s[:, 0] - s[:, 1]).min():.4f} (median {(s[:, 0] - s[:, 1]).median():.3f}), "
          f"|logit| max {logits.abs().max():.2f}")


if __name__ == "__main__":
    main()
