"""The decoder block as wina runs it: the family's own attention and MLP modules, with an optional change of
basis of the residual stream (the WINA transform's shortcut matrices) and, for families with post-norms, a
rotation after the post-norm so that norm still sees the original basis.

One forward, written once for every family through the adapter:
    r = h @ S_attn (or h);   a = attn(attn_norm(h));  a = post_attn_norm(a) @ R_attn (where present);  h = r + a
    r = h @ S_mlp (or h);    m = mlp(mlp_norm(h));    m = post_mlp_norm(m) @ R_mlp (where present);    h = r + m
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .models.adapters import Adapter

# Buffer names on each decoder layer; they are part of the state dict and so of the artifact.
BASIS_BUFFERS = ("wina_shortcut_attn", "wina_shortcut_mlp", "wina_post_rot_attn", "wina_post_rot_mlp")


def _residual_half(layer, h, shortcut: str, post_rot: str, norm, body, post_norm, call):
    s = getattr(layer, shortcut, None)
    residual = h if s is None else h @ s
    out = call(body, norm(h))
    out = out[0] if isinstance(out, tuple) else out
    if post_norm is not None:
        out = post_norm(out)
        r = getattr(layer, post_rot, None)
        if r is not None:
            out = out @ r
    return residual + out


def _wina_forward(self, hidden_states: torch.Tensor, **kwargs):
    a = self._wina_spec
    h = _residual_half(self, hidden_states, "wina_shortcut_attn", "wina_post_rot_attn", a.attn_norm(self),
                       a.attn(self), a.post_attn_norm(self), lambda attn, x: attn(hidden_states=x, **kwargs))
    return _residual_half(self, h, "wina_shortcut_mlp", "wina_post_rot_mlp", a.mlp_norm(self), a.mlp(self),
                          a.post_mlp_norm(self), lambda mlp, x: mlp(x))


def install_block_forward(adapter: Adapter) -> None:
    """Route every decoder layer through the shared block forward (idempotent)."""
    for layer in adapter.layers():
        if getattr(layer, "_wina_spec", None) is None:
            layer._wina_spec = adapter
            layer.forward = types.MethodType(_wina_forward, layer)


def set_basis_buffers(layer: nn.Module, **mats: torch.Tensor) -> None:
    for name, mat in mats.items():
        assert name in BASIS_BUFFERS, name
        layer.register_buffer(name, mat.contiguous(), persistent=True)
