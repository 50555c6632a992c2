"""Cut the calibration text into deterministic token windows; where perplexity is measured during calibration
(a budget, --method auto), a few more windows are drawn and held apart from the statistics."""
from __future__ import annotations

from wina_cli.config import needs_holdout
from wina_cli.data import token_windows

from .base import Pass, PassResult, PipelineState


class TokenizeCalibration(Pass):
    name = "tokenize"

    def requires(self, state: PipelineState):
        if state.tokenizer is None:
            raise self.fail("no tokenizer", "the text is tokenized with the model's tokenizer", "run load first")

    def call(self, state: PipelineState) -> PassResult:
        r = state.recipe
        held = r.holdout.num_samples if needs_holdout(r) else 0
        tw = token_windows(r.data.path, state.tokenizer, r.data.num_samples + held, r.data.seq_len, r.seed)
        state.calib_ids, state.calib_provenance = tw.ids[: r.data.num_samples], dict(tw.provenance)
        if held:
            state.holdout_ids = tw.ids[r.data.num_samples:]
            state.calib_provenance["holdout_windows"] = held
        return PassResult(True, {"tokens": tw.provenance["tokens"], "holdout_windows": held})
