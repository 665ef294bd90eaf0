"""GPU figures through the real commands: `stage1 train` (Lightning) for each config in bf16,
eager and with ``training.compile=true``, then `stage1 encode` of its exported model.

Per training run, from what the run logged to TensorBoard (``ThroughputCallback`` and
``MemoryMonitorCallback`` of ``stage1.training``; the first logging interval, which holds the
compilation, is dropped): training windows/s, the share of step time the host spent fetching and
building batches (``perf/data_wait_share``), peak GPU memory; model FLOP utilisation from the
training FLOPs per window (``torch.utils.flop_counter``: forward + backward of model and loss)
and the device's dense bf16 peak (by name: 989 TFLOP/s for H100 SXM and H200). Per config, the
encoding rate `stage1 encode` prints (loading excluded).

Called by ``benchmarks/gpu_check.sh``; ``--device cpu`` is the dry run with tiny sizes (CI runs
it, so this script stays working on machines without a GPU). Writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from stage1.config import load_config
from stage1.data.io import load_tf_data
from stage1.data.synthetic import write_synthetic_dataset
from stage1.losses import Stage1CombinedLoss
from stage1.model.model import Stage1Model
from stage1.training import read_scalars

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]
# Dense bf16 tensor-core peak by device name (no sparsity), FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
ENCODE_RATE = re.compile(r"encoding loop ([\d,]+) windows/s")


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a device by its name (PCIe H100s are slower: 756 TFLOP/s)."""
    if "H100" in device_name and "PCIe" in device_name:
        return 756e12
    return next((peak for key, peak in PEAK_BF16.items() if key in device_name), None)


def train_flops_per_window(config: Any) -> float:
    """FLOPs of one training window: model forward + loss + backward (counted on CPU, batch 2)."""
    model, criterion = Stage1Model(config), Stage1CombinedLoss(config)
    n_tf, seq_len = len(config.data.timeframes), int(config.data.seq_len)
    x = torch.randn(2, n_tf, seq_len, 6)
    masks = torch.rand(2, n_tf, seq_len) < 0.15
    masks[:, 0, 0] = False
    minutes = torch.tensor([1, 5, 15, 30, 60, 240][:n_tf])[:, None] * torch.arange(seq_len)
    times = (minutes * 60_000_000_000).expand(2, n_tf, seq_len).contiguous()
    with FlopCounterMode(display=False) as counter:
        out = model(x, masks, times)
        losses = criterion(out["reconstructed"], x, masks, times, out.get("scale"))
        losses["total"].backward()
    return counter.get_total_flops() / 2


def run(command: list[str], log: Path, timeout_s: int) -> str:
    """Run a stage1 command, keep its output in ``log``; raise with the tail on failure."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({result.returncode}):\n{tail}")
    print(f"  {' '.join(command[3:5])}: {time.perf_counter() - started:.0f} s", flush=True)
    return result.stdout + result.stderr


def train_figures(run_dir: Path, flops: float, peak: float | None) -> dict[str, Any]:
    """Medians of what the run logged, the first (compiling) interval dropped."""
    scalars = read_scalars(run_dir)

    def steady(tag: str) -> float | None:
        values = [v for _, v in scalars.get(tag, [])][1:]
        return statistics.median(values) if values else None

    rate = steady("perf/windows_per_s")
    peak_mb = max((v for _, v in scalars.get("memory/gpu_peak_mb", [])), default=None)
    return {
        "windows_per_s": rate,
        "data_wait_share": steady("perf/data_wait_share"),
        "step_ms": steady("perf/step_ms"),
        "mfu": None if rate is None or peak is None else rate * flops / peak,
        "model_tflops_per_s": None if rate is None else rate * flops / 1e12,
        "peak_gpu_mb": peak_mb,
        "logged_intervals": len(scalars.get("perf/windows_per_s", [])),
    }


def bench_config(
    name: str,
    data_dir: Path,
    work: Path,
    args: argparse.Namespace,
    figures: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Fill ``figures`` for one config; ``save`` writes everything measured so far (a run cut
    short by the time limit still leaves the figures it had)."""
    config = load_config(name)
    flops = train_flops_per_window(config)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    figures["train_flops_per_window"] = flops
    stage1 = [sys.executable, "-m", "stage1"]
    common = [
        f"training.max_steps={args.steps}",
        f"training.log_every_n_steps={args.log_every}",
        "training.limit_val_batches=0",
        "training.max_epochs=1000",
        "training.precision=bf16-mixed",
        "dataloader.num_workers=0",
        "dataloader.persistent_workers=false",
        *([f"training.batch_size={args.batch_size}"] if args.batch_size else []),
    ]
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    for compiled in (mode == "compile" for mode in args.modes):
        key = "train_bf16_compile" if compiled else "train_bf16_eager"
        out = work / f"{name}_{key}"
        command = [*stage1, "train", "--config", name, "--data_dir", str(data_dir)]
        command += ["--output_dir", str(out), "--accelerator", accelerator]
        command += [*common, f"training.compile={str(compiled).lower()}"]
        try:
            run(command, out.with_suffix(".log"), args.timeout)
            figures[key] = train_figures(out, flops, peak_flops(device_name))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # keep the other figures
            figures[key] = {"error": str(exc)}
        print(f"  {key}: {figures[key]}", flush=True)
        save()
    ckpt = next(work.glob(f"{name}_train_bf16_*/checkpoints/stage1_best.pth"), None)
    if ckpt is None:
        figures["encode_windows_per_s"] = None
        return
    command = [*stage1, "encode", "--ckpt", str(ckpt), "--data_dir", str(data_dir)]
    if args.encode_windows:
        m1 = load_tf_data(data_dir, ["m1"])["m1"]
        command += ["--start", m1.index[-args.encode_windows].isoformat()]
    command += ["--out", str(work / f"{name}.npy"), "--pool", "mean", "--device", args.device]
    output = run(command, work / f"{name}_encode.log", args.timeout)
    match = ENCODE_RATE.search(output)
    figures["encode_windows_per_s"] = float(match.group(1).replace(",", "")) if match else None
    print(f"  encode: {figures['encode_windows_per_s']} windows/s", flush=True)


def save_json(path: str, figures: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(figures, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="gpu_figures.json")
    parser.add_argument("--configs", nargs="+", default=["base", "production"])
    parser.add_argument("--rows", type=int, default=600_000, help="synthetic M1 rows")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--log_every", type=int, default=50, help="steps per measured interval")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per command")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"])
    parser.add_argument(
        "--encode_windows", type=int, default=None, help="encode the newest N (default: all)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "peak_bf16_flops": peak_flops(torch.cuda.get_device_name())
        if args.device == "cuda"
        else None,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "steps_per_run": args.steps,
        "cpu_count": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        work = Path(tmp)
        data_dir = write_synthetic_dataset(
            work / "data", n_rows=args.rows, timeframes=TIMEFRAMES, seed=0
        )
        for name in args.configs:
            print(f"== {name}", flush=True)
            figures[name] = {}
            bench_config(
                name, data_dir, work, args, figures[name], lambda: save_json(args.out, figures)
            )
            save_json(args.out, figures)
    print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
