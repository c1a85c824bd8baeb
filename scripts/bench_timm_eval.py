#!/usr/bin/env python3
"""Eval-mode throughput of timm's ViT in PyTorch on CPU: the peer of
`cargo run -p rdrop-vit --example bench_eval`. Random weights (no download).

Usage: python3 scripts/bench_timm_eval.py [--model vit_base_patch16_224]
       [--image-size 224] [--batch 8] [--threads 2] [--iters 10] [--classes 100]
Prints one JSON line: {"images_per_s", "ms_per_batch", ...}.
"""
import argparse
import json
import time

import timm
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--classes", type=int, default=100)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = timm.create_model(a.model, pretrained=False, num_classes=a.classes, img_size=a.image_size).eval()
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    with torch.inference_mode():
        for _ in range(2):
            m(x)
        t0 = time.perf_counter()
        for _ in range(a.iters):
            m(x)
        dt = (time.perf_counter() - t0) / a.iters
    print(json.dumps({
        "impl": f"timm {timm.__version__} / torch {torch.__version__}", "model": a.model,
        "image_size": a.image_size, "batch": a.batch, "threads": a.threads,
        "params": sum(p.numel() for p in m.parameters()),
        "ms_per_batch": round(dt * 1e3, 1), "images_per_s": round(a.batch / dt, 2),
    }))


if __name__ == "__main__":
    main()
