#!/usr/bin/env bash
# Build (or check) rdrop's CUDA path on a machine WITHOUT a GPU or a CUDA toolkit.
#
# NVIDIA's nvcc comes from PyPI (pinned 13.0.x: the GPU machines' driver 580 / CUDA 13.0 may
# refuse PTX from a newer nvcc); the CUDA libraries cudarc links against get unversioned
# symlinks, and libcuda (the driver, present on a GPU machine) gets a link stub generated here
# from cudarc's own symbol list (never committed; every stub function returns
# CUDA_ERROR_NO_DEVICE). README.md ("The full recipe on a GPU") says what each flavour runs on.
#
# Two flavours, each in its own target and dist folder: CUDA 13 (the default; nvcc 13.0 from
# PyPI; cubins sm_75-sm_90 + PTX; drivers of the 580 series and newer; what
# scripts/gpu-check.sh runs) and CUDA 12 (`--cuda 12`: cubins sm_70-sm_90 + PTX, so V100s too;
# drivers of the 525 series and newer). PyPI's CUDA 12 wheels hold ptxas but no nvcc, so the
# CUDA 12 flavour takes an installed CUDA 12 toolkit (RDROP_CUDA12_HOME, a CUDA_HOME of release
# 12, or the newest /usr/local/cuda-12.*), else assembles one: nvcc, cicc, cudafe++, fatbinary
# and ptxas of CUDA 12.4 from Debian's nvidia-cuda-toolkit and libnvvm4 packages (trixie,
# non-free; downloaded from deb.debian.org, sha256-checked, unpacked, not installed) with the
# CUDA 12.4 headers and libraries of PyPI's -cu12 wheels and CCCL 12.6.
#
# usage: scripts/build-cuda.sh [--cuda 12|13] [--build]   release `rdrop` with --features cuda, stripped,
#                                          into dist/cuda/rdrop (default), and the CUDA test
#                                          binaries (rdrop-vit tests/cuda.rs, rdrop-kernels
#                                          tests/cuda_kernels.rs) into dist/cuda/tests/
#                                          (+ dist/cuda-pack/{rdrop.gz,cuda-tests.tar.gz}: carry
#                                          dist/cuda-pack to a GPU machine)
#        scripts/build-cuda.sh --check     cargo clippy --release -D warnings (cargo check if
#                                          clippy is missing) of the whole workspace, all
#                                          targets, CUDA on; compiles the kernels (needs nvcc
#                                          only; quick after a --build) and checks that their
#                                          fat binaries hold a cubin for every architecture of
#                                          the flavour and the PTX of the lowest; runs
#                                          rdrop-kernels tests/kernel_names.rs (the launchers'
#                                          kernel names = the PTX entries)
#        scripts/build-cuda.sh --setup     only install the toolchain and make the stub
#        scripts/build-cuda.sh --env       set up, then print `export ...` lines for the build
#                                          (eval "$(scripts/build-cuda.sh --env)")
#        scripts/build-cuda.sh --run-env   set up, then print an `export LD_LIBRARY_PATH=...`
#                                          that lets a CUDA build START here (stub libcuda):
#                                          every CUDA device then reports "no device"
#
# Idempotent: the venv, the symlinks, the stub and target-cuda/ are reused.
# Environment:
#   RDROP_CUDA_VENV        venv holding nvcc & co  (CUDA 13; default ~/.cache/rdrop/cuda-venv)
#   RDROP_CUDA12_HOME      an installed CUDA 12 toolkit (bin/nvcc, include/, lib64/)
#   RDROP_CUDA12_VENV      venv of the assembled CUDA 12 toolkit's wheels (default
#                          ~/.cache/rdrop/cuda12-venv); its Debian packages go to
#                          ~/.cache/rdrop/cuda12-debs
#   RDROP_CUDA_TARGET_DIR  cargo target dir        (default target-cuda, CUDA 12: target-cuda12;
#                          ignored by git)
#   RDROP_CUDA_DIST        where the binary goes   (default dist/cuda, CUDA 12: dist/cuda12)
#   RDROP_CUDA_ARCHS       rdrop's kernels: cubins for these architectures, e.g. 80 or 80,90
#                          (default: sm_75, 80, 86, 89, 90 and PTX for compute_75, which newer
#                          GPUs JIT; a CUDA_COMPUTE_CAP given narrows it to that one)
#   CUDA_COMPUTE_CAP       candle's kernels (the autograd engine; rdrop's own engine never
#                          launches them): one arch, default 90 (H100/H200). Other GPUs run
#                          the explicit engine (the default) from rdrop's kernels; for
#                          --engine autograd there, build with their CUDA_COMPUTE_CAP.
#   CUDAFORGE_THREADS      parallel nvcc jobs      (default: number of CPUs)
#   PYTHON                 python used for the venv (default python3)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
MODE=build
CUDA=13
while [[ $# -gt 0 ]]; do
    case $1 in
    --build) MODE=build ;;
    --check) MODE=check ;;
    --setup) MODE=setup ;;
    --env) MODE=env ;;
    --run-env) MODE=run-env ;;
    --cuda)
        CUDA=${2:-}
        [[ $CUDA == 12 || $CUDA == 13 ]] || { echo "build-cuda.sh: --cuda takes 12 or 13" >&2; exit 2; }
        shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-cuda.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ $CUDA == 13 ]]; then
    VENV=${RDROP_CUDA_VENV:-$HOME/.cache/rdrop/cuda-venv}
    TARGET=${RDROP_CUDA_TARGET_DIR:-$REPO/target-cuda}
    DIST=${RDROP_CUDA_DIST:-$REPO/dist/cuda}
    WANT_CUBINS="75, 80, 86, 89, 90"
else
    VENV=${RDROP_CUDA12_VENV:-$HOME/.cache/rdrop/cuda12-venv}
    TARGET=${RDROP_CUDA_TARGET_DIR:-$REPO/target-cuda12}
    DIST=${RDROP_CUDA_DIST:-$REPO/dist/cuda12}
    WANT_CUBINS="70, 75, 80, 86, 89, 90"
fi
CUDA_ROOT=$TARGET/cuda-root # symlinks + stub: generated, inside an ignored folder
PY=${PYTHON:-python3}

log() { echo "[build-cuda] $*" >&2; }

# What kernels need to compile (nvcc, its front end, libdevice, headers) ...
# ... and what the binary links against (cudarc's dynamic-linking feature).
if [[ $CUDA == 13 ]]; then
    COMPILE_PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
    LINK_PKGS=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)
else
    # CUDA 12.4's headers (crt/ comes with the nvcc wheel) and CCCL 12.6 (12.4's wheel was
    # yanked as broken) for the assembled toolkit; the libraries the binary links against.
    COMPILE_PKGS=(nvidia-cuda-nvcc-cu12==12.4.131 nvidia-cuda-runtime-cu12==12.4.127
        nvidia-cuda-cccl-cu12==12.6.77)
    LINK_PKGS=(nvidia-cublas-cu12==12.4.5.8 nvidia-curand-cu12==10.3.5.147
        nvidia-cuda-nvrtc-cu12==12.4.127)
    # Debian trixie non-free: CUDA 12.4's compiler (path sha256).
    DEBS=("pool/non-free/n/nvidia-cuda-toolkit/nvidia-cuda-toolkit_12.4.131~12.4.1-2_amd64.deb cd5fe85aee38d108b315f408a688641478f2402622a10c677478eb7a6c4e5319"
        "pool/non-free/n/nvidia-cuda-toolkit/libnvvm4_12.4.131~12.4.1-2_amd64.deb 3c905c1df7453e1ad477516c4465629c310d2f58a796d66f44070dc289e7ec12")
    DEBIAN_MIRROR=${RDROP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
fi

pip_install() { # $1 = stamp name, rest = packages; skipped when the stamp matches
    local stamp="$VENV/.rdrop-$1" want
    shift
    want="$*"
    if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then return; fi
    log "installing $* into $VENV"
    if [[ -x $VENV/bin/python ]]; then
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir "$@"
    else # no venv module: plain pip into a folder
        "$PY" -m pip install -q --disable-pip-version-check --no-cache-dir --target "$VENV/site" "$@"
    fi
    echo "$want" >"$stamp"
}

setup_toolchain() { # $1 = compile | link
    if [[ $CUDA == 12 ]]; then
        setup_cuda12 "$1"
        return
    fi
    if [[ ! -x $VENV/bin/python && ! -d $VENV/site ]]; then
        log "creating venv $VENV"
        mkdir -p "$VENV"
        if ! "$PY" -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            "$PY" -m pip --version >/dev/null 2>&1 || {
                log "'$PY -m venv' and '$PY -m pip' both failed: install python3-venv or pip"
                exit 1
            }
            mkdir -p "$VENV/site"
            log "'$PY -m venv' failed; installing with '$PY -m pip --target $VENV/site'"
        fi
    fi
    pip_install compile "${COMPILE_PKGS[@]}"
    [[ $1 == link ]] && pip_install link "${LINK_PKGS[@]}"
    mkdir -p "$CUDA_ROOT/lib64/stubs"
    NV=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 "$VENV"/site/nvidia/cu13 2>/dev/null | head -1 || true)
    if [[ -z $NV || ! -x $NV/bin/nvcc ]]; then
        log "nvcc not found under $VENV (nvidia/cu13/bin/nvcc); remove $VENV and retry"
        exit 1
    fi
    # CUDA_HOME's layout as build scripts expect it: bin/, include/, nvvm/ from the wheels.
    for d in bin include nvvm; do ln -sfn "$NV/$d" "$CUDA_ROOT/$d"; done
    if [[ $1 == link ]]; then
        local l
        LIBDIRS=$NV/lib
        for l in cudart:13 cublas:13 cublasLt:13 curand:10 nvrtc:13; do
            ln -sf "$NV/lib/lib${l%%:*}.so.${l##*:}" "$CUDA_ROOT/lib64/lib${l%%:*}.so"
        done
        make_stub
    fi
}

setup_cuda12() { # $1 = compile | link: an installed CUDA 12 toolkit (PyPI has no CUDA 12 nvcc)
    local home="" c
    for c in "${RDROP_CUDA12_HOME:-}" "${CUDA_HOME:-}" $(ls -d /usr/local/cuda-12.* 2>/dev/null | sort -V -r); do
        [[ -n $c && -x $c/bin/nvcc ]] || continue
        if "$c/bin/nvcc" --version | grep -q "release 12\."; then home=$c; break; fi
    done
    if [[ -z $home ]]; then
        assemble_cuda12 "$1"
        return
    fi
    NV=$home
    mkdir -p "$CUDA_ROOT/lib64/stubs"
    for c in bin include nvvm; do ln -sfn "$home/$c" "$CUDA_ROOT/$c"; done
    local lib=$home/lib64
    [[ -d $lib ]] || lib=$home/targets/x86_64-linux/lib
    LIBDIRS=$lib
    if [[ $1 == link ]]; then
        for c in cudart cublas cublasLt curand nvrtc; do
            ln -sf "$lib/lib$c.so" "$CUDA_ROOT/lib64/lib$c.so"
        done
        make_stub
    fi
    # cudarc's bindings for this toolkit's driver API (12.x from nvcc --version).
    local v
    v=$("$home/bin/nvcc" --version | sed -n 's/.*release 12\.\([0-9]*\).*/\1/p' | head -1)
    export CUDARC_CUDA_VERSION=120${v:-0}0
    log "CUDA 12 toolkit: $home (cudarc bindings $CUDARC_CUDA_VERSION)"
}

assemble_cuda12() { # $1 = compile | link: CUDA 12.4 from Debian's packages and PyPI's wheels
    local debs=$HOME/.cache/rdrop/cuda12-debs d path sum f root=$CUDA_ROOT
    mkdir -p "$debs"
    for d in "${DEBS[@]}"; do
        path=${d% *} sum=${d#* } f=$debs/$(basename "${d% *}")
        if [[ ! -f $f ]] || ! echo "$sum  $f" | sha256sum -c --quiet 2>/dev/null; then
            log "downloading $DEBIAN_MIRROR/$path"
            curl -fsSL --retry 3 -o "$f.part" "$DEBIAN_MIRROR/$path" || {
                log "cannot download $DEBIAN_MIRROR/$path (set RDROP_DEBIAN_MIRROR, or install a CUDA 12 toolkit and set RDROP_CUDA12_HOME)"
                exit 1
            }
            echo "$sum  $f.part" | sha256sum -c --quiet || { log "$f: sha256 is not $sum"; rm -f "$f.part"; exit 1; }
            mv "$f.part" "$f"
        fi
    done
    # the venv of the wheels (headers; libraries for a build)
    if [[ ! -x $VENV/bin/python ]]; then
        log "creating venv $VENV"
        "$PY" -m venv "$VENV"
    fi
    pip_install compile "${COMPILE_PKGS[@]}"
    [[ $1 == link ]] && pip_install link "${LINK_PKGS[@]}"
    local sp
    sp=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia | head -1)
    local stamp="$root/.assembled"
    if [[ ! -f $stamp || "$(cat "$stamp")" != "${DEBS[*]} ${COMPILE_PKGS[*]}" ]]; then
        log "assembling CUDA 12.4 in $root"
        rm -rf "$root/bin" "$root/nvvm" "$root/include" "$root/deb"
        mkdir -p "$root/deb" "$root/bin" "$root/nvvm/bin" "$root/nvvm/libdevice" "$root/include" \
            "$root/lib64/stubs"
        for d in "$debs"/*.deb; do
            if command -v dpkg-deb >/dev/null; then
                dpkg-deb -x "$d" "$root/deb"
            else # ar + tar where dpkg is missing
                (cd "$root/deb" && ar x "$d" data.tar.xz && tar -xJf data.tar.xz && rm data.tar.xz)
            fi
        done
        local t=$root/deb/usr/lib/nvidia-cuda-toolkit
        cp "$t/bin/nvcc" "$root/bin/"
        cp -r "$t/bin/crt" "$root/bin/"
        for f in cudafe++ fatbinary ptxas nvlink bin2c cuobjdump; do cp "$root/deb/usr/bin/$f" "$root/bin/"; done
        cp "$t/bin/cicc" "$root/nvvm/bin/"
        cp "$t/libdevice/libdevice.10.bc" "$root/nvvm/libdevice/"
        for c in cuda_nvcc cuda_runtime cuda_cccl; do
            cp -r "$sp/$c/include/." "$root/include/"
        done
        rm -f "$root/include/__init__.py"
        # nvcc's profile as a toolkit's: its own folder's nvvm/, include/ and lib64/
        cat >"$root/bin/nvcc.profile" <<'PROFILE'

TOP              = $(_HERE_)/..

NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice

LD_LIBRARY_PATH += $(TOP)/lib:
PATH            += $(TOP)/nvvm/bin:$(_HERE_):

INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)

LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"

CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
PROFILE
        rm -rf "$root/deb"
        echo "${DEBS[*]} ${COMPILE_PKGS[*]}" >"$stamp"
    fi
    NV=$root
    LIBDIRS=$sp/cuda_runtime/lib:$sp/cublas/lib:$sp/curand/lib:$sp/cuda_nvrtc/lib
    if [[ $1 == link ]]; then
        local l name
        for l in cuda_runtime/cudart:12 cublas/cublas:12 cublas/cublasLt:12 curand/curand:10 \
            cuda_nvrtc/nvrtc:12; do
            name=${l#*/}
            name=${name%%:*}
            ln -sf "$sp/${l%%/*}/lib/lib$name.so.${l##*:}" "$root/lib64/lib$name.so"
        done
        make_stub
    fi
    export CUDARC_CUDA_VERSION=12040
    log "CUDA 12.4 assembled in $root (Debian's compiler, PyPI's headers; cudarc bindings 12040)"
}

# The kernels' fat binaries of the last build hold a cubin for every architecture of the
# flavour (unless RDROP_CUDA_ARCHS narrows it) and the PTX of the lowest.
check_cubins() {
    local out want_ptx got
    out=$(ls -td "$TARGET"/release/build/rdrop-kernels-*/out 2>/dev/null | while read -r d; do
        ls "$d"/*.fatbin >/dev/null 2>&1 && { echo "$d"; break; }; done)
    [[ -n $out ]] || { log "no fat binaries of rdrop-kernels under $TARGET"; exit 1; }
    if [[ -n ${RDROP_CUDA_ARCHS:-} ]]; then
        log "RDROP_CUDA_ARCHS=$RDROP_CUDA_ARCHS: the architecture check is skipped"
        return
    fi
    # the fat-binary reader of gpu-emu (a host build, in the workspace's own target folder)
    (cd "$REPO" && CARGO_TARGET_DIR="$REPO/target" cargo build --release -q -p rdrop-gpu-emu)
    want_ptx=${WANT_CUBINS%%,*}
    local f
    for f in "$out"/*.fatbin; do
        got=$("$REPO/target/release/rdrop-gpu-emu" images "$f")
        if [[ $got != *"\"cubins\": [$WANT_CUBINS], \"ptx\": [$want_ptx]}" ]]; then
            log "$(basename "$f"): $got; want cubins [$WANT_CUBINS] and PTX [$want_ptx]"
            exit 1
        fi
    done
    log "kernels (CUDA $CUDA): every fat binary holds cubins sm_${WANT_CUBINS//, /, sm_} and PTX compute_$want_ptx"
}

make_stub() { # libcuda link stub from cudarc's driver symbol list (needs `cargo fetch`)
    local so="$CUDA_ROOT/lib64/stubs/libcuda.so" src="$CUDA_ROOT/stub_libcuda.c" cudarc ver
    ver=$(grep -A1 '^name = "cudarc"' "$REPO/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')
    [[ -f $so && -f $src && "$(head -1 "$src")" == "// cudarc $ver" ]] && return
    (cd "$REPO" && cargo fetch -q)
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$ver" 2>/dev/null | head -1 || true)
    if [[ -z $cudarc ]]; then
        log "cudarc $ver sources not found after cargo fetch"
        exit 1
    fi
    {
        echo "// cudarc $ver"
        echo "// libcuda stub: every driver call fails with CUDA_ERROR_NO_DEVICE (100)."
        grep -oE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$cudarc/src/driver/sys/mod.rs" |
            sed -E 's/^\s+fn //; s/\($//' | sort -u | awk '{print "int "$1"(void){return 100;}"}'
    } >"$src.tmp"
    mv "$src.tmp" "$src"
    ${CC:-cc} -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$so" "$src"
    ln -sf libcuda.so "$CUDA_ROOT/lib64/stubs/libcuda.so.1"
    log "libcuda stub: $(grep -c '^int ' "$src") symbols -> $so"
}

export_env() {
    export PATH="$NV/bin:$PATH" CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT"
    # A CUDA_COMPUTE_CAP of the user's narrows rdrop's kernels to it too (a faster build).
    if [[ -n ${CUDA_COMPUTE_CAP:-} && -z ${RDROP_CUDA_ARCHS:-} ]]; then
        export RDROP_CUDA_ARCHS=$CUDA_COMPUTE_CAP
    fi
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
    export CARGO_TARGET_DIR="$TARGET"
    # the linker finds the unversioned symlinks and the stub here
    export LIBRARY_PATH="$CUDA_ROOT/lib64:$CUDA_ROOT/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
}

case $MODE in
check)
    setup_toolchain compile
    export_env
    log "nvcc: $(nvcc --version | tail -1)"
    # rdrop-cli/cuda turns on rdrop-vit/cuda, rdrop-core/cuda and candle's cuda for the whole
    # workspace (features unify); build scripts run under `check` too, so the kernels compile.
    # Clippy (a superset of check) when installed: code behind cfg(feature = "cuda") gets the
    # same -D warnings as the CPU build.
    # The release profile: after a --build (as CI runs them: scripts/gpu-emu-check.sh first),
    # the build scripts' outputs are shared, so candle's kernels are not compiled by nvcc again
    # (a minute instead of about ten).
    if cargo clippy --version >/dev/null 2>&1; then
        (cd "$REPO" && cargo clippy --release --workspace --all-targets --features rdrop-cli/cuda -- -D warnings)
    else
        (cd "$REPO" && cargo check --release --workspace --all-targets --features rdrop-cli/cuda)
    fi
    check_cubins
    # The kernels the launchers name = the modules' PTX entries (reads sources; no GPU needed).
    (cd "$REPO" && cargo test --release -q -p rdrop-kernels --features cuda --test kernel_names)
    log "cuda $CUDA check passed"
    ;;
build)
    setup_toolchain link
    export_env
    log "nvcc: $(nvcc --version | tail -1)"
    # One cargo run for the binary and the GPU test binaries (`#[ignore]`d: no GPU here; run
    # with --ignored on a GPU machine): one feature resolution, so candle's kernels are compiled
    # by nvcc once (two runs resolved different features and compiled them twice).
    log "building rdrop and the CUDA test binaries (rdrop-kernels tests/cuda_kernels.rs, rdrop-vit tests/cuda.rs)"
    (cd "$REPO" && cargo build --release -p rdrop-cli -p rdrop-kernels -p rdrop-vit \
        --features rdrop-cli/cuda --bin rdrop --test cuda --test cuda_kernels \
        --message-format=json-render-diagnostics) >"$TARGET/cuda-tests.jsonl"
    mkdir -p "$DIST"
    cp "$TARGET/release/rdrop" "$DIST/rdrop.tmp"
    strip "$DIST/rdrop.tmp" 2>/dev/null || log "strip not found: binary left unstripped"
    mv "$DIST/rdrop.tmp" "$DIST/rdrop"
    log "built $DIST/rdrop ($(du -h "$DIST/rdrop" | cut -f1))"
    # gzip'd copy to carry to a GPU machine (the device tool moves at most 64 MiB; the binary is
    # ~60 MB, most of it candle's kernels): scripts/gpu-check.sh unpacks it
    mkdir -p "$DIST-pack"
    gzip -6 -c "$DIST/rdrop" >"$DIST-pack/rdrop.gz.tmp" && mv "$DIST-pack/rdrop.gz.tmp" "$DIST-pack/rdrop.gz"
    log "packed $DIST-pack/rdrop.gz ($(du -h "$DIST-pack/rdrop.gz" | cut -f1))"
    # the GPU test binaries, stripped and packed next to the binary: gpu-check.sh runs them with
    # --ignored on the GPU machine
    rm -rf "$DIST/tests" && mkdir -p "$DIST/tests"
    "$PY" - "$TARGET/cuda-tests.jsonl" "$DIST/tests" <<'PYEOF'
import json, shutil, sys
for line in open(sys.argv[1]):
    m = json.loads(line) if line.startswith("{") else {}
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("kind") == ["test"] \
            and t.get("name") in ("cuda", "cuda_kernels"):  # the GPU tests (cuda_twin is CPU-only)
        pkg = m["package_id"].split("#")[0].rstrip("/").split("/")[-1]
        shutil.copy(m["executable"], f"{sys.argv[2]}/{pkg}-{t['name']}")
PYEOF
    strip "$DIST"/tests/* 2>/dev/null || true
    tar -C "$DIST" -czf "$DIST-pack/cuda-tests.tar.gz.tmp" tests && mv "$DIST-pack/cuda-tests.tar.gz.tmp" "$DIST-pack/cuda-tests.tar.gz"
    log "packed $DIST-pack/cuda-tests.tar.gz: $(ls "$DIST/tests" | tr '\n' ' ')($(du -h "$DIST-pack/cuda-tests.tar.gz" | cut -f1))"
    # sanity: it starts here with the stub libcuda (no GPU) and prints its version
    if v=$(LD_LIBRARY_PATH="$LIBDIRS:$CUDA_ROOT/lib64/stubs" "$DIST/rdrop" --version); then
        log "$v starts (stub libcuda)"
    else
        log "warning: $DIST/rdrop does not start with the stub libcuda"
    fi
    ;;
setup)
    setup_toolchain link
    ;;
env)
    setup_toolchain link
    export_env
    for v in PATH CUDA_HOME CUDA_PATH CUDA_COMPUTE_CAP CUDAFORGE_THREADS CARGO_TARGET_DIR LIBRARY_PATH; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    [[ -z ${RDROP_CUDA_ARCHS:-} ]] || printf 'export RDROP_CUDA_ARCHS=%q\n' "$RDROP_CUDA_ARCHS"
    [[ -z ${CUDARC_CUDA_VERSION:-} ]] || printf 'export CUDARC_CUDA_VERSION=%q\n' "$CUDARC_CUDA_VERSION"
    ;;
run-env)
    setup_toolchain link
    printf 'export LD_LIBRARY_PATH=%q\n' "$LIBDIRS:$CUDA_ROOT/lib64/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    ;;
esac
