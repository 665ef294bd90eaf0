#!/usr/bin/env bash
# A normal (non-editable) install, used from a directory outside the checkout: the configs must
# come from the wheel. The venv sees the system's site-packages so torch and the other
# dependencies are not installed again (seconds instead of minutes); stage1 itself must be the
# wheel's copy, which the first check below asserts.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install -q --no-deps "$work"/dist/stage1-*.whl
echo "   wheel built and installed ($((SECONDS - start)) s)"

cd "$work" && mkdir elsewhere && cd elsewhere
"$work/venv/bin/python" - "$work/venv" <<'PY'
import sys
from pathlib import Path

import stage1
from stage1.config import CONFIG_DIR, shipped_configs

venv = Path(sys.argv[1]).resolve()
assert venv in Path(stage1.__file__).resolve().parents, f"imported {stage1.__file__}, not the wheel"
assert venv in CONFIG_DIR.resolve().parents and "demo" in shipped_configs(), CONFIG_DIR
print(f"   stage1 from {Path(stage1.__file__).parent}, configs: {', '.join(shipped_configs())}")
PY
"$work/venv/bin/stage1" check
"$work/venv/bin/python" -m stage1 demo --out demo_out \
    training.max_epochs=1 training.limit_train_batches=2 training.limit_val_batches=1 \
    evaluation.probe_max_train_windows=500
test -s demo_out/report/metrics.json && test -s demo_out/embeddings.parquet
"$work/venv/bin/stage1" train --config configs/test.yaml --data_dir demo_out/data \
    --output_dir train_out --fast_dev_run
test -s train_out/config.yaml
echo "   package check passed ($((SECONDS - start)) s)"
