"""The pass contract and the pipeline that runs passes in order.

A pass does one job on the pipeline state. `requires` checks what it needs (precondition), `call` does the
work and returns a PassResult saying whether it changed anything, `ensures` checks what it promised
(postcondition). A failure anywhere is raised as a PassError that names the pass and the one that ran before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from wina_cli.errors import PassError, WinaError
from wina_cli.memory import peak_rss_mb


@dataclass
class PassResult:
    changed: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineState:
    """Everything the passes share. Each field is filled by the pass named beside it."""

    recipe: Any  # wina_cli.config.Recipe
    model: Any = None  # load
    tokenizer: Any = None  # load
    adapter: Any = None  # load
    source: dict = field(default_factory=dict)  # load: where the model came from
    folded: bool = False  # fold_norms
    transform: str = "none"  # rotate
    calib_ids: Any = None  # tokenize: LongTensor [num_samples, seq_len]
    calib_provenance: dict = field(default_factory=dict)  # tokenize
    holdout_ids: Any = None  # tokenize: windows held apart from statistics and allocation (budget, auto)
    reference_ppl: Any = None  # distill: the dense original's perplexity on the held-apart windows
    stats: Any = None  # collect_stats: wina_cli.calibration.CalibrationStats
    gateset: Any = None  # allocate: wina_cli.gating.GateSet, the model's gated projections
    allocation: Any = None  # allocate: wina_cli.gating.Allocation
    choice: dict = field(default_factory=dict)  # select: criterion, allocation, dense_first picked (else the recipe's)
    incumbent: Any = None  # run_calibration (auto with a budget): the best candidate of the transforms tried before
    target: Any = None  # select (the target realizing the recipe's sparsity) or ppl_budget; else the recipe's
    gates: Any = None  # set_gates: wina_cli.gating.GatePlan
    validation: dict = field(default_factory=dict)  # any pass's measured checks
    progress: Callable[[str], None] = lambda msg: None


def gate_setting(state: PipelineState) -> tuple[str, str, str]:
    """(criterion, mode, allocation) in force: the recipe's, unless --method auto chose."""
    sp = state.recipe.sparsity
    return state.choice.get("criterion", sp.criterion), sp.mode, state.choice.get("allocation", sp.allocation)


def dense_first_policy(state: PipelineState) -> int:
    """Tokens computed dense at the start of every sequence: the recipe's, unless --method auto chose."""
    return int(state.choice.get("dense_first", state.recipe.sparsity.dense_first))


def held_apart_eval(state: PipelineState, setting: tuple[str, str, str] | None, target: float, label: str,
                    dense_first: int | None = None) -> tuple[float, float]:
    """(perplexity, realized model-wide sparsity) on the held-apart windows with the gates of (criterion, mode,
    allocation) at target, or dense for setting None, under the dense-first policy in force (or the one given).
    Every token is scored, the dense ones included. The model is left dense afterwards."""
    from wina_cli.gating import plan_gates
    from wina_cli.perplexity import perplexity

    if setting is None and state.reference_ppl is not None:
        return state.reference_ppl, 0.0  # the weights were tuned: dense means the model the user started with
    st, gs = state.stats, state.gateset
    plan = None if setting is None else plan_gates(st, state.allocation, *setting, target)
    gs.apply(plan, st.col_norms, st.in_features)
    gs.set_dense_until(dense_first_policy(state) if dense_first is None else dense_first)
    gs.counting(True)
    try:
        ppl = perplexity(state.model, state.holdout_ids, state.progress, label)
        sizes = state.allocation.sizes.double()
        realized = float((gs.realized().double() * sizes).sum() / sizes.sum())
        return ppl, realized
    finally:
        gs.counting(False)
        gs.set_dense_until(0)
        gs.apply(None, st.col_norms, st.in_features)


def held_apart_perplexity(state: PipelineState, setting: tuple[str, str, str] | None, target: float,
                          label: str) -> float:
    return held_apart_eval(state, setting, target, label)[0]


class Pass:
    name = "pass"

    def requires(self, state: PipelineState) -> None:
        """Raise PassError when the state lacks what `call` needs."""

    def call(self, state: PipelineState) -> PassResult:
        raise NotImplementedError

    def ensures(self, state: PipelineState, result: PassResult) -> None:
        """Raise PassError (or ValidationError) when `call` did not deliver what it promises."""

    def fail(self, what: str, why: str = "", fix: str = "") -> PassError:
        return PassError(f"pass '{self.name}': {what}", why, fix)


@dataclass
class PipelineReport:
    passes: list[dict] = field(default_factory=list)


class Pipeline:
    def __init__(self, passes: list[Pass]):
        self.passes = passes

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, state: PipelineState) -> PipelineReport:
        report = PipelineReport()
        previous = "start"
        peak = 0.0  # a running maximum: the kernel's own high-water mark can be reset by other code in-process
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                p.requires(state)
                result = p.call(state)
                p.ensures(state, result)
            except WinaError as e:
                e.what = f"{e.what.rstrip('.')} (in pass '{p.name}', after '{previous}')"
                raise
            except Exception as e:  # a bug or an unexpected library error: still say where
                raise PassError(
                    f"pass '{p.name}' (after '{previous}') raised {type(e).__name__}: {e}",
                    "this is unexpected and most likely a bug in wina",
                    "rerun with --debug and report the traceback",
                ) from e
            peak = max(peak, peak_rss_mb())
            report.passes.append({"name": p.name, "changed": result.changed, "seconds": round(time.perf_counter() - t0, 3),
                                  "peak_rss_mb": peak, **({"info": result.info} if result.info else {})})
            previous = p.name
        return report
