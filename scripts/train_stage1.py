#!/usr/bin/env python3
"""The guide's training entry point; same as ``stage1 train``.

    python3 scripts/train_stage1.py --config configs/test.yaml --data_dir ../data/derived --fast_dev_run
    python3 scripts/train_stage1.py --config configs/production.yaml --data_dir ../data/derived \\
        --max_epochs 20 --batch_size 24 [--devices 2 --strategy ddp] [--resume] [key.sub=value ...]
"""

import os
import sys

# The guide's MPI workaround, before anything imports Lightning (stage1.cli sets it too).
os.environ.setdefault("PYTORCH_LIGHTNING_DISABLE_MPI", "1")
os.environ.setdefault("OMPI_DISABLED", "1")
os.environ.setdefault("I_MPI_DISABLED", "1")

from stage1.cli import main

if __name__ == "__main__":
    # --debug belongs to the top-level `stage1` parser; accept it anywhere here.
    args = sys.argv[1:]
    debug = ["--debug"] if "--debug" in args else []
    sys.exit(main([*debug, "train", *(a for a in args if a != "--debug")]))
