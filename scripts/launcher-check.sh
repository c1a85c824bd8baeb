#!/usr/bin/env bash
# Data parallel started by the real launchers, on one CPU machine: torchrun (one node of 2
# ranks; two "nodes" of 1 rank on 127.0.0.1, static and c10d rendezvous), Slurm (`srun -n 2`
# and `sbatch --wrap "srun ..."`), and rdrop's own `--nproc-per-node 2`. Every run is the
# demo preset with SGD for 20 updates of 64 = 2 ranks × 32; all of them must end with the same
# final weights, to the bit (the same code path: only how the ranks were started differs),
# and with the one-process run's test loss within 1e-6 (float sums in another order).
#
# Then restarts (preemption; Slurm waits about 2 minutes before it starts a requeued job):
# torchrun --max-restarts 2 with rank 1 killed (SIGKILL) mid-run,
# a Slurm job (sbatch --requeue) requeued mid-run with `scontrol requeue`, and one stopped with
# SIGUSR1 that requeues itself (`rdrop train --requeue`). Each must continue from its
# checkpoint and end with the uninterrupted two-rank run's weights, to the bit.
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
lines() { # train lines logged in run folder $1
    grep -c '"kind":"train"' "$1/metrics.jsonl" 2>/dev/null || echo 0
}
wait_lines() { # $1 folder, $2 lines: wait (at most 300 s) until the run logged that many
    local t=0
    while [ "$(lines "$1")" -lt "$2" ] && [ $t -lt 3000 ]; do sleep 0.1; t=$((t + 1)); done
}
kill_rank() { # $1 rank, $2 run folder, $3 lines: SIGKILL that rank's process at that point
    wait_lines "$2" "$3"
    local pid
    for pid in $(pgrep -f -- "--out $2" ); do
        if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx "RANK=$1"; then
            echo "[launcher-check] $2: SIGKILL to rank $1 (pid $pid) after $(lines "$2") updates"
            kill -9 "$pid"
            return
        fi
    done
    echo "[launcher-check] $2: rank $1 not found"
}
wait_job() { # $1 job id: until Slurm forgets it (at most 600 s)
    local t=0
    while squeue -h -j "$1" 2>/dev/null | grep -q . && [ $t -lt 600 ]; do sleep 1; t=$((t + 1)); done
}
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
    # torchrun --max-restarts: rank 1 killed once; torchrun restarts the world, which
    # continues (TORCHELASTIC_RESTART_COUNT=1, no flag needed).
    RDROP_TEST_STEP_DELAY_MS=300 run torchrun-restart "$TORCHRUN" --no-python --max-restarts 2 \
        --nproc-per-node 2 --master-port 29541 \
        "$RDROP" "${ARGS[@]}" --save-every 2 --out torchrun-restart &
    kill_rank 1 torchrun-restart 8
    wait
else
    echo "[launcher-check] torchrun: skipped (not found; pip install torch, or set TORCHRUN)"
fi
if command -v srun >/dev/null && sinfo >/dev/null 2>&1; then
    run srun srun -n 2 --overcommit "$RDROP" "${ARGS[@]}" --out srun
    job=$(sbatch --parsable -n 2 --overcommit -o sbatch.err \
        --wrap "srun $RDROP ${ARGS[*]} --out sbatch > sbatch.json")
    wait_job "$job"
    RC[sbatch]=$([ -s sbatch.json ] && echo 0 || echo 1)
    echo "[launcher-check] sbatch: job $job, summary $( [ -s sbatch.json ] && echo written || echo missing)"
    # sbatch --requeue, requeued by hand mid-run: Slurm stops the ranks (SIGTERM: checkpoint,
    # exit 75) and starts the script again (SLURM_RESTART_COUNT=1: the run continues).
    export RDROP_TEST_STEP_DELAY_MS=300
    job=$(sbatch --parsable --requeue -n 2 --overcommit -o sbatch-requeue.err --open-mode=append \
        --wrap "srun $RDROP ${ARGS[*]} --save-every 2 --out sbatch-requeue > sbatch-requeue.json")
    wait_lines sbatch-requeue 8
    echo "[launcher-check] sbatch-requeue: scontrol requeue $job after $(lines sbatch-requeue) updates"
    scontrol requeue "$job"
    wait_job "$job"
    echo "[launcher-check] sbatch-requeue: job $job ended, summary $( [ -s sbatch-requeue.json ] && echo written || echo missing)"
    # SIGUSR1 (as --signal=USR1@90 sends it): checkpoint, exit 75, and `--requeue` requeues.
    job=$(sbatch --parsable --requeue -n 2 --overcommit -o sbatch-usr1.err --open-mode=append \
        --wrap "srun $RDROP ${ARGS[*]} --save-every 2 --requeue --out sbatch-usr1 > sbatch-usr1.json")
    wait_lines sbatch-usr1 8
    echo "[launcher-check] sbatch-usr1: scancel --signal=USR1 $job after $(lines sbatch-usr1) updates"
    scancel --signal=USR1 "$job"
    wait_job "$job"
    echo "[launcher-check] sbatch-usr1: job $job ended, summary $( [ -s sbatch-usr1.json ] && echo written || echo missing)"
    unset RDROP_TEST_STEP_DELAY_MS
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
runs = ["nproc", "torchrun", "torchrun-2nodes", "torchrun-c10d", "srun", "sbatch",
        "torchrun-restart", "sbatch-requeue", "sbatch-usr1"]
# What each restart run must have said (its stderr, or Slurm's output file).
restarted = {"torchrun-restart": "torchrun's restart 1",
             "sbatch-requeue": "Slurm's requeue 1", "sbatch-usr1": "Slurm's requeue 1"}
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
    note = ""
    if r in restarted:
        err = (out / f"{r}.err").read_text(errors="replace") if (out / f"{r}.err").exists() else ""
        said = restarted[r] in err and "continuing the run in" in err
        stops = err.count("preempted (SIG")
        good &= said
        note = f"  continued after {restarted[r]}: {'yes' if said else 'NO'}" + (
            f", ranks that stopped with a checkpoint (exit 75): {stops}" if stops else "")
    ok &= good
    rows.append(f"  {r:18s} world {s.get('world_size')} {s.get('collective')}  "
                f"weights {str(d)[:12]}  |Δ test loss| vs one process {dl:.1e}  {'ok' if good else 'FAIL'}{note}")
print("\n".join(rows))
if len(digests) != 1:
    ok = False
    print("  the distributed runs' final weights differ")
print("[launcher-check]", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
