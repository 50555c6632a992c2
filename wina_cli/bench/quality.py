"""Quality benchmark: perplexity on an evaluation text with every token computed sparse, and the sparsity
each projection really had (counted channel by channel, not the nominal target)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..gating import GatePlan
from ..runtime import Runtime


@dataclass
class EvalResult:
    ppl: float
    realized: torch.Tensor  # [L, 7]
    realized_model: float  # fraction of projection weights skipped, over the whole model
    flops_per_token: float  # linear layers only (projections, basis matrices, LM head)


@torch.no_grad()
def evaluate(rt: Runtime, plan: GatePlan | None, windows: torch.Tensor, progress=lambda m: None,
             label: str = "") -> EvalResult:
    rt.use_plan(plan)
    rt.gateset.counting(True)
    nll, count = 0.0, 0
    for i in range(windows.shape[0]):
        progress(f"({i + 1}/{windows.shape[0]}) evaluating {label}")
        ids = windows[i:i + 1]
        logits = rt.model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        nll += float(loss)
        count += ids.shape[1] - 1
    realized = rt.gateset.realized()
    rt.gateset.counting(False)
    sizes = rt.allocation.sizes
    model_sparsity = float((realized * sizes).sum() / sizes.sum())
    return EvalResult(math.exp(nll / count), realized, model_sparsity, flops_per_token(rt, realized))


def flops_per_token(rt: Runtime, realized: torch.Tensor) -> float:
    cfg = rt.model.config
    d = cfg.hidden_size
    proj = float(((1.0 - realized) * rt.allocation.sizes).sum())
    basis = sum(int(b.numel()) for layer in rt.adapter.layers()
                for name, b in layer.named_buffers(recurse=False) if name.startswith("wina_"))
    return 2.0 * (proj + basis + cfg.vocab_size * d)
