"""Paired comparisons of two answer sets on the same records: what tells a gain from noise."""
from __future__ import annotations

import math

import numpy as np


def paired_difference(right: dict, right_before: dict, ids: list) -> dict:
    """Accuracy of one row minus another's on the same records ``ids``, with the standard error of
    that difference taken record by record (each record's difference is +1, 0 or -1). Two rows that
    mostly agree have a far smaller se than either accuracy's: this is what tells a gain from noise
    on one test set. ``gained``/``lost``: records right only in the first row / only in the second;
    ``p``: McNemar's p of that split (``mcnemar_p``), honest where few records changed."""
    n = len(ids)
    gained = sum(right[i] and not right_before[i] for i in ids)
    lost = sum(right_before[i] and not right[i] for i in ids)
    if not n:
        return {"n": 0, "delta": None, "se": None, "gained": 0, "lost": 0, "p": None}
    mean = (gained - lost) / n
    return {"n": n, "delta": mean, "se": math.sqrt(max((gained + lost) / n - mean * mean, 0.0) / n),
            "gained": gained, "lost": lost, "p": mcnemar_p(gained, lost)}


def mcnemar_p(gained: int, lost: int) -> float:
    """McNemar's exact two-sided p: the chance of a split between records gained and lost at least
    this uneven, were each record that changed as likely to be gained as lost. Unlike a gain over
    its se it stays honest for a handful of changed records (4 gained and 0 lost: p 0.125)."""
    changed = gained + lost
    if gained == lost:
        return 1.0
    tail = sum(math.comb(changed, k) for k in range(min(gained, lost) + 1)) / 2 ** changed
    return min(1.0, 2 * tail)


def auc(positives: list[float], negatives: list[float]) -> float | None:
    """The chance that a positive scores above a negative (ties count half): 0.5 where the score
    tells them apart no better than a coin; None without both."""
    if not positives or not negatives:
        return None
    p, n = np.asarray(positives, dtype=float)[:, None], np.asarray(negatives, dtype=float)[None, :]
    return float(np.mean((p > n) + 0.5 * (p == n)))
