"""Where `stage1 evaluate` spends its time, per batch of windows (CPU).

    python benchmarks/bench_evaluation.py [--config demo] [--rows 200000] [--batch 256]
                                          [--repeats 5]

On synthetic M1 data with the given config and a freshly initialised model (weights do not
change the cost), one evaluation batch is timed stage by stage, median of ``--repeats`` runs:
window building (gather + features + normalise), mask generation (synchronised), the model's
masked forward, and the metrics (four baselines incl. agg + every metric, ``MetricAccumulator.update``).
The same-run baseline is the model forward: the ratio says how much the honest metrics add on
top of the reconstruction itself. Probes and the report are one-off costs, not per window.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import median_seconds

from stage1.config import load_config
from stage1.data.dataset import Stage1Dataset
from stage1.data.features import FeatureEngineer
from stage1.data.synthetic import write_synthetic_dataset
from stage1.evaluation.metrics import MetricAccumulator
from stage1.model.model import Stage1Model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_synthetic_dataset(
            Path(tmp) / "data", args.rows, list(config.data.timeframes), seed=0
        )
        dataset = Stage1Dataset(data_dir, config, "test")
    torch.manual_seed(0)
    model = Stage1Model(config).eval()
    engineer, normalizer = FeatureEngineer(config), dataset.normalizer
    positions = np.arange(min(args.batch, len(dataset)))
    batch = dataset.get_batch(positions)
    generator = torch.Generator().manual_seed(0)
    parents = batch.get("parents")
    masks = dataset.masking.generate(batch["times"], generator, sync=True, parents=parents)
    with torch.inference_mode():
        out = model(batch["features"], masks, batch["times"])["reconstructed"]
    truth = normalizer.denormalize(batch["targets"]).double()
    pred = normalizer.denormalize(out).double()
    std = normalizer.std.double().numpy()

    def metrics() -> None:
        MetricAccumulator(dataset.sampler.timeframes, std).update(
            truth.numpy(), pred.numpy(), masks.numpy(), batch["times"].numpy(),
            engineer.to_prices(truth, batch["ref_price"]).numpy(),
            engineer.to_prices(pred, batch["ref_price"]).numpy(),
        )  # fmt: skip

    def forward() -> None:
        with torch.inference_mode():
            model(batch["features"], masks, batch["times"])

    stages = {
        "windows (gather+features+normalise)": lambda: dataset.get_batch(positions),
        "masks (synchronised)": lambda: dataset.masking.generate(
            batch["times"], generator, sync=True, parents=parents
        ),
        "model forward (masked)": forward,
        "metrics (4 baselines + all metrics)": metrics,
    }
    n = len(positions)
    print(f"bench_evaluation: config={args.config} batch={n} windows, torch threads="
          f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}")  # fmt: skip
    seconds = {name: median_seconds(fn, args.repeats, warmup=True) for name, fn in stages.items()}
    for name, s in seconds.items():
        print(f"  {name:<38} {s * 1e3:8.1f} ms  {n / s:10,.0f} windows/s")
    total = sum(seconds.values())
    ratio = seconds["metrics (4 baselines + all metrics)"] / seconds["model forward (masked)"]
    print(f"  metrics / model forward (same run): {ratio:.2f}x")
    print(f"  one masked pass, all stages: {n / total:,.0f} windows/s "
          "(evaluate runs two: synchronised + unsynchronised masks)")  # fmt: skip


if __name__ == "__main__":
    main()
