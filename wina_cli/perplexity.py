"""Perplexity with the gates in force, and the search for the highest sparsity within a perplexity budget (the
Sparsing Law's "PPL-p% sparsity": the largest model-wide sparsity whose perplexity stays within (1 + p) of dense).
Shared by the calibration's budget pass and `wina bench`."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

SEARCH_TOLERANCE = 0.005  # the search stops when the bracket is this narrow (model-wide sparsity)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress=lambda m: None, label: str = "", first_scored: int = 0) -> float:
    """exp(mean NLL) over every next-token prediction of every window whose target position is >= first_scored + 1
    (first_scored > 0 leaves the first tokens out of the score, e.g. a prompt that was computed dense)."""
    nll, count = 0.0, 0
    for i in range(windows.shape[0]):
        progress(f"({i + 1}/{windows.shape[0]}) evaluating {label}")
        ids = windows[i:i + 1]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits[0, first_scored:-1], ids[0, first_scored + 1:], reduction="sum"))
        count += ids.shape[1] - 1 - first_scored
    return math.exp(nll / count)


def max_sparsity_within(ppl_at: Callable[[float], float], limit: float, hi: float = 0.9,
                        tolerance: float = SEARCH_TOLERANCE, cache: dict | None = None) -> tuple[float, float]:
    """The highest target t in [0, hi] with ppl_at(t) <= limit, by bisection (perplexity rises with sparsity;
    where it does not, the search returns a t that satisfies the limit, not necessarily the highest one).
    Returns (t, ppl_at(t)). `cache` maps target -> perplexity and is shared between searches."""
    cache = {} if cache is None else cache

    def at(t: float) -> float:
        t = round(t, 6)
        if t not in cache:
            cache[t] = ppl_at(t)
        return cache[t]

    if at(hi) <= limit:
        return hi, at(hi)
    lo, lo_ppl = 0.0, at(0.0)
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if at(mid) <= limit:
            lo, lo_ppl = mid, at(mid)
        else:
            hi = mid
    return round(lo, 6), lo_ppl
