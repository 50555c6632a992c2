"""--method auto, within one transform: measure every criterion x allocation (x dense-first policy, with
`auto.dense_first`) on the held-apart calibration windows and keep the one with the lowest perplexity.

Candidates are compared at the same realized sparsity (`auto.match_realized`, on by default): the same gate target
realizes different sparsities under different transforms and policies (a dense-first policy computes some tokens
dense; a basis whose score distributions shift off the calibration windows realizes less), and a candidate that
skips less would otherwise win by skipping less. Each candidate is measured at the recipe's target; when it realizes
more than MATCH_TOLERANCE off that, once more at a target moved by the difference (a secant step), and its
perplexity and gate target at the requested realized sparsity are interpolated between the two (log perplexity
linear in sparsity, a short step). The chosen candidate's gates are set at that target.

With a perplexity budget (`--max-ppl-increase p`) the question is another one: which candidate skips the most
within (1 + p) of dense. Each candidate then gets the budget's own search (passes.budget), and the one whose target
found realizes the highest sparsity wins. A candidate is first measured at the best target found so far (by any
transform tried before, too); when it is over the budget there and realizes no more than the best, it cannot win
(realized sparsity rises with the target) and is dropped after that one measurement. The budget pass then reuses
the winner's search.

The driver (passes.run_calibration) runs this once per candidate transform and keeps the best model; every
measurement goes into the manifest, so the choice can be checked."""
from __future__ import annotations

import math

from wina_cli.config import auto_dense_first
from wina_cli.gating import ALLOCATIONS, MAX_TARGET
from wina_cli.perplexity import max_sparsity_within
from wina_cli.sparse import CRITERIA

from .base import Pass, PassResult, PipelineState, held_apart_eval

MATCH_TOLERANCE = 0.005


def at_realized(measure, wanted: float, match: bool) -> dict:
    """Perplexity and gate target at realized sparsity `wanted`. `measure(target) -> (ppl, realized)`."""
    ppl0, r0 = measure(wanted)
    points = [{"target": wanted, "realized": r0, "ppl": ppl0}]
    out = {"ppl": ppl0, "realized_sparsity": r0, "gate_target": wanted, "measured": points}
    if not match or abs(r0 - wanted) <= MATCH_TOLERANCE:
        return out
    t1 = min(MAX_TARGET, max(0.0, wanted + (wanted - r0)))
    ppl1, r1 = measure(t1)
    points.append({"target": t1, "realized": r1, "ppl": ppl1})
    if abs(r1 - r0) < 1e-6:  # the gates did not move the realized sparsity: nothing to interpolate on
        return out
    w = (wanted - r0) / (r1 - r0)
    out.update(ppl=math.exp(math.log(ppl0) + w * (math.log(ppl1) - math.log(ppl0))), realized_sparsity=wanted,
               gate_target=round(wanted + w * (t1 - wanted), 6))
    return out


def within_budget(measure, limit: float, incumbent: dict | None) -> dict:
    """The budget's search for one candidate, or a single measurement at the incumbent's target that shows it
    cannot beat the incumbent. `measure(target) -> (ppl, realized)`."""
    points, cache = [], {}

    def ppl_at(t: float) -> float:
        ppl, r = measure(t)
        points.append({"target": round(t, 6), "realized": r, "ppl": ppl})
        return ppl

    if incumbent is not None:
        t = round(incumbent["gate_target"], 6)
        cache[t] = ppl_at(t)
        if cache[t] > limit and points[-1]["realized"] <= incumbent["realized_sparsity"]:
            return {"ppl": cache[t], "realized_sparsity": points[-1]["realized"], "gate_target": t,
                    "within_budget": False, "measured": points}
    t, ppl = max_sparsity_within(ppl_at, limit, hi=MAX_TARGET, cache=cache)
    realized = next(p["realized"] for p in points if p["target"] == round(t, 6))
    return {"ppl": ppl, "realized_sparsity": realized, "gate_target": t, "within_budget": True, "measured": points}


def rank(candidate: dict, budget: bool) -> tuple:
    """Higher is better: the lowest perplexity, or with a budget the highest realized sparsity within it."""
    if budget:
        return candidate["within_budget"], candidate["realized_sparsity"], -candidate["ppl"]
    return (-candidate["ppl"],)


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
        match = state.recipe.auto.match_realized
        budget = sp.max_ppl_increase > 0
        dense, _ = held_apart_eval(state, None, 0.0, f"dense [{state.transform}]", dense_first=0)
        limit = dense * (1 + sp.max_ppl_increase)
        candidates, incumbent = [], state.incumbent
        policies = auto_dense_first(state.recipe)
        # kl is a candidate only for the criteria whose KL table the recipe measured (allocation.kl_criteria)
        pairs = [(c, a) for c in CRITERIA for a in ALLOCATIONS if state.allocation.has(c, a)]
        total = len(policies) * len(pairs)
        for n in policies:
            for c, a in pairs:
                tag = (f"candidate {len(candidates) + 1}/{total} [{state.transform}]: "
                       f"{c}/{a}{f', first {n} dense' if n else ''}")

                def measure(t, c=c, a=a, n=n, tag=tag):
                    return held_apart_eval(state, (c, sp.mode, a), t, f"{tag} at {t:.3f}", dense_first=n)

                got = (within_budget(measure, limit, incumbent) if budget
                       else at_realized(measure, sp.target, match))
                cand = {"transform": state.transform, "criterion": c, "allocation": a, "dense_first": n, **got,
                        "ppl_increase": got["ppl"] / dense - 1}
                candidates.append(cand)
                if budget and (incumbent is None or rank(cand, True) > rank(incumbent, True)):
                    incumbent = cand
        best = max(candidates, key=lambda x: rank(x, budget))
        state.choice = {"criterion": best["criterion"], "allocation": best["allocation"],
                        "dense_first": best["dense_first"]}
        state.target = best["gate_target"]
        state.validation["select"] = {"dense_ppl": dense, "target": sp.target, "mode": sp.mode,
                                      "match_realized": match, "budget": sp.max_ppl_increase if budget else None,
                                      "limit": limit if budget else None, "tokens": int(state.holdout_ids.numel()),
                                      "candidates": candidates, "best": best}
        return PassResult(True, {**state.choice, "gate_target": state.target})

    def ensures(self, state: PipelineState, result: PassResult):
        got = state.validation["select"]
        budget = got["budget"] is not None
        if any(rank(c, budget) > rank(got["best"], budget) for c in got["candidates"]):
            raise self.fail("the choice is not the best candidate measured", "this is a bug", "report it")
        if budget:
            best = got["best"]
            if best["within_budget"] and best["ppl"] > got["limit"] * (1 + 1e-9) and best["gate_target"] > 0:
                raise self.fail("the choice exceeds the perplexity budget", "this is a bug", "report it")
            if not best["within_budget"] and state.incumbent is None:
                raise self.fail("every candidate was dropped with no earlier best to lose to", "this is a bug",
                                "report it")
        elif got["match_realized"]:
            off = [c for c in got["candidates"] if abs(c["realized_sparsity"] - got["target"]) > MATCH_TOLERANCE
                   and abs(c["measured"][-1]["realized"] - c["measured"][0]["realized"]) >= 1e-6]
            if off:
                raise self.fail(f"{len(off)} candidates are compared off the requested realized sparsity",
                                "the secant step should have matched it", "report it")
