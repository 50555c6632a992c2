"""Calibration tables, sparsity allocations and gate plans: the data that turns a target sparsity into a gate
on every projection, and the code that attaches those gates to a model.

One calibration serves every target in [0, 0.9], both criteria, both allocations and both modes: the score
quantiles of each projection are stored at 1000 levels, and the greedy allocation is stored as the path it took.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .models.adapters import PROJECTIONS, Adapter
from .sparse import CRITERIA, MODES, Gate, GatedLinear, Segment, column_norms

LEVELS = 1000  # quantile table: the score below which a fraction j/LEVELS of channels fall, j = 0..LEVELS-1
MAX_TARGET = 0.9
ALLOCATIONS = ("greedy", "uniform", "global", "kl")
SENSITIVITY_LEVELS = (0.2, 0.4, 0.6, 0.8, 0.9)  # block sparsities each layer is probed at (linear in between)
# Sparsities each projection is probed at alone for the kl allocation (its cost is linear in between). The exact
# probe pays a partial forward per level, so it takes few; the second-order estimate gets every level at once.
KL_LEVELS_EXACT = (0.2, 0.35, 0.5, 0.65, 0.9)
KL_LEVELS_FISHER = tuple(round(0.05 * i, 2) for i in range(1, 19))


@dataclass
class CalibrationStats:
    quantiles: dict[str, torch.Tensor]  # criterion -> [L, 7, LEVELS] float32
    col_norms: torch.Tensor  # [L, 7, max_in] float32, zero-padded past in_features[l, p]
    in_features: torch.Tensor  # [L, 7] int64
    out_features: torch.Tensor  # [L, 7] int64
    tokens: int

    @property
    def num_layers(self) -> int:
        return int(self.in_features.shape[0])

    def col_norm(self, layer: int, p: int) -> torch.Tensor:
        return self.col_norms[layer, p, : int(self.in_features[layer, p])]

    def threshold(self, criterion: str, layer: int, p: int, sparsity: float) -> float:
        return threshold_at(self.quantiles[criterion][layer, p], sparsity)


def threshold_gate(stats: CalibrationStats, criterion: str, l: int, p: int, sparsity: float) -> Gate | None:
    """The calibrated threshold gate of one projection at a sparsity (None: dense)."""
    return None if sparsity <= 0 else Gate(criterion, "threshold", stats.threshold(criterion, l, p, sparsity), 0,
                                           stats.col_norm(l, p) if criterion == "wina" else None)


def threshold_at(table: torch.Tensor, sparsity: float) -> float:
    pos = min(max(sparsity, 0.0), 1.0) * LEVELS
    lo = min(int(pos), LEVELS - 1)
    hi = min(lo + 1, LEVELS - 1)
    frac = pos - int(pos)
    return float(table[lo] * (1 - frac) + table[hi] * frac)


def quantile_table(samples: torch.Tensor) -> torch.Tensor:
    s, _ = samples.float().sort()
    idx = (torch.arange(LEVELS, dtype=torch.float64) / LEVELS * (s.numel() - 1)).round().long()
    return s[idx].contiguous()


@dataclass
class Allocation:
    """Per-projection sparsities for a target: uniform, or looked up on a greedy path.

    A greedy path for one layer is a [steps, 9] tensor: column 0 the block sparsity reached (fraction of the
    block's weights skipped), columns 1..7 the projections' sparsities at that step, column 8 the relative
    block-output error measured there.

    `global` spreads a model-wide target over layers first: `sensitivity[c]` [L, 1 + levels] is the relative error
    of the model's final normalized hidden state when only layer l is gated, at block sparsity 0 and each of
    SENSITIVITY_LEVELS (its greedy split), so an early layer's error is counted after the layers that carry it;
    `layer_path[c]` [steps, 1 + L] is the path a greedy search over layers took on those curves:
    column 0 the model-wide sparsity, then each layer's block sparsity. Each layer's share is then split among
    its projections on its greedy path.

    `kl` measures every projection on its own: `kl[c]` [L, 7, 1 + levels] is the KL divergence of the model's
    next-token distribution from the dense one (mean per token) when only projection p of layer l is gated, at
    the sparsities `kl_levels[c]` (0 first). A knapsack over all projections then spends the model-wide target where it
    costs the least KL per weight skipped (KL taken as additive across projections, linear between levels).
    """

    sizes: torch.Tensor  # [L, 7] number of weights per projection
    greedy: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    sensitivity: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_path: dict[str, torch.Tensor] = field(default_factory=dict)
    kl: dict[str, torch.Tensor] = field(default_factory=dict)
    kl_levels: dict[str, torch.Tensor] = field(default_factory=dict)  # [1 + levels], 0 first

    def has(self, criterion: str, allocation: str) -> bool:
        """Whether this allocation can be planned for this criterion (the tables it needs were measured)."""
        return {"uniform": True, "greedy": criterion in self.greedy, "global": criterion in self.layer_path,
                "kl": criterion in self.kl}[allocation]

    def per_projection(self, criterion: str, allocation: str, target: float) -> torch.Tensor:
        L = self.sizes.shape[0]
        if allocation == "uniform":
            return torch.full((L, len(PROJECTIONS)), float(target))
        if allocation == "kl":
            if criterion not in self.kl:
                raise KeyError(criterion)
            return kl_knapsack(self.kl[criterion], self.sizes, target, self.kl_levels[criterion])
        if criterion not in self.greedy:
            raise KeyError(criterion)
        if allocation == "global":
            if criterion not in self.layer_path:
                raise KeyError(criterion)
            per_layer = lookup_layer_path(self.layer_path[criterion], target)
            return torch.stack([lookup_path(path, float(t)) for path, t in zip(self.greedy[criterion], per_layer)])
        rows = []
        for path in self.greedy[criterion]:
            rows.append(lookup_path(path, target))
        return torch.stack(rows)


def lookup_layer_path(path: torch.Tensor, target: float) -> torch.Tensor:
    """Each layer's block sparsity where the layer path's model-wide sparsity equals target (linear between)."""
    model = path[:, 0].contiguous()
    if target <= float(model[0]):
        return path[0, 1:].clone()
    if target >= float(model[-1]):
        return path[-1, 1:].clone()
    i = int(torch.searchsorted(model, torch.tensor(float(target), dtype=model.dtype)))
    m0, m1 = float(model[i - 1]), float(model[i])
    w = 0.0 if m1 == m0 else (target - m0) / (m1 - m0)
    return path[i - 1, 1:] * (1 - w) + path[i, 1:] * w


def layer_search(sensitivity: torch.Tensor, layer_sizes: torch.Tensor) -> torch.Tensor:
    """Greedy over layers: from all-dense, repeatedly raise by one level the layer whose next level costs the least
    KL per weight skipped, until every layer is at the last level. Curves are made non-decreasing first (a
    measured dip is noise, not a free lunch). Returns the path [steps, 1 + L]."""
    levels = torch.tensor((0.0,) + SENSITIVITY_LEVELS, dtype=torch.float64)
    cost = sensitivity.double().cummax(dim=1).values
    sizes = layer_sizes.double()
    L = cost.shape[0]
    at = [0] * L
    total = float(sizes.sum())

    def row():
        s = torch.tensor([float(levels[i]) for i in at], dtype=torch.float64)
        return [float((s * sizes).sum() / total), *s.tolist()]

    path = [row()]
    while any(i < len(levels) - 1 for i in at):
        best = min((l for l in range(L) if at[l] < len(levels) - 1),
                   key=lambda l: (float(cost[l, at[l] + 1] - cost[l, at[l]])
                                  / (float(levels[at[l] + 1] - levels[at[l]]) * float(sizes[l])), l))
        at[best] += 1
        path.append(row())
    return torch.tensor(path, dtype=torch.float32)


def kl_knapsack(kl: torch.Tensor, sizes: torch.Tensor, target: float, levels: torch.Tensor) -> torch.Tensor:
    """[L, 7] sparsities skipping a fraction `target` of all projection weights at the least total KL.

    Each projection's cost curve (KL at the sparsities `levels`, 0 first; made non-decreasing: a measured dip is noise)
    is replaced by its lower convex hull, whose segments have rising KL per weight; taking the segments of all
    projections in order of that slope, the last one partly, is then the best split under the additive model.
    Ties go to the earlier layer and projection, so the plan is deterministic."""
    if kl.shape[-1] != len(levels):
        raise ValueError(f"a KL table of {kl.shape[-1]} columns against {len(levels)} levels")
    levels = levels.double()
    cost = kl.double().cummax(dim=-1).values
    size = sizes.double()
    L, P, _ = cost.shape
    segments = []  # (KL per weight, layer, projection, from level, to level)
    for l in range(L):
        for p in range(P):
            hull = [0]
            for i in range(1, len(levels)):
                # drop the last hull point while it lies on or above the chord to point i
                while len(hull) >= 2:
                    a, b = hull[-2], hull[-1]
                    if (cost[l, p, b] - cost[l, p, a]) * (levels[i] - levels[a]) >= \
                            (cost[l, p, i] - cost[l, p, a]) * (levels[b] - levels[a]):
                        hull.pop()
                    else:
                        break
                hull.append(i)
            for a, b in zip(hull, hull[1:]):
                slope = float((cost[l, p, b] - cost[l, p, a]) / ((levels[b] - levels[a]) * size[l, p]))
                segments.append((slope, l, p, float(levels[a]), float(levels[b])))
    segments.sort()
    out = torch.zeros(L, P, dtype=torch.float64)
    need = min(max(float(target), 0.0), MAX_TARGET) * float(size.sum())
    for _, l, p, lo, hi in segments:
        if need <= 0:
            break
        weights = (hi - lo) * float(size[l, p])
        take = min(1.0, need / weights)
        out[l, p] = lo + (hi - lo) * take
        need -= weights * take
    return out.float()


def lookup_path(path: torch.Tensor, target: float) -> torch.Tensor:
    """Per-projection sparsities at the point where the path's block sparsity equals target (linear between steps)."""
    block = path[:, 0].contiguous()
    if target <= float(block[0]):
        return path[0, 1:8].clone()
    if target >= float(block[-1]):
        return path[-1, 1:8].clone()
    i = int(torch.searchsorted(block, torch.tensor(float(target), dtype=block.dtype)))
    b0, b1 = float(block[i - 1]), float(block[i])
    w = 0.0 if b1 == b0 else (target - b0) / (b1 - b0)
    return path[i - 1, 1:8] * (1 - w) + path[i, 1:8] * w


def block_sparsity(sizes: torch.Tensor, s: torch.Tensor) -> float:
    return float((sizes * s).sum() / sizes.sum())


@dataclass
class GatePlan:
    criterion: str
    mode: str
    allocation: str
    target: float
    sparsity: torch.Tensor  # [L, 7] nominal per-projection sparsity
    threshold: torch.Tensor  # [L, 7] score threshold (mode threshold)
    k: torch.Tensor  # [L, 7] channels kept per token (mode topk)

    def describe(self) -> dict:
        return {"criterion": self.criterion, "mode": self.mode, "allocation": self.allocation, "target": self.target}


def plan_gates(stats: CalibrationStats, alloc: Allocation, criterion: str, mode: str, allocation: str,
               target: float) -> GatePlan:
    assert criterion in CRITERIA and mode in MODES and allocation in ALLOCATIONS, (criterion, mode, allocation)
    s = alloc.per_projection(criterion, allocation, target).float()
    L, P = s.shape
    thr = torch.zeros(L, P)
    k = torch.zeros(L, P, dtype=torch.int64)
    for l in range(L):
        for p in range(P):
            thr[l, p] = stats.threshold(criterion, l, p, float(s[l, p]))
            n = int(stats.in_features[l, p])
            k[l, p] = n - int(round(float(s[l, p]) * n))
    return GatePlan(criterion, mode, allocation, float(target), s, thr, k)


def projection_shapes(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    L = len(adapter.layers())
    fin = torch.zeros(L, len(PROJECTIONS), dtype=torch.int64)
    fout = torch.zeros_like(fin)
    for l, layer in enumerate(adapter.layers()):
        for p, name in enumerate(PROJECTIONS):
            w = adapter.proj_weight(layer, name)
            fout[l, p], fin[l, p] = w.shape
    return fin, fout


def model_col_norms(adapter: Adapter) -> torch.Tensor:
    fin, _ = projection_shapes(adapter)
    out = torch.zeros(fin.shape[0], fin.shape[1], int(fin.max()))
    for l, layer in enumerate(adapter.layers()):
        for p, name in enumerate(PROJECTIONS):
            out[l, p, : fin[l, p]] = column_norms(adapter.proj_weight(layer, name))
    return out


class GateSet:
    """The gated projections of a model, addressable by (layer, logical projection)."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self._position_hook = None
        self.segments: list[dict[str, Segment]] = []
        self.modules: list[GatedLinear] = []
        for layer in adapter.layers():
            by_module: dict[str, list] = {}
            for pr in adapter.projections(layer):
                by_module.setdefault(pr.module_path, []).append(pr)
            segs = {}
            for path, prs in by_module.items():
                module = adapter.module(layer, path)
                existing = {s.name: s for s in getattr(module, "segments", None) or []}
                seg_list = [existing.get(pr.name) or Segment(pr.name, pr.rows) for pr in prs]
                self.modules.append(GatedLinear.wrap(module, seg_list))
                segs.update({seg.name: seg for seg in seg_list})
            self.segments.append(segs)

    def apply(self, plan: GatePlan | None, col_norms: torch.Tensor, in_features: torch.Tensor) -> None:
        """Set every projection's gate from a plan; no plan, or a projection at sparsity 0, means dense."""
        for l, segs in enumerate(self.segments):
            for p, name in enumerate(PROJECTIONS):
                seg = segs[name]
                if plan is None or float(plan.sparsity[l, p]) <= 0.0:
                    seg.gate = None
                    continue
                scale = col_norms[l, p, : int(in_features[l, p])] if plan.criterion == "wina" else None
                seg.gate = Gate(plan.criterion, plan.mode, float(plan.threshold[l, p]), int(plan.k[l, p]), scale)

    def set_dense_until(self, n: int) -> None:
        """Gate policy: token positions < n are computed dense (0: every token sparse). Positions count from the
        start of the sequence, KV cache included (read from the decoder's cache_position on every call)."""
        for m in self.modules:
            m.dense_until = int(n)
        if n > 0 and self._position_hook is None:
            self._position_hook = self.adapter.base.register_forward_pre_hook(self._track_offset, with_kwargs=True)

    def _track_offset(self, module, args, kwargs):
        cp = kwargs.get("cache_position")
        if cp is not None and cp.numel():
            offset = int(cp.reshape(-1)[0])
        else:
            # transformers 5.x before 5.24 passes the cache as past_key_values, later releases as cache
            past = kwargs.get("past_key_values", kwargs.get("cache"))
            offset = int(past.get_seq_length()) if past is not None else 0
        for m in self.modules:
            m.offset = offset

    def set_layer(self, layer: int, gates: dict[str, Gate | None]) -> None:
        for name, gate in gates.items():
            self.segments[layer][name].gate = gate

    def counting(self, on: bool) -> None:
        for m in self.modules:
            m.counting = on
        for segs in self.segments:
            for seg in segs.values():
                seg.counter.kept = seg.counter.total = 0

    def realized(self) -> torch.Tensor:
        """[L, 7] measured sparsity since counting was switched on (0 for dense projections: they read all)."""
        out = torch.zeros(len(self.segments), len(PROJECTIONS))
        for l, segs in enumerate(self.segments):
            for p, name in enumerate(PROJECTIONS):
                out[l, p] = segs[name].counter.sparsity
        return out
