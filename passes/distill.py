"""Sparsity-aware distillation: tune the projection weights so that the gated model's next-token distribution
stays close to the dense original's.

Gating drops input channels; the weights reading the kept ones can partly make up for what the dropped ones
carried. Before the statistics are read, the decoder's projection weights (and biases) take `distill.steps` AdamW
steps on KL(dense original || gated model), mean per token, with every projection gated at `distill.sparsity`:
top-k per token, or (`distill.gate: quantile`) at the quantile of each window's own scores; with
`distill.sparsity_max`, each step at a sparsity drawn uniformly from [sparsity, sparsity_max]. Never at fixed
thresholds, because the weights could learn to lift activations over them and the sparsity would drift.
With `distill.ce_weight` > 0 the loss adds that weight x the gated model's next-token cross-entropy on the
distillation text: the weights then fit the text itself as well as the dense original, so the tuned model can read
text of that kind better than the original does (domain adaptation, which the record and README say as such).
Embeddings, norms, the LM head and basis matrices stay as they are (a folded, rotated model keeps its unit norms).
The thresholds are calibrated afterwards, on the tuned model.

The windows are cut from the distillation text (`distill.data`, by default the calibration text) with seed + 1,
leaving out every window the statistics or the held-apart evaluation read; a few of them are kept back as check
windows. The model's dense function changes by design: the pass records how far (the tuned dense model's KL from
the original on the check windows), and ensures the gated model's loss (the KL, plus the weighted cross-entropy)
on the check windows went down. The dense original's perplexity on the held-apart windows is kept as the
reference of budgets and --method auto, so a budget counts from the model the user started with.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wina_cli.config import distill_sparsity
from wina_cli.data import token_windows
from wina_cli.errors import DataError
from wina_cli.gating import GateSet
from wina_cli.models.adapters import PROJECTIONS
from wina_cli.sparse import Gate, column_norms

from .base import Pass, PassResult, PipelineState


def distill_windows(state: PipelineState) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(training windows in training order, check windows, provenance), none of them read by the statistics or
    the held-apart evaluation."""
    r = state.recipe
    d = r.distill
    path = d.data or r.data.path
    need = d.steps * d.batch + d.check_samples
    taken = set(state.calib_provenance.get("window_starts", [])) if path == r.data.path else set()
    def short(have: str) -> DataError:
        return DataError(f"the distillation text '{path}' has too few windows apart from the calibration's: "
                         f"{have} of the {need} needed ({d.steps} steps x {d.batch} + {d.check_samples} check)",
                         "distillation trains on windows the statistics and the held-apart evaluation do not read",
                         "give more text (`distill.data`), or fewer `distill.steps` / `distill.batch`")

    try:
        tw = token_windows(path, state.tokenizer, need + len(taken), r.data.seq_len, r.seed + 1)
    except DataError as e:
        if "too short" not in e.what:
            raise
        raise short("fewer") from e
    free = [i for i, s in enumerate(tw.provenance["window_starts"]) if s not in taken][:need]
    if len(free) < need:
        raise short(str(len(free)))
    order = torch.randperm(need, generator=torch.Generator().manual_seed(r.seed + 1))
    ids = tw.ids[torch.tensor(free)][order]
    # files_read: so that `wina bench` can refuse to evaluate on text the weights were tuned on
    prov = {"path": path, "files_read": tw.provenance["files_read"], "text_sha256": tw.provenance["text_sha256"],
            "seq_len": r.data.seq_len, "windows": need, "seed": r.seed + 1}
    return ids[d.check_samples:], ids[: d.check_samples], prov


def tuned_parameters(adapter) -> list[torch.nn.Parameter]:
    """The projection modules' weights and biases, each once (fused modules hold several projections)."""
    seen, out = set(), []
    for layer in adapter.layers():
        for pr in adapter.projections(layer):
            m = adapter.module(layer, pr.module_path)
            for prm in (m.weight, m.bias):
                if prm is not None and id(prm) not in seen:
                    seen.add(id(prm))
                    out.append(prm)
    return out


@dataclass
class QuantileGate(Gate):
    """Training only: the threshold is the `sparsity` quantile of this input's own scores (every token of the
    window), so tokens keep more or fewer channels as under calibrated thresholds, while the share dropped cannot
    drift as the weights learn."""

    sparsity: float = 0.0

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        score = x.detach().abs()
        if self.scale is not None:
            score = score * self.scale.to(score.dtype)
        drop = int(round(self.sparsity * score.numel()))
        if drop <= 0:
            return torch.ones_like(x, dtype=torch.bool)
        return score > score.flatten().kthvalue(drop).values


def training_gates(gates: GateSet, adapter, criterion: str, sparsity: float, kind: str = "topk") -> None:
    """Every projection gated at `sparsity` (top-k per token, or at each window's quantile), with column norms of
    the current weights (wina)."""
    for l, layer in enumerate(adapter.layers()):
        row = {}
        for name in PROJECTIONS:
            w = adapter.proj_weight(layer, name)
            n = int(w.shape[1])
            scale = column_norms(w) if criterion == "wina" else None
            row[name] = (QuantileGate(criterion, "threshold", scale=scale, sparsity=sparsity) if kind == "quantile"
                         else Gate(criterion, "topk", 0.0, n - int(round(sparsity * n)), scale))
        gates.set_layer(l, row)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate of step `step` (0-based) as a fraction of distill.lr."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return 1.0


def step_sparsities(lo: float, hi: float, steps: int, seed: int) -> list[float]:
    """The sparsity of each step: `lo` throughout, or (hi > 0) uniform draws from [lo, hi], the same for a seed."""
    if not hi:
        return [lo] * steps
    u = torch.rand(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [round(lo + (hi - lo) * float(v), 4) for v in u]


def dense_gates(gates: GateSet, adapter) -> None:
    for l in range(len(adapter.layers())):
        gates.set_layer(l, {name: None for name in PROJECTIONS})


def window_losses(teacher, model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token KL(teacher || model) over one or more windows, and the model's mean next-token cross-entropy
    on the windows' own text; both differentiable in the model."""
    with torch.no_grad():
        ref = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    got = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    kl = (ref.exp() * (ref - got)).sum(dim=-1).mean()
    return kl, next_token_ce(got, ids)


def next_token_ce(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(logprobs[:, :-1].reshape(-1, logprobs.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def mean_ce(model, windows: torch.Tensor) -> float:
    """The model's own next-token cross-entropy, the mean over the windows, one window at a time."""
    per = [next_token_ce(F.log_softmax(model(input_ids=windows[i:i + 1], use_cache=False).logits.float(), dim=-1),
                         windows[i:i + 1]) for i in range(windows.shape[0])]
    return sum(float(ce) for ce in per) / len(per)


@torch.no_grad()
def mean_losses(teacher, model, windows: torch.Tensor) -> tuple[float, float]:
    """(KL, cross-entropy) of `model`, each the mean over the windows, one window at a time."""
    per = [window_losses(teacher, model, windows[i:i + 1]) for i in range(windows.shape[0])]
    return sum(float(kl) for kl, _ in per) / len(per), sum(float(ce) for _, ce in per) / len(per)


# the check record's key suffix for each end of the trained sparsity: the target, then the range's top
END_TAILS = ("", "_at_max")


def objective(kl, ce, ce_weight: float):
    """What the steps minimise: the KL, plus the text's own cross-entropy at its weight."""
    return kl + ce_weight * ce if ce_weight else kl


class Distill(Pass):
    name = "distill"

    def requires(self, state: PipelineState):
        if state.calib_ids is None:
            raise self.fail("no calibration windows", "distillation leaves the calibration's windows out",
                            "run tokenize first")
        if state.stats is not None:
            raise self.fail("the statistics were read before distillation",
                            "thresholds must be calibrated on the tuned model", "run distill before collect_stats")

    def call(self, state: PipelineState) -> PassResult:
        from wina_cli.perplexity import perplexity

        r, d = state.recipe, state.recipe.distill
        model, adapter = state.model, state.adapter
        criterion = r.sparsity.criterion
        sparsity = distill_sparsity(r)
        train, check, prov = distill_windows(state)
        t0 = time.perf_counter()
        teacher = copy.deepcopy(model)
        teacher.eval()
        for prm in teacher.parameters():
            prm.requires_grad_(False)
        reference = None
        if state.holdout_ids is not None:
            reference = perplexity(teacher, state.holdout_ids, state.progress, "dense original")
        params = tuned_parameters(adapter)
        was = {id(prm): prm.requires_grad for prm in model.parameters()}
        for prm in model.parameters():
            prm.requires_grad_(False)
        gates = GateSet(adapter)
        # a range is checked at both ends: the pass must help the gated model wherever it trained it
        ends = [sparsity, d.sparsity_max] if d.sparsity_max else [sparsity]

        def check_losses() -> list[tuple[float, float]]:
            out = []
            for s in ends:
                training_gates(gates, adapter, criterion, s, d.gate)
                out.append(mean_losses(teacher, model, check))
            return out

        before = check_losses()
        draws = step_sparsities(sparsity, d.sparsity_max, d.steps, r.seed + 2)
        for prm in params:
            prm.requires_grad_(True)
        torch.manual_seed(r.seed)
        opt = torch.optim.AdamW(params, lr=d.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(d.schedule, s, d.steps))
        losses, kls = [], []  # the loss each step minimised, and its KL part
        what = f"KL + {d.ce_weight:g} x CE" if d.ce_weight else "KL"
        try:
            for step in range(d.steps):
                # the step's sparsity, and (wina) the column norms of the weights as they are now
                training_gates(gates, adapter, criterion, draws[step], d.gate)
                opt.zero_grad(set_to_none=True)
                total = total_kl = 0.0
                for i in range(d.batch):  # one window at a time: the logits of a batch would double peak memory
                    j = step * d.batch + i
                    kl, ce = window_losses(teacher, model, train[j:j + 1])
                    loss = objective(kl, ce, d.ce_weight) / d.batch
                    loss.backward()
                    total += float(loss.detach())
                    total_kl += float(kl.detach()) / d.batch
                opt.step()
                sched.step()
                losses.append(round(total, 5))
                kls.append(round(total_kl, 5))
                state.progress(f"({step + 1}/{d.steps}) distilling at {draws[step]:g}: {what} {total:.4f}")
        finally:
            for prm in model.parameters():
                prm.requires_grad_(was[id(prm)])
        after = check_losses()
        dense_gates(gates, adapter)
        dense_moved, dense_ce = mean_losses(teacher, model, check)
        # the dense original's own cross-entropy, which KL alone cannot beat but a fit to the text can
        original_ce = mean_ce(teacher, check) if d.ce_weight else None
        del teacher
        state.reference_ppl = reference
        info = {"steps": d.steps, "batch": d.batch, "lr": d.lr, "schedule": d.schedule, "sparsity": sparsity,
                "criterion": criterion, "gate": d.gate, "train_tokens": int(train.numel()),
                "check_tokens": int(check.numel()), "parameters_tuned": int(sum(p.numel() for p in params)),
                "data": prov, "dense_kl_after": round(dense_moved, 6), "train_kl_first": kls[0] if kls else None,
                "train_kl_last": kls[-1] if kls else None, "seconds": round(time.perf_counter() - t0, 1)}
        losses_kept = ("kl", "ce") if d.ce_weight else ("kl",)
        for tail, b, a in zip(END_TAILS, before, after):
            for k, loss in enumerate(losses_kept):
                info[f"check_{loss}_before{tail}"] = round(b[k], 6)
                info[f"check_{loss}_after{tail}"] = round(a[k], 6)
        if d.sparsity_max:
            info.update({"sparsity_max": d.sparsity_max,
                         "mean_step_sparsity": round(sum(draws) / len(draws), 4)})  # the pass runs at steps > 0
        if d.ce_weight:
            info.update({"ce_weight": d.ce_weight, "train_loss_first": losses[0], "train_loss_last": losses[-1],
                         "dense_ce_after": round(dense_ce, 6), "original_ce": round(original_ce, 6)})
        if reference is not None:
            info["reference_holdout_ppl"] = round(reference, 4)
        state.validation["distill"] = info
        return PassResult(d.steps > 0, info)

    def ensures(self, state: PipelineState, result: PassResult):
        info = result.info
        for prm in tuned_parameters(state.adapter):
            if not torch.isfinite(prm).all():
                raise self.fail("a tuned weight is not finite", "the distillation diverged",
                                "lower `distill.lr` (--distill-lr)")
        w = info.get("ce_weight", 0.0)
        what = f"KL from the dense original + {w:g} x its cross-entropy on the text" if w else \
            "KL from the dense original"
        ends = [info["sparsity"]] + ([info["sparsity_max"]] if "sparsity_max" in info else [])
        for at, tail in zip(ends, END_TAILS):
            before, after = (objective(info[f"check_kl_{when}{tail}"], info.get(f"check_ce_{when}{tail}", 0.0), w)
                             for when in ("before", "after"))
            if info["steps"] and not after < before:
                raise self.fail(f"distillation did not lower the gated model's {what} (gated at {at:g}) on its "
                                f"{info['check_tokens']} check tokens ({before:.4f} before, {after:.4f} after)",
                                "the steps moved the weights without helping the gated model: too high a "
                                "learning rate, or too few steps to show",
                                "lower `distill.lr` (--distill-lr) or raise `distill.steps` (--distill-steps), "
                                "or turn distillation off (steps 0)")
