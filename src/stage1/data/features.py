"""FeatureEngineer: OHLC windows -> six scale-free features per bar."""

from __future__ import annotations

FEATURE_NAMES = ("open", "high", "low", "close", "delta_close", "body_ratio")
OPEN, HIGH, LOW, CLOSE, DELTA_CLOSE, BODY_RATIO = range(6)
N_FEATURES = len(FEATURE_NAMES)
