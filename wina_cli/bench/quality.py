"""Quality benchmark: perplexity on an evaluation text with every token computed sparse (or under a gate policy),
and the sparsity each projection really had (counted channel by channel, not the nominal target)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import files_read
from ..gating import GatePlan
from ..perplexity import perplexity
from ..runtime import Runtime


@dataclass
class EvalResult:
    ppl: float
    realized: torch.Tensor  # [L, 7]
    realized_model: float  # fraction of projection weights skipped, over the whole model
    flops_per_token: float  # linear layers only (projections, basis matrices, LM head)


@dataclass(frozen=True)
class Policy:
    """Which tokens are computed sparse. `all`: every one. `prompt:N`: the first N tokens are a prompt computed
    dense and left out of the score (perplexity of the continuation, decoded sparse). `first:N`: the first N
    tokens of every sequence are computed dense, every token is scored."""

    name: str
    dense_until: int = 0
    first_scored: int = 0

    @classmethod
    def parse(cls, text: str) -> "Policy":
        kind, _, n = text.partition(":")
        if kind == "all" and not n:
            return cls("all")
        if kind in ("prompt", "first") and n.isdigit() and int(n) > 0:
            return cls(text, int(n), int(n) if kind == "prompt" else 0)
        raise ValueError(text)


EVERY_TOKEN = Policy("all")


@torch.no_grad()
def evaluate(rt: Runtime, plan: GatePlan | None, windows: torch.Tensor, progress=lambda m: None,
             label: str = "", policy: Policy = EVERY_TOKEN) -> EvalResult:
    rt.use_plan(plan)
    rt.gateset.set_dense_until(policy.dense_until)
    rt.gateset.counting(True)
    try:
        ppl = perplexity(rt.model, windows, progress, label, policy.first_scored)
    finally:
        rt.gateset.set_dense_until(0)
    realized = rt.gateset.realized()
    rt.gateset.counting(False)
    sizes = rt.allocation.sizes
    model_sparsity = float((realized * sizes).sum() / sizes.sum())
    return EvalResult(ppl, realized, model_sparsity, flops_per_token(rt, realized))


def flops_per_token(rt: Runtime, realized: torch.Tensor) -> float:
    cfg = rt.model.config
    d = cfg.hidden_size
    proj = float(((1.0 - realized) * rt.allocation.sizes).sum())
    basis = sum(int(b.numel()) for layer in rt.adapter.layers()
                for name, b in layer.named_buffers(recurse=False) if name.startswith("wina_"))
    return 2.0 * (proj + basis + cfg.vocab_size * d)


def distilled(rt: Runtime) -> bool:
    """Whether the artifact's weights were tuned by distillation (its dense model is not the checkpoint's)."""
    m = rt.artifact.manifest if rt.artifact is not None else {}
    return bool(m.get("validation", {}).get("distill", {}).get("steps"))


def source_model(rt: Runtime):
    """The checkpoint a distilled artifact was tuned from, loaded again and checked against the manifest's hash:
    perplexity increases and budgets of such an artifact count from it, the model the user started with."""
    from ..errors import ArtifactError
    from ..models.load import load_model

    src = rt.artifact.manifest.get("source", {})
    fix = "make the checkpoint the artifact was built from available under the same name, or rebuild the artifact"
    if src.get("kind") in (None, "memory"):
        raise ArtifactError(f"the distilled artifact '{rt.artifact.path}' names no loadable source checkpoint",
                            "its dense reference is the model it was tuned from", fix)
    loaded = load_model(src["spec"], rt.artifact.wina.get("dtype", "float32"))
    if src.get("sha256") and loaded.source["sha256"] != src["sha256"]:
        raise ArtifactError(f"the checkpoint '{src['spec']}' is not the one '{rt.artifact.path}' was tuned from",
                            f"its files hash to {str(loaded.source['sha256'])[:16]}..., the manifest records "
                            f"{src['sha256'][:16]}...", fix)
    return loaded.model


def fitted_text_overlap(manifest: dict, eval_files: list[Path]) -> tuple[dict[str, list[str]], list[str]]:
    """Which evaluation files an artifact was also fitted to: {"calibration" | "distillation": files} (the
    calibration read the statistics', the allocation's and the held-apart windows; distillation the tuned
    weights'), and what could not be checked from here (its text not found, or its extent not recorded)."""
    fitted = {"calibration": manifest.get("calibration", {})}
    d = manifest.get("validation", {}).get("distill", {})
    if d.get("steps"):
        fitted["distillation"] = d.get("data", {})
    wanted = set(eval_files)
    overlap, unchecked = {}, []
    for what, prov in fitted.items():
        read = files_read(prov)
        if read is None:
            unchecked.append(f"{what} text '{prov.get('path')}' "
                             f"({'its extent not recorded' if 'files_read' not in prov else 'not found here'})")
            continue
        both = [str(f) for f in read if f in wanted]
        if both:
            overlap[what] = both
    return overlap, unchecked
