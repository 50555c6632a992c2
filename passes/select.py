"""--method auto, within one transform: measure every criterion x allocation (x dense-first policy, with
`auto.dense_first`) at the recipe's target and mode on the held-apart calibration windows and keep the one with
the lowest perplexity. Policies are compared at the same target, so their gates are the same; the sparsity each
candidate realized on those windows (a dense-first policy realizes a little less) is recorded beside it. The
driver (passes.run_calibration) runs this once per candidate transform and keeps the best model; every
measurement goes into the manifest, so the choice can be checked."""
from __future__ import annotations

from wina_cli.config import auto_dense_first
from wina_cli.gating import ALLOCATIONS
from wina_cli.sparse import CRITERIA

from .base import Pass, PassResult, PipelineState, held_apart_eval


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
        dense, _ = held_apart_eval(state, None, 0.0, f"dense [{state.transform}]", dense_first=0)
        candidates = []
        for n in auto_dense_first(state.recipe):
            for c in CRITERIA:
                for a in ALLOCATIONS:
                    tag = f"{c}/{a}{f', first {n} dense' if n else ''} [{state.transform}]"
                    ppl, realized = held_apart_eval(state, (c, sp.mode, a), sp.target, tag, dense_first=n)
                    candidates.append({"transform": state.transform, "criterion": c, "allocation": a,
                                       "dense_first": n, "ppl": ppl, "ppl_increase": ppl / dense - 1,
                                       "realized_sparsity": realized})
        best = min(candidates, key=lambda x: x["ppl"])
        state.choice = {"criterion": best["criterion"], "allocation": best["allocation"],
                        "dense_first": best["dense_first"]}
        state.validation["select"] = {"dense_ppl": dense, "target": sp.target, "mode": sp.mode,
                                      "tokens": int(state.holdout_ids.numel()), "candidates": candidates, "best": best}
        return PassResult(True, dict(state.choice))

    def ensures(self, state: PipelineState, result: PassResult):
        got = state.validation["select"]
        if any(c["ppl"] < got["best"]["ppl"] for c in got["candidates"]):
            raise self.fail("the choice is not the lowest perplexity measured", "this is a bug", "report it")
