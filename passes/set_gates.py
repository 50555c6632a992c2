"""Resolve the deployment gates: per-projection sparsity, threshold and k for the recipe's target."""
from __future__ import annotations

import torch

from wina_cli.gating import GateSet, plan_gates

from .base import Pass, PassResult, PipelineState, gate_setting


class SetGates(Pass):
    name = "set_gates"

    def requires(self, state: PipelineState):
        if state.allocation is None:
            raise self.fail("no allocation", "gates need per-projection sparsities", "run allocate first")

    def call(self, state: PipelineState) -> PassResult:
        sp = state.recipe.sparsity
        target = sp.target if state.target is None else state.target
        criterion, mode, allocation = gate_setting(state)
        state.gates = plan_gates(state.stats, state.allocation, criterion, mode, allocation, target)
        state.gateset = state.gateset or GateSet(state.adapter)
        state.gateset.apply(state.gates, state.stats.col_norms, state.stats.in_features)
        return PassResult(True, state.gates.describe())

    def ensures(self, state: PipelineState, result: PassResult):
        g = state.gates
        if not torch.isfinite(g.threshold).all():
            raise self.fail("a threshold is not finite", "the score tables hold non-finite values", "report it")
        got = float((g.sparsity * state.allocation.sizes).sum() / state.allocation.sizes.sum())
        if abs(got - g.target) > 0.02 and g.target <= 0.9:
            raise self.fail(f"the plan's sparsity {got:.3f} misses the target {g.target}",
                            "the allocation did not serve this target", "report it")
