"""Orthogonal transforms of the residual stream, exact, in float64: the paper's (arXiv 2505.19427) and wina's
variants. They differ only in which basis each half-block reads its input in.

Every layer has two reading slots, attention (q, k, v) and MLP (gate, up). Slot j reads the residual in basis B_j:
    E <- E B_0;   readers of slot j <- W B_j;   writer before slot j+1 <- B_{j+1}^T W;   lm_head <- W B_final
and where two consecutive slots use different bases a shortcut matrix B_j^T B_{j+1} carries the residual across
(h <- h S + out). Consecutive slots sharing a basis need none: that is what makes `pca-global` free at run time,
and wina's variants let the LM head read the last slot's basis, which saves the last layer's MLP shortcut.

Variants (recipe `transform`):
  wina        the paper: attention slot from the SVD of W_k, MLP slot from the SVD of W_gate (W_k B then has
              orthogonal columns, so |x_i| * ||W[:, i]|| is k's exact output change); final basis I, as published.
  stacked     SVD of the readers of a slot stacked together ([W_q; W_k; W_v] and [W_gate; W_up]): the fused matrix
              of each slot gets orthogonal columns, so the score is exact for the slot's output as a whole.
  pca         the eigenbasis of each slot's input covariance on calibration text (largest variance first). Energy
              concentrates in fewer channels, which magnitude gating feeds on: on SmolLM2 it nearly halves
              TEAL's perplexity loss at 50-65% on text of the calibration's domain, and hurts on text of another
              domain (README): the basis is learned from the data.
  pca-global  one eigenbasis for every slot (the trace-normalized covariances summed): no shortcut matrices at all.

For families with post-norms (Gemma 2/3) the attention and MLP outputs are normalized with a non-uniform gain
before the residual add; that gain does not commute with a rotation, so W_o and W_down keep the original basis and
the normalized output is rotated into the next slot's basis instead (one d x d matrix per half).

Precondition: norms folded (and calibration windows for the pca variants). Postcondition: logits on a probe batch
agree with those before, to 1e-3 relative.
"""
from __future__ import annotations

import torch

from wina_cli import probe
from wina_cli.blocks import set_basis_buffers
from wina_cli.errors import ValidationError

from .base import Pass, PassResult, PipelineState

TRANSFORM_TOLERANCE = 1e-3  # max |delta logits| / max |logits|, fp32
VARIANTS = ("wina", "stacked", "pca", "pca-global")
PCA_WINDOWS = 16  # calibration windows the input covariances are read on


def right_basis(weight: torch.Tensor) -> torch.Tensor:
    """V (d x d, float64) of the full SVD W = U S V^T; columns ordered by decreasing singular value."""
    _, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=True)
    return vh.T.contiguous()


def eigen_basis(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric matrix as columns, largest eigenvalue first (float64)."""
    _, vecs = torch.linalg.eigh(cov.double())
    return vecs.flip(-1).contiguous()


def _rotate_inputs(linear, q: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_((linear.weight.double() @ q).to(linear.weight.dtype))


def _rotate_outputs(linear, q: torch.Tensor) -> None:
    """y -> y Q for row-vector outputs: W <- Q^T W, b <- b Q."""
    with torch.no_grad():
        linear.weight.copy_((q.T @ linear.weight.double()).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_((linear.bias.double() @ q).to(linear.bias.dtype))


@torch.no_grad()
def slot_covariances(adapter, ids: torch.Tensor) -> list[torch.Tensor]:
    """Uncentered input covariance (float64, d x d) of every reading slot, in slot order, on the windows `ids`."""
    layers = adapter.layers()
    d = adapter.config.hidden_size
    covs = [torch.zeros(d, d, dtype=torch.float64) for _ in range(2 * len(layers))]
    counts = [0] * len(covs)
    handles = []
    for l, layer in enumerate(layers):
        for half, readers in enumerate((adapter.attn_readers(layer), adapter.mlp_readers(layer))):
            def hook(module, args, j=2 * l + half):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                covs[j] += x.T @ x
                counts[j] += x.shape[0]
            handles.append(readers[0].register_forward_pre_hook(hook))
    try:
        for i in range(ids.shape[0]):
            adapter.base(input_ids=ids[i:i + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [c / max(n, 1) for c, n in zip(covs, counts)]


def slot_bases(adapter, variant: str, ids: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The basis of every reading slot (2 per layer, attention first) and the LM head's (None: the original)."""
    layers = adapter.layers()
    if variant == "wina":
        bases = []
        for layer in layers:
            bases += [right_basis(adapter.proj_weight(layer, "k")), right_basis(adapter.proj_weight(layer, "gate"))]
        return bases, None
    if variant == "stacked":
        bases = []
        for layer in layers:
            bases += [right_basis(torch.cat([adapter.proj_weight(layer, n) for n in ("q", "k", "v")])),
                      right_basis(torch.cat([adapter.proj_weight(layer, n) for n in ("gate", "up")]))]
        return bases, bases[-1]
    covs = slot_covariances(adapter, ids)
    if variant == "pca":
        bases = [eigen_basis(c) for c in covs]
        return bases, bases[-1]
    if variant == "pca-global":
        shared = eigen_basis(sum(c / c.trace().clamp_min(1e-30) for c in covs))
        return [shared] * len(covs), shared
    raise ValueError(variant)


class RotateWina(Pass):
    name = "rotate"

    def __init__(self, variant: str = "wina"):
        self.variant = variant

    def requires(self, state: PipelineState):
        if not state.folded:
            raise self.fail("norms are not folded", "a rotation of the residual stream is exact only when the "
                            "norms reading it have unit gain", "run fold_norms before rotate")
        if state.transform != "none":
            raise self.fail("the model is already transformed", "rotating twice is not the paper's transform",
                            "run rotate once")
        if self.variant not in VARIANTS:
            raise self.fail(f"unknown transform '{self.variant}'", f"variants: {', '.join(VARIANTS)}",
                            "pick one of those")
        if self.variant.startswith("pca") and state.calib_ids is None:
            raise self.fail("no calibration windows", "the pca variants read input covariances on calibration text",
                            "run tokenize before rotate")

    def call(self, state: PipelineState) -> PassResult:
        a = state.adapter
        variant = self.variant
        ids = probe.probe_ids(a.config.vocab_size, state.recipe.seed)
        self._ids, self._ref = ids, probe.logits(state.model, ids)
        layers = a.layers()
        dtype = a.embedding().weight.dtype
        pca_ids = None if state.calib_ids is None else state.calib_ids[:PCA_WINDOWS]
        bases, final = slot_bases(a, variant, pca_ids)
        bases.append(torch.eye(bases[0].shape[0], dtype=torch.float64) if final is None else final)
        with torch.no_grad():
            emb = a.embedding().weight
            emb.copy_((emb.double() @ bases[0]).to(emb.dtype))
        extra = 0
        for l, layer in enumerate(layers):
            state.progress(f"({l + 1}/{len(layers)}) rotating [{variant}]")
            qa, qm, qn = bases[2 * l], bases[2 * l + 1], bases[2 * l + 2]
            for lin in a.attn_readers(layer):
                _rotate_inputs(lin, qa)
            for lin in a.mlp_readers(layer):
                _rotate_inputs(lin, qm)
            mats = {}
            if qa is not qm:
                mats["wina_shortcut_attn"] = (qa.T @ qm).to(dtype)
            if qm is not qn:
                mats["wina_shortcut_mlp"] = (qm.T @ qn).to(dtype)
            if a.has_post_norms:
                mats["wina_post_rot_attn"] = qm.to(dtype)
                mats["wina_post_rot_mlp"] = qn.to(dtype)
            else:
                _rotate_outputs(a.attn_writer(layer), qm)
                _rotate_outputs(a.mlp_writer(layer), qn)
            extra += sum(int(m.numel()) for m in mats.values())
            set_basis_buffers(layer, **mats)
        if final is not None:
            _rotate_inputs(a.lm_head(), final)
        state.transform = variant
        return PassResult(True, {"variant": variant, "extra_parameters": extra,
                                 "extra_flops_per_token": 2 * extra})

    def ensures(self, state: PipelineState, result: PassResult):
        cmp = probe.compare(self._ref, probe.logits(state.model, self._ids))
        state.validation["transform"] = cmp
        if cmp["max_rel_delta"] > TRANSFORM_TOLERANCE:
            raise ValidationError(
                f"the '{self.variant}' transform changed the logits by {cmp['max_abs_delta']:.3g} "
                f"({cmp['max_rel_delta']:.3g} of the largest logit, limit {TRANSFORM_TOLERANCE})",
                "the transform is exact in exact arithmetic, so this model breaks one of its assumptions "
                "(a norm with a gain between rotated parts, or an adapter pointing at the wrong modules)",
                "use --transform none for this model and report its model type")
