"""One contract, checked for every architecture family on a tiny random config."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_recipe, run_pipeline, tiny_model, tiny_tokenizer
from passes.base import Pipeline, PipelineState
from passes.fold_norms import FoldNorms
from passes.load import LoadCheckpoint
from passes.rotate import PCA_WINDOWS, VARIANTS, RotateWina, slot_covariances
from wina_cli import probe
from wina_cli.blocks import install_block_forward
from wina_cli.errors import UnsupportedModelError
from wina_cli.gating import GatePlan, GateSet
from wina_cli.models.adapters import PROJECTIONS, adapter_class_for, adapter_for, supported_model_types


class AdapterContract:
    model_type: str

    def test_adapter_is_chosen_by_model_type(self):
        model = tiny_model(self.model_type)
        assert self.model_type in adapter_for(model).model_types

    def test_projections_have_consistent_shapes(self):
        model = tiny_model(self.model_type)
        a = adapter_for(model)
        d = model.config.hidden_size
        for layer in a.layers():
            shapes = {n: tuple(a.proj_weight(layer, n).shape) for n in PROJECTIONS}
            assert shapes["q"][1] == shapes["k"][1] == shapes["v"][1] == d
            assert shapes["gate"] == shapes["up"] and shapes["gate"][1] == d
            assert shapes["down"] == (d, shapes["gate"][0])
            assert shapes["o"][0] == d and shapes["o"][1] == shapes["q"][0]

    def test_block_forward_reproduces_the_family_forward(self):
        model = tiny_model(self.model_type)
        ids = probe.probe_ids(model.config.vocab_size, 3)
        ref = probe.logits(model, ids)
        install_block_forward(adapter_for(model))
        got = probe.logits(model, ids)
        assert torch.equal(ref, got)

    def test_transform_is_exact(self):
        ids = probe.probe_ids(300, 11)
        ref = probe.logits(tiny_model(self.model_type, seed=0), ids)
        state = run_pipeline(self.model_type, "wina")
        state.gateset.apply(None, state.stats.col_norms, state.stats.in_features)
        got = probe.logits(state.model, ids)
        cmp = probe.compare(ref, got)
        assert cmp["max_rel_delta"] < 1e-5, cmp
        assert state.validation["transform"]["max_rel_delta"] < 1e-5

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_every_transform_variant_is_exact(self, variant):
        ids = probe.probe_ids(300, 11)
        ref = probe.logits(tiny_model(self.model_type, seed=0), ids)
        state = PipelineState(recipe=make_recipe(), model=tiny_model(self.model_type, seed=0),
                              tokenizer=tiny_tokenizer())
        state.calib_ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
        report = Pipeline([LoadCheckpoint(), FoldNorms(), RotateWina(variant)]).run(state)
        cmp = probe.compare(ref, probe.logits(state.model, ids))
        assert cmp["max_rel_delta"] < 1e-5, cmp
        a = state.adapter
        buffers = [n for layer in a.layers() for n, _ in layer.named_buffers(recurse=False) if n.startswith("wina_")]
        info = report.passes[-1]["info"]
        d = a.config.hidden_size
        assert info["extra_parameters"] == len(buffers) * d * d
        shortcuts = [n for n in buffers if "shortcut" in n]
        if variant == "pca-global":
            assert shortcuts == []  # one basis everywhere: nothing to carry the residual across
        else:
            assert len(shortcuts) == 2 * len(a.layers()) - (0 if variant == "wina" else 1)
        if variant == "stacked":
            for layer in a.layers():
                w = torch.cat([a.proj_weight(layer, n) for n in ("q", "k", "v")]).double()
                gram = w.T @ w
                assert (gram - torch.diag(torch.diag(gram))).abs().max() < 1e-4 * gram.abs().max()
        if variant == "pca":
            # The rotated slot inputs are decorrelated on the windows the bases were read on.
            cov = slot_covariances(a, state.calib_ids[:PCA_WINDOWS])[0]
            off = cov - torch.diag(torch.diag(cov))
            assert off.abs().max() < 1e-6 * cov.abs().max()
            assert (torch.diag(cov)[1:] <= torch.diag(cov)[:-1] + 1e-9).all()

    def test_layer_by_layer_reproduces_the_full_forward(self):
        # collect_stats steps every window through one layer at a time with the first window's layer keyword
        # arguments (rotary tables, masks); that must give each layer exactly the inputs of a full forward.
        from passes.capture import capture_block_inputs
        from passes.stats import first_layer_inputs

        model = tiny_model(self.model_type)
        a = adapter_for(model)
        install_block_forward(a)
        ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(4))
        kwargs = [kw for _, kw in capture_block_inputs(a, ids[:1])]
        hidden = first_layer_inputs(a, ids)
        with torch.no_grad():
            for l, layer in enumerate(a.layers()):
                for i in range(3):
                    want = capture_block_inputs(a, ids[i:i + 1])[l][0]
                    assert torch.allclose(hidden[i:i + 1], want, atol=1e-5), (l, i)
                    hidden[i:i + 1] = layer(hidden[i:i + 1], **kwargs[l])

    def test_transform_makes_key_columns_orthogonal(self):
        state = run_pipeline(self.model_type, "wina")
        a = state.adapter
        for layer in a.layers():
            wk = a.proj_weight(layer, "k").double()
            gram = wk.T @ wk
            off = gram - torch.diag(torch.diag(gram))
            assert off.abs().max() < 1e-4 * gram.abs().max()

    def test_sparsity_zero_is_dense_and_gates_change_output(self):
        state = run_pipeline(self.model_type, "none")
        ids = probe.probe_ids(300, 4)
        st, gs = state.stats, state.gateset
        gs.apply(None, st.col_norms, st.in_features)
        dense = probe.logits(state.model, ids)
        zero = state.allocation.per_projection("wina", "uniform", 0.0)
        from wina_cli.gating import plan_gates

        gs.apply(plan_gates(st, state.allocation, "wina", "threshold", "uniform", 0.0), st.col_norms, st.in_features)
        assert torch.equal(probe.logits(state.model, ids), dense)
        gs.apply(plan_gates(st, state.allocation, "wina", "threshold", "uniform", 0.5), st.col_norms, st.in_features)
        assert not torch.allclose(probe.logits(state.model, ids), dense)
        assert zero.sum() == 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_is_registered(model_type):
    assert model_type in supported_model_types()


def test_unknown_type_lists_supported():
    with pytest.raises(UnsupportedModelError) as e:
        adapter_class_for("gpt2")
    assert "gpt2" in e.value.message and "llama" in e.value.message and e.value.exit_code == 5


class TestLlama(AdapterContract):
    model_type = "llama"


class TestMistral(AdapterContract):
    model_type = "mistral"


class TestQwen2(AdapterContract):
    model_type = "qwen2"


class TestQwen3(AdapterContract):
    model_type = "qwen3"


class TestPhi3(AdapterContract):
    model_type = "phi3"


class TestGemma2(AdapterContract):
    model_type = "gemma2"


class TestGemma3(AdapterContract):
    model_type = "gemma3_text"
