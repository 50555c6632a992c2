"""The sparse runtime's gate: a linear layer that reads only the input channels whose score passes its gate.

score_i = |x_i| * c_i, with c_i = ||W[:, i]||_2 (criterion `wina`) or 1 (criterion `teal`). A gate keeps the
channels whose score is above a calibrated threshold (mode `threshold`) or the k highest per token (mode `topk`).
This torch runtime zeroes the dropped channels before a dense matmul: it is the reference the exported kernels
are checked against, not the fast path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CRITERIA = ("wina", "teal")
MODES = ("threshold", "topk")


@dataclass
class Gate:
    """The gate of one logical projection."""

    criterion: str
    mode: str
    threshold: float = 0.0  # mode threshold: keep score > threshold
    k: int = 0  # mode topk: keep the k highest scores of each token
    scale: torch.Tensor | None = None  # [in] column norms for `wina`, None for `teal`

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        score = x.abs()
        if self.scale is not None:
            score = score * self.scale.to(score.dtype)
        if self.mode == "threshold":
            return score > self.threshold
        n = x.shape[-1]
        if self.k >= n:
            return torch.ones_like(x, dtype=torch.bool)
        keep = torch.zeros_like(x, dtype=torch.bool)
        if self.k > 0:
            keep.scatter_(-1, score.topk(self.k, dim=-1).indices, True)
        return keep


@dataclass
class Counter:
    """Measured sparsity of one logical projection: channels read vs channels offered, over every token."""

    kept: int = 0
    total: int = 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


@dataclass
class Segment:
    name: str
    rows: tuple[int, int] | None
    gate: Gate | None = None
    counter: Counter = field(default_factory=Counter)


class GatedLinear(nn.Linear):
    """An nn.Linear whose output segments (one per logical projection; one for an unfused module) are each
    computed from a gated copy of the input. With no gates it is exactly the dense linear.

    It keeps nn.Linear's parameter names, so state-dict keys are those of the Hugging Face model.
    """

    segments: list[Segment]
    counting: bool
    # Gate policy: token positions below dense_until are computed dense; offset is the position of x's first row
    # (the KV-cache length during generation). Set for the whole model by GateSet.
    dense_until: int = 0
    offset: int = 0

    @classmethod
    def wrap(cls, linear: nn.Linear, segments: list[Segment]) -> "GatedLinear":
        if isinstance(linear, GatedLinear):
            linear.segments = segments
            return linear
        linear.__class__ = cls
        linear.segments = segments
        linear.counting = False
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if all(s.gate is None for s in self.segments):
            return F.linear(x, self.weight, self.bias)
        outs = []
        for seg in self.segments:
            w = self.weight if seg.rows is None else self.weight[seg.rows[0]:seg.rows[1]]
            b = None if self.bias is None else (self.bias if seg.rows is None else self.bias[seg.rows[0]:seg.rows[1]])
            if seg.gate is None:
                outs.append(F.linear(x, w, b))
                continue
            keep = seg.gate.mask(x)
            if self.dense_until > self.offset and x.dim() >= 2:
                keep[..., : self.dense_until - self.offset, :] = True
            if self.counting:
                seg.counter.kept += int(keep.sum())
                seg.counter.total += keep.numel()
            outs.append(F.linear(x * keep.to(x.dtype), w, b))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]||_2 for each input channel i of an [out, in] weight, in float32."""
    return weight.detach().double().norm(dim=0).float()


def scores(x: torch.Tensor, criterion: str, col_norm: torch.Tensor | None) -> torch.Tensor:
    s = x.detach().abs().float()
    if criterion == "wina":
        s = s * col_norm
    return s
