"""Perplexity budget: find the highest model-wide sparsity whose calibration-text perplexity stays within
(1 + p) of dense (`--max-ppl-increase p`), for the criterion, mode and allocation in force. The target found
replaces `sparsity.target` for set_gates, and the search is recorded in the manifest.

It reads the calibration text's held-apart windows (`holdout.num_samples`, not used by the statistics or the
allocation); `wina bench --ppl-budget` measures the same on evaluation text.
"""
from __future__ import annotations

from wina_cli.gating import MAX_TARGET
from wina_cli.perplexity import max_sparsity_within

from .base import Pass, PassResult, PipelineState, gate_setting, held_apart_perplexity


class PerplexityBudget(Pass):
    name = "ppl_budget"

    def requires(self, state: PipelineState):
        if state.allocation is None:
            raise self.fail("no allocation", "the search evaluates gate plans", "run allocate first")
        if state.holdout_ids is None:
            raise self.fail("no held-apart windows", "the budget is measured on calibration text the statistics "
                            "did not see", "run tokenize with a budget set")
        if state.recipe.sparsity.max_ppl_increase <= 0:
            raise self.fail("no budget given", "the pass searches within max_ppl_increase",
                            "set sparsity.max_ppl_increase (e.g. 0.01)")

    def call(self, state: PipelineState) -> PassResult:
        sp = state.recipe.sparsity
        setting = gate_setting(state)
        windows = state.holdout_ids
        # --method auto with a budget already measured dense and ran this search for the candidate it chose
        # (select.within_budget, same windows, limit and policy): both are reused, so nothing is measured twice.
        select = state.validation.get("select", {})
        chosen = select.get("best", {})
        from_select = "within_budget" in chosen
        dense = select["dense_ppl"] if from_select else held_apart_perplexity(state, None, 0.0, "dense")
        limit = dense * (1 + sp.max_ppl_increase)
        cache = {p["target"]: p["ppl"] for p in chosen["measured"]} if from_select else {}
        reused = len(cache)

        def ppl_at(t: float) -> float:
            return held_apart_perplexity(state, setting, t, f"at {t:.3f}")

        target, ppl = max_sparsity_within(ppl_at, limit, hi=MAX_TARGET, cache=cache)
        state.target = target
        found = {"max_ppl_increase": sp.max_ppl_increase, "dense_ppl": dense, "ppl": ppl,
                 "ppl_increase": ppl / dense - 1, "target": target, "windows": int(windows.shape[0]),
                 "tokens": int(windows.numel()), "evaluations": sorted([t, p] for t, p in cache.items()),
                 "reused_from_select": reused}
        state.validation["ppl_budget"] = found
        return PassResult(True, {"target": target, "ppl_increase": round(ppl / dense - 1, 5)})

    def ensures(self, state: PipelineState, result: PassResult):
        b = state.validation["ppl_budget"]
        if b["ppl"] > b["dense_ppl"] * (1 + b["max_ppl_increase"]) * (1 + 1e-9):
            raise self.fail(f"the target found ({b['target']}) exceeds the budget", "this is a bug", "report it")
