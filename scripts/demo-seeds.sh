#!/usr/bin/env bash
# R-Drop against plain dropout on the demo, over seeds: for each seed 1..N and α ∈ {0.3, 0},
# runs `rdrop train --preset demo --seed S --alpha A [EXTRA FLAGS]`, reads the final and the
# best test top-1 from the run's metrics.jsonl, and prints mean ± sample standard deviation per
# α, then one JSON line with the same numbers.
#
#   scripts/demo-seeds.sh [N=5] [EXTRA FLAGS...]
#   scripts/demo-seeds.sh 5 --steps 1000          # a longer demo
#
# Environment: RDROP (the binary; default $CARGO_TARGET_DIR or target, /release/rdrop),
# OUT (where the runs go; default a new temporary folder), ALPHAS (default "0.3 0").
# Wall time on a shared machine says little: the table reports each run's user CPU seconds.
set -euo pipefail

N=${1:-5}
shift || true
RDROP=${RDROP:-${CARGO_TARGET_DIR:-target}/release/rdrop}
OUT=${OUT:-$(mktemp -d -t rdrop-demo-seeds.XXXXXX)}
ALPHAS=${ALPHAS:-"0.3 0"}
[ -x "$RDROP" ] || { echo "no rdrop binary at $RDROP (cargo build --release, or set RDROP)" >&2; exit 1; }
mkdir -p "$OUT"

# top-1 of every eval line of a metrics.jsonl, in order, one per line.
evals() { grep '"kind":"eval"' "$1" | grep -o '"top1":[-0-9.eE+]*' | cut -d: -f2; }

results="$OUT/results.tsv"
: > "$results"
for a in $ALPHAS; do
  for s in $(seq 1 "$N"); do
    run="$OUT/alpha-$a-seed-$s"
    rm -rf "$run"
    TIMEFORMAT=%U
    { user=$( { time "$RDROP" train --preset demo --seed "$s" --alpha "$a" --out "$run" "$@" \
                 > "$run.log" 2>&1; } 2>&1 ); } || { echo "run failed: see $run.log" >&2; exit 1; }
    final=$(evals "$run/metrics.jsonl" | tail -n 1)
    best=$(evals "$run/metrics.jsonl" | sort -g | tail -n 1)
    printf '%s\t%s\t%s\t%s\t%s\n' "$a" "$s" "$final" "$best" "$user" | tee -a "$results"
  done
done

awk -F'\t' -v n="$N" -v flags="$*" '
  { k=$1; c[k]++; f[k]+=$3; ff[k]+=$3*$3; b[k]+=$4; bb[k]+=$4*$4; u[k]+=$5; if (!(k in seen)) { seen[k]=1; order[++m]=k } }
  function sd(s, ss, c) { return c > 1 ? sqrt((ss - s*s/c) / (c-1)) : 0 }
  END {
    printf "\n%-6s %5s  %-18s %-18s %s\n", "alpha", "runs", "final top-1 (%)", "best top-1 (%)", "user CPU s/run"
    json = sprintf("{\"seeds\":%d,\"flags\":\"%s\"", n, flags)
    for (i=1; i<=m; i++) {
      k=order[i]
      fm=100*f[k]/c[k]; fs=100*sd(f[k],ff[k],c[k]); bm=100*b[k]/c[k]; bs=100*sd(b[k],bb[k],c[k]); um=u[k]/c[k]
      printf "%-6s %5d  %6.2f ± %-9.2f %6.2f ± %-9.2f %.1f\n", k, c[k], fm, fs, bm, bs, um
      json = json sprintf(",\"alpha_%s\":{\"final_mean\":%.4f,\"final_std\":%.4f,\"best_mean\":%.4f,\"best_std\":%.4f,\"user_s\":%.1f}", k, fm, fs, bm, bs, um)
    }
    print ""
    print json "}"
  }' "$results"
echo "runs in $OUT" >&2
