"""The weekly-open check of ``stage1 prepare``: where the first bar after each break of more than
24 h lands. The FX week opens Sunday 17:00 New York time, so labels read in the wrong time zone
show up as weekly opens elsewhere; :func:`weekly_open_report` says so and suggests the zone that
fits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from stage1.data.timeframes import NS_PER_MINUTE

# The FX week opens Sunday 17:00 New York time; weekly opens within an hour of it fit.
NEW_YORK = "America/New_York"
_WEEK_MINUTES = 7 * 1440
_SUNDAY_1700_MINUTES = 6 * 1440 + 17 * 60  # minutes after Monday 00:00
_OPEN_TOLERANCE_MINUTES = 60
_BREAK_NS = 24 * 60 * NS_PER_MINUTE
# Zones whose labels users most often mistake for another; tried when the open does not fit.
_CANDIDATE_ZONES = (
    "UTC",
    "America/New_York",
    "Etc/GMT+5",
    "America/Chicago",
    "Europe/London",
    "Europe/Berlin",
    "Europe/Athens",
    "Europe/Moscow",
    "Asia/Tokyo",
    "Asia/Singapore",
    "Australia/Sydney",
)
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _minute_of_week(index: pd.DatetimeIndex) -> np.ndarray:
    return np.asarray(index.day_of_week * 1440 + index.hour * 60 + index.minute, dtype=np.int64)


def _open_offsets(opens_new_york: pd.DatetimeIndex) -> np.ndarray:
    """Signed minutes from the nearest Sunday 17:00 New York to each weekly open."""
    offset = (_minute_of_week(opens_new_york) - _SUNDAY_1700_MINUTES) % _WEEK_MINUTES
    return np.where(offset > _WEEK_MINUTES // 2, offset - _WEEK_MINUTES, offset)


def _mode_hour(index: pd.DatetimeIndex) -> tuple[str, float]:
    keys = pd.Series(index.day_of_week * 24 + index.hour)
    counts = keys.value_counts()
    key = int(counts.index[0])
    return f"{_DAY_NAMES[key // 24]} {key % 24:02d}:00", float(counts.iloc[0] / len(keys))


def weekly_open_report(index: pd.DatetimeIndex, tz: str = "UTC") -> dict[str, Any]:
    """Where the first bar after each break of more than 24 h lands, in UTC and New York time.

    ``fits`` is False when most weekly opens miss Sunday 17:00 New York ±1 h; then
    ``suggested_tz`` names the common zone whose reading of the same labels fits best, if any.
    """
    index = pd.DatetimeIndex(index).as_unit("ns")
    opens = index[np.flatnonzero(np.diff(index.asi8) > _BREAK_NS) + 1]
    report: dict[str, Any] = {"weekly_opens": len(opens)}
    if len(opens) == 0:
        return report | {"fits": None, "message": "no break over 24 h: weekly open not checked"}
    new_york = opens.tz_convert(NEW_YORK)
    utc_mode, utc_share = _mode_hour(opens)
    ny_mode, ny_share = _mode_hour(new_york)
    fit = float(np.mean(np.abs(_open_offsets(new_york)) <= _OPEN_TOLERANCE_MINUTES))
    report |= {
        "utc_mode": utc_mode,
        "utc_mode_share": round(utc_share, 4),
        "new_york_mode": ny_mode,
        "new_york_mode_share": round(ny_share, 4),
        "fit_share": round(fit, 4),
        "fits": fit >= 0.5,
        "suggested_tz": None,
    }
    summary = (
        f"weekly open (first bar after each of {len(opens)} breaks > 24 h): {ny_mode} New York "
        f"in {ny_share:.0%} of weeks ({utc_mode} UTC: {utc_share:.0%}); "
        f"{fit:.0%} within 1 h of Sunday 17:00 New York"
    )
    if report["fits"]:
        return report | {"message": summary}
    labels = opens.tz_convert(tz).tz_localize(None)
    scores = {}  # zone -> (share of opens that fit, -mean |offset|): the closest fit wins ties
    for zone in _CANDIDATE_ZONES:
        if zone == tz:
            continue
        local = labels.tz_localize(zone, ambiguous="NaT", nonexistent="NaT").dropna()
        offsets = np.abs(_open_offsets(local.tz_convert(NEW_YORK)))
        fits = offsets <= _OPEN_TOLERANCE_MINUTES
        closeness = -float(offsets[fits].mean()) if fits.any() else -np.inf
        scores[zone] = (float(fits.sum()) / len(labels), closeness)
    best = max(scores, key=lambda zone: scores[zone])
    if scores[best][0] >= 0.8:
        report["suggested_tz"] = best
        advice = f"the labels look like {best} time read as {tz}: rerun with --tz {best}"
    else:
        advice = "no common time zone fits the labels either: check --tz and the source"
    return report | {
        "message": f"{summary}; FX opens Sunday 17:00 New York, so the time zone looks wrong: {advice}"
    }
