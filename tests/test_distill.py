"""Sparsity-aware distillation: what it tunes, on which windows, what it checks, and what budgets count from."""
from __future__ import annotations

import pytest
import torch

from conftest import make_recipe, run_pipeline, tiny_model, tiny_tokenizer
from passes.base import PassResult, PipelineState
import passes.distill as distill_mod
from passes.distill import Distill, QuantileGate, distill_windows, lr_factor, step_sparsities, tuned_parameters
from wina_cli.config import recipe_from_dict, validate
from wina_cli.errors import ConfigError, DataError, PassError
from wina_cli.perplexity import perplexity

DISTILL = {"distill.steps": 20, "distill.lr": 3e-4, "distill.batch": 2, "distill.check_samples": 2}


@pytest.fixture(scope="module")
def distilled(calib_text):
    return run_pipeline("llama", "none", **DISTILL, **{"distill.data": str(calib_text)})


def test_distillation_lowers_the_gated_kl_and_records_it(distilled):
    info = distilled.validation["distill"]
    assert info["check_kl_after"] < info["check_kl_before"]
    assert info["steps"] == 20 and info["train_tokens"] == 20 * 2 * 64 and info["check_tokens"] == 2 * 64
    assert info["sparsity"] == distilled.recipe.sparsity.target and info["gate"] == "topk"
    # the dense function moved (by design), and the record says how far
    assert info["dense_kl_after"] > 0


def test_only_projection_weights_change(distilled):
    before = dict(tiny_model("llama", 0).named_parameters())
    tuned = {id(p) for p in tuned_parameters(distilled.adapter)}
    changed, kept = 0, 0
    for name, p in distilled.model.named_parameters():
        same = torch.equal(p.detach(), before[name].detach())
        if id(p) in tuned:
            changed += not same
        else:
            assert same, f"{name} is not a projection weight and must not change"
            kept += 1
    assert changed == len(tuned) and kept > 0


def test_distillation_is_deterministic(calib_text, distilled):
    again = run_pipeline("llama", "none", **DISTILL, **{"distill.data": str(calib_text)})
    for (name, a), b in zip(distilled.model.named_parameters(), again.model.parameters()):
        assert torch.equal(a, b), name
    assert again.validation["distill"]["check_kl_after"] == distilled.validation["distill"]["check_kl_after"]


def test_statistics_are_read_on_the_tuned_weights(distilled):
    from wina_cli.gating import model_col_norms
    from wina_cli.models.adapters import adapter_for

    assert torch.equal(distilled.stats.col_norms, model_col_norms(distilled.adapter))
    assert not torch.equal(model_col_norms(adapter_for(tiny_model("llama", 0))), distilled.stats.col_norms)


def test_windows_leave_out_the_calibration_and_fail_clearly_when_short(calib_text):
    tok = tiny_tokenizer()
    from wina_cli.data import token_windows

    r = make_recipe(**DISTILL, **{"data.path": str(calib_text)})
    calib = token_windows(str(calib_text), tok, 8, 64, 0)
    state = PipelineState(recipe=r, tokenizer=tok, calib_ids=calib.ids, calib_provenance=calib.provenance)
    train, check, prov = distill_windows(state)
    assert train.shape == (40, 64) and check.shape == (2, 64) and prov["seed"] == 1
    used = {tuple(w.tolist()) for w in calib.ids}
    assert not any(tuple(w.tolist()) in used for w in torch.cat([train, check]))
    r.distill.steps = 10_000
    with pytest.raises(DataError) as e:
        distill_windows(state)
    assert "too few windows" in e.value.message


def ensures(info: dict) -> PassError | None:
    """The pass's `ensures` on a tiny model as built, against a made-up record: the error it raises, or None."""
    from wina_cli.models.adapters import adapter_for

    state = PipelineState(recipe=make_recipe(), model=tiny_model("llama"))
    state.adapter = adapter_for(state.model)
    try:
        Distill().ensures(state, PassResult(True, info))
    except PassError as e:
        return e
    return None


def test_cosine_schedule_decays_from_lr_towards_zero():
    assert [lr_factor("constant", s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    f = [lr_factor("cosine", s, 10) for s in range(10)]
    assert f[0] == 1.0 and f[5] == pytest.approx(0.5) and 0 < f[-1] < 0.03
    assert all(a > b for a, b in zip(f, f[1:]))


def test_the_schedule_sets_the_rate_of_every_step(calib_text, monkeypatch):
    rates = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    state = run_pipeline("llama", "none", **{**DISTILL, "distill.steps": 8, "distill.schedule": "cosine"},
                         **{"distill.data": str(calib_text)})
    assert rates == pytest.approx([3e-4 * lr_factor("cosine", s, 8) for s in range(8)])
    info = state.validation["distill"]
    assert info["schedule"] == "cosine" and info["check_kl_after"] < info["check_kl_before"]


def test_quantile_gate_drops_the_windows_share_with_tokens_varying():
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.2, 3, 64)[None, :, None]
    keep = QuantileGate("teal", "threshold", sparsity=0.4).mask(x)
    assert int((~keep).sum()) == round(0.4 * x.numel())
    per_token = keep.sum(-1).flatten()
    assert per_token[-8:].float().mean() > per_token[:8].float().mean()  # louder tokens keep more channels
    dropped = x.abs()[~keep]
    assert float(dropped.max()) <= float(x.abs()[keep].min())
    scale = torch.linspace(0.1, 2, 32)  # wina: the column norms weigh the scores
    keep_w = QuantileGate("wina", "threshold", scale=scale, sparsity=0.4).mask(x)
    assert int((~keep_w).sum()) == round(0.4 * x.numel()) and not torch.equal(keep, keep_w)
    assert bool(QuantileGate("teal", "threshold", sparsity=0.0).mask(x).all())


def test_quantile_gates_train_at_the_share_asked_for(calib_text, distilled, monkeypatch):
    seen = []
    mask = QuantileGate.mask

    def spy(self, x):
        keep = mask(self, x)
        seen.append(1 - float(keep.float().mean()))
        return keep

    monkeypatch.setattr(QuantileGate, "mask", spy)
    state = run_pipeline("llama", "none", **{**DISTILL, "distill.gate": "quantile"},
                         **{"distill.data": str(calib_text)})
    info = state.validation["distill"]
    assert info["gate"] == "quantile" and info["check_kl_after"] < info["check_kl_before"]
    # the share, or a little more where a repeated token's equal scores sit at the cut (all of them drop)
    assert seen and all(info["sparsity"] - 1e-6 <= s < info["sparsity"] + 0.005 for s in seen)
    assert sum(s == info["sparsity"] for s in seen) > len(seen) / 2
    # another gate, so other weights than top-k's
    other = dict(distilled.model.named_parameters())
    assert any(not torch.equal(p, other[n]) for n, p in state.model.named_parameters())


def test_step_sparsities_are_one_value_or_seeded_uniform_draws():
    assert step_sparsities(0.5, 0.0, 4, 3) == [0.5] * 4
    draws = step_sparsities(0.3, 0.6, 400, 3)
    assert draws == step_sparsities(0.3, 0.6, 400, 3) and draws != step_sparsities(0.3, 0.6, 400, 4)
    assert all(0.3 <= s <= 0.6 for s in draws) and min(draws) < 0.31 and max(draws) > 0.59
    assert sum(draws) / len(draws) == pytest.approx(0.45, abs=0.02)


def test_a_sparsity_range_trains_each_step_at_its_draw_and_checks_both_ends(calib_text, distilled, monkeypatch):
    seen = []
    set_gates = distill_mod.training_gates

    def spy(gates, adapter, criterion, sparsity, kind="topk"):
        seen.append(sparsity)
        return set_gates(gates, adapter, criterion, sparsity, kind)

    monkeypatch.setattr(distill_mod, "training_gates", spy)
    # the range starts at the target (0.5); on the tiny model, one from 0.3 lowers the KL at 0.6 but not at 0.3
    state = run_pipeline("llama", "none", **{**DISTILL, "distill.sparsity_max": 0.7},
                         **{"distill.data": str(calib_text)})
    info = state.validation["distill"]
    draws = step_sparsities(0.5, 0.7, 20, state.recipe.seed + 2)
    # the two ends checked before, each step at its own draw, the two ends checked after
    assert seen == [0.5, 0.7, *draws, 0.5, 0.7] and len(set(draws)) == 20
    assert info["sparsity"] == 0.5 and info["sparsity_max"] == 0.7
    assert info["mean_step_sparsity"] == pytest.approx(sum(draws) / 20, abs=1e-4)
    assert info["check_kl_after"] < info["check_kl_before"]
    assert info["check_kl_after_at_max"] < info["check_kl_before_at_max"]
    assert info["check_kl_before_at_max"] > info["check_kl_before"]  # sparser gates, further from the original
    other = dict(distilled.model.named_parameters())  # other gates than the single-sparsity run's, other weights
    assert any(not torch.equal(p, other[n]) for n, p in state.model.named_parameters())


ONE = {"steps": 4, "check_tokens": 128, "sparsity": 0.5, "check_kl_before": 0.08, "check_kl_after": 0.08}
RANGE = {**ONE, "sparsity": 0.3, "check_kl_after": 0.07, "sparsity_max": 0.6, "check_kl_before_at_max": 0.2,
         "check_kl_after_at_max": 0.21}
# the KL fell, but the cross-entropy rose by more: the objective the steps minimised went up
FITTED = {**ONE, "check_kl_after": 0.07, "ce_weight": 1.0, "check_ce_before": 3.0, "check_ce_after": 3.02}


@pytest.mark.parametrize("info,needles,fixed", [
    (ONE, ["did not lower", "KL from the dense original (gated at 0.5)"], [{"check_kl_after": 0.07}]),
    (RANGE, ["gated at 0.6", "0.2000 before"], [{"check_kl_after_at_max": 0.19}]),
    (FITTED, ["1 x its cross-entropy", "3.0800 before, 3.0900 after"],
     [{"check_ce_after": 3.0}, {"ce_weight": 0.0}]),  # KL alone: its fall is enough
])
def test_the_pass_fails_unless_its_objective_fell_at_every_checked_sparsity(info, needles, fixed):
    e = ensures(info)
    assert e is not None and all(n in e.message for n in needles), e
    assert "distill.lr" in e.fix
    for change in fixed:
        assert ensures({**info, **change}) is None


def test_a_cross_entropy_weight_fits_the_text_and_is_checked_and_recorded(calib_text, distilled):
    state = run_pipeline("llama", "none", **{**DISTILL, "distill.ce_weight": 1.0},
                         **{"distill.data": str(calib_text)})
    info = state.validation["distill"]
    assert info["ce_weight"] == 1.0
    assert info["train_loss_first"] > info["train_kl_first"] > 0  # the loss trained on, and its KL part
    assert info["check_ce_after"] < info["check_ce_before"]
    assert info["check_kl_after"] + info["check_ce_after"] < info["check_kl_before"] + info["check_ce_before"]
    # the same windows and gates as KL alone, so the weights differ only through the added term
    assert info["check_kl_before"] == distilled.validation["distill"]["check_kl_before"]
    other = dict(distilled.model.named_parameters())
    assert any(not torch.equal(p, other[n]) for n, p in state.model.named_parameters())
    tuned = distilled.validation["distill"]  # KL alone records no cross-entropy
    assert "check_ce_after" not in tuned and "ce_weight" not in tuned
    from passes.distill import mean_losses
    assert info["original_ce"] == pytest.approx(mean_losses(tiny_model("llama", 0), tiny_model("llama", 0),
                                                            distill_windows(state)[1])[1], rel=1e-5)


@pytest.mark.parametrize("distill,why", [({"sparsity_max": 0.95}, "at most 0.9"),
                                         ({"sparsity_max": 0.4}, "starting at 0.5"),
                                         ({"sparsity": 0.6, "sparsity_max": 0.6}, "starting at 0.6")])
def test_a_sparsity_range_must_end_above_its_start(distill, why):
    with pytest.raises(ConfigError) as e:
        validate(recipe_from_dict({"model": "m", "data": {"path": "x"}, "distill": distill}))
    assert "distill.sparsity_max" in e.value.message and why in f"{e.value.message} {e.value.why}"
    validate(recipe_from_dict({"model": "m", "data": {"path": "x"}, "distill": {"sparsity_max": 0.7}}))


def test_budget_counts_from_the_dense_original(calib_text):
    state = run_pipeline("llama", "none", **DISTILL, **{"distill.data": str(calib_text),
                                                        "sparsity.max_ppl_increase": 0.05, "holdout.num_samples": 2})
    original = perplexity(tiny_model("llama", 0), state.holdout_ids)
    assert state.validation["ppl_budget"]["dense_ppl"] == pytest.approx(original, rel=1e-6)
    state.gateset.apply(None, state.stats.col_norms, state.stats.in_features)
    assert perplexity(state.model, state.holdout_ids) != pytest.approx(original, rel=1e-6)


@pytest.mark.parametrize("key,value", [("steps", -1), ("batch", 0), ("lr", 0.0), ("lr", 0.5), ("sparsity", 0.95),
                                       ("check_samples", 0), ("schedule", "linear"),
                                       ("gate", "threshold"), ("ce_weight", -0.5), ("ce_weight", 11.0)])
def test_bad_distill_settings_are_config_errors(key, value):
    with pytest.raises(ConfigError) as e:
        validate(recipe_from_dict({"model": "m", "data": {"path": "x"}, "distill": {key: value}}))
    assert "distill" in e.value.message


def test_unknown_distill_key_names_its_path():
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({"distill": {"epochs": 3}})
    assert "distill.epochs" in e.value.message
