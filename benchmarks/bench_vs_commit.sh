#!/usr/bin/env bash
# Same-run speed comparison against an earlier commit: alternates this tree's and BASE's
# bench_train.py (Lightning training step) and bench_evaluation.py (evaluation batch), N rounds,
# one torch thread each, and prints every figure; take the medians.
#
#   bash benchmarks/bench_vs_commit.sh BASE_COMMIT [ROUNDS=3] [CONFIG=demo]
set -euo pipefail
base=${1:?usage: bench_vs_commit.sh BASE_COMMIT [ROUNDS] [CONFIG]}
rounds=${2:-3}
config=${3:-demo}
here=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)/base
git -C "$here" worktree add -q --detach "$tree" "$base"
trap 'git -C "$here" worktree remove --force "$tree"' EXIT
export OMP_NUM_THREADS=1 MPLBACKEND=Agg
for round in $(seq "$rounds"); do
  for side in base head; do
    root=$here; [ "$side" = base ] && root=$tree
    echo "== round $round $side ($(git -C "$root" rev-parse --short HEAD))"
    (cd "$root" && PYTHONPATH="$root/src" python benchmarks/bench_train.py --configs "$config" \
      --steps 20 --warmup 3 --threads 1 2>/dev/null | grep -iE "samples/s|step" || true)
    (cd "$root" && PYTHONPATH="$root/src" python benchmarks/bench_evaluation.py --config "$config" \
      --repeats 5 2>/dev/null | grep -iE "windows/s|total|metrics|forward" || true)
  done
done
