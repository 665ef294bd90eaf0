#!/usr/bin/env bash
# The GPU check, in one run of at most 8 minutes on one H100/H200 (no internet needed):
#   1. the GPU-relevant tests on the GPU machine (device batch path, masks, model, losses);
#   2. `stage1 train` (the real Lightning path) for configs/base.yaml and configs/production.yaml,
#      bf16-mixed, eager and torch.compile, 300 steps of 1024 windows each, and `stage1 encode`
#      of each exported model (benchmarks/gpu_bench.py reads the figures the runs logged).
# Figures go to ${OUT:-.}/gpu_figures.json (plus logs). `--cpu` is the dry run CI does: the same
# script with the test config, tiny sizes and no compilation (Inductor on a CPU takes minutes;
# tests/unit/test_model.py checks the compiled forward), no GPU needed.
#
# Before a GPU run without internet, fetch what that machine lacks (PyTorch, Lightning, pandas and
# PyArrow are assumed present) into benchmarks/wheels/ here:
#   pip download omegaconf antlr4-python3-runtime -d benchmarks/wheels
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-.}
mkdir -p "$OUT_DIR"

if ! python -c "import omegaconf" 2>/dev/null; then
  pip install --no-index --find-links benchmarks/wheels omegaconf
fi
python -c "import stage1" 2>/dev/null || pip install --no-deps --no-build-isolation -e . >/dev/null

if [[ "${1:-}" == "--cpu" ]]; then
  echo "== dry run on CPU (test config, tiny sizes)"
  timeout 600 python benchmarks/gpu_bench.py --device cpu --configs test --rows 60000 \
    --steps 6 --log_every 2 --batch_size 32 --modes eager --encode_windows 2000 \
    --out "$OUT_DIR/gpu_figures.json"
  exit 0
fi

echo "== GPU-relevant tests (device batch path, masks, model, losses)"
timeout 120 python -m pytest -q -p no:cacheprovider tests/unit/test_device_batch.py \
  tests/unit/test_masking.py tests/unit/test_model.py tests/unit/test_losses.py -m "not slow" \
  2>&1 | tail -5 | tee "$OUT_DIR/gpu_tests.txt" || true

echo "== stage1 train (base, production; bf16 eager and compiled) and stage1 encode"
timeout 330 python benchmarks/gpu_bench.py --device cuda --configs base production \
  --batch_size 1024 --steps 300 --log_every 50 --timeout 150 --out "$OUT_DIR/gpu_figures.json"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT_DIR/nvidia_smi.csv" || true
