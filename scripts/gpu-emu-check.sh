#!/usr/bin/env bash
# rdrop's CUDA code checked without a GPU: the UNCHANGED binaries that scripts/build-cuda.sh
# builds (the release `rdrop` and the two GPU test binaries) run on the CPU against the emulated
# CUDA stack of gpu-emu/ (driver with memory checks, host-compiled kernels, cuBLASLt, NCCL
# between processes; see gpu-emu/README.md). Writes target/gpu-emu/summary.json and exits
# non-zero when a mark is missed.
#
# usage: scripts/gpu-emu-check.sh [--skip-build] [--only PART[,PART…]]
#   parts: symbols tests archs fit profile demo eval resume dp2 mutations gpucheck (default: all)
# Environment:
#   GPU_EMU_DEMO_STEPS   updates of the bf16/f16 demo runs (default 400, 95 % top-1 on the CPU; the
#                        CPU run of the same command must reach ≥ 90 %, checked and recorded)
#   RDROP_EMU_THREADS    host threads per kernel (default: the cores)
#   RDROP_EMU_OUT        where the libraries, runs and summary.json go (default target/gpu-emu)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${RDROP_EMU_OUT:-$REPO/target/gpu-emu}
# the emulator as cargo builds it below (CARGO_TARGET_DIR as cargo reads it)
EMU=${CARGO_TARGET_DIR:-$REPO/target}/release/rdrop-gpu-emu
LIB=$OUT/lib
BIN=$REPO/dist/cuda/rdrop
TESTS=$REPO/dist/cuda/tests
SKIP_BUILD=0
ONLY=all
while [[ $# -gt 0 ]]; do
    case $1 in
    --skip-build) SKIP_BUILD=1 ;;
    --only)
        [[ $# -ge 2 ]] || { echo "gpu-emu-check.sh: --only needs a list of parts (try --help)" >&2; exit 2; }
        ONLY=$2
        for p in ${ONLY//,/ }; do
            case $p in
            symbols | tests | archs | fit | profile | demo | eval | resume | dp2 | mutations | gpucheck) ;;
            *) echo "gpu-emu-check.sh: unknown part '$p' (parts: symbols tests archs fit profile demo eval resume dp2 mutations gpucheck)" >&2; exit 2 ;;
            esac
        done
        shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-emu-check.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
want() { [[ $ONLY == all || ",$ONLY," == *",$1,"* ]]; }
say() { echo "[gpu-emu] $*" >&2; }
T0=$(date +%s)
mkdir -p "$OUT"
RES=$OUT/results
rm -rf "$RES" && mkdir -p "$RES"
# one line per figure: `key value` (value is JSON); summary.json is assembled at the end
put() { echo "$1 $2" >>"$RES/figures"; }

if [[ $SKIP_BUILD == 0 ]]; then
    say "building the CUDA binaries (scripts/build-cuda.sh)"
    "$REPO/scripts/build-cuda.sh" || { say "scripts/build-cuda.sh failed"; exit 1; }
fi
say "building the emulator (cargo build --release -p rdrop-gpu-emu)"
(cd "$REPO" && cargo build --release -q -p rdrop-gpu-emu) || { say "the emulator does not build"; exit 1; }
"$EMU" install "$LIB" >"$RES/install.txt" || exit 1

export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export RDROP_NCCL_LIBRARY=$LIB/libnccl.so.2 RDROP_EMU_KERNELS=$LIB/kernels RDROP_REPO=$REPO
export RUST_BACKTRACE=0
RUNS=$OUT/runs
rm -rf "$RUNS" && mkdir -p "$RUNS"

if want symbols; then
    say "symbols: every import of the binaries is exported by the emulator"
    if "$EMU" check-symbols "$LIB" "$BIN" "$TESTS"/* >"$RES/symbols.txt" 2>&1; then
        put symbols_complete true
    else
        cat "$RES/symbols.txt" >&2
        put symbols_complete false
    fi
    # The kernels' fat binaries in the shipped binary (what cuobjdump --list-elf lists): each of
    # rdrop's (one per rdrop-kernels/src/cuda/*.cu) must hold cubins for sm_75, 80, 86, 89 and
    # 90 and PTX for compute_75 (CUDA 13); candle's own few, sm_90 cubins of kernels rdrop never
    # launches, are counted apart.
    say "images: the architectures of the kernels' fat binaries in $BIN"
    "$EMU" images "$BIN" >"$RES/images.json" 2>&1
    head -c 300 "$RES/images.json" >&2; echo " …" >&2
    put kernel_images "$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
want = [75, 80, 86, 89, 90]
ours = [f for f in d["fatbins"] if f["ptx"]]  # those of rdrop carry PTX, the sm_90 cubins of candle do not
print(json.dumps({"fatbins": len(ours), "cubins": d["cubins"], "ptx": d["ptx"],
                  "others": len(d["fatbins"]) - len(ours),
                  "complete": len(ours) == int(sys.argv[2]) and all(f["cubins"] == want and f["ptx"] == [75] for f in ours)}))
' "$RES/images.json" "$(ls "$REPO"/rdrop-kernels/src/cuda/*.cu | wc -l)" 2>/dev/null || echo null)"
    # A machine without a GPU: one line of error, even with RUST_BACKTRACE=1 (candle appends
    # its captured backtrace to its errors' text).
    say "errors: no GPU (RDROP_EMU_DEVICES=0, RUST_BACKTRACE=1) gives a one-line error"
    RDROP_EMU_DEVICES=0 RUST_BACKTRACE=1 "$BIN" train --preset demo --device cuda --steps 1 \
        --out "$RUNS/no-gpu" >/dev/null 2>"$RES/no-gpu.txt"
    rc=$?
    n=$(grep -c . "$RES/no-gpu.txt")
    if [[ $rc == 1 ]] && grep -q "no CUDA GPU found" "$RES/no-gpu.txt"; then
        put no_gpu_error_lines "$n"
    else
        cat "$RES/no-gpu.txt" >&2
        put no_gpu_error_lines null
    fi
fi

# ------------------------------------------------------------------------------ GPU tests
if want tests; then
    passed=0 failed=0 ignored=0
    for t in "$TESTS"/*; do
        name=$(basename "$t")
        say "GPU tests: $name --ignored (tests that need candle's kernels, named *autograd*, are skipped)"
        rc=0
        "$t" --ignored --skip autograd --test-threads 1 >"$RES/tests-$name.txt" 2>&1 || rc=$?
        line=$(grep -E '^test result:' "$RES/tests-$name.txt" | tail -1)
        p=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$line")
        f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
        [[ $p =~ ^[0-9]+$ ]] || p=0
        [[ $f =~ ^[0-9]+$ ]] || {
            f=1
            say "$name did not finish (exit $rc): the end of $RES/tests-$name.txt"
            tail -n 15 "$RES/tests-$name.txt" >&2
        }
        # the skipped ones: listed ignored tests whose name says autograd
        s=$("$t" --list --ignored 2>/dev/null | grep -c 'autograd.*: test' || true)
        passed=$((passed + p)) failed=$((failed + f)) ignored=$((ignored + s))
        grep -E '^test .*(FAILED|ok)$|rdrop-gpu-emu:' "$RES/tests-$name.txt" | head -40 >&2
    done
    put gpu_tests_passed $passed
    put gpu_tests_failed $failed
    put gpu_tests_ignored $ignored
fi

# ------------------------------------------------------------------- GPU architectures
# One update and the evaluation of the demo on emulated GPUs of each compute capability: the
# driver's choice from the fat binaries (the run's header says it), and a V100 refused.
if want archs; then
    say "archs: the kernel image and precision auto of each GPU (T4, A100, RTX 3090, RTX 4090, H100, cc 12.0; V100 refused)"
    declare -A WANT_IMG=([t4]="cubin sm_75" [a100-80]="cubin sm_80" [rtx3090]="cubin sm_86"
        [rtx4090]="cubin sm_89" [h100]="cubin sm_90" [cc12]="PTX compute_75")
    declare -A WANT_PREC=([t4]=f16 [a100-80]=bf16 [rtx3090]=bf16 [rtx4090]=bf16 [h100]=bf16 [cc12]=bf16)
    images="{" precisions="{"
    for g in t4 a100-80 rtx3090 rtx4090 h100 cc12 v100-16; do
        env=(RDROP_EMU_GPU=$g)
        [[ $g == cc12 ]] && env=(RDROP_EMU_GPU=h100 RDROP_EMU_CC=12.0)
        env "${env[@]}" "$BIN" train --preset demo --device cuda --precision auto --steps 1 \
            --eval-every 0 --train-images 64 --out "$RUNS/arch-$g" >"$RES/arch-$g.txt" 2>&1
        rc=$?
        if [[ $g == v100-16 ]]; then
            ok=false
            [[ $rc == 1 ]] && grep -q "no kernel image for this GPU (compute capability 7.0)" "$RES/arch-$g.txt" && ok=true
            # and bf16 asked for on it: refused, naming the GPU and the alternative
            RDROP_EMU_GPU=$g "$BIN" train --preset demo --device cuda --precision bf16 --dry-run \
                >/dev/null 2>"$RES/arch-$g-bf16.txt"
            rc=$?
            [[ $rc == 1 ]] && grep -q "Tesla V100-SXM2-16GB is 7.0: use --precision f16" "$RES/arch-$g-bf16.txt" || ok=false
            put v100_refused $ok
            [[ $ok == true ]] || tail -n 5 "$RES/arch-$g.txt" "$RES/arch-$g-bf16.txt" >&2
            continue
        fi
        prec=$(sed -n 's/^training .* cuda:0 \([a-z0-9]*\) (auto).*/\1/p' "$RES/arch-$g.txt")
        [[ $prec == "${WANT_PREC[$g]}" ]] || prec="wrong: ${prec:-none}"
        precisions+="\"$g\": \"$prec\", "
        got=$(sed -n 's/^GPU: .*; kernels: \(.*\)$/\1/p' "$RES/arch-$g.txt" | sed 's/, JIT-compiled by the driver//')
        say "  $g: $(grep '^GPU: ' "$RES/arch-$g.txt" | head -1) (exit $rc)"
        [[ $rc == 0 && $got == "${WANT_IMG[$g]}" ]] || { tail -n 5 "$RES/arch-$g.txt" >&2; got="wrong: ${got:-none} (exit $rc)"; }
        images+="\"$g\": \"$got\", "
    done
    put arch_kernel_images "${images%, }}"
    put arch_precision_auto "${precisions%, }}"
fi

pyjson() { python3 - "$@"; }

# --------------------------------------------------------------- micro-batch auto
# The recipe (ViT-B/16 at 224, batch 512) on emulated GPUs of 16 to 80 GiB and compute
# capability 7.0 to 9.0: what `--micro-batch auto` and `--precision auto` choose (--dry-run
# opens the device and asks it; nothing is allocated); then a real run whose choice is tight
# (the demo model, a batch of 512, a GPU of 1100 MiB of which the emulated context takes 512)
# stays within the GPU less the margin.
if want fit; then
    say "fit: micro-batch and precision auto on 16/24/40/80 GiB GPUs of cc 7.0-9.0, and a run within its margin"
    fits="{" fit_ok=true
    for spec in 7.0:16GiB 7.5:16GiB 8.9:24GiB 8.0:40GiB 8.0:80GiB 9.0:80GiB; do
        cc=${spec%%:*} mem=${spec##*:}
        RDROP_EMU_CC=$cc RDROP_EMU_MEMORY=$mem "$BIN" train --device cuda --dry-run \
            >/dev/null 2>"$RES/fit-$cc-$mem.txt"
        rc=$?
        mb=$(sed -n 's/^micro-batch auto: \([0-9]*\) of 512 per rank.*/\1/p' "$RES/fit-$cc-$mem.txt")
        prec=$(sed -n 's/^precision: auto is \([a-z0-9]*\) on .*/\1/p' "$RES/fit-$cc-$mem.txt")
        want=bf16
        [[ ${cc%%.*} -lt 8 ]] && want=f16
        if [[ $rc != 0 || -z $mb || $((512 % ${mb:-1})) != 0 || $prec != "$want" ]]; then
            fit_ok=false
            tail -n 5 "$RES/fit-$cc-$mem.txt" >&2
        fi
        say "  cc $cc, $mem: micro-batch ${mb:-none}, precision ${prec:-none}"
        fits+="\"$cc/$mem\": {\"micro_batch\": ${mb:-null}, \"precision\": \"${prec:-none}\"}, "
    done
    put fit_choices "${fits%, }}"
    # More memory never chooses a smaller micro-batch (same precision).
    pyjson "$RES" >>"$RES/figures" <<'EOF2'
import json, re, sys, glob
got = {}
for f in glob.glob(f"{sys.argv[1]}/fit-*.txt"):
    t = open(f).read()
    m = re.search(r"^micro-batch auto: (\d+) of 512", t, re.M)
    p = re.search(r"^precision: auto is (\w+)", t, re.M)
    g = re.search(r"fit-([\d.]+)-(\d+)GiB", f)
    if m and p and g:
        got[(p.group(1), g.group(1), int(g.group(2)))] = int(m.group(1))
ok = len(got) == 6 and all(got[a] <= got[b] for a in got for b in got if a[0] == b[0] and a[2] < b[2])
print("fit_monotone", json.dumps(ok))
EOF2
    # A run whose micro-batch auto is tight: it must stay within total − margin on the device.
    RDROP_EMU_MEMORY=1100MiB "$BIN" train --preset demo --device cuda --micro-batch auto \
        --batch-size 512 --train-images 512 --steps 1 --eval-every 0 --out "$RUNS/fit-run" \
        >"$RES/fit-run.txt" 2>&1
    rc=$?
    pyjson "$RES/fit-run.txt" "$rc" >>"$RES/figures" <<'EOF2'
import json, re, sys
t = open(sys.argv[1]).read()
m = re.search(r"^micro-batch auto: (\d+) of 512 per rank .* of ([\d.]+) GiB free less a ([\d.]+) GiB margin", t, re.M)
u = re.search(r"GPU memory after the first update: (\d+) MiB in use of (\d+) MiB", t)
ok = sys.argv[2] == "0" and m is not None and u is not None
used = int(u.group(1)) if u else None
limit = int(u.group(2)) - round(float(m.group(3)) * 1024) if (m and u) else None
print("fit_run", json.dumps({"exit": int(sys.argv[2]), "micro_batch": int(m.group(1)) if m else None,
      "used_mib": used, "limit_mib": limit,
      "within_margin": bool(ok and used <= limit)}))
EOF2
    grep -E "^micro-batch auto|^GPU memory" "$RES/fit-run.txt" >&2
    put fit_dry_runs_ok $fit_ok
fi

# ----------------------------------------------------------------------- step profile
# `rdrop bench train --profile` on the CUDA engine: CUDA events between the op groups; the
# groups must cover the step (sum within 5 % of the step time) and name every group.
if want profile; then
    say "profile: bench train --profile --json on cuda (events between the op groups)"
    "$BIN" bench train --model tiny --image-size 32 --micro-batch 8 --steps 2 --warmup 1 \
        --device cuda --precision bf16 --engine explicit --profile --json \
        >"$RES/profile.json" 2>"$RES/profile.log"
    pyjson "$RES/profile.json" >>"$RES/figures" <<'EOF2'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
    groups = [g["group"] for g in r["profile"]]
    ok = (abs(r["profile_ms"] - r["step_ms"]) <= 0.05 * r["step_ms"]
          and all(k in g for g in r["profile"] for k in ("group", "ms", "flops", "bytes"))
          and {"qkv_gemm", "attention_bwd", "optimizer", "loss"} <= set(groups))
    print("cuda_profile", json.dumps({"groups": len(groups), "sum_over_step": round(r["profile_ms"] / r["step_ms"], 4), "ok": ok}))
except Exception as e:
    print("cuda_profile", json.dumps({"error": str(e), "ok": False}))
EOF2
fi

# ---------------------------------------------------------------------------- the demo
train() { # DIR DEVICE [flags...]: rdrop train --preset demo into DIR
    local dir=$1 dev=$2
    shift 2
    "$BIN" train --preset demo --device "$dev" --out "$dir" --seed 42 "$@" >"$dir.log" 2>&1
}
if want demo; then
    say "demo f32: 20 updates on cuda vs cpu (losses within 1e-4 relative)"
    train "$RUNS/f32-cpu" cpu --steps 20 --eval-every 20
    train "$RUNS/f32-cuda" cuda --steps 20 --eval-every 20
    pyjson "$RUNS/f32-cpu/metrics.jsonl" "$RUNS/f32-cuda/metrics.jsonl" >>"$RES/figures" <<'EOF'
import json, sys
def losses(p):
    try:
        return [json.loads(l)["loss"] for l in open(p) if '"kind":"train"' in l.replace(" ", "")]
    except OSError:
        return []
a, b = losses(sys.argv[1]), losses(sys.argv[2])
if len(a) != 20 or len(b) != 20:
    print("demo_f32_max_rel_loss_diff null")
else:
    print("demo_f32_max_rel_loss_diff", json.dumps(max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))))
EOF
    steps=${GPU_EMU_DEMO_STEPS:-400}
    say "demo: $steps updates on the cpu (f32) and on cuda in bf16 and f16 (the two side by side)"
    train "$RUNS/demo-cpu" cpu --steps "$steps" --eval-every "$steps"
    s0=$(date +%s)
    pids=()
    for p in bf16 f16; do
        # one host thread each: two runs side by side use 2 cores better than one after the other
        RDROP_EMU_THREADS=${RDROP_EMU_THREADS:-1} train "$RUNS/demo-$p" cuda --steps "$steps" \
            --eval-every "$steps" --precision "$p" &
        pids+=($!)
    done
    wait "${pids[@]}"
    put demo_bf16_f16_wall_s $(($(date +%s) - s0))
    pyjson "$RUNS" >>"$RES/figures" <<'EOF'
import json, sys
def top1(d):
    try:
        ev = [json.loads(l) for l in open(f"{sys.argv[1]}/{d}/metrics.jsonl") if '"eval"' in l]
        return ev[-1]["top1"] if ev else None
    except OSError:
        return None
for key, d in [("demo_cpu_top1", "demo-cpu"), ("demo_bf16_top1", "demo-bf16"), ("demo_f16_top1", "demo-f16")]:
    print(key, json.dumps(top1(d)))
EOF
    put demo_steps "$steps"
fi

# -------------------------------------------------------------------------------- eval
if want eval; then
    w=$RUNS/f32-cpu
    [[ -d $w/final ]] || train "$w" cpu --steps 20 --eval-every 20
    say "eval: the same weights on cpu and cuda"
    "$BIN" eval --weights "$w" --data "$REPO/rdrop-cli/assets/digits-demo.tar.gz" --device cpu --json >"$RES/eval-cpu.json" 2>"$RES/eval-cpu.log"
    "$BIN" eval --weights "$w" --data "$REPO/rdrop-cli/assets/digits-demo.tar.gz" --device cuda --json >"$RES/eval-cuda.json" 2>"$RES/eval-cuda.log"
    pyjson "$RES/eval-cpu.json" "$RES/eval-cuda.json" >>"$RES/figures" <<'EOF'
import json, sys
def get(p):
    try:
        return json.loads(open(p).read().strip().splitlines()[-1])
    except Exception:
        return None
a, b = get(sys.argv[1]), get(sys.argv[2])
ok = a is not None and b is not None and a.get("top1") == b.get("top1") and a.get("top5") == b.get("top5")
print("eval_cuda_equals_cpu", json.dumps(ok))
print("eval_top1", json.dumps(None if a is None else a.get("top1")))
EOF
fi

# ------------------------------------------------------------------------------ resume
sha() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }
if want resume; then
    say "resume: SIGKILL during a cuda run, rdrop resume, against an uninterrupted cuda run"
    train "$RUNS/resume-ref" cuda --steps 40 --eval-every 40 --save-every 10
    d=$RUNS/resume-killed
    "$BIN" train --preset demo --device cuda --out "$d" --seed 42 --steps 40 --eval-every 40 --save-every 10 >"$d.log" 2>&1 &
    pid=$!
    # kill once a checkpoint exists (past update 10, before the end)
    for _ in $(seq 1 600); do
        ls "$d/checkpoints" 2>/dev/null | grep -q step- && break
        sleep 0.2
    done
    sleep 1
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    "$BIN" resume "$d" >"$d.resume.log" 2>&1
    a=$(sha "$RUNS/resume-ref/final/model.safetensors") b=$(sha "$d/final/model.safetensors")
    if [[ -n $a && $a == "$b" ]]; then put resume_bit_identical true; else put resume_bit_identical false; fi
fi

# ------------------------------------------------------------------------------- dp2
if want dp2; then
    say "data parallel: 2 ranks on 2 emulated devices through the emulated NCCL vs one process"
    common=(--steps 20 --eval-every 20 --optimizer sgd --lr 0.05 --micro-batch 32)
    train "$RUNS/dp-one" cuda "${common[@]}"
    RDROP_EMU_DEVICES=2 train "$RUNS/dp-buckets" cuda "${common[@]}" --nproc-per-node 2 --grad-bucket-mb 1e-6
    RDROP_EMU_DEVICES=2 train "$RUNS/dp-flat" cuda "${common[@]}" --nproc-per-node 2 --grad-bucket-mb 0
    pyjson "$RUNS" >>"$RES/figures" <<'EOF'
import json, struct, sys
def load(p):
    try:
        b = open(p, "rb").read()
    except OSError:
        return None
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    out = {}
    for k, v in h.items():
        if k == "__metadata__" or v["dtype"] != "F32":
            continue
        s, e = v["data_offsets"]
        out[k] = struct.unpack(f"<{(e - s) // 4}f", b[8 + n + s:8 + n + e])
    return out
one = load(f"{sys.argv[1]}/dp-one/final/model.safetensors")
worst = None
for d in ("dp-buckets", "dp-flat"):
    m = load(f"{sys.argv[1]}/{d}/final/model.safetensors")
    if one is None or m is None or m.keys() != one.keys():
        worst = None
        break
    diff = max(abs(x - y) for k in one for x, y in zip(one[k], m[k]))
    worst = diff if worst is None else max(worst, diff)
print("dp2_max_param_diff", json.dumps(worst))
EOF
fi

# --------------------------------------------------------------------------- mutations
if want mutations; then
    say "mutations: each must make a GPU test or run fail under the emulator"
    tried=0 caught=0 names=()
    KT=$TESTS/rdrop-kernels-cuda_kernels
    VT=$TESTS/rdrop-vit-cuda
    MUT=$LIB/kernels-mutants
    mutant() { # NAME COMMAND...: caught when the command fails
        local n=$1
        shift
        tried=$((tried + 1))
        if "$@" >"$RES/mutant-$n.txt" 2>&1; then
            say "mutation $n NOT caught"
            names+=("\"$n\": false")
        else
            caught=$((caught + 1))
            names+=("\"$n\": true")
        fi
    }
    for m in oob-read no-barrier shfl-width; do
        if [[ -d $MUT/$m ]]; then
            mutant "$m" env RDROP_EMU_KERNELS="$MUT/$m:$LIB/kernels" "$KT" --ignored --test-threads 1
        else
            tried=$((tried + 1))
            names+=("\"$m\": false")
            say "mutant $m was not built"
        fi
    done
    mutant swapped-args env RDROP_EMU_MUTATE=swap-args "$KT" --ignored --test-threads 1
    mutant gemm-ld env RDROP_EMU_MUTATE=gemm-ld "$VT" --ignored --skip autograd --test-threads 1
    mutant gemm-batch-stride env RDROP_EMU_MUTATE=gemm-batch-stride "$VT" --ignored --skip autograd --test-threads 1
    mutant overlapping-plan env RDROP_EMU_MUTATE=alias-alloc "$VT" --ignored --skip autograd --test-threads 1
    mutant missing-stream-wait env RDROP_EMU_MUTATE=drop-stream-wait RDROP_EMU_DELAY=7:3000 \
        "$VT" --ignored --skip autograd --test-threads 1 cuda_gradient_buckets
    put mutations_tried $tried
    put mutations_caught $caught
    put mutations "{$(IFS=,; echo "${names[*]}")}"
fi

# ------------------------------------------------------------------ gpu-check, emulated
if want gpucheck; then
    say "scripts/gpu-check.sh --emulated: the GPU check's real CUDA paths (no PyTorch, no timings)"
    OUT=$RES/gpu-check GPU_EMU_LIB=$LIB bash "$REPO/scripts/gpu-check.sh" --emulated >"$RES/gpu-check.txt" 2>&1
    pyjson "$RES/gpu-check/gpu-check.json" >>"$RES/figures" <<'EOF2'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print("gpu_check_emulated_pass", json.dumps(bool(s["summary"].get("emulated_pass"))))
except (OSError, KeyError, ValueError):
    print("gpu_check_emulated_pass false")
EOF2
fi

put wall_s $(($(date +%s) - T0))
# ------------------------------------------------------------------------------ summary
python3 - "$RES/figures" "$OUT/summary.json" "$ONLY" <<'EOF'
import json, sys
fig = {}
for line in open(sys.argv[1]):
    k, _, v = line.strip().partition(" ")
    try:
        fig[k] = json.loads(v)
    except ValueError:
        fig[k] = v
marks = {
    "symbols_complete": lambda v: v is True,
    "no_gpu_error_lines": lambda v: v == 1,
    "kernel_images": lambda v: isinstance(v, dict) and v.get("complete") is True,
    "arch_kernel_images": lambda v: isinstance(v, dict) and all(not str(x).startswith("wrong") for x in v.values()) and len(v) == 6,
    "v100_refused": lambda v: v is True,
    "arch_precision_auto": lambda v: isinstance(v, dict) and len(v) == 6 and all(not str(x).startswith("wrong") for x in v.values()),
    "gpu_tests_failed": lambda v: v == 0,
    "gpu_tests_passed": lambda v: isinstance(v, int) and v > 0,
    "demo_f32_max_rel_loss_diff": lambda v: v is not None and v <= 1e-4,
    "demo_cpu_top1": lambda v: v is not None and v >= 0.9,
    "demo_bf16_top1": lambda v: v is not None and fig.get("demo_cpu_top1") is not None and v >= fig["demo_cpu_top1"] - 0.03,
    "demo_f16_top1": lambda v: v is not None and fig.get("demo_cpu_top1") is not None and v >= fig["demo_cpu_top1"] - 0.03,
    "eval_cuda_equals_cpu": lambda v: v is True,
    "resume_bit_identical": lambda v: v is True,
    "dp2_max_param_diff": lambda v: v is not None and v <= 1e-6,
    "mutations_caught": lambda v: v == fig.get("mutations_tried") and (v or 0) >= 7,
    "gpu_check_emulated_pass": lambda v: v is True,
    "fit_dry_runs_ok": lambda v: v is True,
    "fit_monotone": lambda v: v is True,
    "fit_run": lambda v: isinstance(v, dict) and v.get("within_margin") is True,
    "cuda_profile": lambda v: isinstance(v, dict) and v.get("ok") is True,
}
missed = [k for k, ok in marks.items() if k in fig and not ok(fig[k])]
fig["missed"] = missed
json.dump(fig, open(sys.argv[2], "w"), indent=1)
print(json.dumps(fig, indent=1))
sys.exit(1 if missed else 0)
EOF
rc=$?
say "summary: $OUT/summary.json ($([[ $rc == 0 ]] && echo all marks met || echo marks missed))"
exit $rc
