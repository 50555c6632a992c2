"""The kl allocation's table: how far the model's next-token distribution moves when one projection alone is gated.

Two ways to get it, both [L, 7, levels] tables of mean per-token KL(dense || gated), level 0 being sparsity 0:

`exact_kl` gates each projection at each level and runs the model on from that layer's cached dense input: a
partial forward per (projection, level), 210 x 5 on SmolLM2.

`fisher_kl` uses the second-order expansion of the KL around the dense model, KL ~ 1/2 E_y[(g . delta)^2], where
g is the gradient of log p(y) for next tokens y sampled from the dense model and delta the change gating makes.
Gating projection p drops -x_i from its input, so g . delta = -sum_i u_i x_i over dropped channels, with u the
gradient at that projection's input; which channels are dropped at each level is a comparison of the channel's
score with the level's threshold. One forward and `draws` backward passes per window then give every projection
at every level at once. Draws are independent, and so are windows (a window's gradient does not reach another),
so the estimate's relative noise is about sqrt(2 / (windows x draws)).
"""
from __future__ import annotations

import contextlib

import torch

from wina_cli.gating import GateSet, threshold_gate
from wina_cli.models.adapters import PROJECTIONS
from wina_cli.sparse import scores

from .capture import capture_block_inputs


def _log_probs(adapter, h: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [tokens, vocab] from the last decoder layer's output."""
    z = adapter.lm_head()(adapter.final_norm()(h)).float()
    cap = getattr(adapter.config, "final_logit_softcapping", None)
    if cap:
        z = torch.tanh(z / cap) * cap
    return torch.log_softmax(z.reshape(-1, z.shape[-1]), dim=-1)


@torch.no_grad()
def exact_kl(adapter, inputs, gates: GateSet, stats, criterion: str, levels: torch.Tensor,
             entries=None, progress=lambda m: None) -> torch.Tensor:
    """[L, 7, len(levels)]: measured per-token KL when only projection p of layer l is gated at levels[i]
    (levels[0] = 0). `inputs` are each layer's captured dense inputs; `entries`, a list of (l, p, i), limits the
    measurement to those (the rest stay 0)."""
    layers = adapter.layers()

    def log_probs_from(l: int) -> torch.Tensor:
        h = inputs[l][0]
        for j in range(l, len(layers)):
            h = layers[j](h, **inputs[j][1])
        return _log_probs(adapter, h)

    ref = log_probs_from(0)
    p_ref = ref.exp()
    out = torch.zeros(len(layers), len(PROJECTIONS), len(levels))
    todo = entries if entries is not None else [(l, p, i) for l in range(len(layers))
                                                for p in range(len(PROJECTIONS)) for i in range(1, len(levels))]
    last_layer = None
    for l, p, i in todo:
        if l != last_layer and entries is None:
            progress(f"({l + 1}/{len(layers)}) projection sensitivity [{criterion}]")
        last_layer = l
        name = PROJECTIONS[p]
        gates.set_layer(l, {name: threshold_gate(stats, criterion, l, p, float(levels[i]))})
        out[l, p, i] = float((p_ref * (ref - log_probs_from(l))).sum(dim=-1).mean())
        gates.set_layer(l, {name: None})
    return out


@contextlib.contextmanager
def _frozen_parameters(model):
    """Gradients flow to activations only: parameters stop requiring grad for the duration."""
    params = [prm for prm in model.parameters() if prm.requires_grad]
    for prm in params:
        prm.requires_grad_(False)
    try:
        yield
    finally:
        for prm in params:
            prm.requires_grad_(True)


def fisher_kl(adapter, ids: torch.Tensor, stats, criterion: str, levels: torch.Tensor, draws: int, seed: int,
              progress=lambda m: None, dense_first: int = 0) -> torch.Tensor:
    """[L, 7, len(levels)]: the second-order estimate of the per-token KL when only projection p of layer l is
    gated at levels[i] (levels[0] = 0), on the windows `ids` [N, T], from `draws` sampled next-token sequences per
    window. Under a first-N-dense policy (`dense_first`), positions below N are never gated and contribute
    nothing. The model must be dense (no gate set) and is left so."""
    layers = adapter.layers()
    L, P = len(layers), len(PROJECTIONS)
    for layer in layers:
        for pr in adapter.projections(layer):
            if any(seg.gate is not None for seg in getattr(adapter.module(layer, pr.module_path), "segments", ())):
                raise ValueError("fisher_kl expands around the dense model: clear the gates first")
    thr = torch.tensor([[[stats.threshold(criterion, l, p, float(s)) for s in levels[1:]] for p in range(P)]
                        for l in range(L)], dtype=torch.float32)
    col = {(l, p): (stats.col_norm(l, p) if criterion == "wina" else None) for l in range(L) for p in range(P)}
    # (layer, module) -> its projections [(p, rows)]. A module of one projection: the gradient at its input is u
    # itself. A fused module's input gradient sums its projections', so u comes from its output's gradient rows.
    readers: dict[tuple[int, str], list] = {}
    for l, layer in enumerate(layers):
        for pr in adapter.projections(layer):
            readers.setdefault((l, pr.module_path), []).append((PROJECTIONS.index(pr.name), pr.rows))
    gen = torch.Generator().manual_seed(seed)
    acc = torch.zeros(L, P, len(levels), dtype=torch.float64)
    captured: dict = {}

    def hooks_for(key, module):
        fused = len(readers[key]) > 1

        def pre(mod, args):
            v = args[0].view_as(args[0])
            captured[key] = [v, None]
            return (v,) + tuple(args[1:])

        def post(mod, args, out):
            captured[key][1] = out
        return [module.register_forward_pre_hook(pre)] + ([module.register_forward_hook(post)] if fused else [])

    handles = [adapter.embedding().register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))]
    for (l, path) in readers:
        handles += hooks_for((l, path), adapter.module(layers[l], path))
    try:
        with _frozen_parameters(adapter.model), torch.enable_grad():
            for n in range(ids.shape[0]):
                progress(f"({n + 1}/{ids.shape[0]}) projection sensitivity, second order [{criterion}]")
                captured.clear()
                logp = torch.log_softmax(adapter.model(input_ids=ids[n:n + 1], use_cache=False).logits[0].float(),
                                         dim=-1)
                keys = list(captured)
                xs = {k: captured[k][0].detach()[0] for k in keys}  # each module's input on this window
                # which level first drops each input channel at each token: thresholds rise with the level, and
                # a channel is dropped where its score is <= the threshold
                first_dropped = {}
                for (l, path) in keys:
                    for p, _ in readers[(l, path)]:
                        first_dropped[(l, p)] = torch.searchsorted(
                            thr[l, p].contiguous(), scores(xs[(l, path)], criterion, col[(l, p)]).contiguous())
                        # positions the policy computes dense are dropped at no level: the last bin, never summed
                        first_dropped[(l, p)][:dense_first] = len(levels) - 1
                wrt = [captured[k][1] if len(readers[k]) > 1 else captured[k][0] for k in keys]
                probs = logp.detach().exp()
                for d in range(draws):
                    y = torch.multinomial(probs, 1, generator=gen)
                    grads = torch.autograd.grad(logp.gather(-1, y).sum(), wrt, retain_graph=d < draws - 1)
                    for k, g in zip(keys, grads):
                        l, path = k
                        for p, rows in readers[k]:
                            if rows is None:
                                u = g[0]
                            else:
                                w = adapter.module(layers[l], path).weight
                                u = g[0, :, rows[0]:rows[1]] @ w[rows[0]:rows[1]]
                            contrib = (u * xs[k]).double().flatten()
                            hist = torch.zeros(len(levels), dtype=torch.float64)
                            hist.scatter_add_(0, first_dropped[(l, p)].flatten(), contrib)
                            # at level i (1-based in `levels`), the channels first dropped at levels 1..i
                            acc[l, p, 1:] += hist[:-1].cumsum(0) ** 2
                del logp, probs, wrt, grads, xs
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    return (0.5 * acc / (draws * ids.numel())).float()


def fisher_check(adapter, ids: torch.Tensor, gates: GateSet, stats, criterion: str, levels: torch.Tensor,
                 table: torch.Tensor, dense_first: int = 0) -> dict:
    """The estimate against the measured KL for the seven projections of the middle layer at the level nearest
    0.5, on the same windows (one at a time, so a window's logits are all that is held) and under the same
    first-N-dense policy: the ratio of the sums, which the allocate pass requires to be near 1."""
    L = table.shape[0]
    i = int((levels - 0.5).abs().argmin())
    entries = [(L // 2, p, i) for p in range(len(PROJECTIONS))]
    meas = 0.0
    gates.set_dense_until(dense_first)
    try:
        for n in range(ids.shape[0]):
            measured = exact_kl(adapter, capture_block_inputs(adapter, ids[n:n + 1]), gates, stats, criterion, levels,
                                entries)
            meas += float(sum(measured[e] for e in entries)) / ids.shape[0]
    finally:
        gates.set_dense_until(0)
    est = float(sum(table[e] for e in entries))
    return {"layer": L // 2, "level": round(float(levels[i]), 4), "estimated": est, "measured": meas,
            "ratio": est / meas if meas > 0 else float("inf")}
