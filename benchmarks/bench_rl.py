"""Stage 2 surfaces on CPU: per-step live-encoding latency and EmbeddingStore lookup throughput.

    python benchmarks/bench_rl.py [--ckpt FILE] [--steps 400] [--anchors 200000]
                                  [--queries 100000] [--repeats 5]

1. Live encoding (what an agent pays per decision): a ``LiveEncoder`` primed with history is fed
   each timeframe's newest closed bar at every M1 close and returns the new embedding
   (``update``: append, index the kept tail, build features, encode one window). p50 / p99 over
   ``--steps`` steps, next to the same-run baseline: the bare model (``Stage1Model.encode``) on
   one ready-made window of features. Checkpoint: ``--ckpt``, or a fresh ``configs/test.yaml``
   model on synthetic data (weights do not change the cost).
2. ``EmbeddingStore.asof_many``: ``--queries`` random times (DatetimeIndex, and int64 ns) over a
   store of ``--anchors`` random 384-dim rows, median of ``--repeats`` runs alternating with the
   same-run floor: a bare ``np.searchsorted`` plus row gather.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_encode import TIMEFRAMES, make_checkpoint
from timing import seconds

from stage1.data.io import load_tf_data
from stage1.data.synthetic import write_synthetic_dataset
from stage1.data.timeframes import tf_ns
from stage1.inference import Stage1InferenceEngine
from stage1.rl.store import EmbeddingStore

MINUTE_NS = 60_000_000_000


def percentiles(values: list[float]) -> str:
    ms = np.asarray(values) * 1e3
    return f"p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms"


def bench_live(ckpt: Path, data_dir: Path, steps: int) -> None:
    engine = Stage1InferenceEngine(ckpt, device="cpu")
    frames = load_tf_data(data_dir, engine.timeframes)
    close_ns = {tf: frame.index.as_unit("ns").asi8 + tf_ns(tf) for tf, frame in frames.items()}
    anchors = engine.build_sampler(frames).anchor_ns
    first = len(anchors) // 2
    # Start after a valid anchor, with enough history; then one M1 close per step.
    times = anchors[first : first + steps + 1]

    def closed_by(t: int, n: int) -> dict[str, pd.DataFrame]:
        out = {}
        for tf, frame in frames.items():
            stop = int(np.searchsorted(close_ns[tf], t, side="right"))
            out[tf] = frame.iloc[max(0, stop - n) : stop]
        return out

    live = engine.stream(history=closed_by(int(times[0]), 2 * engine.seq_len), pool="mean")
    feeds = [closed_by(int(t), 3) for t in times[1:]]  # newest closed bars (re-sent ones replace)
    latencies = []
    for feed in feeds:
        start = time.perf_counter()
        result = live.update(feed)
        latencies.append(time.perf_counter() - start)
        assert result is not None, "every step is a new valid anchor"
    sampler = engine.build_sampler(closed_by(int(times[-1]), 2 * engine.seq_len))
    features = engine.window_features(sampler.gather([len(sampler) - 1])[0])
    bare = []
    with torch.inference_mode():
        engine.model.encode(features)
        for _ in range(steps):
            bare.append(seconds(lambda: engine.model.encode(features)))
    print(
        f"live encoding, {steps} steps (seq_len {engine.seq_len}, d_model {engine.d_model}): "
        f"LiveEncoder.update {percentiles(latencies)}; bare model on one ready window "
        f"{percentiles(bare)} (same run)"
    )


def bench_asof(n_anchors: int, n_queries: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    gaps = rng.choice([1, 1, 1, 1, 2, 3], n_anchors) * MINUTE_NS  # minutes with a few gaps
    anchor_ns = pd.Timestamp("2019-01-01", tz="UTC").value + np.cumsum(gaps)
    embeddings = rng.standard_normal((n_anchors, 384), dtype=np.float32)
    store = EmbeddingStore(anchor_ns, embeddings, {"timeframes": TIMEFRAMES}, max_staleness=None)
    times_ns = np.sort(rng.integers(anchor_ns[0], anchor_ns[-1], n_queries))
    times_index = pd.DatetimeIndex(times_ns, tz="UTC")

    def floor() -> np.ndarray:
        return embeddings[np.searchsorted(anchor_ns, times_ns, side="right") - 1]

    timings: dict[str, list[float]] = {"floor": [], "index": [], "ns": []}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for name, work in (
            ("floor", floor),
            ("index", lambda: store.asof_many(times_index)),
            ("ns", lambda: store.asof_many(times_ns)),
        ):
            timings[name].append(seconds(work))
    assert np.array_equal(store.asof_many(times_index), floor())
    med = {name: statistics.median(values[1:]) for name, values in timings.items()}
    rate = {name: n_queries / value / 1e6 for name, value in med.items()}
    print(
        f"asof_many, {n_queries} queries over {n_anchors} anchors x 384 float32 (median of "
        f"{repeats}): DatetimeIndex {med['index'] * 1e3:.1f} ms ({rate['index']:.1f} M/s), "
        f"int64 ns {med['ns'] * 1e3:.1f} ms ({rate['ns']:.1f} M/s); bare searchsorted + gather "
        f"{med['floor'] * 1e3:.1f} ms ({rate['floor']:.1f} M/s), ratio "
        f"{med['index'] / med['floor']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: fresh test model)")
    parser.add_argument("--data_dir", default=None, help="data dir (default: synthetic)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--anchors", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
        if args.data_dir is None:
            write_synthetic_dataset(data_dir, n_rows=100_000, timeframes=TIMEFRAMES, seed=0)
        ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(data_dir, Path(tmp) / "m.pth")
        bench_live(ckpt, data_dir, args.steps)
    bench_asof(args.anchors, args.queries, args.repeats)


if __name__ == "__main__":
    main()
