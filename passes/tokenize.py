"""Cut the calibration text into deterministic token windows."""
from __future__ import annotations

from wina_cli.data import token_windows

from .base import Pass, PassResult, PipelineState


class TokenizeCalibration(Pass):
    name = "tokenize"

    def requires(self, state: PipelineState):
        if state.tokenizer is None:
            raise self.fail("no tokenizer", "the text is tokenized with the model's tokenizer", "run load first")

    def call(self, state: PipelineState) -> PassResult:
        r = state.recipe
        tw = token_windows(r.data.path, state.tokenizer, r.data.num_samples, r.data.seq_len, r.seed)
        state.calib_ids, state.calib_provenance = tw.ids, tw.provenance
        return PassResult(True, {"tokens": tw.provenance["tokens"]})
