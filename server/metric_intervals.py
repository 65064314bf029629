"""95 % intervals for a site's AUROC and AUPRC from the aggregate numbers the coordinator has.

The coordinator never sees a site's scores, so a bootstrap is impossible here; closed forms
need only the metric and the class counts. AUROC: Hanley & McNeil (1982), whose standard
error uses the AUROC and the numbers of positives and negatives. AUPRC: the logit interval
of Boyd, Eng & Page (2013), which uses the number of positives. Both need the site to report
how many of its test stays are positive (``num-positives``); without it the card says so.
"""

from __future__ import annotations

import math
from typing import Any

Z_95 = 1.959963984540054
UNAVAILABLE = "interval unavailable: the site does not report num-positives"


def hanley_mcneil(auroc: float, positives: int, negatives: int, z: float = Z_95) -> tuple[float, float]:
    q1 = auroc / (2 - auroc)
    q2 = 2 * auroc**2 / (1 + auroc)
    variance = (auroc * (1 - auroc) + (positives - 1) * (q1 - auroc**2) + (negatives - 1) * (q2 - auroc**2)) / (
        positives * negatives
    )
    half = z * math.sqrt(max(variance, 0.0))
    return max(0.0, auroc - half), min(1.0, auroc + half)


def logit_interval(auprc: float, positives: int, z: float = Z_95) -> tuple[float, float]:
    if auprc <= 0.0 or auprc >= 1.0:
        return auprc, auprc
    eta = math.log(auprc / (1 - auprc))
    tau = 1 / math.sqrt(positives * auprc * (1 - auprc))
    return 1 / (1 + math.exp(-(eta - z * tau))), 1 / (1 + math.exp(-(eta + z * tau)))


def site_intervals(metrics: dict[str, Any]) -> dict[str, Any]:
    """``{"auroc": [lo, hi] | reason, "auprc": ...}`` for one site's evaluation metrics."""
    n, positives = metrics.get("num-examples"), metrics.get("num-positives")
    out: dict[str, Any] = {}
    for key in ("auroc", "auprc"):
        value = metrics.get(key)
        if not isinstance(value, float) or not math.isfinite(value):
            out[key] = "interval unavailable: metric undefined at this site"
        elif not isinstance(positives, int) or not isinstance(n, int):
            out[key] = UNAVAILABLE
        elif not 0 < positives < n:
            out[key] = "interval unavailable: the site's test stays hold one class only"
        elif key == "auroc":
            out[key] = list(hanley_mcneil(value, positives, n - positives))
        else:
            out[key] = list(logit_interval(value, positives))
    return out
