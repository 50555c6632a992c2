"""What each decoder layer sees: its input hidden states and keyword arguments, captured from one dense forward,
so a pass can run any layer (and the layers after it) again without the ones before."""
from __future__ import annotations

import torch


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
