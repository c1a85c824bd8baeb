#!/usr/bin/env bash
# Data parallel started by the real launchers, on one CPU machine: torchrun (one node of 2
# ranks; two "nodes" of 1 rank on 127.0.0.1, static and c10d rendezvous), Slurm (`srun -n 2`
# and `sbatch --wrap "srun ..."`), and rdrop's own `--nproc-per-node 2`. Every run is the
# demo preset with SGD for 20 updates of 64 = 2 ranks × 32; all of them must end with the same
# final weights, to the bit (the same code path: only how the ranks were started differs),
# and with the one-process run's test loss within 1e-6 (float sums in another order).
#
# Ranks run on the CPU through the test hook (RDROP_TEST_CPU_RANKS=1), so the binary must be a
# debug build (`cargo build -p rdrop-cli`, the default RDROP) or one built with
# `--features test-hooks`. Not part of CI: it needs torchrun (pip install torch) and, for the
# Slurm part, a running Slurm (scripts/launcher-check.sh --local-slurm starts a one-node
# cluster here: Debian's slurm-wlm and munge, as root). A part whose launcher is missing is
# reported as skipped.
#
# usage: scripts/launcher-check.sh [--local-slurm]
# env:   RDROP (default target/debug/rdrop), TORCHRUN (default: torchrun on PATH),
#        OUT (default a new temporary folder)
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
RDROP=${RDROP:-$REPO/target/debug/rdrop}
TORCHRUN=${TORCHRUN:-$(command -v torchrun || true)}
OUT=${OUT:-$(mktemp -d)}
export RDROP_TEST_CPU_RANKS=1
ARGS=(train --preset demo --micro-batch 32 --steps 20 --eval-every 10 --optimizer sgd
      --grad-bucket-mb 1e-6 --json)
[ -x "$RDROP" ] || { echo "no rdrop binary at $RDROP (cargo build -p rdrop-cli)"; exit 2; }
mkdir -p "$OUT"
cd "$OUT" || exit 2
echo "[launcher-check] rdrop $RDROP, runs in $OUT"

if [ "${1:-}" = "--local-slurm" ]; then
    # A one-node cluster on this machine (containers: no cgroups, no systemd).
    host=$(hostname)
    mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null
    cat > /etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SlurmUser=root
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged || munged --force
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    sleep 3
fi

declare -A RC
run() { # name, then the command; stdout (the --json summary) and stderr into name.{json,err}
    local name=$1
    shift
    timeout 300 "$@" > "$name.json" 2> "$name.err"
    RC[$name]=$?
    echo "[launcher-check] $name: exit ${RC[$name]}"
}

run one "$RDROP" "${ARGS[@]}" --out one
run nproc "$RDROP" "${ARGS[@]}" --nproc-per-node 2 --out nproc
if [ -n "$TORCHRUN" ]; then
    run torchrun "$TORCHRUN" --no-python --nproc-per-node 2 --master-port 29511 \
        "$RDROP" "${ARGS[@]}" --out torchrun
    for nr in 1 0; do
        run "torchrun-2nodes-$nr" "$TORCHRUN" --no-python --nnodes 2 --node-rank $nr \
            --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29521 \
            "$RDROP" "${ARGS[@]}" --out torchrun-2nodes &
    done
    wait
    for nr in 1 0; do
        run "torchrun-c10d-$nr" "$TORCHRUN" --no-python --nnodes 2 --nproc-per-node 1 \
            --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29531 --rdzv-id launcher-check \
            "$RDROP" "${ARGS[@]}" --out torchrun-c10d &
    done
    wait
else
    echo "[launcher-check] torchrun: skipped (not found; pip install torch, or set TORCHRUN)"
fi
if command -v srun >/dev/null && sinfo >/dev/null 2>&1; then
    run srun srun -n 2 --overcommit "$RDROP" "${ARGS[@]}" --out srun
    job=$(sbatch --parsable -n 2 --overcommit -o sbatch.err \
        --wrap "srun $RDROP ${ARGS[*]} --out sbatch > sbatch.json")
    while squeue -h -j "$job" 2>/dev/null | grep -q .; do sleep 1; done
    RC[sbatch]=$([ -s sbatch.json ] && echo 0 || echo 1)
    echo "[launcher-check] sbatch: job $job, summary $( [ -s sbatch.json ] && echo written || echo missing)"
else
    echo "[launcher-check] Slurm: skipped (no srun, or no cluster answers sinfo; try --local-slurm)"
fi

# The verdict: every distributed run's final weights equal (sha256), its test loss within 1e-6
# of the one-process run's, and it said it ran on 2 ranks over TCP.
python3 - "$OUT" <<'EOF'
import hashlib, json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def summary(name):
    try:
        return json.loads((out / f"{name}.json").read_text().strip().splitlines()[-1])
    except Exception:
        return None
one = summary("one")
# Two torchrun agents ("nodes"): rank 0 (whichever agent it landed on) prints the summary.
runs = ["nproc", "torchrun", "torchrun-2nodes", "torchrun-c10d", "srun", "sbatch"]
ok, digests, rows = one is not None, set(), []
for r in runs:
    s = summary(r) or summary(f"{r}-0") or summary(f"{r}-1")
    if s is None:
        if any((out / f"{n}.err").exists() for n in (r, f"{r}-0", f"{r}-1")) or r == "nproc":
            ok = False
            rows.append(f"  {r:18s} FAILED (no summary; see {out}/{r}.err)")
        continue
    w = out / s["out"] / "final" / "model.safetensors"
    d = hashlib.sha256(w.read_bytes()).hexdigest() if w.exists() else None
    digests.add(d)
    dl = abs(s["test_loss"] - one["test_loss"]) if one else float("nan")
    good = d is not None and s.get("world_size") == 2 and s.get("collective") == "tcp" and dl <= 1e-6
    ok &= good
    rows.append(f"  {r:18s} world {s.get('world_size')} {s.get('collective')}  "
                f"weights {str(d)[:12]}  |Δ test loss| vs one process {dl:.1e}  {'ok' if good else 'FAIL'}")
print("\n".join(rows))
if len(digests) != 1:
    ok = False
    print("  the distributed runs' final weights differ")
print("[launcher-check]", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
