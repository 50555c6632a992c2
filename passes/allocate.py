"""Sparsity allocation: how a target is split among layers and among each block's seven projections.

`uniform` needs nothing stored. `greedy` (TEAL's block-wise greedy, with WINA's or TEAL's score) starts every
projection of a block at 0 and repeatedly raises by one step the projection whose step raises the block's output
error least, until the block skips 90% of its weights. A step removes the same number of weights whatever the
projection (step * mean size / size). The error is ||y - y_dense||^2 / ||y_dense||^2 of the block output, residual
included, on a few calibration windows. The whole path is stored, so every target in [0, 0.9] is a lookup.

`global` (wina's cross-layer allocation) first splits a model-wide target among layers: each layer is gated alone
at a few block sparsities (its greedy split) and the error it leaves in the model's final hidden state is measured,
which counts what later layers do with it; a greedy search over layers then takes the cheapest error per weight
skipped. Both criteria's layer paths are stored, so every model-wide target is a lookup too.

`kl` (wina's allocation by output sensitivity) takes, for every projection gated alone at a range of sparsities,
the KL divergence of the model's next-token distribution from the dense one (kl_sensitivity: a second-order
estimate by default, or measured); the plan is a knapsack over those curves (gating.kl_knapsack). It is measured
only for the criteria a recipe asks for.

Candidates are re-measured lazily: a step rarely makes another projection's next step cheaper, so the cheapest
stale candidate is re-measured first and taken when it is still the cheapest (usually 1-2 measurements a step
instead of 7).
"""
from __future__ import annotations

import torch

from wina_cli.config import kl_criteria
from wina_cli.gating import (KL_LEVELS_EXACT, KL_LEVELS_FISHER, MAX_TARGET, SENSITIVITY_LEVELS, Allocation, GateSet,
                             block_sparsity, layer_search, lookup_path, threshold_gate)
from wina_cli.models.adapters import PROJECTIONS
from wina_cli.sparse import CRITERIA

from .base import Pass, PassResult, PipelineState
from .capture import capture_block_inputs
from .kl_sensitivity import exact_kl, fisher_check, fisher_kl

# the second-order estimate's sum over the check's entries must lie within this factor of the measured KL
FISHER_CHECK_FACTOR = 3.0

PROJECTION_CAP = 0.99


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((y.double() - ref.double()) ** 2).sum() / (ref.double() ** 2).sum().clamp_min(1e-30))


@torch.no_grad()
def greedy_path(layer, l: int, x: torch.Tensor, kw: dict, gates: GateSet, stats, criterion: str,
                sizes: torch.Tensor, step: float) -> torch.Tensor:
    ref = layer(x, **kw)
    step_p = step * sizes.double().mean() / sizes.double()
    s = torch.zeros(len(PROJECTIONS), dtype=torch.float64)

    def set_layer(svec):
        gates.set_layer(l, _layer_gates(stats, criterion, l, svec))

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


def _layer_gates(stats, criterion: str, l: int, svec: torch.Tensor) -> dict:
    return {name: threshold_gate(stats, criterion, l, p, float(svec[p])) for p, name in enumerate(PROJECTIONS)}


@torch.no_grad()
def layer_sensitivity(adapter, inputs, gates: GateSet, stats, criterion: str, paths: list[torch.Tensor],
                      progress=lambda m: None) -> torch.Tensor:
    """[L, 1 + levels]: relative error of the final normalized hidden state when only layer l is gated at each
    level of SENSITIVITY_LEVELS (its greedy split); column 0 is 0 (dense). Runs from layer l's captured input."""
    layers = adapter.layers()
    norm = adapter.final_norm()

    def run_from(l: int) -> torch.Tensor:
        h = inputs[l][0]
        for j in range(l, len(layers)):
            h = layers[j](h, **inputs[j][1])
        return norm(h)

    ref = run_from(0)
    out = torch.zeros(len(layers), 1 + len(SENSITIVITY_LEVELS))
    for l in range(len(layers)):
        progress(f"({l + 1}/{len(layers)}) layer sensitivity [{criterion}]")
        for i, level in enumerate(SENSITIVITY_LEVELS):
            gates.set_layer(l, _layer_gates(stats, criterion, l, lookup_path(paths[l], level)))
            out[l, 1 + i] = _rel_err(run_from(l), ref)
        gates.set_layer(l, {name: None for name in PROJECTIONS})
    return out


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
            sens = layer_sensitivity(a, inputs, state.gateset, state.stats, c, paths, state.progress)
            alloc.sensitivity[c] = sens
            alloc.layer_path[c] = layer_search(sens, sizes.sum(dim=1))
        kl_for = kl_criteria(r)
        info = {"criteria": sorted(alloc.greedy), "kl_criteria": kl_for}
        if kl_for:
            ar = r.allocation
            kl_ids = state.calib_ids[: ar.kl_samples, : ar.kl_seq_len]
            fisher = ar.kl_estimate == "fisher"
            state.gateset.apply(None, state.stats.col_norms, state.stats.in_features)  # both probes start dense
            levels = torch.tensor((0.0,) + (KL_LEVELS_FISHER if fisher else KL_LEVELS_EXACT))
            # the estimate honours the recipe's first-N-dense policy (those positions are never gated); the exact
            # probe and --method auto's other policies use the table as it is
            dense_first = r.sparsity.dense_first if fisher else 0
            info.update(kl_estimate=ar.kl_estimate, kl_tokens=int(kl_ids.numel()),
                        **({"kl_draws": ar.kl_draws, "kl_dense_first": dense_first, "kl_check": {}} if fisher else {}))
            for c in kl_for:
                if fisher:
                    table = fisher_kl(a, kl_ids, state.stats, c, levels, ar.kl_draws, r.seed, state.progress,
                                      dense_first)
                    info["kl_check"][c] = fisher_check(a, kl_ids, state.gateset, state.stats, c, levels, table,
                                                       dense_first)
                else:
                    table = exact_kl(a, capture_block_inputs(a, kl_ids), state.gateset, state.stats, c, levels,
                                     progress=state.progress)
                alloc.kl[c], alloc.kl_levels[c] = table, levels
        state.allocation = alloc
        return PassResult(True, info)

    def ensures(self, state: PipelineState, result: PassResult):
        for c, paths in state.allocation.greedy.items():
            for l, path in enumerate(paths):
                if float(path[-1, 0]) < MAX_TARGET - 1e-6:
                    raise self.fail(f"the greedy path of layer {l} ({c}) stops at {float(path[-1, 0]):.3f}",
                                    f"it must reach {MAX_TARGET} to serve every target", "report this")
                if (path[1:, 0] < path[:-1, 0]).any():
                    raise self.fail(f"the greedy path of layer {l} ({c}) is not monotone", "this is a bug",
                                    "report it")
        for c, path in state.allocation.layer_path.items():
            if float(path[-1, 0]) < MAX_TARGET - 1e-6 or (path[1:, 0] < path[:-1, 0]).any():
                raise self.fail(f"the layer path ({c}) does not rise monotonically to {MAX_TARGET}", "this is a bug",
                                "report it")
            if not torch.isfinite(state.allocation.sensitivity[c]).all():
                raise self.fail(f"the layer sensitivities ({c}) are not finite",
                                "a gated layer produced inf/nan downstream", "check the model in fp32")
        for c in kl_criteria(state.recipe):
            table = state.allocation.kl.get(c)
            if table is None or not torch.isfinite(table).all():
                raise self.fail(f"the KL table ({c}) is missing or not finite",
                                "a gated projection produced inf/nan downstream", "check the model in fp32")
            # KL is non-negative; allow float noise of a nearly dense probe
            if float(table.min()) < -1e-5:
                raise self.fail(f"the KL table ({c}) has a negative entry ({float(table.min()):.2e})",
                                "a KL divergence cannot be negative: the probe is broken", "report it")
            check = result.info.get("kl_check", {}).get(c)
            if check is not None and not 1 / FISHER_CHECK_FACTOR <= check["ratio"] <= FISHER_CHECK_FACTOR:
                raise self.fail(
                    f"the second-order KL estimate ({c}) is {check['ratio']:.2f}x the KL measured for layer "
                    f"{check['layer']}'s projections at sparsity {check['level']}",
                    f"it must lie within {FISHER_CHECK_FACTOR:g}x of it for the allocation to be trusted; the "
                    "estimate is too noisy on these tokens or the model is far from quadratic there",
                    "raise allocation.kl_draws or kl_samples, or set allocation.kl_estimate: exact")
