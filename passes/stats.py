"""Calibration statistics: for every projection and both criteria, the distribution of input-channel scores
(|x_i| for teal, |x_i| * ||W[:, i]|| for wina) over the calibration text, kept as a 1000-level quantile table.

The text goes through the model layer by layer, with no gradient: every window's input to layer l is held (one
[windows, seq, d] tensor), layer l runs on each window in turn while hooks on its projections draw a seeded
random subsample of the channel scores, the layer's quantile tables are read off the pooled sample, and the
outputs become layer l+1's inputs. Peak memory is the model, that hidden-state tensor, one window's activations
inside one layer and one layer's score samples (buffers allocated once: tens of thousands of small per-window
tensors let the allocator's arenas grow, and peak memory then varied from run to run between 2.9 and 6.2 GB on
SmolLM2). Layer keyword arguments (rotary tables, masks) depend only on the window shape, which every window
shares, so they are captured once from the first window's forward.
"""
from __future__ import annotations

import torch

from wina_cli.gating import CalibrationStats, model_col_norms, projection_shapes, quantile_table
from wina_cli.models.adapters import PROJECTIONS
from wina_cli.sparse import CRITERIA

from .capture import capture_block_inputs
from .base import Pass, PassResult, PipelineState

SAMPLE_PER_PROJECTION = 1 << 18  # pooled scores per projection and criterion; quantile error ~ 1e-3


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(adapter, ids: torch.Tensor) -> torch.Tensor:
    """[windows, seq, d]: the hidden states entering layer 0 for each window (the forward stops there)."""
    out = []

    def catch(module, args, kwargs):
        out.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = adapter.layers()[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(ids.shape[0]):
            try:
                adapter.base(input_ids=ids[i:i + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(out)


class CollectStats(Pass):
    name = "collect_stats"

    def requires(self, state: PipelineState):
        if state.calib_ids is None:
            raise self.fail("no calibration windows", "statistics are read on calibration text",
                            "run tokenize first")

    @torch.no_grad()
    def call(self, state: PipelineState) -> PassResult:
        a = state.adapter
        ids = state.calib_ids
        n_win = ids.shape[0]
        fin, fout = projection_shapes(a)
        col = model_col_norms(a)
        L = fin.shape[0]
        per_window = max(1, SAMPLE_PER_PROJECTION // n_win)
        gen = torch.Generator().manual_seed(state.recipe.seed)
        P = len(PROJECTIONS)
        samples = {c: torch.empty(P, per_window * n_win) for c in CRITERIA}
        filled = torch.zeros(P, dtype=torch.int64)
        quantiles = {c: torch.zeros(L, P, 1000) for c in CRITERIA}

        kwargs = [kw for _, kw in capture_block_inputs(a, ids[:1])]
        hidden = first_layer_inputs(a, ids)
        for l, layer in enumerate(a.layers()):
            state.progress(f"({l + 1}/{L}) calibrating")
            filled.zero_()
            by_module: dict[str, list[int]] = {}
            for pr in a.projections(layer):
                by_module.setdefault(pr.module_path, []).append(PROJECTIONS.index(pr.name))
            handles = []
            for path, pidx in by_module.items():
                def hook(module, args, l=l, pidx=pidx):
                    x = args[0].reshape(-1, args[0].shape[-1])
                    n_in = x.shape[1]
                    flat = torch.randint(0, x.numel(), (per_window,), generator=gen)
                    ax = x.reshape(-1)[flat].abs().float()
                    chan = flat % n_in
                    for p in pidx:
                        start = int(filled[p])
                        samples["teal"][p, start:start + per_window] = ax
                        samples["wina"][p, start:start + per_window] = ax * col[l, p, chan]
                        filled[p] = start + per_window
                handles.append(a.module(layer, path).register_forward_pre_hook(hook))
            try:
                for i in range(n_win):
                    hidden[i:i + 1] = layer(hidden[i:i + 1], **kwargs[l])
            finally:
                for h in handles:
                    h.remove()
            for c in CRITERIA:
                for p in range(P):
                    quantiles[c][l, p] = quantile_table(samples[c][p, : int(filled[p])])
        state.stats = CalibrationStats(quantiles, col, fin, fout, tokens=int(ids.numel()))
        return PassResult(True, {"tokens": int(ids.numel()), "samples_per_projection": per_window * n_win})

    def ensures(self, state: PipelineState, result: PassResult):
        for c, q in state.stats.quantiles.items():
            if not torch.isfinite(q).all():
                raise self.fail(f"the {c} score table has non-finite values",
                                "the model produced inf/nan activations on the calibration text",
                                "check the model in fp32 on this text")
            if (q[..., 1:] < q[..., :-1]).any():
                raise self.fail(f"the {c} quantile table is not monotone", "this is a bug", "report it")
