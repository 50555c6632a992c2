"""Quality benchmark: perplexity on an evaluation text with every token computed sparse (or under a gate policy),
and the sparsity each projection really had (counted channel by channel, not the nominal target)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gating import GatePlan
from ..perplexity import perplexity
from ..runtime import Runtime


@dataclass
class EvalResult:
    ppl: float
    realized: torch.Tensor  # [L, 7]
    realized_model: float  # fraction of projection weights skipped, over the whole model
    flops_per_token: float  # linear layers only (projections, basis matrices, LM head)


@dataclass(frozen=True)
class Policy:
    """Which tokens are computed sparse. `all`: every one. `prompt:N`: the first N tokens are a prompt computed
    dense and left out of the score (perplexity of the continuation, decoded sparse). `first:N`: the first N
    tokens of every sequence are computed dense, every token is scored."""

    name: str
    dense_until: int = 0
    first_scored: int = 0

    @classmethod
    def parse(cls, text: str) -> "Policy":
        kind, _, n = text.partition(":")
        if kind == "all" and not n:
            return cls("all")
        if kind in ("prompt", "first") and n.isdigit() and int(n) > 0:
            return cls(text, int(n), int(n) if kind == "prompt" else 0)
        raise ValueError(text)


EVERY_TOKEN = Policy("all")


@torch.no_grad()
def evaluate(rt: Runtime, plan: GatePlan | None, windows: torch.Tensor, progress=lambda m: None,
             label: str = "", policy: Policy = EVERY_TOKEN) -> EvalResult:
    rt.use_plan(plan)
    rt.gateset.set_dense_until(policy.dense_until)
    rt.gateset.counting(True)
    try:
        ppl = perplexity(rt.model, windows, progress, label, policy.first_scored)
    finally:
        rt.gateset.set_dense_until(0)
    realized = rt.gateset.realized()
    rt.gateset.counting(False)
    sizes = rt.allocation.sizes
    model_sparsity = float((realized * sizes).sum() / sizes.sum())
    return EvalResult(ppl, realized, model_sparsity, flops_per_token(rt, realized))


def flops_per_token(rt: Runtime, realized: torch.Tensor) -> float:
    cfg = rt.model.config
    d = cfg.hidden_size
    proj = float(((1.0 - realized) * rt.allocation.sizes).sum())
    basis = sum(int(b.numel()) for layer in rt.adapter.layers()
                for name, b in layer.named_buffers(recurse=False) if name.startswith("wina_"))
    return 2.0 * (proj + basis + cfg.vocab_size * d)
