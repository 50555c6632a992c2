"""Untie the LM head from the embeddings and fold every reader norm's gain into the linears that read it.

Exact: RMSNorm(x) W^T = (x / rms(x)) diag(g) W^T, so W <- W diag(g) and g <- 1 leaves the function unchanged.
After this pass the norms that feed q/k/v, gate/up and the LM head are pure RMS normalizations, which commute
with any orthogonal change of basis of the residual stream: the precondition of the rotation.
"""
from __future__ import annotations

import torch
from torch import nn

from wina_cli import probe
from wina_cli.errors import ValidationError

from .base import Pass, PassResult, PipelineState

FOLD_TOLERANCE = 1e-4  # relative to the largest logit; folding is a per-column scale, so fp32 round-off only


def _scale_columns(linear: nn.Linear, gain: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_((linear.weight.double() * gain).to(linear.weight.dtype))


class FoldNorms(Pass):
    name = "fold_norms"

    def requires(self, state: PipelineState):
        if state.adapter is None:
            raise self.fail("no model is loaded", "fold_norms runs after load", "put `load` first")
        if state.folded:
            raise self.fail("norms are already folded", "folding twice would square the gains",
                            "run fold_norms once")

    def call(self, state: PipelineState) -> PassResult:
        a = state.adapter
        ids = probe.probe_ids(a.config.vocab_size, state.recipe.seed)
        self._ref = probe.logits(state.model, ids)
        untied = False
        if a.ties_embeddings:
            a.model.lm_head.weight = nn.Parameter(a.embedding().weight.detach().clone())
            a.config.tie_word_embeddings = False
            untied = True
        for layer in a.layers():
            for norm, readers in ((a.attn_norm(layer), a.attn_readers(layer)), (a.mlp_norm(layer), a.mlp_readers(layer))):
                gain = a.norm_gain(norm)
                for lin in readers:
                    _scale_columns(lin, gain)
                a.reset_norm(norm)
        final = a.final_norm()
        _scale_columns(a.lm_head(), a.norm_gain(final))
        a.reset_norm(final)
        state.folded = True
        self._ids = ids
        return PassResult(True, {"untied_embeddings": untied})

    def ensures(self, state: PipelineState, result: PassResult):
        got = probe.logits(state.model, self._ids)
        cmp = probe.compare(self._ref, got)
        state.validation["fold_norms"] = cmp
        if cmp["max_rel_delta"] > FOLD_TOLERANCE:
            raise ValidationError(
                f"folding the norms changed the logits by {cmp['max_abs_delta']:.3g} "
                f"({cmp['max_rel_delta']:.3g} of the largest logit, limit {FOLD_TOLERANCE})",
                "folding is exact in exact arithmetic, so the adapter likely points at the wrong norm or readers",
                "report the model type; run with --transform none meanwhile")
