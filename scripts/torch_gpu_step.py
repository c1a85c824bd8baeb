#!/usr/bin/env python3
"""PyTorch reference for one R-Drop training step of a ViT on a GPU, to compare `rdrop bench
train` against (R-Drop: Liang et al. 2021, https://arxiv.org/abs/2106.14448).

The step: timm VisionTransformer (fused scaled-dot-product attention), bf16/f16 autocast with
f32 master weights, R-Drop as one forward of the concatenated [x; x] (2·B images), mean-mode
loss  ½(CE_p + CE_q) + α·½(KL(P‖Q) + KL(Q‖P))  with α = 0.3, SGD momentum 0.9, global grad-norm
clip 1.0. Dropout as in the recipe: 0.1 after the position embeddings and after each MLP linear,
none on attention. Synthetic data already on the device; random init.

Prints one JSON line: R-Drop samples/s (each sample goes through two passes), step ms, peak
memory (allocated and reserved by PyTorch's allocator). With --find-max-micro-batch it first
searches the largest micro-batch that fits (doubling, then bisection to --granularity), then
measures there; the JSON gains `max_search`. With --compile the search is run eagerly (one
compile per size would be too slow) and the compiled model measured at that size; add
--fallback-on-oom to step down if the compiled model needs more memory.

usage: torch_gpu_step.py [--model vit-b16] [--image-size 224] [--micro-batch 64] [--steps 20]
                         [--warmup 5] [--precision bf16|f16|f32] [--compile]
                         [--find-max-micro-batch [--granularity 16] [--max-limit 4096]]
                         [--fallback-on-oom] [--device cuda|cpu] [--json-out FILE]
"""
import argparse
import gc
import json
import sys
import time

import torch
import torch.nn.functional as F
import timm
from timm.models.vision_transformer import VisionTransformer

# (embed dim, depth, heads, patch)
PRESETS = {
    "vit-ti16": (192, 12, 3, 16),
    "vit-s16": (384, 12, 6, 16),
    "vit-b16": (768, 12, 12, 16),
    "vit-b32": (768, 12, 12, 32),
    "vit-l16": (1024, 24, 16, 16),
    "cpu-small": (192, 6, 3, 4),
}
ALPHA, NUM_CLASSES, DROPOUT = 0.3, 100, 0.1
OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit-b16", choices=sorted(PRESETS))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile included)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--find-max-micro-batch", action="store_true")
    p.add_argument("--granularity", type=int, default=16, help="bisection stops at this step")
    p.add_argument("--max-limit", type=int, default=4096, help="largest micro-batch tried")
    p.add_argument("--fallback-on-oom", action="store_true",
                   help="if the measurement runs out of memory, retry 1/8 smaller (down to 8)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the timed steps, STEPS more under torch.profiler: its per-op table "
                        "(top 30 by device time, or CPU time on the CPU) in the JSON")
    p.add_argument("--json-out", help="also write the JSON line to this file")
    return p.parse_args()


def build_model(a, dev):
    dim, depth, heads, patch = PRESETS[a.model]
    m = VisionTransformer(img_size=a.image_size, patch_size=patch, embed_dim=dim, depth=depth,
                          num_heads=heads, mlp_ratio=4, num_classes=NUM_CLASSES, class_token=True,
                          global_pool="token", drop_rate=0.0, pos_drop_rate=DROPOUT,
                          proj_drop_rate=DROPOUT, attn_drop_rate=0.0)
    # timm's proj_drop_rate also drops after the attention projection; the recipe does not
    for blk in m.blocks:
        blk.attn.proj_drop = torch.nn.Identity()
    return m.to(dev).train()


class Runner:
    def __init__(self, a, dev):
        self.a, self.dev = a, dev
        self.model = build_model(a, dev)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.precision]
        self.scaler = torch.amp.GradScaler(dev, enabled=a.precision == "f16")
        self.fwd = self.model

    def use_compile(self):
        self.fwd = torch.compile(self.model)

    def step(self, x, y):
        B = y.shape[0]
        with torch.autocast(self.dev, dtype=self.dtype, enabled=self.a.precision != "f32"):
            logits = self.fwd(torch.cat([x, x])).float()
        pl, ql = logits[:B], logits[B:]
        ce = 0.5 * (F.cross_entropy(pl, y) + F.cross_entropy(ql, y))
        lp, lq = F.log_softmax(pl, -1), F.log_softmax(ql, -1)
        kl = 0.5 * (F.kl_div(lp, lq, reduction="batchmean", log_target=True)
                    + F.kl_div(lq, lp, reduction="batchmean", log_target=True))
        loss = ce + ALPHA * kl
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()

    def batch(self, B):
        s = self.a.image_size
        x = torch.randn(B, 3, s, s, device=self.dev)
        y = torch.randint(0, NUM_CLASSES, (B,), device=self.dev)
        return x, y

    def sync(self):
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def measure(self, B, steps, warmup):
        x, y = self.batch(B)
        t0 = time.perf_counter()
        for _ in range(warmup):
            self.step(x, y)
        self.sync()
        warm_s = time.perf_counter() - t0
        if self.dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(steps):
            self.step(x, y)
        self.sync()
        el = time.perf_counter() - t
        out = {"micro_batch": B, "steps": steps, "samples_per_s": B * steps / el,
               "step_ms": 1000 * el / steps, "warmup_s": round(warm_s, 3)}
        if self.dev == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        return out

    def profile(self, B, steps):
        """torch.profiler's per-op table over `steps` steps: the ops with the most self time."""
        from torch.profiler import ProfilerActivity, profile
        x, y = self.batch(B)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                self.step(x, y)
            self.sync()
        dev_key = "self_device_time_total" if self.dev == "cuda" else "self_cpu_time_total"
        rows = []
        for e in prof.key_averages():
            dev_us = getattr(e, dev_key, None)
            if dev_us is None and self.dev == "cuda":
                dev_us = getattr(e, "self_cuda_time_total", 0)
            rows.append({"op": e.key, "calls": e.count // steps,
                         "self_ms": round(dev_us / 1000 / steps, 4),
                         "cpu_ms": round(e.self_cpu_time_total / 1000 / steps, 4)})
        rows.sort(key=lambda r: -r["self_ms"])
        return {"steps": steps, "time": "device" if self.dev == "cuda" else "cpu",
                "ops": rows[:30], "total_self_ms": round(sum(r["self_ms"] for r in rows), 3)}

    def fits(self, B):
        """Two steps at micro-batch B; False on out-of-memory (and memory freed again)."""
        ok = True
        try:
            x, y = self.batch(B)
            for _ in range(2):
                self.step(x, y)
            self.sync()
        except OOM:
            ok = False
        x = y = None
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if self.dev == "cuda":
            torch.cuda.empty_cache()
        return ok


def find_max(r, start, granularity, limit):
    tried = []

    def probe(b):
        t = time.perf_counter()
        ok = r.fits(b)
        tried.append({"micro_batch": b, "fits": ok, "s": round(time.perf_counter() - t, 2)})
        print(f"[torch_gpu_step] micro-batch {b}: {'fits' if ok else 'out of memory'}", file=sys.stderr)
        return ok

    lo, hi = 0, None  # lo fits, hi does not
    b = max(granularity, start)
    while b <= limit:
        if probe(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if lo == 0:  # even the start did not fit: bisect downwards from it
        hi, lo = b, 0
    if hi is None:
        return lo, tried
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried


def main():
    a = parse_args()
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_gpu_step.py: PyTorch sees no CUDA device (use --device cpu for a plumbing test)")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    r = Runner(a, dev)
    info = {"impl": "pytorch" + ("+compile" if a.compile else ""), "torch": torch.__version__,
            "timm": timm.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "model": a.model, "image_size": a.image_size, "precision": a.precision,
            "fused_attn": bool(getattr(r.model.blocks[0].attn, "fused_attn", False)),
            "params": sum(p.numel() for p in r.model.parameters())}
    B = a.micro_batch
    if a.find_max_micro_batch:
        B, tried = find_max(r, a.micro_batch, a.granularity, a.max_limit)
        info["max_search"] = tried
        info["max_micro_batch"] = B
        if B == 0:
            info["error"] = "no micro-batch fits"
            emit(info, a)
            sys.exit(1)
    if a.compile:
        r.use_compile()
    while True:
        try:
            info.update(r.measure(B, a.steps, a.warmup))
            break
        except OOM:
            if not a.fallback_on_oom or B <= 8:
                raise
            r.opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            info.setdefault("oom_at", []).append(B)
            B -= max(8, B // 8 // 8 * 8)
            print(f"[torch_gpu_step] out of memory, retrying at micro-batch {B}", file=sys.stderr)
    if a.profile > 0:
        info["profile"] = r.profile(B, a.profile)
    emit(info, a)


def emit(info, a):
    line = json.dumps(info)
    print(line, flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
