"""What every number of the metrics JSON means: ``DEFINITIONS``, which ``stage1 evaluate`` writes
under ``definitions``.
"""

from __future__ import annotations

from stage1.evaluation.alarms import RIGHT_EDGE_SKILL_ALARM, RIGHT_EDGE_T_ALARM, SIGN_AUC_ALARM
from stage1.evaluation.metrics import CONSISTENCY_TOLERANCE_STD

DEFINITIONS = {
    "space": (
        "baselines and errors are computed in raw feature space (log price / reference price); "
        "mae is reported in normalised units (raw MAE / normaliser std of that timeframe and "
        "feature); headline mae and skills pool the price features open/high/low/close"
    ),
    "hidden_only": "every metric uses hidden bars only; visible bars are known inputs",
    "skill": "skill_X = 1 - mae_model / mae_X on the same hidden bars; skill_best uses the best "
    "baseline per feature (agg included where it exists; best_baseline names it); skill_agg and "
    "mae_agg are null on the base timeframe, and their mean is over the coarser timeframes",
    "baselines": {
        "last": "last visible bar carried forward (first visible after, for a span at position 0)",
        "interp": "linear interpolation between the visible neighbours; right edge: carry forward",
        "bridge": "hidden closes run linearly from the last visible close to the open of the next "
        "visible bar; hidden open = previous close; high/low = max/min(open, close) +/- the "
        "window's median visible upper/lower wick; right edge: carry forward",
        "agg": "coarser timeframes only: a hidden bar with period P = [open, open + duration) "
        "gets the aggregate (first open, max high, min low, last close) of the composite bars "
        "(truth where visible, that timeframe's bridge where hidden) opening inside P of its "
        "source: the finest finer timeframe with a visible bar inside P whose window starts at or "
        "before P's open, else the finest finer timeframe with a visible bar inside P; when the "
        "source's window starts after P's open, the open is the coarse bridge's and high/low are "
        "max/min with the coarse bridge's; bars with no visible finer bar inside P (uncovered) "
        "get the coarse bridge; exact when every source bar inside P is visible",
    },
    "span_classes": "right_edge = hidden bars after the last visible information of the window: no "
    "visible bar of any timeframe closes at or after their close (on the base timeframe: the "
    "spans ending at the newest bar; on coarser ones, newest bars whose close no visible finer "
    "bar gives away); interior = every other hidden bar. On coarser timeframes the hidden bars are "
    "also split into covered (at least one visible bar of a finer timeframe opens inside the "
    "bar's period) and uncovered (none); the base timeframe has no covered/uncovered blocks. "
    "n_spans counts runs of a class's bars",
    "corr": "Pearson over hidden bars of close (corr_close) and delta_close (corr_delta); "
    "corr_close_interp is the interp baseline's, for scale",
    "consistency_ratio": (
        f"share of hidden higher-timeframe bars, fully covered by the base window, whose "
        f"reconstructed close is within {CONSISTENCY_TOLERANCE_STD} x that timeframe's close std "
        "(normaliser) of the close of the last base bar inside it (composite: truth where visible, "
        "reconstruction where hidden)"
    ),
    "spectrum_error": "mean |log10 power| difference of the close's first differences, composite "
    "series vs truth, per window with hidden bars (spectrum_error_interp: the interp baseline)",
    "pip": "0.01 when the median close is above 20 (JPY-quoted pairs), else 0.0001",
    "probe": (
        "targets from the base timeframe after the anchor (labels only, never in a window): log "
        "realised volatility log sqrt(sum r^2) of the next probe_horizon_bars log close returns "
        "(ridge -> vol_r2) and their sign (logistic -> sign_acc, sign_auc); anchors whose horizon "
        "is incomplete or spans a gap (> 2 x horizon in time) are skipped; fitted on an evenly "
        "spaced subset of at most probe_max_train_windows train windows (lambda chosen on the "
        "last 20 % of them), scored on an evenly spaced subset of at most as many windows of the "
        "evaluated split. encoder: mean over latent steps of the unmasked encoding, concatenated "
        "over timeframes; encoder+raw: both concatenated; raw: per timeframe the newest bar's normalised features + the window's "
        "log realised volatility and log range; random: the same model, freshly initialised"
    ),
    "close_skill_fresh": "right_edge.close_skill_fresh = 1 - MAE_model / MAE_fresh over right-edge "
    "closes, fresh = the close of the newest visible bar of any timeframe (the last known price, "
    "the best guess of a martingale); on the base timeframe it equals the last baseline; "
    "close_skill_fresh_t = t statistic of the per-bar gain |e_fresh| - |e_model| (null below two "
    "bars)",
    "alarms": f"right_edge.close_skill_fresh > {RIGHT_EDGE_SKILL_ALARM} with close_skill_fresh_t "
    f">= {RIGHT_EDGE_T_ALARM} on any timeframe (a few dozen bars do not make evidence); sign "
    f"probe AUC > {SIGN_AUC_ALARM} for any probe",
}
