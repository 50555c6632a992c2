"""Logit probes: the measurement behind every "did this change the model's function" check."""
from __future__ import annotations

import torch


def probe_ids(vocab_size: int, seed: int, batch: int = 2, seq_len: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """max |delta|, and the same relative to the largest reference logit (the 1e-3 criterion)."""
    delta = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item() or 1.0
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"max_abs_delta": delta, "max_rel_delta": delta / scale, "top1_agreement": agree}
