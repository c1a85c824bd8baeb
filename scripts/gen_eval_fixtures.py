#!/usr/bin/env python3
"""Fixtures for `rdrop eval` tests: the trained tiny digits ViT of scripts/fixtures/gpu-check-vit
(transformers' ViTForImageClassification, HF layout) converted to timm's and Google's npz layouts
(each checked by timm: state dict load / timm's own npz loader give the same logits), plus the
test-split metrics transformers computes with the recipe's test transform
(Resize((32, 32)) is the identity on the 32x32 demo images; ToTensor; Normalize(0.5, 0.5)).

Writes rdrop-cli/tests/fixtures/eval-digits/{timm.safetensors, google.npz, expected.json}.
Usage: python3 scripts/gen_eval_fixtures.py
"""
import json
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer, _load_weights
from transformers import ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_vit_fixtures import to_google, to_timm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "scripts/fixtures/gpu-check-vit"
OUT = ROOT / "rdrop-cli/tests/fixtures/eval-digits"
ARCHIVE = ROOT / "rdrop-cli/assets/digits-demo.tar.gz"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    with tarfile.open(ARCHIVE) as tar:
        d = pickle.loads(tar.extractfile("cifar-100-python/test").read(), encoding="latin1")
    x = torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    x = (x.float() / 255 - 0.5) / 0.5
    y = torch.tensor(d["fine_labels"])
    hf = ViTForImageClassification.from_pretrained(SRC).eval()
    cfg = hf.config
    with torch.no_grad():
        logits = hf(pixel_values=x).logits
    top5 = min(5, logits.shape[1])
    expected = {
        "top1": (logits.argmax(-1) == y).float().mean().item(),
        "top5": (logits.topk(top5, -1).indices == y[:, None]).any(-1).float().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits, y).item(),
        "n": len(y),
    }
    sd = load_file(SRC / "model.safetensors")
    kw = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.hidden_size,
              depth=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
              mlp_ratio=cfg.intermediate_size / cfg.hidden_size, qkv_bias=True,
              num_classes=cfg.num_labels, global_pool="token")
    t = to_timm(sd, cfg.num_hidden_layers)
    tm = VisionTransformer(**kw).eval()
    tm.load_state_dict(t, strict=True)
    with torch.no_grad():
        assert torch.allclose(tm(x), logits, atol=1e-4)
    save_file({k: v.contiguous() for k, v in t.items()}, OUT / "timm.safetensors")
    g = to_google(sd, cfg.num_hidden_layers, cfg.num_attention_heads)
    npz = OUT / "google.npz"
    np.savez(npz, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in g.items()})
    tm2 = VisionTransformer(**kw).eval()
    _load_weights(tm2, str(npz))
    with torch.no_grad():
        assert torch.allclose(tm2(x), logits, atol=1e-4)
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(json.dumps(expected))


if __name__ == "__main__":
    main()
