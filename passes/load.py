"""Load a checkpoint and pick its adapter."""
from __future__ import annotations

from wina_cli.blocks import install_block_forward
from wina_cli.models.adapters import adapter_for
from wina_cli.models.load import load_model

from .base import Pass, PassResult, PipelineState


class LoadCheckpoint(Pass):
    name = "load"

    def call(self, state: PipelineState) -> PassResult:
        if state.model is None:
            state.progress(f"loading {state.recipe.model}")
            loaded = load_model(state.recipe.model, "float32")
            state.model, state.tokenizer, state.source = loaded.model, loaded.tokenizer, loaded.source
        state.adapter = adapter_for(state.model)
        # Every layer runs through wina's block forward from here on, transformed or not, so calibration,
        # allocation and the artifact runtime all execute the same code.
        install_block_forward(state.adapter)
        return PassResult(True, {"model_type": state.model.config.model_type,
                                 "layers": len(state.adapter.layers())})

    def ensures(self, state, result):
        if state.tokenizer is None:
            raise self.fail("the model has no tokenizer", "calibration text must be tokenized",
                            "use a checkpoint that ships tokenizer files")
