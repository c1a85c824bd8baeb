#!/usr/bin/env python3
"""Driver of scripts/gpu-check.sh: rdrop's CUDA build checked and measured against PyTorch on
one GPU machine, in one call, within a time budget. Run it through gpu-check.sh (which finds
the Python with torch and the CUDA libraries the binary needs).

Parts, each time-boxed; a failing part records its error in the JSON and the rest go on:
  env    the GPU, driver, torch, the binary and the libraries it resolved
  parity the CUDA test binaries (dist/cuda/tests or dist/cuda-pack/cuda-tests.tar.gz, from
         scripts/build-cuda.sh) run with --ignored: each CUDA kernel against its CPU twin and
         the CUDA engine against the CPU engine (same masks), resume exactness
  eval   `rdrop eval` of scripts/fixtures/gpu-check-vit on the demo test split: CPU f32 vs
         CUDA f32 (max |Δlogit| <= 1e-3, identical predictions) and CUDA bf16
         (max |Δlogit| <= 2e-2 · max|logit|); plus PyTorch/transformers' logits of the same model
  dp     data parallel through the real code path with world size 1 (torchrun's variables,
         NCCL all-reduce) against the same short demo run without them: losses per update
  memcheck `compute-sanitizer --tool memcheck` over one small training step of the engine
  train  `rdrop bench train` (vit-b16, 224, bf16, micro-batch 64) vs scripts/torch_gpu_step.py
         eager and --compile, back to back; then each at the largest micro-batch it fits
  data   (only with --with-data) `rdrop data bench` vs scripts/torchvision_loader.py at 224 px
The JSON (every figure and ratio, a top-level `summary` with the headline figures) is rewritten
after each part, printed at the end, and copied to gpu-check-<gpu>-<date>.json beside --out
(commit that one as docs/gpu-check-<gpu>-<date>.json).

usage: gpu_check.py --bin RDROP --python PY --out FILE [--budget SECONDS] [--dry-run]
  --dry-run: plumbing test on a machine without a GPU (tiny sizes, CPU; CUDA runs are
             expected to fail with rdrop's "no GPU" error, which is recorded)
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE_MODEL = REPO / "scripts/fixtures/gpu-check-vit"
DEMO_DATA = REPO / "rdrop-cli/assets/digits-demo.tar.gz"
F32_TOL, BF16_REL_TOL = 1e-3, 3e-2

T0 = time.monotonic()


def log(msg):
    print(f"[gpu-check {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Budget:
    def __init__(self, seconds):
        self.end = T0 + seconds

    def left(self):
        return self.end - time.monotonic()

    def box(self, want):
        """A part's timeout: what it wants, capped by what is left (keeping 5 s to write up)."""
        return max(1.0, min(want, self.left() - 5))


class MemSampler:
    """Peak device memory used (MiB) while a command runs, minus what was used before: the
    same yardstick for rdrop and PyTorch (context and allocator caches included)."""

    def __init__(self, enabled):
        self.enabled, self.peak, self.base, self._stop = enabled, None, None, threading.Event()
        self._read = None
        if not enabled:
            return
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
        except Exception:
            if shutil.which("nvidia-smi"):
                def read():
                    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                          "--format=csv,noheader,nounits", "-i", "0"],
                                         capture_output=True, text=True, timeout=5).stdout
                    return float(out.split()[0])
                self._read = read

    def __enter__(self):
        if self._read:
            try:
                self.base = self.peak = self._read()
                self._stop.clear()
                self._t = threading.Thread(target=self._loop, daemon=True)
                self._t.start()
            except Exception:
                self._read = None
        return self

    def _loop(self):
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, self._read())
            except Exception:
                pass

    def __exit__(self, *exc):
        if self._read and self.base is not None:
            self._stop.set()
            self._t.join(2)

    def result(self):
        if self.base is None or self.peak is None:
            return None
        return round((self.peak - self.base) / 1024, 3)  # GiB


def run(cmd, timeout, env=None, mem=False, keep_output=False):
    """Runs cmd (in its own process group, killed whole on timeout). Returns a dict with rc,
    seconds, the last JSON object printed on stdout (if any), stderr's tail, device memory
    (and, with keep_output, the tails of stdout and stderr)."""
    res = {"cmd": " ".join(str(c) for c in cmd)}
    if timeout < 8:  # the budget is spent: say so rather than start what cannot finish
        log("skipped (time budget spent): " + res["cmd"])
        return {**res, "rc": None, "skipped": "time budget spent"}
    log("$ " + res["cmd"] + f"   (timeout {timeout:.0f}s)")
    t = time.monotonic()
    sampler = MemSampler(mem)
    with sampler:
        try:
            p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                                 start_new_session=True)
        except OSError as e:
            return {**res, "rc": None, "error": f"cannot start: {e}"}
        try:
            out, err = p.communicate(timeout=timeout)
            res["rc"] = p.returncode
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
            out, err = p.communicate()
            res["rc"], res["timed_out"] = None, True
    res["s"] = round(time.monotonic() - t, 2)
    res["json"] = last_json(out)
    # rdrop train's header: the GPU, its compute capability and memory, the kernel image
    m = re.search(r"^(?:\[rank \d+\] )?GPU: (.*)$", err or "", re.M)
    if m:
        res["gpu_header"] = m.group(1)
    if keep_output:
        res["stdout"], res["stderr"] = (out or "")[-6000:], (err or "")[-3000:]
    gib = sampler.result()
    if gib is not None:
        res["device_mem_peak_gib"] = gib
    if res.get("rc") != 0:
        tail = (err or "").strip().splitlines()[-6:]
        res["error"] = ("timed out after %.0fs; " % timeout if res.get("timed_out") else "") + \
            " | ".join(tail)[-800:]
        log(f"   -> failed ({res['s']}s): {res['error'][:300]}")
    else:
        log(f"   -> ok ({res['s']}s)")
    return res


def last_json(text):
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def pick(d, *names):
    """First key of d (a flat-ish JSON object) whose name matches one of names (regexes)."""
    if not isinstance(d, dict):
        return None
    for n in names:
        for k, v in d.items():
            if re.fullmatch(n, k) and isinstance(v, (int, float)):
                return v
        for k, v in d.items():  # one level down, e.g. {"result": {...}}
            if isinstance(v, dict):
                r = pick(v, n)
                if r is not None:
                    return r
    return None


def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def samples_per_s(j):
    return pick(j, r"samples_per_s", r"rdrop_samples_per_s", r".*samples.*per.*s.*")


def peak_gib(j):
    return pick(j, r"peak_gib", r"peak_mem.*gib", r"peak.*gib", r"peak.*")


# ----------------------------------------------------------------------------------------------
class Check:
    def __init__(self, a):
        self.a = a
        self.dry = a.dry_run
        # --emulated: the real CUDA code paths on the emulated device (gpu-emu/), small sizes,
        # no PyTorch and no timings
        self.emu = a.emulated
        self.small = self.dry or self.emu
        self.budget = Budget(a.budget)
        self.out = Path(a.out)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.env = dict(os.environ)
        self.summary = {"script": "scripts/gpu-check.sh", "dry_run": self.dry, "emulated": self.emu,
                        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "budget_s": a.budget}
        self.cuda = "cpu" if self.dry else "cuda"
        self.cores = len(os.sched_getaffinity(0))

    def save(self):
        self.summary["elapsed_s"] = round(time.monotonic() - T0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2) + "\n")
        tmp.replace(self.out)

    def part(self, name, fn):
        log(f"== {name} ({self.budget.left():.0f}s left)")
        try:
            fn(self.summary.setdefault(name, {}))
        except Exception as e:  # record and go on
            self.summary[name]["error"] = f"{type(e).__name__}: {e}"
            log(f"   part {name} failed: {e}")
        self.save()

    def rdrop(self, *args):
        return [self.a.bin, *args]

    def py(self, script, *args):
        return [self.a.python, "-u", str(REPO / "scripts" / script), *args]

    # -- env ------------------------------------------------------------------------------------
    def env_part(self, s):
        s["cpu_cores"] = self.cores
        s["binary"] = str(self.a.bin)
        s["ld_library_path"] = os.environ.get("LD_LIBRARY_PATH", "")
        try:
            p = subprocess.run([self.a.bin, "--version"], capture_output=True, text=True, timeout=20)
            s["rdrop_version"] = p.stdout.strip() if p.returncode == 0 else f"error: {p.stderr.strip()[-400:]}"
        except (OSError, subprocess.SubprocessError) as e:
            s["rdrop_version"] = f"error: {e}"
        if shutil.which("ldd"):
            ldd = subprocess.run(["ldd", self.a.bin], capture_output=True, text=True, timeout=20).stdout
            s["libs"] = {m.group(1): m.group(2) for m in
                         re.finditer(r"^\s*(lib(?:cuda|cublas|cublasLt|curand|cudart|nvrtc)\S*) => (.*?)(?: \(0x[0-9a-f]+\))?$",
                                     ldd, re.M)}
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            s["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        r = run([self.a.python, "-c", "import json, torch, timm, torchvision; print(json.dumps({"
                 "'torch': torch.__version__, 'timm': timm.__version__, 'torchvision': torchvision.__version__, "
                 "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))"], 60)
        s["python"] = r.get("json") or r.get("error")

    # -- a. eval -------------------------------------------------------------------------------
    def eval_part(self, s):
        runs = [("cpu_f32", "cpu", "f32"), ("cuda_f32", self.cuda, "f32")]
        runs.append(("cuda_bf16", "cuda", "bf16"))  # on a dry run: the recorded no-GPU error
        logits = {}
        base = ["eval", "--weights", FIXTURE_MODEL, "--data", DEMO_DATA, "--batch-size", "100", "--json"]
        for key, dev, prec in runs:
            f = self.tmp / f"logits-{key}.npy"
            cmd = self.rdrop(*base, "--device", dev, "--dump-logits", f)
            if prec != "f32":
                cmd += ["--precision", prec]
            r = run(cmd, self.budget.box(90), self.env, mem=dev == "cuda" and not self.dry)
            if r.get("rc") != 0 and "dump-logits" in (r.get("error") or ""):
                # an rdrop without the hidden --dump-logits: compare the metrics only
                cmd = [c for c in cmd if c not in ("--dump-logits", f)]
                r = run(cmd, self.budget.box(90), self.env)
            s[key] = dict(r)
            s[key]["metrics"] = s[key].pop("json", None)
            if r.get("rc") == 0 and f.exists():
                logits[key] = load_npy(f)
        if "cpu_f32" in logits and not self.emu:
            s["torch_reference"] = self.torch_eval_reference(logits["cpu_f32"])
        ref = logits.get("cpu_f32")
        for key, tol, rel in (("cuda_f32", F32_TOL, False), ("cuda_bf16", BF16_REL_TOL, True)):
            if ref is None or key not in logits:
                if ref is not None or key in logits:
                    s[f"{key}_vs_cpu"] = {"error": "logits missing (see the runs above)"}
                continue
            s[f"{key}_vs_cpu"] = compare(ref, logits[key], tol, rel)
        if ref is None:  # fall back to the metrics
            m = {k: s.get(k, {}).get("metrics") for k in ("cpu_f32", "cuda_f32")}
            if all(isinstance(v, dict) for v in m.values()):
                s["metrics_only"] = {
                    "loss_abs_diff": abs(pick(m["cpu_f32"], "loss") - pick(m["cuda_f32"], "loss")),
                    "top1_equal": pick(m["cpu_f32"], "top1") == pick(m["cuda_f32"], "top1")}

    def torch_eval_reference(self, rd):
        """transformers' logits of the fixture model on the same test images (CPU, f64)."""
        code = f"""
import json, pickle, tarfile, numpy as np, torch
from transformers import ViTForImageClassification
t = tarfile.open({str(DEMO_DATA)!r}); d = pickle.loads(t.extractfile('cifar-100-python/test').read())
x = torch.from_numpy(np.asarray(d['data'], dtype=np.uint8).reshape(-1, 3, 32, 32).copy()).double()
m = ViTForImageClassification.from_pretrained({str(FIXTURE_MODEL)!r}).double().eval()
with torch.no_grad(): l = m(pixel_values=(x / 255 - 0.5) / 0.5).logits.numpy()
np.save({str(self.tmp / 'logits-torch.npy')!r}, l)
print(json.dumps({{'top1': float((l.argmax(-1) == np.asarray(d['fine_labels'])).mean())}}))
"""
        r = run([self.a.python, "-c", code], self.budget.box(90))
        if r.get("rc") != 0:
            return {"error": r.get("error")}
        tl = load_npy(self.tmp / "logits-torch.npy")
        if len(tl) != len(rd):
            return {"error": f"{len(tl)} rows vs rdrop's {len(rd)}"}
        return {"top1": r["json"]["top1"], "rdrop_cpu_vs_transformers": compare(tl, rd, 1e-4, False)}

    # -- parity: the ignored CUDA tests ----------------------------------------------------------
    def parity_part(self, s):
        folder = REPO / "dist/cuda/tests"
        pack = REPO / "dist/cuda-pack/cuda-tests.tar.gz"
        if not (folder.is_dir() and any(folder.iterdir())):
            if not pack.exists():
                s["error"] = f"no CUDA test binaries: neither {folder} nor {pack} (scripts/build-cuda.sh)"
                s["pass"] = False
                return
            subprocess.run(["tar", "-C", str(self.tmp), "-xzf", str(pack)], check=True, timeout=60)
            folder = self.tmp / "tests"
        ok, passed, failed = True, 0, 0
        for b in sorted(folder.iterdir()):
            # RDROP_REPO: where the fixtures are here (the binaries were built elsewhere)
            skip = ["--skip", "autograd"] if self.emu else []  # candle's kernels: not emulated
            r = run([b, "--ignored", "--test-threads", "1", *skip], self.budget.box(150),
                    dict(self.env, RDROP_REPO=str(REPO)), keep_output=True)
            out = r.pop("stdout", "")
            tests = dict(re.findall(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", out, re.M))
            m = re.search(r"test result: \w+\. (\d+) passed; (\d+) failed", out)
            p, f = (int(m.group(1)), int(m.group(2))) if m else (0, None)
            fails = [ln for ln in out.splitlines() if "panicked" in ln or ln.startswith("---- ")]
            s[b.name] = {"rc": r.get("rc"), "s": r.get("s"), "passed": p, "failed": f,
                         "tests": tests, **({"failures": fails[:20], "error": r.get("error")}
                                            if r.get("rc") != 0 else {})}
            ok &= r.get("rc") == 0 and p > 0
            passed, failed = passed + p, failed + (f or 0)
        s["passed"], s["failed"], s["pass"] = passed, failed, bool(ok and passed > 0)

    # -- dp: world size 1 through NCCL ------------------------------------------------------------
    def dp_part(self, s):
        import socket

        steps = 6 if self.small else 30
        base = ["train", "--preset", "demo", "--data", "builtin:digits", "--steps", steps,
                "--device", self.cuda, "--json"]
        plain = run(self.rdrop(*base, "--out", self.tmp / "dp-plain"), self.budget.box(120), self.env)
        with socket.socket() as so:
            so.bind(("127.0.0.1", 0))
            port = so.getsockname()[1]
        env1 = dict(self.env, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # Gradient buckets of one block each (summed on the NCCL stream during the backward),
        # and the single all-reduce after the backward (--grad-bucket-mb 0): both must give
        # the plain run's losses.
        dist = run(self.rdrop(*base, "--grad-bucket-mb", "1e-6", "--out", self.tmp / "dp-nccl"),
                   self.budget.box(120), env1)
        flat = run(self.rdrop(*base, "--grad-bucket-mb", "0", "--out", self.tmp / "dp-nccl-flat"),
                   self.budget.box(120), env1)
        s["plain"], s["world1"], s["world1_one_all_reduce"] = plain, dist, flat
        # which GPU and kernel image (cubin sm_XY, or PTX the driver compiled) the run says
        s["gpu_header"] = plain.get("gpu_header")
        s["world_size"] = pick(dist.get("json"), r"world_size", r"world")
        s["collective"] = (dist.get("json") or {}).get("collective")

        def losses(d):
            f = d / "metrics.jsonl"
            if not f.exists():
                return None
            rows = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
            return [(r.get("step"), r.get("loss")) for r in rows if r.get("kind") == "train"]

        a, b = losses(self.tmp / "dp-plain"), losses(self.tmp / "dp-nccl")
        c = losses(self.tmp / "dp-nccl-flat")
        if not a or not b or not c:
            s["error"] = s.get("error") or "a run wrote no train losses (see plain / world1*)"
            s["pass"] = False
            return
        diff = max((abs(x[1] - y[1]) for x, y in zip(a, b)), default=None)
        diff_flat = max((abs(x[1] - y[1]) for x, y in zip(a, c)), default=None)
        s["updates_compared"], s["max_abs_loss_diff"] = min(len(a), len(b)), diff
        s["max_abs_loss_diff_one_all_reduce"] = diff_flat
        s["tolerance"] = 1e-6
        # the second run must say it ran distributed (a binary that ignored the variables
        # would compare a plain run with itself)
        s["pass"] = bool(len(a) == len(b) == len(c) and diff is not None and diff <= 1e-6
                         and diff_flat is not None and diff_flat <= 1e-6
                         and plain.get("rc") == 0 and dist.get("rc") == 0 and flat.get("rc") == 0
                         and s["world_size"] == 1 and (self.dry or s["collective"] == "nccl"))

    # -- memcheck ---------------------------------------------------------------------------------
    def memcheck_part(self, s):
        import glob

        if self.emu:
            s["skipped"], s["pass"] = "emulated: the emulator checks every access of every run above", None
            return
        cs = shutil.which("compute-sanitizer") or next(iter(sorted(glob.glob(
            "/usr/local/cuda*/bin/compute-sanitizer") + glob.glob("/opt/nvidia/*/compute-sanitizer"))), None)
        if not cs:
            s["skipped"], s["pass"] = "compute-sanitizer not found", None
            return
        r = run([cs, "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "20",
                 *self.rdrop("bench", "train", "--model", "cpu-small", "--image-size", 32,
                             "--micro-batch", 4, "--steps", 1, "--warmup", 1, "--precision",
                             "f32" if self.dry else "bf16", "--device", self.cuda, "--json")],
                self.budget.box(180), self.env, keep_output=True)
        text = r.pop("stdout", "") + r.pop("stderr", "")
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        s["run"], s["errors"] = r, int(m.group(1)) if m else None
        s["reports"] = [ln for ln in text.splitlines() if ln.startswith("=========")][:40]
        if "Device not supported" in text or "not supported on this" in text:
            s["pass"], s["unsupported"] = None, "compute-sanitizer refused the device (gVisor machines do)"
        else:
            s["pass"] = bool(r.get("rc") == 0 and s["errors"] == 0)

    # -- c. data -------------------------------------------------------------------------------
    def data_part(self, s):
        size, batches = (64, 10) if self.dry else (224, 300)
        threads = self.cores
        r = run(self.rdrop("data", "bench", "--image-size", size, "--batch-size", 64, "--batches",
                           batches, "--threads", threads, "--json"), self.budget.box(60), self.env)
        s["rdrop"] = r
        t = run(self.py("torchvision_loader.py", "--image-size", size, "--workers", threads,
                        "--images", 64 * batches), self.budget.box(90))
        s["torchvision"] = t
        ri, ti = pick(r.get("json"), "images_per_s"), pick(t.get("json"), "images_per_s")
        s["images_per_s"] = {"rdrop": ri, "torchvision": ti, "ratio_rdrop_over_torchvision": ratio(ri, ti)}

    # -- b. train ------------------------------------------------------------------------------
    def bench_args(self):
        if self.dry:
            return "cpu-small", 32, "f32", 2
        if self.emu:
            return "cpu-small", 32, "bf16", 2
        return "vit-b16", 224, "bf16", 20

    def rdrop_train(self, mb, steps, timeout, warmup=3):
        model, size, prec, _ = self.bench_args()
        return run(self.rdrop("bench", "train", "--model", model, "--image-size", size, "--micro-batch",
                              mb, "--steps", steps, "--warmup", warmup, "--precision", prec,
                              "--device", self.cuda, "--json"),
                   timeout, self.env, mem=not self.dry)

    def torch_train(self, mb, steps, timeout, *extra):
        model, size, prec, _ = self.bench_args()
        return run(self.py("torch_gpu_step.py", "--model", model, "--image-size", size, "--micro-batch", mb,
                           "--steps", steps, "--warmup", 2 if self.dry else 3, "--precision", prec,
                           "--device", self.cuda, *extra), timeout, mem=not self.dry)

    def train_part(self, s):
        _, _, _, steps = self.bench_args()
        mb = 8 if self.small else 64
        s["micro_batch"] = mb
        s["rdrop"] = self.rdrop_train(mb, steps, self.budget.box(120))
        # Where rdrop's step goes: op groups timed by CUDA events (FLOPs, bytes, TFLOP/s)
        model, size, prec, _ = self.bench_args()
        p = run(self.rdrop("bench", "train", "--model", model, "--image-size", size, "--micro-batch", mb,
                           "--steps", max(2, steps // 4), "--warmup", 2, "--precision", prec,
                           "--device", self.cuda, "--engine", "explicit", "--profile", "--json"),
                self.budget.box(90), self.env)
        pj = p.get("json") or {}
        s["rdrop_profile"] = {"rc": p.get("rc"), "step_ms": pj.get("step_ms"), "profile_ms": pj.get("profile_ms"),
                              "step_tflops": pj.get("step_tflops"), "profile": pj.get("profile"),
                              **({"error": p.get("error")} if p.get("rc") != 0 else {})}
        if self.emu:  # the CUDA path ran; timings and PyTorch mean nothing here
            s["skipped"] = "emulated: no PyTorch, no timings"
            return
        # PyTorch eager with torch.profiler's per-op table over 3 more steps
        s["torch_eager"] = self.torch_train(mb, steps, self.budget.box(150), "--profile", 3)
        s["torch_compile"] = self.torch_train(mb, steps, self.budget.box(240), "--compile")
        s["summary"] = self.train_ratios(s["rdrop"], s["torch_eager"], s["torch_compile"])
        # what dropout's random masks cost rdrop (if this rdrop's bench takes --dropout)
        h = subprocess.run([self.a.bin, "bench", "train", "--help"], capture_output=True, text=True,
                           timeout=20, env=self.env).stdout
        if "--dropout" in h and s["rdrop"].get("rc") == 0:
            model, size, prec, _ = self.bench_args()
            r = run(self.rdrop("bench", "train", "--model", model, "--image-size", size, "--micro-batch", mb,
                               "--steps", steps, "--precision", prec, "--device", self.cuda, "--dropout", "0",
                               "--json"), self.budget.box(90), self.env)
            s["rdrop_dropout0"] = r
            s["summary"]["rdrop_dropout0_samples_per_s"] = samples_per_s(r.get("json"))
            s["summary"]["ratio_rdrop_dropout0_over_rdrop"] = ratio(samples_per_s(r.get("json")),
                                                                    samples_per_s(s["rdrop"].get("json")))

    def train_ratios(self, rd, te, tc):
        rj, ej, cj = rd.get("json"), te.get("json"), tc.get("json")
        out = {"samples_per_s": {"rdrop": samples_per_s(rj), "torch_eager": samples_per_s(ej),
                                 "torch_compile": samples_per_s(cj)},
               "peak_gib_self_reported": {"rdrop": peak_gib(rj), "torch_eager": peak_gib(ej),
                                          "torch_compile": peak_gib(cj)},
               "device_mem_peak_gib": {"rdrop": rd.get("device_mem_peak_gib"),
                                       "torch_eager": te.get("device_mem_peak_gib"),
                                       "torch_compile": tc.get("device_mem_peak_gib")}}
        sp, dm = out["samples_per_s"], out["device_mem_peak_gib"]
        out["ratio_rdrop_over_torch_eager"] = ratio(sp["rdrop"], sp["torch_eager"])
        out["ratio_rdrop_over_torch_compile"] = ratio(sp["rdrop"], sp["torch_compile"])
        out["mem_ratio_rdrop_over_torch_eager"] = ratio(dm["rdrop"], dm["torch_eager"])
        out["goal_rdrop_at_least_torch_eager"] = (out["ratio_rdrop_over_torch_eager"] or 0) >= 1.0
        mr = out["mem_ratio_rdrop_over_torch_eager"]
        out["goal_peak_mem_no_higher_than_torch_eager"] = None if mr is None else mr <= 1.0
        return out

    def max_part(self, s):
        _, _, _, steps = self.bench_args()
        gran = 8 if self.dry else 16
        limit = 32 if self.dry else 2048
        # rdrop: one process per probe (an OOM ends the process); doubling, then bisection
        probes, lo, hi, b = [], 0, None, (8 if self.dry else 64)
        if (self.summary.get("train_mb64", {}).get("rdrop") or {}).get("rc") == 0:
            mb = self.summary["train_mb64"]["micro_batch"]
            probes.append({"micro_batch": mb, "fits": True, "s": None, "note": "train_mb64 ran"})
            lo, b = mb, 2 * mb
        deadline = time.monotonic() + min(150, self.budget.left() * 0.45)
        while b <= limit and time.monotonic() < deadline:
            r = self.rdrop_train(b, 1, self.budget.box(min(90, deadline - time.monotonic() + 30)), warmup=1)
            probes.append({"micro_batch": b, "fits": r.get("rc") == 0, "s": r.get("s"),
                           **({"error": r.get("error")} if r.get("rc") != 0 else {})})
            if r.get("rc") != 0:
                hi = b
                break
            lo, b = b, b * 2
        while hi is not None and lo and hi - lo > gran and time.monotonic() < deadline:
            mid = (lo + hi) // 2 // gran * gran
            if mid <= lo:
                break
            r = self.rdrop_train(mid, 1, self.budget.box(90), warmup=1)
            ok = r.get("rc") == 0
            probes.append({"micro_batch": mid, "fits": ok, "s": r.get("s"),
                           **({"error": r.get("error")} if not ok else {})})
            lo, hi = (mid, hi) if ok else (lo, mid)
        s["rdrop_probes"] = probes
        s["rdrop_max_micro_batch"] = lo
        s["rdrop_max_search_complete"] = hi is None or hi - lo <= gran
        if lo:
            s["rdrop"] = self.rdrop_train(lo, steps, self.budget.box(120))
        # PyTorch eager: in-process search (OOM is recoverable there), then measured at its max
        s["torch_eager"] = self.torch_train(64 if not self.dry else 8, steps, self.budget.box(200),
                                            "--find-max-micro-batch", "--granularity", gran,
                                            "--max-limit", limit)
        tmax = (s["torch_eager"].get("json") or {}).get("max_micro_batch")
        s["torch_max_micro_batch"] = tmax
        # compiled at PyTorch's eager max (one more compile), if time allows
        if tmax and self.budget.left() > (60 if self.dry else 150):
            s["torch_compile"] = self.torch_train(tmax, steps, self.budget.box(200), "--compile",
                                                  "--fallback-on-oom")
        else:
            s["torch_compile"] = {"skipped": "not enough time left"}
        sm = self.train_ratios(s.get("rdrop", {}), s["torch_eager"], s["torch_compile"])
        sm["micro_batch"] = {"rdrop": lo, "torch": tmax}
        sm["ratio_max_micro_batch_rdrop_over_torch"] = ratio(lo, tmax)
        s["summary"] = sm

    def main(self):
        self.part("env", self.env_part)
        self.part("parity", self.parity_part)
        self.part("eval", self.eval_part)
        self.part("dp", self.dp_part)
        self.part("memcheck", self.memcheck_part)
        self.part("train_mb64", self.train_part)
        if not self.emu:
            self.part("train_max", self.max_part)
        if self.a.with_data:
            self.part("data", self.data_part)
        self.summary["summary"] = issue_summary(self.summary)
        if self.emu:
            g = lambda *ks: _get(self.summary, ks)
            self.summary["summary"]["emulated_pass"] = bool(
                g("parity", "pass") and g("eval", "cuda_f32_vs_cpu", "pass")
                and g("eval", "cuda_bf16_vs_cpu", "pass") and g("dp", "pass")
                and g("train_mb64", "rdrop", "rc") == 0
                and g("train_mb64", "rdrop_profile", "rc") == 0
                and all(k in row for row in (g("train_mb64", "rdrop_profile", "profile") or [{}])
                        for k in ("group", "ms", "flops", "bytes")))
        self.summary["headline"] = headline(self.summary)
        self.save()
        gpu = re.sub(r"[^a-z0-9]+", "-", str(_get(self.summary, ("env", "python", "gpu")) or
                                            ("dry-run" if self.dry else "emulated" if self.emu else "gpu")).lower())
        gpu = re.sub(r"^nvidia-", "", gpu).strip("-") or "gpu"
        dated = self.out.parent / f"gpu-check-{gpu}-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
        shutil.copy(self.out, dated)
        log(f"copied to {dated} (commit it as docs/{dated.name})")
        shutil.rmtree(self.tmp, ignore_errors=True)
        print(json.dumps(self.summary, indent=2))
        print("HEADLINE " + json.dumps(self.summary["headline"]))


def load_npy(path):
    """A 2-D little-endian f32/f64 .npy (rdrop eval --dump-logits) as a list of rows of floats,
    without numpy."""
    import ast
    import struct

    b = Path(path).read_bytes()
    if b[:6] != b"\x93NUMPY":
        raise ValueError(f"{path}: not a .npy file")
    hlen = struct.unpack("<H", b[8:10])[0] if b[6] == 1 else struct.unpack("<I", b[8:12])[0]
    start = 10 if b[6] == 1 else 12
    h = ast.literal_eval(b[start:start + hlen].decode("latin1"))
    code = {"<f4": "f", "<f8": "d"}[h["descr"]]
    shape = h["shape"]
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    vals = struct.unpack(f"<{rows * cols}{code}", b[start + hlen:start + hlen + rows * cols * struct.calcsize(code)])
    if h.get("fortran_order"):
        return [[vals[c * rows + r] for c in range(cols)] for r in range(rows)]
    return [list(vals[r * cols:(r + 1) * cols]) for r in range(rows)]


def compare(ref, got, tol, relative):
    """Logits (lists of rows) against a reference: max |Δ|, predictions, near ties."""
    if len(ref) != len(got) or any(len(a) != len(b) for a, b in zip(ref, got)):
        return {"error": "shapes differ", "pass": False}
    d = [abs(x - y) for a, b in zip(ref, got) for x, y in zip(a, b)]
    max_ref = max(abs(x) for a in ref for x in a)
    scale = max_ref if relative else 1.0
    argmax = lambda row: max(range(len(row)), key=lambda i: row[i])
    margins = [sorted(a)[-1] - sorted(a)[-2] if len(a) > 1 else float("inf") for a in ref]
    mism = [argmax(a) != argmax(b) for a, b in zip(ref, got)]
    out = {"n": len(ref), "max_abs_diff": max(d), "mean_abs_diff": sum(d) / len(d),
           "max_abs_ref": max_ref, "tolerance": tol,
           "criterion": "max|Δ| <= tol·max|ref|" if relative else "max|Δ| <= tol",
           "prediction_mismatches": sum(mism),
           # a mismatch where the reference's top-2 margin is below the tolerance is a near-tie
           "mismatches_beyond_near_ties": sum(1 for m, g in zip(mism, margins) if m and g > 2 * tol * scale),
           "min_top2_margin": min(margins)}
    out["pass"] = bool(max(d) <= tol * scale and out["mismatches_beyond_near_ties"] == 0)
    out["identical_predictions"] = out["prediction_mismatches"] == 0
    return out


def issue_summary(s):
    """The headline figures (step throughput and memory against PyTorch, the checks' passes), at the top of the JSON."""
    g = lambda *ks: _get(s, ks)
    out = {
        "train_ratio_vs_eager": g("train_mb64", "summary", "ratio_rdrop_over_torch_eager"),
        "train_ratio_vs_compile": g("train_mb64", "summary", "ratio_rdrop_over_torch_compile"),
        "peak_mem_ratio_vs_eager": g("train_mb64", "summary", "mem_ratio_rdrop_over_torch_eager"),
        "engine_parity_pass": g("parity", "pass"),
        "max_micro_batch_rdrop": g("train_max", "rdrop_max_micro_batch"),
        "max_micro_batch_torch": g("train_max", "torch_max_micro_batch"),
        "eval_f32_pass": g("eval", "cuda_f32_vs_cpu", "pass"),
        "eval_bf16_pass": g("eval", "cuda_bf16_vs_cpu", "pass"),
        "memcheck_pass": g("memcheck", "pass"),
        "memcheck_errors": g("memcheck", "errors"),
        "data_parallel_pass": g("dp", "pass"),
        "data_parallel_world_size": g("dp", "world_size"),
        "micro_batch": g("train_mb64", "micro_batch"),
    }
    num = lambda v: v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    mr, mt = num(out["max_micro_batch_rdrop"]), num(out["max_micro_batch_torch"])
    out["goals"] = {
        "train_ratio_vs_eager_ge_1_3": None if num(out["train_ratio_vs_eager"]) is None else out["train_ratio_vs_eager"] >= 1.3,
        "train_ratio_vs_compile_ge_1_0": None if num(out["train_ratio_vs_compile"]) is None else out["train_ratio_vs_compile"] >= 1.0,
        "peak_mem_ratio_vs_eager_le_1_0": None if num(out["peak_mem_ratio_vs_eager"]) is None else out["peak_mem_ratio_vs_eager"] <= 1.0,
        "max_micro_batch_at_least_torch": None if mr is None or mt is None else mr >= mt,
        "engine_parity_pass": out["engine_parity_pass"],
    }
    return out


def headline(s):
    g = lambda *ks: _get(s, ks)
    return {
        "gpu": g("env", "python", "gpu") or g("env", "nvidia_smi"),
        "summary": g("summary"),
        "eval_f32_pass": g("eval", "cuda_f32_vs_cpu", "pass"),
        "eval_f32_max_abs_diff": g("eval", "cuda_f32_vs_cpu", "max_abs_diff"),
        "eval_bf16_pass": g("eval", "cuda_bf16_vs_cpu", "pass"),
        "eval_bf16_max_abs_diff": g("eval", "cuda_bf16_vs_cpu", "max_abs_diff"),
        "train_mb64_samples_per_s": g("train_mb64", "summary", "samples_per_s"),
        "train_mb64_rdrop_over_torch_eager": g("train_mb64", "summary", "ratio_rdrop_over_torch_eager"),
        "train_mb64_rdrop_over_torch_compile": g("train_mb64", "summary", "ratio_rdrop_over_torch_compile"),
        "train_mb64_device_mem_peak_gib": g("train_mb64", "summary", "device_mem_peak_gib"),
        "train_max_micro_batch": g("train_max", "summary", "micro_batch"),
        "train_max_samples_per_s": g("train_max", "summary", "samples_per_s"),
        "train_max_rdrop_over_torch_eager": g("train_max", "summary", "ratio_rdrop_over_torch_eager"),
        "data_images_per_s": g("data", "images_per_s"),
        "errors": errors(s),
        "elapsed_s": round(time.monotonic() - T0, 1),
    }


def errors(d, path=""):
    """Every recorded error, as "part.run: message" (messages cut to 200 characters)."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            if k == "error" and v:
                out.append(f"{path or 'top'}: {str(v)[:200]}")
            elif k not in ("headline",):
                out += errors(v, f"{path}.{k}" if path else k)
    elif isinstance(d, list):
        for i, v in enumerate(d):
            if isinstance(v, dict) and v.get("fits") is False:
                continue  # an OOM probe is the expected end of a search
            out += errors(v, f"{path}[{i}]")
    return out


def _get(d, ks):
    for k in ks:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=450, help="seconds for everything")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--emulated", action="store_true",
                    help="on the emulated device of gpu-emu/ (scripts/gpu-emu-check.sh): small sizes, "
                         "the real CUDA code paths, no PyTorch, no timings")
    ap.add_argument("--with-data", action="store_true",
                    help="also compare the data loader with torchvision (not part of the headline figures)")
    Check(ap.parse_args()).main()
