"""The WINA orthogonal transformation (arXiv 2505.19427), exact, in float64.

Per layer l: Q_attn(l) = V from the SVD W_k(l) = U S V^T, and Q_mlp(l) = V from the SVD of W_gate(l). The
residual stream enters layer l's attention in basis Q_attn(l) and its MLP in basis Q_mlp(l):
    E <- E Q_attn(0);   W_{q,k,v} <- W Q_attn(l);   W_{gate,up} <- W Q_mlp(l)
    W_o <- Q_mlp(l)^T W_o;   W_down <- Q_attn(l+1)^T W_down   (Q_attn(L) = I: the LM head keeps its basis)
and two shortcut matrices per layer carry the residual between bases:
    h <- h Q_attn(l)^T Q_mlp(l) + attn_out;   h <- h Q_mlp(l)^T Q_attn(l+1) + mlp_out.
After it W_k Q_attn = U S has orthogonal columns whose norms are the singular values, so |x_i| * ||W[:, i]|| is the
exact change of the output when channel i is dropped.

For families with post-norms (Gemma 2/3) the attention and MLP outputs are normalized with a non-uniform gain
before the residual add; that gain does not commute with a rotation, so W_o and W_down keep the original basis and
the normalized output is rotated into the residual's basis instead (one more d x d matrix per half).

Precondition: norms folded. Postcondition: logits on a probe batch agree with those before, to 1e-3 relative.
"""
from __future__ import annotations

import torch

from wina_cli import probe
from wina_cli.blocks import set_basis_buffers
from wina_cli.errors import ValidationError

from .base import Pass, PassResult, PipelineState

TRANSFORM_TOLERANCE = 1e-3  # max |delta logits| / max |logits|, fp32


def right_basis(weight: torch.Tensor) -> torch.Tensor:
    """V (d x d, float64) of the full SVD W = U S V^T; columns ordered by decreasing singular value."""
    _, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=True)
    return vh.T.contiguous()


def _rotate_inputs(linear, q: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_((linear.weight.double() @ q).to(linear.weight.dtype))


def _rotate_outputs(linear, q: torch.Tensor) -> None:
    """y -> y Q for row-vector outputs: W <- Q^T W, b <- b Q."""
    with torch.no_grad():
        linear.weight.copy_((q.T @ linear.weight.double()).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_((linear.bias.double() @ q).to(linear.bias.dtype))


class RotateWina(Pass):
    name = "rotate"

    def requires(self, state: PipelineState):
        if not state.folded:
            raise self.fail("norms are not folded", "a rotation of the residual stream is exact only when the "
                            "norms reading it have unit gain", "run fold_norms before rotate")
        if state.transform != "none":
            raise self.fail("the model is already transformed", "rotating twice is not the paper's transform",
                            "run rotate once")

    def call(self, state: PipelineState) -> PassResult:
        a = state.adapter
        ids = probe.probe_ids(a.config.vocab_size, state.recipe.seed)
        self._ids, self._ref = ids, probe.logits(state.model, ids)
        layers = a.layers()
        dtype = a.embedding().weight.dtype
        q_attn = [right_basis(a.proj_weight(layer, "k")) for layer in layers]
        q_mlp = [right_basis(a.proj_weight(layer, "gate")) for layer in layers]
        d = q_attn[0].shape[0]
        q_attn.append(torch.eye(d, dtype=torch.float64))
        with torch.no_grad():
            emb = a.embedding().weight
            emb.copy_((emb.double() @ q_attn[0]).to(emb.dtype))
        for l, layer in enumerate(layers):
            state.progress(f"({l + 1}/{len(layers)}) rotating")
            qa, qm, qn = q_attn[l], q_mlp[l], q_attn[l + 1]
            for lin in a.attn_readers(layer):
                _rotate_inputs(lin, qa)
            for lin in a.mlp_readers(layer):
                _rotate_inputs(lin, qm)
            mats = {"wina_shortcut_attn": (qa.T @ qm).to(dtype), "wina_shortcut_mlp": (qm.T @ qn).to(dtype)}
            if a.has_post_norms:
                mats["wina_post_rot_attn"] = qm.to(dtype)
                mats["wina_post_rot_mlp"] = qn.to(dtype)
            else:
                _rotate_outputs(a.attn_writer(layer), qm)
                _rotate_outputs(a.mlp_writer(layer), qn)
            set_basis_buffers(layer, **mats)
        state.transform = "wina"
        extra = (4 if a.has_post_norms else 2) * len(layers) * d * d
        return PassResult(True, {"extra_parameters": extra})

    def ensures(self, state: PipelineState, result: PassResult):
        cmp = probe.compare(self._ref, probe.logits(state.model, self._ids))
        state.validation["transform"] = cmp
        if cmp["max_rel_delta"] > TRANSFORM_TOLERANCE:
            raise ValidationError(
                f"the WINA transform changed the logits by {cmp['max_abs_delta']:.3g} "
                f"({cmp['max_rel_delta']:.3g} of the largest logit, limit {TRANSFORM_TOLERANCE})",
                "the transform is exact in exact arithmetic, so this model breaks one of its assumptions "
                "(a norm with a gain between rotated parts, or an adapter pointing at the wrong modules)",
                "use --transform none for this model and report its model type")
