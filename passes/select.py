"""--method auto, within one transform: measure every criterion x allocation at the recipe's target and mode on
the held-apart calibration windows and keep the one with the lowest perplexity. The driver (passes.run_calibration)
runs this once per candidate transform and keeps the best model; every measurement goes into the manifest, so the
choice can be checked."""
from __future__ import annotations

from wina_cli.gating import ALLOCATIONS
from wina_cli.sparse import CRITERIA

from .base import Pass, PassResult, PipelineState, held_apart_perplexity


class SelectMethod(Pass):
    name = "select"

    def requires(self, state: PipelineState):
        if state.allocation is None:
            raise self.fail("no allocation", "the candidates are gate plans", "run allocate first")
        if state.holdout_ids is None:
            raise self.fail("no held-apart windows", "candidates are compared on calibration text the statistics "
                            "did not see", "run tokenize with method auto")

    def call(self, state: PipelineState) -> PassResult:
        sp = state.recipe.sparsity
        dense = held_apart_perplexity(state, None, 0.0, f"dense [{state.transform}]")
        candidates = []
        for c in CRITERIA:
            for a in ALLOCATIONS:
                ppl = held_apart_perplexity(state, (c, sp.mode, a), sp.target, f"{c}/{a} [{state.transform}]")
                candidates.append({"transform": state.transform, "criterion": c, "allocation": a, "ppl": ppl,
                                   "ppl_increase": ppl / dense - 1})
        best = min(candidates, key=lambda x: x["ppl"])
        state.choice = {"criterion": best["criterion"], "allocation": best["allocation"]}
        state.validation["select"] = {"dense_ppl": dense, "target": sp.target, "mode": sp.mode,
                                      "tokens": int(state.holdout_ids.numel()), "candidates": candidates, "best": best}
        return PassResult(True, {"criterion": best["criterion"], "allocation": best["allocation"]})

    def ensures(self, state: PipelineState, result: PassResult):
        got = state.validation["select"]
        if any(c["ppl"] < got["best"]["ppl"] for c in got["candidates"]):
            raise self.fail("the choice is not the lowest perplexity measured", "this is a bug", "report it")
