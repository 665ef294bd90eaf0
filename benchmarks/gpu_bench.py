"""GPU figures in one run: training throughput (bf16, with and without torch.compile), the share
of step time spent waiting for data, encoding throughput and peak GPU memory.

Called by ``benchmarks/gpu_check.sh``; ``--device cpu`` is a dry run with tiny sizes so the script
itself stays tested on machines without a GPU. Writes a JSON file of figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from stage1.checkpoint import export_checkpoint
from stage1.config import config_to_dict, load_config
from stage1.data.dataset import Stage1DataModule
from stage1.data.io import load_tf_data
from stage1.data.synthetic import write_synthetic_dataset
from stage1.inference import Stage1InferenceEngine
from stage1.training import Stage1LightningModule

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_module(data_dir: Path, config: Any) -> tuple[Stage1DataModule, Stage1LightningModule]:
    """A set-up data module and a freshly initialised training module, as `stage1 train` has."""
    datamodule = Stage1DataModule(data_dir, config)
    datamodule.setup("fit")
    assert datamodule.normalizer is not None
    return datamodule, Stage1LightningModule(config, datamodule.normalizer.to_dict())


def train_throughput(
    data_dir: Path, config: Any, device: torch.device, steps: int, compile_model: bool
) -> dict[str, float]:
    """Samples/s and data-wait share of a bf16 training step on the real loaders."""
    datamodule, module = fresh_module(data_dir, config)
    module = module.to(device)
    model, criterion, masking = module.model, module.criterion, module.masking
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = iter(datamodule.train_dataloader())
    waits, totals, batch_size = [], [], 0
    warmup = 3
    for step in range(warmup + steps):
        start = time.perf_counter()
        batch = next(loader)
        fetched = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            masks = masking.generate(batch["times"])
            out = step_model(batch["features"], masks, batch["times"])
            loss = criterion(
                out["reconstructed"], batch["targets"], masks, batch["times"], out.get("scale")
            )
        loss["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            waits.append(fetched - start)
            totals.append(time.perf_counter() - start)
            batch_size = int(batch["features"].shape[0])
    step_s = statistics.median(totals)
    return {
        "batch_size": batch_size,
        "step_ms_median": 1000 * step_s,
        "samples_per_s": batch_size / step_s,
        "data_wait_share": sum(waits) / sum(totals),
    }


def encode_throughput(
    data_dir: Path, config: Any, device: torch.device, n_windows: int, batch_size: int
) -> dict[str, float]:
    """Windows/s of ``Stage1InferenceEngine.encode`` (mean-pooled) on ``n_windows`` anchors."""
    datamodule, module = fresh_module(data_dir, config)
    assert datamodule.normalizer is not None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = export_checkpoint(
            Path(tmp) / "bench.pth",
            module.model.state_dict(),
            config_to_dict(config),
            datamodule.normalizer.to_dict(),
            epoch=0,
            best_loss=None,
        )
        engine = Stage1InferenceEngine(ckpt, device=str(device))
    data = load_tf_data(data_dir, list(config.data.timeframes))
    sampler = engine.build_sampler(data)
    ids = engine.select_windows(sampler)[-n_windows:]
    engine.embed_windows(sampler, ids[:batch_size], "mean")  # warm-up
    runs = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(ids), batch_size):
            engine.embed_windows(sampler, ids[i : i + batch_size], "mean")
        _sync(device)
        runs.append(time.perf_counter() - start)
    return {"windows": len(ids), "windows_per_s": len(ids) / statistics.median(runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_figures.json")
    parser.add_argument("--config", default="base")
    parser.add_argument("--rows", type=int, default=400_000, help="synthetic M1 rows")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--encode_windows", type=int, default=100_000)
    parser.add_argument("--num_workers", type=int, default=6)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    overrides = [
        f"training.batch_size={args.batch_size}",
        f"dataloader.num_workers={args.num_workers}",
        f"dataloader.persistent_workers={args.num_workers > 0}",
        f"dataloader.pin_memory={device.type == 'cuda'}",
    ]
    config = load_config(args.config, overrides)
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_synthetic_dataset(
            Path(tmp) / "data", n_rows=args.rows, timeframes=TIMEFRAMES, seed=0
        )
        for compiled in (False, True):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            key = "train_bf16_compile" if compiled else "train_bf16"
            figures[key] = train_throughput(data_dir, config, device, args.steps, compiled)
            if device.type == "cuda":
                figures[key]["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            print(key, figures[key], flush=True)
        figures["encode_mean_pool"] = encode_throughput(
            data_dir, config, device, args.encode_windows, batch_size=4096
        )
        print("encode", figures["encode_mean_pool"], flush=True)
    Path(args.out).write_text(json.dumps(figures, indent=2))
    print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
