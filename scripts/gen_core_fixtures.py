#!/usr/bin/env python3
"""Golden fixtures for rdrop-core, computed with PyTorch (independent of the Rust code).

Writes into rdrop-core/tests/fixtures/:
  loss.json            R-Drop loss value and gradients w.r.t. both logits, for the `reference`
                       convention exactly as the R-Drop ViT code calls F.cross_entropy / F.kl_div,
                       and for the `mean` convention (F.kl_div reduction='batchmean'); float64.
  schedule.safetensors lr multiplier of updates k = 1..10000 from torch's LambdaLR driven by the
                       reference WarmupCosineSchedule / WarmupLinearSchedule (warm-up 500,
                       total 10000), scheduler.step() before optimizer.step() as the reference.
  mlp.safetensors      a small MLP (6 -> 12 tanh, fixed dropout masks, -> 4) trained for five
                       updates by torch.optim.SGD (momentum, clip_grad_norm_, 2-step accumulation)
                       and torch.optim.AdamW; parameters after every update, losses, grad norms.

Run: python3 scripts/gen_core_fixtures.py
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "rdrop-core", "tests", "fixtures")


# ---- the reference code's schedules (ViT-pytorch utils/scheduler.py) ----
class WarmupCosineSchedule(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer, warmup_steps, t_total, cycles=.5, last_epoch=-1):
        self.warmup_steps = warmup_steps
        self.t_total = t_total
        self.cycles = cycles
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step):
        if step < self.warmup_steps:
            return float(step) / float(max(1.0, self.warmup_steps))
        progress = float(step - self.warmup_steps) / float(max(1, self.t_total - self.warmup_steps))
        return max(0.0, 0.5 * (1. + math.cos(math.pi * float(self.cycles) * 2.0 * progress)))


class WarmupLinearSchedule(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer, warmup_steps, t_total, last_epoch=-1):
        self.warmup_steps = warmup_steps
        self.t_total = t_total
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step):
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        return max(0.0, float(self.t_total - step) / float(max(1.0, self.t_total - self.warmup_steps)))


# ---- the loss in both conventions ----
def loss_reference(p, q, y, alpha, ls):
    """models/modeling.py of the R-Drop ViT code (per micro-batch, before / accumulation)."""
    ce = F.cross_entropy(p, y, label_smoothing=ls) + F.cross_entropy(q, y, label_smoothing=ls)
    p_loss = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="none")
    q_loss = F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="none")
    kl = p_loss.sum() + q_loss.sum()
    return ce + alpha * kl, ce, kl


def loss_mean(p, q, y, alpha, ls):
    ce = 0.5 * (F.cross_entropy(p, y, label_smoothing=ls) + F.cross_entropy(q, y, label_smoothing=ls))
    kl = 0.5 * (F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="batchmean")
                + F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="batchmean"))
    return ce + alpha * kl, ce, kl


LOSSES = {"reference": loss_reference, "mean": loss_mean}


def gen_loss():
    g = torch.Generator().manual_seed(1)
    m, c = 8, 10
    p0 = torch.randn(m, c, generator=g, dtype=torch.float64) * 2.0
    q0 = p0 + 0.7 * torch.randn(m, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (m,), generator=g)
    cases = []
    for mode in ["mean", "reference"]:
        for alpha, ls in [(0.3, 0.0), (1.0, 0.1)]:
            p = p0.clone().requires_grad_(True)
            q = q0.clone().requires_grad_(True)
            loss, ce, kl = LOSSES[mode](p, q, y, alpha, ls)
            loss.backward()
            cases.append({
                "mode": mode, "alpha": alpha, "label_smoothing": ls,
                "loss": loss.item(), "ce": ce.item(), "kl": kl.item(),
                "grad_p": p.grad.tolist(), "grad_q": q.grad.tolist(),
            })
    doc = {"p": p0.tolist(), "q": q0.tolist(), "y": y.tolist(), "cases": cases,
           "torch": torch.__version__}
    with open(os.path.join(OUT, "loss.json"), "w") as f:
        json.dump(doc, f, indent=None)


def gen_schedule():
    out = {}
    for name, cls in [("cosine", WarmupCosineSchedule), ("linear", WarmupLinearSchedule)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = cls(opt, warmup_steps=500, t_total=10000)
        lrs = []
        for _ in range(10000):
            sched.step()  # before optimizer.step(), as the reference's train loop
            lrs.append(sched.get_last_lr()[0])
        out[name] = torch.tensor(lrs, dtype=torch.float64)
    save_file(out, os.path.join(OUT, "schedule.safetensors"))


# ---- five updates of a small MLP ----
D_IN, HID, C = 6, 12, 4
MB, ACCUM, UPDATES, P_DROP = 4, 2, 5, 0.25

SCENARIOS = {
    # SGD momentum, weight decay on rank>=2 only, clipping active, reference loss, cosine.
    "sgd": dict(opt="sgd", lr=0.5, momentum=0.9, nesterov=False, wd=1e-2, wd_rank2=True,
                clip=0.5, mode="reference", alpha=0.3, ls=0.0, sched="cosine", warmup=2, total=6),
    # Nesterov, weight decay on all, no clipping, mean loss with label smoothing, linear decay.
    "nesterov": dict(opt="sgd", lr=0.2, momentum=0.9, nesterov=True, wd=5e-3, wd_rank2=False,
                     clip=None, mode="mean", alpha=1.0, ls=0.1, sched="linear", warmup=1, total=5),
    # AdamW with clipping and the mean loss.
    "adamw": dict(opt="adamw", lr=2e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.05, wd_rank2=False,
                  clip=1.0, mode="mean", alpha=0.3, ls=0.0, sched="cosine", warmup=2, total=6),
}


def gen_mlp():
    g = torch.Generator().manual_seed(7)
    init = {
        "w1": torch.randn(HID, D_IN, generator=g) * 0.5,
        "b1": torch.randn(HID, generator=g) * 0.1,
        "w2": torch.randn(C, HID, generator=g) * 0.5,
        "b2": torch.randn(C, generator=g) * 0.1,
    }
    n = UPDATES * ACCUM
    x = torch.randn(n, MB, D_IN, generator=g)
    y = torch.randint(0, C, (n, MB), generator=g)
    # One mask per concatenated [x; x] forward (2·MB rows), inverted dropout.
    keep = (torch.rand(n, 2 * MB, HID, generator=g) >= P_DROP).float()
    masks = keep / (1.0 - P_DROP)
    out = {f"init.{k}": v.clone() for k, v in init.items()}
    out["x"] = x
    out["y"] = y.to(torch.int64)
    out["masks"] = masks
    for name, s in SCENARIOS.items():
        params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        mats = [params["w1"], params["w2"]]
        vecs = [params["b1"], params["b2"]]
        if s["wd_rank2"]:
            groups = [{"params": mats, "weight_decay": s["wd"]}, {"params": vecs, "weight_decay": 0.0}]
        else:
            groups = [{"params": mats + vecs, "weight_decay": s["wd"]}]
        if s["opt"] == "sgd":
            opt = torch.optim.SGD(groups, lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"])
        else:
            opt = torch.optim.AdamW(groups, lr=s["lr"], betas=s["betas"], eps=s["eps"])
        cls = WarmupCosineSchedule if s["sched"] == "cosine" else WarmupLinearSchedule
        sched = cls(opt, warmup_steps=s["warmup"], t_total=s["total"])
        losses, ces, kls, norms, lrs = [], [], [], [], []
        for u in range(UPDATES):
            tot = ce_tot = kl_tot = 0.0
            for a in range(ACCUM):
                i = u * ACCUM + a
                xx = torch.cat([x[i], x[i]], dim=0)
                h = torch.tanh(xx @ params["w1"].T + params["b1"]) * masks[i]
                logits = h @ params["w2"].T + params["b2"]
                p, q = logits[:MB], logits[MB:]
                loss, ce, kl = LOSSES[s["mode"]](p, q, y[i], s["alpha"], s["ls"])
                (loss / ACCUM).backward()
                tot += loss.item() / ACCUM
                ce_tot += ce.item() / ACCUM
                kl_tot += kl.item() / ACCUM
            all_params = mats + vecs
            max_norm = s["clip"] if s["clip"] is not None else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(all_params, max_norm)
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            opt.zero_grad()
            losses.append(tot)
            ces.append(ce_tot)
            kls.append(kl_tot)
            norms.append(norm.item())
            for k, v in params.items():
                out[f"{name}.step{u + 1}.{k}"] = v.detach().clone()
        out[f"{name}.loss"] = torch.tensor(losses, dtype=torch.float64)
        out[f"{name}.ce"] = torch.tensor(ces, dtype=torch.float64)
        out[f"{name}.kl"] = torch.tensor(kls, dtype=torch.float64)
        out[f"{name}.grad_norm"] = torch.tensor(norms, dtype=torch.float64)
        out[f"{name}.lr"] = torch.tensor(lrs, dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "mlp.safetensors"))
    with open(os.path.join(OUT, "mlp_scenarios.json"), "w") as f:
        json.dump({"d_in": D_IN, "hidden": HID, "classes": C, "micro_batch": MB, "accum": ACCUM,
                   "updates": UPDATES, "scenarios": SCENARIOS}, f, indent=1)


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    gen_loss()
    gen_schedule()
    gen_mlp()
    print("fixtures written to", os.path.normpath(OUT))
