"""Model adapters: one small class per architecture family answers "where are the norms, the readers of each
norm, the output projections", so the transform, the calibration and the runtime are written once against it.

Adapters are keyed on `config.model_type`, never on a model's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError

# The seven logical projections of a decoder block, in a fixed order used by every table wina writes.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Proj:
    """A logical projection: the module that computes it and, for fused modules, its rows of the output."""

    name: str
    module_path: str  # attribute path below the decoder layer, e.g. "self_attn.q_proj"
    rows: tuple[int, int] | None = None  # [start, stop) of the fused module's output, None when not fused


class Adapter:
    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    # Gemma-style norms compute x_hat * (1 + w): the gain is 1 + w and the identity is w = 0.
    norm_offset: ClassVar[float] = 0.0
    # Families that normalize the attention / MLP output before the residual add.
    has_post_norms: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- where things are ------------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.model.model

    def layers(self) -> list[nn.Module]:
        return list(self.base.layers)

    def embedding(self) -> nn.Embedding:
        return self.base.embed_tokens

    def final_norm(self) -> nn.Module:
        return self.base.norm

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def attn(self, layer) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer) -> nn.Module:
        return layer.mlp

    def attn_norm(self, layer) -> nn.Module:
        return layer.input_layernorm

    def mlp_norm(self, layer) -> nn.Module:
        return layer.post_attention_layernorm

    def post_attn_norm(self, layer) -> nn.Module | None:
        return None

    def post_mlp_norm(self, layer) -> nn.Module | None:
        return None

    def projections(self, layer) -> list[Proj]:
        return [
            Proj("q", "self_attn.q_proj"), Proj("k", "self_attn.k_proj"), Proj("v", "self_attn.v_proj"),
            Proj("o", "self_attn.o_proj"), Proj("gate", "mlp.gate_proj"), Proj("up", "mlp.up_proj"),
            Proj("down", "mlp.down_proj"),
        ]

    # -- derived, written once -------------------------------------------------------------------------------
    def module(self, layer, path: str) -> nn.Module:
        obj = layer
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def set_module(self, layer, path: str, new: nn.Module) -> None:
        *parents, last = path.split(".")
        obj = layer
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, last, new)

    def proj(self, layer, name: str) -> Proj:
        return next(p for p in self.projections(layer) if p.name == name)

    def proj_weight(self, layer, name: str) -> torch.Tensor:
        """The [out, in] weight of one logical projection (a view into a fused module where fused)."""
        p = self.proj(layer, name)
        w = self.module(layer, p.module_path).weight
        return w if p.rows is None else w[p.rows[0]:p.rows[1]]

    def _modules_for(self, layer, names) -> list[nn.Linear]:
        seen, out = set(), []
        for p in self.projections(layer):
            if p.name in names and p.module_path not in seen:
                seen.add(p.module_path)
                out.append(self.module(layer, p.module_path))
        return out

    def attn_readers(self, layer) -> list[nn.Linear]:
        """Distinct modules that read the attention norm's output."""
        return self._modules_for(layer, ("q", "k", "v"))

    def mlp_readers(self, layer) -> list[nn.Linear]:
        return self._modules_for(layer, ("gate", "up"))

    def attn_writer(self, layer) -> nn.Linear:
        return self._modules_for(layer, ("o",))[0]

    def mlp_writer(self, layer) -> nn.Linear:
        return self._modules_for(layer, ("down",))[0]

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        return norm.weight.detach().double() + self.norm_offset

    def reset_norm(self, norm: nn.Module) -> None:
        with torch.no_grad():
            norm.weight.fill_(1.0 - self.norm_offset)

    @property
    def ties_embeddings(self) -> bool:
        head = self.lm_head()
        return head.weight.data_ptr() == self.embedding().weight.data_ptr()


class LlamaLikeAdapter(Adapter):
    """Llama and the families that share its module names: Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms,
    which act per head after the projection and so are untouched by a rotation of the residual stream)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    family = "llama"


class Phi3Adapter(Adapter):
    """Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; gates stay per logical projection."""

    model_types = ("phi3",)
    family = "phi3"

    def projections(self, layer) -> list[Proj]:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q = cfg.num_attention_heads * head_dim
        kv = cfg.num_key_value_heads * head_dim
        ffn = cfg.intermediate_size
        return [
            Proj("q", "self_attn.qkv_proj", (0, q)), Proj("k", "self_attn.qkv_proj", (q, q + kv)),
            Proj("v", "self_attn.qkv_proj", (q + kv, q + 2 * kv)), Proj("o", "self_attn.o_proj"),
            Proj("gate", "mlp.gate_up_proj", (0, ffn)), Proj("up", "mlp.gate_up_proj", (ffn, 2 * ffn)),
            Proj("down", "mlp.down_proj"),
        ]


class GemmaAdapter(Adapter):
    """Gemma 2 and 3: (1 + w) norms, post-attention and post-MLP norms before the residual add, embeddings
    scaled by sqrt(d) (a scalar, so it commutes with any rotation)."""

    model_types = ("gemma2", "gemma3_text")
    family = "gemma"
    norm_offset = 1.0
    has_post_norms = True

    def mlp_norm(self, layer):
        return layer.pre_feedforward_layernorm

    def post_attn_norm(self, layer):
        return layer.post_attention_layernorm

    def post_mlp_norm(self, layer):
        return layer.post_feedforward_layernorm


ADAPTERS: tuple[type[Adapter], ...] = (LlamaLikeAdapter, Phi3Adapter, GemmaAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_class_for(model_type: str) -> type[Adapter]:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not supported by wina",
        "each architecture family needs an adapter that says where its norms and projections are",
        f"use a model of a supported type ({', '.join(supported_model_types())}) or add an adapter in "
        "wina_cli/models/adapters.py",
    )


def adapter_for(model: nn.Module) -> Adapter:
    return adapter_class_for(model.config.model_type)(model)
