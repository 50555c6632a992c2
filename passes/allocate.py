"""Sparsity allocation: how a block's target is split among its seven projections.

`uniform` needs nothing stored. `greedy` (TEAL's block-wise greedy, with WINA's or TEAL's score) starts every
projection of a block at 0 and repeatedly raises by one step the projection whose step raises the block's output
error least, until the block skips 90% of its weights. A step removes the same number of weights whatever the
projection (step * mean size / size). The error is ||y - y_dense||^2 / ||y_dense||^2 of the block output, residual
included, on a few calibration windows. The whole path is stored, so every target in [0, 0.9] is a lookup.

Candidates are re-measured lazily: a step rarely makes another projection's next step cheaper, so the cheapest
stale candidate is re-measured first and taken when it is still the cheapest (usually 1-2 measurements a step
instead of 7).
"""
from __future__ import annotations

import torch

from wina_cli.gating import MAX_TARGET, Allocation, GateSet, block_sparsity
from wina_cli.models.adapters import PROJECTIONS
from wina_cli.sparse import CRITERIA, Gate

from .base import Pass, PassResult, PipelineState

PROJECTION_CAP = 0.99


@torch.no_grad()
def capture_block_inputs(adapter, ids: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """Each decoder layer's input hidden states and keyword arguments on `ids`, from one dense forward."""
    captured = []
    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs: captured.append((args[0] if args else kwargs["hidden_states"],
                                                 {k: v for k, v in kwargs.items() if k != "hidden_states"})),
        with_kwargs=True) for layer in adapter.layers()]
    try:
        adapter.base(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((y.double() - ref.double()) ** 2).sum() / (ref.double() ** 2).sum().clamp_min(1e-30))


@torch.no_grad()
def greedy_path(layer, l: int, x: torch.Tensor, kw: dict, gates: GateSet, stats, criterion: str,
                sizes: torch.Tensor, step: float) -> torch.Tensor:
    ref = layer(x, **kw)
    step_p = step * sizes.double().mean() / sizes.double()
    s = torch.zeros(len(PROJECTIONS), dtype=torch.float64)

    def set_layer(svec):
        gates.set_layer(l, {
            name: None if svec[p] <= 0 else Gate(
                criterion, "threshold", stats.threshold(criterion, l, p, float(svec[p])), 0,
                stats.col_norm(l, p) if criterion == "wina" else None)
            for p, name in enumerate(PROJECTIONS)})

    def measure(svec) -> float:
        set_layer(svec)
        return _rel_err(layer(x, **kw), ref)

    cur = 0.0
    path = [[0.0, *s.tolist(), 0.0]]
    stale: dict[int, float] = {}
    while block_sparsity(sizes.double(), s) < MAX_TARGET:
        open_p = [p for p in range(len(PROJECTIONS)) if s[p] < PROJECTION_CAP - 1e-9]
        if not open_p:
            break
        fresh: set[int] = set()
        for p in open_p:
            if p not in stale:
                t = s.clone(); t[p] = min(PROJECTION_CAP, s[p] + step_p[p])
                stale[p] = measure(t) - cur
                fresh.add(p)
        while True:
            best = min(open_p, key=lambda p: (stale[p], p))
            if best in fresh:
                break
            t = s.clone(); t[best] = min(PROJECTION_CAP, s[best] + step_p[best])
            stale[best] = measure(t) - cur
            fresh.add(best)
        s[best] = min(PROJECTION_CAP, s[best] + step_p[best])
        cur = cur + stale.pop(best)
        path.append([block_sparsity(sizes.double(), s), *s.tolist(), cur])
    gates.set_layer(l, {name: None for name in PROJECTIONS})
    return torch.tensor(path, dtype=torch.float32)


class Allocate(Pass):
    name = "allocate"

    def requires(self, state: PipelineState):
        if state.stats is None:
            raise self.fail("no calibration statistics", "thresholds come from the score tables",
                            "run collect_stats first")

    def call(self, state: PipelineState) -> PassResult:
        a, r = state.adapter, state.recipe
        state.gateset = state.gateset or GateSet(a)
        sizes = (state.stats.in_features * state.stats.out_features).double()
        alloc = Allocation(sizes.float())
        # Greedy paths for both criteria are always computed: the artifact then serves every criterion,
        # allocation and target without recalibrating (wina bench sweeps them).
        ids = state.calib_ids[: r.allocation.num_samples, : r.allocation.seq_len]
        inputs = capture_block_inputs(a, ids)
        layers = a.layers()
        for c in CRITERIA:
            paths = []
            for l, layer in enumerate(layers):
                state.progress(f"({l + 1}/{len(layers)}) allocating [{c}]")
                x, kw = inputs[l]
                paths.append(greedy_path(layer, l, x, kw, state.gateset, state.stats, c, sizes[l],
                                         r.allocation.step))
            alloc.greedy[c] = paths
        state.allocation = alloc
        return PassResult(True, {"criteria": sorted(alloc.greedy)})

    def ensures(self, state: PipelineState, result: PassResult):
        for c, paths in state.allocation.greedy.items():
            for l, path in enumerate(paths):
                if float(path[-1, 0]) < MAX_TARGET - 1e-6:
                    raise self.fail(f"the greedy path of layer {l} ({c}) stops at {float(path[-1, 0]):.3f}",
                                    f"it must reach {MAX_TARGET} to serve every target", "report this")
                if (path[1:, 0] < path[:-1, 0]).any():
                    raise self.fail(f"the greedy path of layer {l} ({c}) is not monotone", "this is a bug",
                                    "report it")
