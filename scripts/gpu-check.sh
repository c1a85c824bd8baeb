#!/usr/bin/env bash
# One prepared check of rdrop's CUDA build on a GPU machine (PyTorch + timm there, no Rust, no
# network), measured against PyTorch on the same GPU, in under 8 minutes:
#   a. the CUDA tests (kernels vs their CPU twins, CUDA engine vs CPU engine, resume), carried as
#      test binaries and run with --ignored;
#   b. `rdrop eval` of scripts/fixtures/gpu-check-vit on CPU vs CUDA (f32 within 1e-3 and
#      identical predictions; bf16 within 2e-2 of the logit scale), and vs transformers;
#   c. data parallel with world size 1 through NCCL vs the plain run (losses within 1e-6);
#   d. compute-sanitizer memcheck over one small training step;
#   e. `rdrop bench train --model vit-b16 --image-size 224 --micro-batch 64 --precision bf16
#      --device cuda` vs scripts/torch_gpu_step.py (eager, --compile), then each at the largest
#      micro-batch it fits; (`--with-data`: `rdrop data bench` vs torchvision too);
#   f. one JSON with every figure and ratio and a top-level `summary` (train_ratio_vs_eager, ...):
#      printed, and written to ${OUT:-.}/gpu-check.json (rewritten after each part, so a cut-off
#      run keeps what it did) and gpu-check-<gpu>-<date>.json (commit it under docs/);
#      the progress log goes to ${OUT:-.}/gpu-check.log; the last stdout line is `HEADLINE {...}`.
# Every part is time-boxed and records its error in the JSON instead of stopping the rest.
#
# Needs the binary and the CUDA test binaries from `scripts/build-cuda.sh`: dist/cuda/, or their
# gzip'd copies dist/cuda-pack/{rdrop.gz,cuda-tests.tar.gz} (carry dist/cuda-pack to the machine: it fits the 64 MiB the device
# tool moves, the bare binary does not). usage: bash scripts/gpu-check.sh [--dry-run | --emulated] [--budget SECONDS] [--with-data]
# Environment: RDROP_BIN (default dist/cuda/rdrop), PYTHON (a python with torch; default: the
# first of python3, /opt/torch/.venv/bin/python3 that imports torch), OUT (output folder).
# --dry-run: plumbing test on a machine without a GPU: tiny CPU sizes; runs that need a GPU are
# expected to fail with rdrop's "no GPU" error (the CUDA build starts with the libcuda stub).
# --emulated: the real CUDA code paths on the emulated GPU of gpu-emu/ (small sizes, no PyTorch,
# no timings; `summary.emulated_pass`): what scripts/gpu-emu-check.sh runs.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RDROP_BIN:-$REPO/dist/cuda/rdrop}
PACK=$REPO/dist/cuda-pack/rdrop.gz
OUTDIR=${OUT:-.}
DRY=0
EMU=0
for a in "$@"; do
    [[ $a == --dry-run ]] && DRY=1
    [[ $a == --emulated ]] && EMU=1
done

say() { echo "[gpu-check] $*" >&2; }
mkdir -p "$OUTDIR"
# the progress log (stderr) is kept next to the JSON as well
exec 2> >(tee -a "$OUTDIR/gpu-check.log" >&2)

PY=""
for p in ${PYTHON:-} python3 /opt/torch/.venv/bin/python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch' 2>/dev/null; then PY=$(command -v "$p"); break; fi
done
if [[ -z $PY ]]; then
    say "no python with torch found (set PYTHON=...)"
    PY=python3
fi
if [[ -z ${RDROP_BIN:-} && ! -x $BIN && -f $PACK ]]; then
    # the gzip'd binary that scripts/build-cuda.sh packs for the trip (carry dist/cuda-pack)
    BIN=${TMPDIR:-/tmp}/rdrop-cuda/rdrop
    mkdir -p "$(dirname "$BIN")" && gzip -dc "$PACK" >"$BIN" && chmod +x "$BIN" ||
        say "cannot unpack $PACK"
fi
say "python: $PY; binary: $BIN"
[[ -x $BIN ]] || say "warning: $BIN is missing or not executable (build it with scripts/build-cuda.sh)"

if [[ $EMU == 1 ]]; then
    # --emulated: the binaries run on the emulated CUDA stack (gpu-emu/; laid out by
    # `rdrop-gpu-emu install`, which scripts/gpu-emu-check.sh runs): the real CUDA code paths,
    # small sizes, no PyTorch, no timings
    EMU_LIB=${GPU_EMU_LIB:-$REPO/target/gpu-emu/lib}
    if [[ ! -e $EMU_LIB/libcuda.so.1 ]]; then
        say "no emulator in $EMU_LIB: run scripts/gpu-emu-check.sh, or target/release/rdrop-gpu-emu install $EMU_LIB"
        exit 1
    fi
    export LD_LIBRARY_PATH=$EMU_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export RDROP_NCCL_LIBRARY=$EMU_LIB/libnccl.so.2 RDROP_EMU_KERNELS=$EMU_LIB/kernels
    say "emulated: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    BUDGET=1200
    for ((i = 1; i <= $#; i++)); do [[ ${!i} == --budget ]] && { j=$((i + 1)); BUDGET=${!j}; }; done
    timeout -k 10 $((${BUDGET%.*} + 60)) "$PY" -u "$REPO/scripts/gpu_check.py" --bin "$BIN" --python "$PY" \
        --out "$OUTDIR/gpu-check.json" --budget "$BUDGET" "$@"
    rc=$?
    say "exit $rc; summary in $OUTDIR/gpu-check.json"
    exit $rc
fi

# The CUDA libraries the binary links (cudarc's dynamic linking): from PyTorch's NVIDIA pip
# packages (nvidia/cu13/lib, nvidia/*/lib) or a CUDA install; libcuda.so.1 is the driver's.
LIBDIRS=$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site, sys
need = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13",
        "libnccl.so.2"]  # NCCL: loaded at run time by data parallel (nvidia-nccl-cu13)
roots = list(dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()] + sys.path))
cands = []
for r in roots:
    if os.path.isdir(os.path.join(r, "nvidia")):
        cands += sorted(glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True))
cands += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
dirs = []
for n in need:
    for d in cands:
        if os.path.exists(os.path.join(d, n)):
            dirs.append(d) if d not in dirs else None
            break
    else:
        print(f"[gpu-check] {n} not found in the Python's nvidia packages or /usr/local/cuda", file=sys.stderr)
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
    # the driver's libcuda where containers usually mount it, if the loader does not know it
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
        [[ -e $d/libcuda.so.1 ]] && { export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; break; }
    done
fi
if [[ $DRY == 1 ]] && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
    # no driver here: let a CUDA build start with the link stub (every CUDA call: no device)
    STUB=$REPO/target-cuda/cuda-root/lib64/stubs
    NVLIB=$(ls -d "${RDROP_CUDA_VENV:-$HOME/.cache/rdrop/cuda-venv}"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1)
    [[ -d $STUB ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$STUB${NVLIB:+:$NVLIB}"
fi
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if command -v ldd >/dev/null && [[ -x $BIN ]] && ldd "$BIN" | grep -q 'not found'; then
    say "unresolved libraries:"; ldd "$BIN" | grep 'not found' >&2
fi

BUDGET=450
for ((i = 1; i <= $#; i++)); do [[ ${!i} == --budget ]] && { j=$((i + 1)); BUDGET=${!j}; }; done
# the driver keeps its own time boxes; this outer one only guards against a hang in the driver
timeout -k 10 $((${BUDGET%.*} + 60)) "$PY" -u "$REPO/scripts/gpu_check.py" --bin "$BIN" --python "$PY" \
    --out "$OUTDIR/gpu-check.json" "$@"
rc=$?
say "exit $rc; summary in $OUTDIR/gpu-check.json"
exit $rc
