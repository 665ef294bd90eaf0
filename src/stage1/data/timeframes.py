"""Timeframe names (``m1``, ``m5``, ``h1``, ``h4``, ``d``) and their durations."""

from __future__ import annotations

import re
from collections.abc import Sequence

NS_PER_MINUTE = 60_000_000_000
_PATTERN = re.compile(r"^(?:(m)(\d+)|(h)(\d+)|(d))$")


def tf_minutes(tf: str) -> int:
    """Duration of one bar of ``tf`` in minutes (``m5`` → 5, ``h4`` → 240, ``d`` → 1440)."""
    match = _PATTERN.match(tf.lower())
    if match is None:
        raise ValueError(f"timeframe {tf!r}: expected mN, hN or d (e.g. m1, m15, h4, d)")
    if match.group(1):
        minutes = int(match.group(2))
    elif match.group(3):
        minutes = 60 * int(match.group(4))
    else:
        minutes = 1440
    if minutes <= 0:
        raise ValueError(f"timeframe {tf!r}: duration must be positive")
    return minutes


def tf_ns(tf: str) -> int:
    """Duration of one bar of ``tf`` in nanoseconds."""
    return tf_minutes(tf) * NS_PER_MINUTE


def sort_timeframes(timeframes: Sequence[str]) -> list[str]:
    """Timeframes from finest to coarsest; the first one is the base timeframe."""
    return sorted(timeframes, key=tf_minutes)


def pandas_rule(tf: str) -> str:
    """The pandas resample rule for ``tf`` (``m5`` → ``5min``)."""
    return f"{tf_minutes(tf)}min"
