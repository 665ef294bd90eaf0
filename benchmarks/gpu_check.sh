#!/usr/bin/env bash
# All GPU checks in one run (about 8 minutes on one H100), for a machine without internet.
# Figures go to ${OUT:-.}/gpu_figures.json. `--cpu` is a dry run with tiny sizes (no GPU needed).
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
  echo "== dry run on CPU"
  python benchmarks/gpu_bench.py --device cpu --config test --rows 60000 --steps 2 \
    --batch_size 16 --encode_windows 256 --num_workers 0 --out "$OUT_DIR/gpu_figures.json"
  exit 0
fi

echo "== GPU-relevant tests (model, losses, training precision paths)"
timeout 240 python -m pytest -q tests/unit/test_model.py tests/unit/test_losses.py \
  2>&1 | tail -5 | tee "$OUT_DIR/gpu_tests.txt" || true

echo "== throughput: base config, bf16, eager and torch.compile; encoding"
timeout 300 python benchmarks/gpu_bench.py --device cuda --config base \
  --out "$OUT_DIR/gpu_figures.json"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT_DIR/nvidia_smi.csv" || true
