"""Stage1InferenceEngine: encoder embeddings for the Stage 2 RL agent.

Windows are built by exactly the training code: :class:`MultiTFWindowSampler` (same
``seq_len`` and staleness rule, no look-ahead) and :class:`DeviceBatchBuilder` on the engine's
device (gather, features, the checkpoint's ``TFNormalizer``); the model then runs without
masks. So an anchor time gets the same embedding here as the ``encoded`` output training computes for that window.

An embedding is keyed by its anchor: the CLOSE time of the newest base-timeframe bar in the
window, i.e. the moment it becomes available to a live agent. Shapes:

* unpooled: ``[n_tf, latent_len, d_model]`` per anchor;
* ``pool='mean'``: mean over the latent steps, timeframes concatenated: ``[n_tf * d_model]``;
* ``pool='last'``: the newest latent step of each timeframe, concatenated: ``[n_tf * d_model]``;
* ``pool='flatten'``: every value, C order of ``[n_tf, latent_len, d_model]``:
  ``[n_tf * latent_len * d_model]``.

Memory: the engine never materialises all windows; it gathers one batch at a time. ``encode``
returns the whole result, which for many anchors without pooling is necessarily large
(1 M anchors x 6 x 12 x 128 float32 = 37 GB); use ``iter_encode`` or ``stage1 encode`` (which
streams chunks to disk) for such ranges.

Beside the engine: :class:`LiveEncoder` (incremental encoding for a live agent) lives in
:mod:`stage1.live`, the ``stage1 encode`` command (``run_encode``, ``encode_to_file``, the file
writers) in :mod:`stage1.encode`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from stage1.checkpoint import load_checkpoint
from stage1.data.device_batch import DeviceBatchBuilder
from stage1.data.features import FeatureEngineer
from stage1.data.io import bars_from_frame, validate_bars
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.timeframes import sort_timeframes
from stage1.errors import CheckpointError, ConfigError, DataValidationError
from stage1.live import LiveEncoder
from stage1.model.model import POOLS, pool_embeddings

# Windows per model call when batch_size is None. On a CPU small batches keep the activations in
# cache (bench_encode.py: 128 runs ~1.5x faster than 1024); a GPU wants big ones.
DEFAULT_BATCH_SIZE = {"cpu": 128, "cuda": 4096}

TimeLike = str | datetime | np.datetime64 | pd.Timestamp | None
Embeddings = npt.NDArray[np.float32]


def to_utc_ns(value: TimeLike, name: str) -> int | None:
    """A time bound as int64 UTC nanoseconds (naive = UTC); ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{name}: {value!r} is not a time (use e.g. 2019-06-01 or 2019-06-01T12:30Z)"
        ) from exc
    if pd.isna(stamp):
        raise ConfigError(f"{name}: {value!r} is not a time")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.as_unit("ns").value)


def _utc_index(anchor_ns: npt.NDArray[np.int64]) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(anchor_ns.view("datetime64[ns]"), name="timestamp").tz_localize("UTC")


class Stage1InferenceEngine:
    """Trained encoder + the training pipeline's window code, loaded from ONE checkpoint.

    ``checkpoint_path``: the ``stage1_best.pth`` export or a Lightning ``.ckpt`` (see
    :mod:`stage1.checkpoint`); a missing, corrupt or incompatible file raises
    :class:`CheckpointError`. ``device``: ``'cpu'``, ``'cuda'``, ... (``None``: CUDA if available).
    Attributes: ``model`` (eval mode, on ``device``), ``config`` (resolved), ``normalizer``,
    ``feature_engineer``, ``timeframes`` (finest first), ``seq_len``, ``latent_len``, ``d_model``,
    ``meta`` (checkpoint source, epoch, versions).

    Input data everywhere is ``{tf: DataFrame}`` in the layout ``load_tf_data`` returns (UTC
    open-time index, ``open, high, low, close``); a ``timestamp`` column instead of the index and
    naive (= UTC) times are accepted. Bars must be closed bars: an unfinished base bar would be
    taken as complete.
    """

    def __init__(self, checkpoint_path: str | Path, device: str | torch.device | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(
                f"device: {device!r} is not a torch device (cpu, cuda, cuda:1)"
            ) from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested, but CUDA is not available here")
        self.checkpoint_path = Path(checkpoint_path)
        self.model, self.config, stats, self.meta = load_checkpoint(
            checkpoint_path, map_location=self.device
        )
        self.timeframes = sort_timeframes(list(self.config.data.timeframes))
        try:
            self.normalizer = TFNormalizer.from_dict(stats)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{checkpoint_path}: normalizer statistics are invalid ({exc})"
            ) from exc
        if self.normalizer.timeframes != self.timeframes:
            raise CheckpointError(
                f"{checkpoint_path}: normalizer is for timeframes {self.normalizer.timeframes}, "
                f"the model for {self.timeframes}"
            )
        self.feature_engineer = FeatureEngineer(self.config)
        self.seq_len = int(self.config.data.seq_len)
        self.latent_len = int(self.model.latent_len)
        self.d_model = int(self.model.d_model)
        self._builder: tuple[MultiTFWindowSampler, DeviceBatchBuilder] | None = None

    # ------------------------------------------------------------------------ windows
    def embedding_shape(self, pool: str | None = None) -> tuple[int, ...]:
        """Shape of one anchor's embedding for ``pool`` (see the module docstring)."""
        n_tf = len(self.timeframes)
        shapes = {
            None: (n_tf, self.latent_len, self.d_model),
            "mean": (n_tf * self.d_model,),
            "last": (n_tf * self.d_model,),
            "flatten": (n_tf * self.latent_len * self.d_model,),
        }
        if pool not in shapes:
            raise ConfigError(f"pool: {pool!r} is not one of {POOLS}")
        return shapes[pool]

    def bars(self, multi_tf_data: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """The model's timeframes from ``multi_tf_data``, normalised to the bar layout and
        validated (SPEC §1 rules, errors naming ``multi_tf_data['tf']`` and the row)."""
        missing = [tf for tf in self.timeframes if tf not in multi_tf_data]
        if missing:
            raise DataValidationError(
                f"multi_tf_data: missing timeframe(s) {missing}; the model needs {self.timeframes}"
            )
        frames = {}
        for tf in self.timeframes:
            source = f"multi_tf_data[{tf!r}]"
            bars = bars_from_frame(multi_tf_data[tf], source)
            validate_bars(bars, source)
            frames[tf] = bars
        return frames

    def build_sampler(
        self, multi_tf_data: Mapping[str, pd.DataFrame], validated: bool = False
    ) -> MultiTFWindowSampler:
        """The training sampler over ``multi_tf_data`` (same ``seq_len`` and staleness rule; no
        disk cache: live data changes with every call). ``validated``: the frames are already
        in the bar layout and validated (``LiveEncoder`` validates each bar once, on arrival)."""
        return MultiTFWindowSampler(
            multi_tf_data if validated else self.bars(multi_tf_data),
            self.seq_len,
            staleness_factor=float(self.config.data.staleness_factor),
            cache_dir=None,
        )

    def select_windows(
        self, sampler: MultiTFWindowSampler, start: TimeLike = None, end: TimeLike = None
    ) -> npt.NDArray[np.int64]:
        """Ids of the windows whose anchor lies in ``[start, end]`` (UTC, both inclusive)."""
        start_ns, end_ns = to_utc_ns(start, "start"), to_utc_ns(end, "end")
        if start_ns is not None and end_ns is not None and start_ns > end_ns:
            raise ConfigError(f"start: {start} is after end {end}")
        anchors = sampler.anchor_ns  # increasing: one anchor per base bar
        first = 0 if start_ns is None else int(np.searchsorted(anchors, start_ns, side="left"))
        stop = len(anchors) if end_ns is None else int(np.searchsorted(anchors, end_ns, "right"))
        if first >= stop:
            oldest, newest = _utc_index(anchors[[0, -1]])
            raise DataValidationError(
                f"no valid window has its anchor in [{start}, {end}]; the data's "
                f"{len(anchors)} valid anchors span {oldest} .. {newest}"
            )
        return np.arange(first, stop, dtype=np.int64)

    def window_features(self, ohlc: npt.NDArray[np.float64] | torch.Tensor) -> torch.Tensor:
        """Model input of raw windows: ``ohlc [B, n_tf, seq_len, 4]`` float64 prices →
        normalised features float32 ``[B, n_tf, seq_len, 6]`` on CPU (``process_batch`` with the
        checkpoint's normaliser: the math of training batches)."""
        return self.feature_engineer.process_batch(torch.as_tensor(ohlc).cpu(), self.normalizer)[0]

    def batch_builder(self, sampler: MultiTFWindowSampler) -> DeviceBatchBuilder:
        """``sampler``'s batch builder on the engine's device (kept for the last sampler)."""
        if self._builder is None or self._builder[0] is not sampler:
            builder = DeviceBatchBuilder(sampler, self.normalizer, self.device, with_parents=False)
            self._builder = (sampler, builder)
        return self._builder[1]

    def embed_windows(
        self,
        sampler: MultiTFWindowSampler,
        window_ids: npt.ArrayLike,
        pool: str | None = None,
    ) -> torch.Tensor:
        """Embeddings of ``sampler``'s windows, float32 on CPU: ``[B, n_tf, latent_len,
        d_model]`` or pooled ``[B, D]``. Features exactly as training builds them
        (:class:`DeviceBatchBuilder`, here on the engine's device), then ``model.encode`` (with
        the bar open times, for a model with ``model.time_features``)."""
        batch = self.batch_builder(sampler).batch(window_ids)
        with torch.inference_mode():
            encoded = self.model.encode(batch["features"], times=batch["times"])
            embeddings = pool_embeddings(encoded, pool).float().cpu()
        # A clone made outside inference mode is an ordinary tensor, so an agent may feed it
        # to a network it trains (inference tensors refuse to be saved for backward).
        return embeddings.clone()

    def _iter_chunks(
        self,
        sampler: MultiTFWindowSampler,
        window_ids: npt.NDArray[np.int64],
        batch_size: int | None,
        pool: str | None,
    ) -> Iterator[tuple[pd.DatetimeIndex, Embeddings]]:
        if batch_size is None:
            batch_size = DEFAULT_BATCH_SIZE.get(self.device.type, DEFAULT_BATCH_SIZE["cuda"])
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        for first in range(0, len(window_ids), batch_size):
            ids = window_ids[first : first + batch_size]
            embeddings = self.embed_windows(sampler, ids, pool).numpy()
            yield _utc_index(sampler.anchor_ns[ids]), embeddings

    # ------------------------------------------------------------------------ public API
    def extract_features(self, multi_tf_data: Mapping[str, pd.DataFrame]) -> torch.Tensor:
        """Embedding of the newest valid window in the data: ``[1, n_tf, latent_len,
        d_model]`` float32 on CPU (the guide's API)."""
        sampler = self.build_sampler(multi_tf_data)
        return self.embed_windows(sampler, [len(sampler) - 1])

    def iter_encode(
        self,
        multi_tf_data: Mapping[str, pd.DataFrame],
        start: TimeLike = None,
        end: TimeLike = None,
        batch_size: int | None = None,
        pool: str | None = None,
    ) -> Iterator[tuple[pd.DatetimeIndex, Embeddings]]:
        """Like :meth:`encode`, as chunks of at most ``batch_size`` anchors (bounded memory)."""
        self.embedding_shape(pool)  # reject a bad pool before any work
        sampler = self.build_sampler(multi_tf_data)
        yield from self._iter_chunks(
            sampler, self.select_windows(sampler, start, end), batch_size, pool
        )

    def encode(
        self,
        multi_tf_data: Mapping[str, pd.DataFrame],
        start: TimeLike = None,
        end: TimeLike = None,
        batch_size: int | None = None,
        pool: str | None = None,
    ) -> tuple[pd.DatetimeIndex, Embeddings]:
        """Embeddings of every valid window anchored in ``[start, end]`` (UTC, inclusive).

        Returns ``(timestamps, embeddings)``: anchor times (``DatetimeIndex``,
        ``datetime64[ns, UTC]``, increasing) and float32 ``[N, n_tf, latent_len, d_model]``, or
        ``[N, D]`` when pooled. Windows are gathered ``batch_size`` at a time (None: 128 on CPU,
        4096 on a GPU); only the result grows with ``N`` (see the module docstring for big
        ranges).
        """
        shape = self.embedding_shape(pool)
        sampler = self.build_sampler(multi_tf_data)
        window_ids = self.select_windows(sampler, start, end)
        embeddings = np.empty((len(window_ids), *shape), dtype=np.float32)
        filled = 0
        for _, chunk in self._iter_chunks(sampler, window_ids, batch_size, pool):
            embeddings[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return _utc_index(sampler.anchor_ns[window_ids]), embeddings

    def stream(
        self,
        history: Mapping[str, pd.DataFrame] | None = None,
        pool: str | None = None,
        keep_bars: int | None = None,
    ) -> LiveEncoder:
        """A :class:`LiveEncoder` for a live agent, primed with ``history`` if given (its newest
        embedding is then in ``latest``)."""
        live = LiveEncoder(self, pool=pool, keep_bars=keep_bars)
        if history is not None:
            live.update(history)
        return live
