"""Pipeline passes. `build_pipeline` composes them from a recipe, in the one order that makes sense:
load -> tokenize -> [fold_norms -> rotate] -> [distill] -> collect_stats -> allocate -> [select] -> [ppl_budget]
-> set_gates. Tokenizing comes first because the data-driven transforms (pca) read the calibration text, and
distillation comes before the statistics so that the thresholds fit the tuned weights. `run_calibration` runs
the pipeline once, or, for --method auto, once per candidate transform up to `select` and finishes the best."""
from __future__ import annotations

import copy


def build_pipeline(recipe, head_only: bool = False):
    """The passes for a recipe; `head_only` stops after select (auto)."""
    from .allocate import Allocate
    from .base import Pipeline
    from .distill import Distill
    from .fold_norms import FoldNorms
    from .load import LoadCheckpoint
    from .rotate import RotateWina
    from .select import SelectMethod
    from .stats import CollectStats
    from .tokenize import TokenizeCalibration

    passes = [LoadCheckpoint(), TokenizeCalibration()]
    if recipe.transform != "none":
        passes += [FoldNorms(), RotateWina(recipe.transform)]
    if recipe.distill.steps > 0:
        passes.append(Distill())
    passes += [CollectStats(), Allocate()]
    if recipe.method == "auto":
        passes.append(SelectMethod())
    return Pipeline(passes if head_only else passes + tail_pipeline(recipe).passes)


def tail_pipeline(recipe):
    """The passes after the choice of method: [ppl_budget] -> set_gates."""
    from .base import Pipeline
    from .budget import PerplexityBudget
    from .set_gates import SetGates

    return Pipeline(([PerplexityBudget()] if recipe.sparsity.max_ppl_increase > 0 else []) + [SetGates()])


def run_calibration(recipe, progress=lambda m: None):
    """Run the recipe's pipeline; returns (state, report). With method auto, each transform in auto.transforms
    is calibrated in turn (a fresh load each: transforms change the weights), the one whose best candidate has
    the lowest held-apart perplexity is kept, and the others are dropped before the next starts."""
    from wina_cli.config import auto_transforms

    from .base import PipelineReport, PipelineState
    from .select import rank

    if recipe.method != "auto":
        state = PipelineState(recipe=recipe, progress=progress)
        return state, build_pipeline(recipe).run(state)
    best = None
    tried = []
    for t in auto_transforms(recipe):
        r = copy.deepcopy(recipe)
        r.transform = t
        state = PipelineState(recipe=r, progress=lambda m, t=t: progress(f"[auto: {t}] {m}"))
        if best is not None and recipe.sparsity.max_ppl_increase > 0:
            state.incumbent = best[0].validation["select"]["best"]  # later transforms' candidates must beat it
        report = build_pipeline(r, head_only=True).run(state)
        sel = state.validation["select"]
        tried += sel["candidates"]
        budget = sel["budget"] is not None
        if best is None or rank(sel["best"], budget) > rank(best[0].validation["select"]["best"], budget):
            best = (state, report)
        del state
    state, report = best
    sel = state.validation["select"]
    chosen = sel["best"]
    if sel["budget"] is not None:
        dropped = sum(not c["within_budget"] for c in tried)
        criterion = (f"highest realized sparsity within +{sel['budget'] * 100:g}% of dense perplexity on "
                     f"{sel['tokens']} held-apart calibration tokens ({recipe.sparsity.mode} mode) among "
                     f"{len(tried)} candidates ({dropped} dropped after one measurement)")
    else:
        criterion = (f"lowest perplexity on {sel['tokens']} held-apart calibration tokens at "
                     f"{'realized sparsity' if recipe.auto.match_realized else 'target'} {recipe.sparsity.target} "
                     f"({recipe.sparsity.mode} mode) among {len(tried)} candidates")
    state.validation["auto"] = {
        "candidates": tried, "chosen": chosen, "dense_ppl": sel["dense_ppl"],
        "reason": f"{criterion}: {chosen['transform']} / {chosen['criterion']} / {chosen['allocation']}"
                  f"{' / first ' + str(chosen['dense_first']) + ' tokens dense' if chosen['dense_first'] else ''} "
                  f"({chosen['ppl_increase'] * 100:+.1f}% over dense, realized sparsity "
                  f"{chosen['realized_sparsity']:.3f} at gate target {chosen['gate_target']:.3f})"}
    state.progress = progress
    report.passes += tail_pipeline(recipe).run(state).passes
    return state, PipelineReport(report.passes)
