#!/usr/bin/env python3
"""Evaluate a Stage 1 checkpoint with the seed guide's flags; same as ``stage1 evaluate``.

    python3 scripts/evaluate_stage1.py --config configs/test.yaml \
        --ckpt checkpoints/stage1_best.pth --data_dir ../data/derived [--split test]
"""

from __future__ import annotations

import sys

from stage1.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
