"""Leak alarms of ``stage1 evaluate`` (SPEC §6): the thresholds and :func:`leak_alarms`, which
reads them off the per-timeframe metrics and the probe scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RIGHT_EDGE_SKILL_ALARM = 0.01
RIGHT_EDGE_T_ALARM = 3.0
SIGN_AUC_ALARM = 0.55


def leak_alarms(per_tf: Mapping[str, Mapping[str, Any]], probe: Mapping[str, Any]) -> list[str]:
    """Leak warnings, empty when clean (SPEC §6).

    * close skill on right-edge bars above 1 % on any timeframe, against the last known price
      (:func:`freshest_visible_close`), with a per-bar gain whose t statistic is at least
      ``RIGHT_EDGE_T_ALARM`` (3): nothing after them is visible, so their close is a martingale
      step from that price and beating it means the model saw what it should not. The t test
      keeps a handful of bars (a coarse timeframe has a few dozen right-edge bars in thousands
      of windows) from alarming on noise; a model that peeks beats the price on every bar
      (t in the tens or infinite).
      On the base timeframe that price is the ``last`` baseline of SPEC §6; a coarse timeframe's
      own last bar can be hours older than a visible finer bar, so its naive baselines are no
      yardstick here (a model reading the finer bars beats them honestly);
    * a sign probe AUC above 0.55: the sign of the next return is nearly unpredictable, so this
      points to future information in the window features.
    """
    alarms = []
    for tf, entry in per_tf.items():
        right_edge = entry.get("right_edge", {})
        value, t_stat = right_edge.get("close_skill_fresh"), right_edge.get("close_skill_fresh_t")
        significant = t_stat is not None and t_stat >= RIGHT_EDGE_T_ALARM  # None: < 2 bars
        if value is not None and value > RIGHT_EDGE_SKILL_ALARM and significant:
            alarms.append(
                f"{tf}: close skill on right-edge bars is {value:+.3f} > "
                f"{RIGHT_EDGE_SKILL_ALARM:.2f} against the last known price (t = {t_stat:.1f}, "
                f"{right_edge.get('n_hidden_bars')} bars); nothing after them is visible, so "
                "their close should be unpredictable beyond it - check for leakage"
            )
    for kind, scores in probe.items():
        auc = scores.get("sign_auc") if isinstance(scores, Mapping) else None
        if auc is not None and auc > SIGN_AUC_ALARM:
            alarms.append(
                f"probe.{kind}: sign AUC is {auc:.3f} > {SIGN_AUC_ALARM:.2f}; the next return's "
                "sign is nearly unpredictable - check for future bars in the window features"
            )
    return alarms
