"""Training-step cost of Stage1Model + Stage1CombinedLoss: forward + loss + backward per batch.

    python benchmarks/bench_model.py [--configs test base] [--repeats 10] [--threads N]
                                     [--precision 32|bf16] [--device cpu|cuda]

For each config: parameter count, batch size (the config's training.batch_size unless
--batch-size), median and spread of --repeats timed steps (after two warm-up steps), and
samples/s. The forward alone (no grad) is timed too, and the loss's share of the step, so a
regression can be placed. Inputs are random features with 15 % of bars hidden and gap-free,
anchor-aligned bar times (so the cross-timeframe loss does its full work).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch

from stage1 import load_config
from stage1.data.timeframes import sort_timeframes, tf_ns
from stage1.losses import Stage1CombinedLoss
from stage1.model import Stage1Model


def aligned_times(timeframes: list[str], batch: int, seq_len: int) -> torch.Tensor:
    """Open times int64 ns ``[B, n_tf, L]``: each timeframe's L bars end at the same anchor."""
    anchor = 1_700_000_000 * 10**9
    steps = torch.arange(seq_len, 0, -1)
    per_tf = torch.stack([anchor - steps * tf_ns(tf) for tf in timeframes])
    return per_tf.expand(batch, -1, -1).contiguous()


def timed(step: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Seconds per call, after two warm-up calls."""
    seconds = []
    for run in range(repeats + 2):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run >= 2:
            seconds.append(time.perf_counter() - start)
    return seconds


def bench_config(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    config = load_config(f"configs/{name}.yaml")
    timeframes = sort_timeframes(list(config.data.timeframes))
    batch, seq_len = args.batch_size or config.training.batch_size, config.data.seq_len
    model = Stage1Model(config).to(device)
    criterion = Stage1CombinedLoss(config).to(device)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(batch, len(timeframes), seq_len, 6, generator=gen).to(device)
    masks = (torch.rand(features.shape[:-1], generator=gen) < 0.15).to(device)
    times = aligned_times(timeframes, batch, seq_len).to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            reconstructed = model(features, masks)["reconstructed"]
            losses = criterion(reconstructed, features, masks, times)
        losses["total"].backward()

    def forward_only() -> None:
        with torch.no_grad(), autocast:
            model(features, masks)

    def loss_only() -> None:
        with torch.no_grad():
            criterion(features + 0.1, features, masks, times)

    step = timed(train_step, args.repeats, device)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "step_ms": 1e3 * statistics.median(step),
        "min_ms": 1e3 * min(step),
        "max_ms": 1e3 * max(step),
        "fwd_ms": 1e3 * statistics.median(timed(forward_only, args.repeats, device)),
        "loss_ms": 1e3 * statistics.median(timed(loss_only, args.repeats, device)),
        "samples_s": batch / statistics.median(step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["test", "base"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(
        f"# {date.today()} | {platform.processor() or platform.machine()} | device {device} | "
        f"torch {torch.__version__} | {torch.get_num_threads()} threads | precision {args.precision}"
    )
    print(
        f"{'config':<8} {'params':>10} {'batch':>6} {'fwd+bwd ms':>11} {'(min-max)':>15} "
        f"{'samples/s':>10} {'fwd ms':>8} {'loss ms':>8}"
    )
    for name in args.configs:
        r = bench_config(name, args, device)
        spread = f"({r['min_ms']:.0f}-{r['max_ms']:.0f})"
        print(
            f"{name:<8} {r['params']:>10,} {r['batch']:>6} {r['step_ms']:>11.1f} {spread:>15} "
            f"{r['samples_s']:>10.0f} {r['fwd_ms']:>8.1f} {r['loss_ms']:>8.1f}"
        )


if __name__ == "__main__":
    main()
