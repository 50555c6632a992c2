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
ALLOCATIONS = ("greedy", "uniform")


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
    """

    sizes: torch.Tensor  # [L, 7] number of weights per projection
    greedy: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def per_projection(self, criterion: str, allocation: str, target: float) -> torch.Tensor:
        L = self.sizes.shape[0]
        if allocation == "uniform":
            return torch.full((L, len(PROJECTIONS)), float(target))
        if criterion not in self.greedy:
            raise KeyError(criterion)
        rows = []
        for path in self.greedy[criterion]:
            rows.append(lookup_path(path, target))
        return torch.stack(rows)


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
