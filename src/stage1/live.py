"""LiveEncoder: incremental encoding for a live agent (``Stage1InferenceEngine.stream``).

Keeps the newest bars of each timeframe and encodes the newest valid window with the engine's
sampler and model, so each embedding equals :meth:`Stage1InferenceEngine.encode`'s for the same
anchor. Also importable from :mod:`stage1.inference`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pandas as pd

from stage1.data.io import bars_from_frame, validate_bars
from stage1.errors import ConfigError, DataValidationError

if TYPE_CHECKING:
    from stage1.inference import Embeddings, Stage1InferenceEngine


class LiveEncoder:
    """Incremental encoding for a live agent: append bars, get the newest embedding.

    Only the newest ``keep_bars`` bars of each timeframe are kept (default ``2 * seq_len``: a
    window needs ``seq_len`` complete bars, the rest is slack for a coarse bar still running at
    the newest anchor), so each update costs one small index and one batch-of-one forward
    pass, however long the agent runs. The embedding equals ``encode()``'s for the same anchor:
    a window that is valid in the kept tail holds exactly the bars the full data's window holds
    (the tail is a contiguous suffix, and a window reaching past it is rejected as short).

    Contract: base-timeframe bars must be closed (the newest one defines the anchor). Coarser
    timeframes may include their running bar; it enters no window before it closes, and a bar
    sent again (same open time) replaces the held copy, so its final values win. Each update
    must bring every timeframe up to the same moment: a coarse bar that closed at or before the
    newest base bar's close but arrives only in a LATER update would be missing from that
    anchor's window, unlike ``encode()`` with hindsight.
    """

    def __init__(
        self, engine: Stage1InferenceEngine, pool: str | None = None, keep_bars: int | None = None
    ) -> None:
        engine.embedding_shape(pool)
        self.engine = engine
        self.pool = pool
        self.keep_bars = 2 * engine.seq_len if keep_bars is None else int(keep_bars)
        if self.keep_bars < engine.seq_len:
            raise ConfigError(
                f"keep_bars: must be >= seq_len ({engine.seq_len}), got {self.keep_bars}"
            )
        self._bars: dict[str, pd.DataFrame] = {}
        # The last (anchor_time, embedding) returned, e.g. the newest one of the priming history.
        self.latest: tuple[pd.Timestamp, Embeddings] | None = None

    @property
    def last_anchor(self) -> pd.Timestamp | None:
        """Anchor time of the last embedding returned (``None`` before the first)."""
        return None if self.latest is None else self.latest[0]

    def _append(self, tf: str, frame: pd.DataFrame) -> None:
        source = f"new_bars[{tf!r}]"
        bars = bars_from_frame(frame, source)
        validate_bars(bars, source)
        held = self._bars.get(tf)
        if held is not None:
            # A bar sent again (e.g. a running bar, then its final version) replaces the held one.
            bars = pd.concat([held, bars])
            bars = bars[~bars.index.duplicated(keep="last")].sort_index()
        self._bars[tf] = bars.iloc[-self.keep_bars :]

    def update(
        self, new_bars: Mapping[str, pd.DataFrame]
    ) -> tuple[pd.Timestamp, Embeddings] | None:
        """Append ``new_bars`` (``{tf: DataFrame}``, any subset of the timeframes; see the class
        contract) and return ``(anchor_time, embedding)`` for the newest valid window if its anchor
        is newer than the last one returned; ``None`` otherwise (not enough history yet, the
        newest window is stale, e.g. right after the weekend, or nothing new). ``embedding`` is
        float32 ``[n_tf, latent_len, d_model]`` or pooled ``[D]``, as one row of ``encode()``.
        When several base bars arrive at once only the newest anchor is encoded; use
        ``encode()`` for backfills."""
        unknown = [tf for tf in new_bars if tf not in self.engine.timeframes]
        if unknown:
            raise DataValidationError(
                f"new_bars: unknown timeframe(s) {unknown}; the model uses {self.engine.timeframes}"
            )
        for tf, frame in new_bars.items():
            self._append(tf, frame)
        if any(len(self._bars.get(tf, ())) < self.engine.seq_len for tf in self.engine.timeframes):
            return None
        try:
            sampler = self.engine.build_sampler(self._bars, validated=True)
        except DataValidationError:
            return None  # inputs are validated, so this is "no valid window in the tail yet"
        anchor = pd.Timestamp(int(sampler.anchor_ns[-1]), tz="UTC")
        if self.last_anchor is not None and anchor <= self.last_anchor:
            return None
        embedding = self.engine.embed_windows(sampler, [len(sampler) - 1], self.pool).numpy()[0]
        self.latest = (anchor, embedding)
        return self.latest
