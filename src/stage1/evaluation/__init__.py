"""Evaluation that tells the truth: metrics on hidden bars, naive baselines, linear probes,
leak alarms and a one-page report (``stage1 evaluate``).

* :mod:`stage1.evaluation.baselines`: ``last``, ``interp`` and ``bridge`` guesses for hidden bars.
* :mod:`stage1.evaluation.agg`: ``agg``, hidden coarse bars rebuilt from the visible finer bars.
* :mod:`stage1.evaluation.spans`: hidden spans; interior / right-edge and covered / uncovered.
* :mod:`stage1.evaluation.measures`: MAE, skill, correlation, consistency, spectrum on arrays.
* :mod:`stage1.evaluation.metrics`: ``MetricAccumulator``, every window's metrics per timeframe.
* :mod:`stage1.evaluation.alarms`: the leak alarms and their thresholds.
* :mod:`stage1.evaluation.probe`: ridge / logistic probes on pooled window features.
* :mod:`stage1.evaluation.report`: PNG plots and the self-contained ``report.html``.
* :mod:`stage1.evaluation.passes`: the reconstruction and probe passes over a split.
* :mod:`stage1.evaluation.definitions`: what each number of the metrics JSON means.
* :mod:`stage1.evaluation.runner`: the pipeline behind ``stage1 evaluate``.
"""

from __future__ import annotations

import argparse


def run_evaluate(args: argparse.Namespace) -> None:
    """``stage1 evaluate``: imported lazily so the metric modules load without torch models."""
    from stage1.evaluation.runner import run_evaluate as _run

    _run(args)


__all__ = ["run_evaluate"]
