"""The decoder as an ONNX graph with a KV cache, built node by node from the torch runtime's model.

Built by hand rather than traced: the graph is then the same for every family (the adapter says where things
are, the family's few differences are flags), deterministic, and every projection is exactly one node, an
`ai.wina` gated op or a plain MatMul, with its weight stored [in, out].

Inputs: input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq],
past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim], and for an artifact whose gate policy keeps the
prompt dense, dense_until [] int64 (the prompt's length: positions before it are computed dense). Outputs:
logits [batch, seq, vocab], present.{i}.key/.value [batch, kv_heads, past + seq, head_dim]. Activations are
float32; weights float32 or float16 (cast on use by plain MatMuls, read directly by the native kernels).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from wina_cli import onnx_ops as ops
from wina_cli.errors import UnsupportedModelError
from wina_cli.onnx_runtime import KV_CACHE_KEY, SHARED_BUFFER
from wina_cli.runtime import Runtime

WEIGHT_DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new")
NEG = float(np.finfo(np.float32).min)
# fused: each attention block is ONNX Runtime's com.microsoft RotaryEmbedding (q and k) and GroupQueryAttention, a
# few nodes instead of about thirty; plain: standard ONNX ops only, for runtimes without those contrib ops.
ATTENTION = ("fused", "plain")
MS_DOMAIN = "com.microsoft"


class _Builder:
    def __init__(self, weight_dtype: str):
        self.np_dtype, self.onnx_dtype = WEIGHT_DTYPES[weight_dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self._consts: dict = {}
        self.counts = {"gated": 0, "dense": 0, "fused": 0}
        self.gated: list[tuple[int, str, str]] = []  # (layer, projection, input name) of every gated node

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", n_out: int = 1, domain: str = "",
           out: str | list[str] | None = None, **attrs):
        if isinstance(out, list):
            outs, n_out = out, len(out)
        else:
            outs = [out] if out else [self._name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self._name("n_" + (hint or op_type)),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, t: torch.Tensor) -> str:
        return self.init(name, t.detach().to(torch.float32).numpy().astype(self.np_dtype))

    def f32(self, name: str, t) -> str:
        arr = t.detach().to(torch.float32).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
        return self.init(name, arr.astype(np.float32))

    def i64(self, *vals: int) -> str:
        key = ("i64",) + vals
        if key not in self._consts:
            self._consts[key] = self.init(f"const_i64_{'_'.join(str(v).replace('-', 'm') for v in vals)}",
                                          np.array(vals, dtype=np.int64))
        return self._consts[key]

    def scalar(self, v: float) -> str:
        key = ("f", float(v))
        if key not in self._consts:
            self._consts[key] = self.init(f"const_f_{len(self._consts)}", np.array(v, dtype=np.float32))
        return self._consts[key]

    def as_float(self, name: str) -> str:
        return name if self.onnx_dtype == TensorProto.FLOAT else self.op("Cast", [name], "cast", to=TensorProto.FLOAT)


def _rms(b: _Builder, x: str, norm, offset: float, name: str) -> str:
    # Written in the form ONNX Runtime's optimizer fuses into one SimplifiedLayerNormalization node (the gain Mul is
    # part of the pattern, so it stays even where the gain is all ones).
    eps = float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps"))
    var = b.op("ReduceMean", [b.op("Pow", [x, b.scalar(2.0)], "sq")], "var", axes=[-1], keepdims=1)
    y = b.op("Div", [x, b.op("Sqrt", [b.op("Add", [var, b.scalar(eps)])])], "normed")
    gain = norm.weight.detach().double() + offset
    return b.op("Mul", [y, b.f32(name + ".gain", gain.float())], "scaled")


def _activation(b: _Builder, x: str, kind: str) -> str:
    if kind in ("silu", "swish"):
        return b.op("Mul", [x, b.op("Sigmoid", [x])], "silu")
    if kind == "gelu":
        e = b.op("Erf", [b.op("Mul", [x, b.scalar(1 / math.sqrt(2.0))])])
        return b.op("Mul", [b.op("Mul", [x, b.scalar(0.5)]), b.op("Add", [e, b.scalar(1.0)])], "gelu")
    # tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    x3 = b.op("Mul", [b.op("Mul", [x, x]), x])
    inner = b.op("Mul", [b.op("Add", [x, b.op("Mul", [x3, b.scalar(0.044715)])]), b.scalar(math.sqrt(2 / math.pi))])
    t = b.op("Tanh", [inner])
    return b.op("Mul", [b.op("Mul", [x, b.scalar(0.5)]), b.op("Add", [t, b.scalar(1.0)])], "gelu")


def _softcap(b: _Builder, x: str, cap) -> str:
    if not cap:
        return x
    return b.op("Mul", [b.op("Tanh", [b.op("Div", [x, b.scalar(float(cap))])]), b.scalar(float(cap))], "softcap")


class DecoderGraph:
    """Builds the graph of one runtime (its gates as currently in force; `dense=True` ignores them)."""

    def __init__(self, rt: Runtime, *, dense: bool, weight_dtype: str = "float32", attention: str = "fused",
                 fuse: bool = False):
        self.rt, self.dense, self.attention, self.fuse = rt, dense, attention, fuse
        self.model, self.adapter, self.cfg = rt.model, rt.adapter, rt.model.config
        self.b = _Builder(weight_dtype)
        act = getattr(self.cfg, "hidden_activation", None) or getattr(self.cfg, "hidden_act", None)
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"MLP activation '{act}' has no ONNX lowering in wina",
                                        f"the exporter lowers {', '.join(ACTIVATIONS)}",
                                        "export a model with one of those, or add the activation to "
                                        "exporters/onnx/graph.py")
        self.act = act
        attn0 = self.adapter.attn(self.adapter.layers()[0])
        self.heads = int(self.cfg.num_attention_heads)
        self.kv_heads = int(getattr(self.cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(attn0.head_dim)
        # Gate policy: positions below max(first N, the dense_until input) are computed dense.
        self.dense_first, self.dense_prompt = (0, False) if dense else rt.gate_policy()
        self.has_policy = self.dense_first > 0 or self.dense_prompt
        self.dense_rows: str | None = None  # bool [seq]: which positions of this call are dense
        # Positions the fused graph's rotary caches cover (the model's own limit).
        self.max_positions = int(getattr(self.cfg, "max_position_embeddings", 0) or 4096)

    # -- pieces ------------------------------------------------------------------------------------------------
    def _weight(self, layer, proj: str):
        """The [out, in] weight and the bias (or None) of one logical projection."""
        p = self.adapter.proj(layer, proj)
        module = self.adapter.module(layer, p.module_path)
        w = module.weight if p.rows is None else module.weight[p.rows[0]:p.rows[1]]
        bias = module.bias if p.rows is None or module.bias is None else module.bias[p.rows[0]:p.rows[1]]
        return w, bias

    def _gate(self, l: int, proj: str, n_in: int):
        """The gate in force on a projection, or None where it keeps every channel."""
        gate = None if self.dense else self.rt.gateset.segments[l][proj].gate
        if gate is not None and gate.mode == "topk" and gate.k >= n_in:
            gate = None
        return gate

    def _scale(self, l: int, proj: str, gate, n_in: int) -> str:
        return self.b.f32(f"layers.{l}.{proj}.scale", gate.scale if gate is not None and gate.scale is not None
                          else torch.ones(n_in))

    def _bias(self, l: int, proj: str, y: str, bias) -> str:
        return y if bias is None else self.b.op("Add", [y, self.b.f32(f"layers.{l}.{proj}.bias", bias)],
                                                f"l{l}_{proj}_b")

    def _linear(self, l: int, layer, proj: str, x: str) -> str:
        b = self.b
        w, bias = self._weight(layer, proj)
        wname = b.weight(f"layers.{l}.{proj}.weight_t", w.t())
        n_in = w.shape[1]
        gate = self._gate(l, proj, n_in)
        if gate is None:
            y = b.op("MatMul", [x, b.as_float(wname)], f"l{l}_{proj}")
            b.counts["dense"] += 1
        else:
            args = [x, wname, self._scale(l, proj, gate, n_in)] + ([self.dense_rows] if self.dense_rows else [])
            if gate.mode == "topk" and gate.k > 0:
                y = b.op(ops.TOPK_ROWS if self.dense_rows else ops.TOPK, args, f"l{l}_{proj}", domain=ops.DOMAIN,
                         k=int(gate.k))
            else:
                thr = math.inf if gate.mode == "topk" else float(gate.threshold)  # k = 0 keeps nothing
                y = b.op(ops.GATED_ROWS if self.dense_rows else ops.GATED, args, f"l{l}_{proj}", domain=ops.DOMAIN,
                         threshold=thr)
            b.counts["gated"] += 1
            b.gated.append((l, proj, x))
        return self._bias(l, proj, y, bias)

    def _linears(self, l: int, layer, projs: tuple[str, ...], x: str) -> list[str]:
        """The projections that read one input. With `fuse`, their weights side by side in one initializer: in a
        sparse graph one FusedGatedMatMulN node where a threshold gates any of them (a dense one joins with
        threshold -inf; top-k gates stay single ops), otherwise one MatMul, split, as in a dense graph, so both
        graphs are fused alike."""
        if not self.fuse or len(projs) not in ops.FUSED_ARITIES:
            return [self._linear(l, layer, p, x) for p in projs]
        b = self.b
        weights = [self._weight(layer, p) for p in projs]
        n_in = weights[0][0].shape[1]
        gates = [self._gate(l, p, n_in) for p in projs]
        if any(g is not None and g.mode == "topk" for g in gates):
            return [self._linear(l, layer, p, x) for p in projs]
        tag = "+".join(projs)
        widths = [int(w.shape[0]) for w, _ in weights]
        # side by side: W [in, sum(widths)]; the weight's name lists its projections (weight_bytes reads it)
        wname = b.weight(f"layers.{l}.{tag}.weight_t", torch.cat([w for w, _ in weights]).t())
        if all(g is None for g in gates):
            ys = b.op("Split", [b.op("MatMul", [x, b.as_float(wname)], f"l{l}_{tag}"), b.i64(*widths)],
                      f"l{l}_split", n_out=len(projs), axis=-1)
            b.counts["dense"] += len(projs)
        else:
            scales = [self._scale(l, p, g, n_in) for p, g in zip(projs, gates)]
            b.gated += [(l, p, x) for p, g in zip(projs, gates) if g is not None]
            thresholds = [-math.inf if g is None else float(g.threshold) for g in gates]
            ys = b.op(ops.fused_name(len(projs), bool(self.dense_rows)),
                      [x, wname, *scales] + ([self.dense_rows] if self.dense_rows else []), f"l{l}_{tag}",
                      n_out=len(projs), domain=ops.DOMAIN, thresholds=thresholds, splits=widths)
            b.counts["gated"] += sum(g is not None for g in gates)
            b.counts["dense"] += sum(g is None for g in gates)
        b.counts["fused"] += 1
        return [self._bias(l, p, y, bias) for p, y, (_, bias) in zip(projs, ys, weights)]

    @staticmethod
    def _rope_kinds(rot) -> dict:
        kinds = getattr(rot, "rope_type", "default")
        kinds = kinds if isinstance(kinds, dict) else {"": kinds}
        for k, v in kinds.items():
            if v in ("dynamic", "longrope"):
                raise UnsupportedModelError(f"rotary embedding type '{v}' is not exported",
                                            "it rescales frequencies with the sequence length, which the graph "
                                            "does not model", "export a model with static rotary frequencies")
        return kinds

    @staticmethod
    def _rope_params(rot, key: str) -> tuple[torch.Tensor, float]:
        """The frequencies (float32) and attention scaling of one rotary variant ('' or e.g. Gemma 3's 'local')."""
        inv = getattr(rot, f"{key}_inv_freq" if key else "inv_freq").float()
        return inv, float(getattr(rot, f"{key}_attention_scaling" if key else "attention_scaling"))

    def _rope_tables(self, position_ids: str) -> dict:
        """cos/sin [batch, 1, seq, rot] per rotary variant (Gemma 3 has a local and a global one)."""
        b = self.b
        rot = self.adapter.base.rotary_emb
        kinds = self._rope_kinds(rot)
        pos = b.op("Unsqueeze", [b.op("Cast", [position_ids], "posf", to=TensorProto.FLOAT), b.i64(-1)])
        tables = {}
        for key in kinds:
            inv, scaling = self._rope_params(rot, key)
            freqs = b.op("Mul", [pos, b.f32(f"rope{('_' + key) if key else ''}.inv_freq", inv)], "freqs")
            emb = b.op("Concat", [freqs, freqs], "emb", axis=-1)
            cos, sin = b.op("Cos", [emb]), b.op("Sin", [emb])
            if scaling != 1.0:
                cos, sin = b.op("Mul", [cos, b.scalar(scaling)]), b.op("Mul", [sin, b.scalar(scaling)])
            tables[key] = (b.op("Unsqueeze", [cos, b.i64(1)], "cos"), b.op("Unsqueeze", [sin, b.i64(1)], "sin"),
                           int(inv.numel()) * 2)
        return tables

    def _rope_caches(self) -> dict:
        """cos/sin caches [max_positions, rot / 2] per rotary variant, for com.microsoft.RotaryEmbedding. Computed
        the way the torch model computes its tables (float32 product of position and frequency, then cos/sin and
        the attention scaling). Positions past the model's max_position_embeddings are outside the caches."""
        b = self.b
        rot = self.adapter.base.rotary_emb
        kinds = self._rope_kinds(rot)
        pos = torch.arange(self.max_positions, dtype=torch.float32)[:, None]
        caches = {}
        for key in kinds:
            inv, scaling = self._rope_params(rot, key)
            freqs = pos * inv[None, :]
            tag = f"rope{('_' + key) if key else ''}"
            caches[key] = (b.f32(f"{tag}.cos_cache", freqs.cos() * scaling),
                           b.f32(f"{tag}.sin_cache", freqs.sin() * scaling), int(inv.numel()) * 2)
        return caches

    def _rope_fused(self, x: str, n_heads: int, cache) -> str:
        cos, sin, rot = cache
        return self.b.op("RotaryEmbedding", [x, "position_ids", cos, sin], "rope", domain=MS_DOMAIN,
                         num_heads=n_heads, rotary_embedding_dim=rot, interleaved=0)

    def _apply_rope(self, x: str, table) -> str:
        b = self.b
        cos, sin, rot = table
        if rot < self.head_dim:
            x_rot, x_pass = b.op("Split", [x, b.i64(rot, self.head_dim - rot)], "rsplit", n_out=2, axis=-1)
        else:
            x_rot, x_pass = x, None
        rotated = b.op("MatMul", [x_rot, self._rotate_half_matrix(rot)], "rot_half")
        y = b.op("Add", [b.op("Mul", [x_rot, cos]), b.op("Mul", [rotated, sin])], "roped")
        return y if x_pass is None else b.op("Concat", [y, x_pass], "rope_cat", axis=-1)

    def _rotate_half_matrix(self, rot: int) -> str:
        """x @ R = concat(-x2, x1): one exact MatMul (entries 0 and +-1) instead of Split, Neg and Concat."""
        name = f"rope.rotate_half_{rot}"
        if name not in self.b._consts:
            h = rot // 2
            r = np.zeros((rot, rot), np.float32)
            r[np.arange(h) + h, np.arange(h)] = -1.0
            r[np.arange(h), np.arange(h) + h] = 1.0
            self.b._consts[name] = self.b.init(name, r)
        return self.b._consts[name]

    def _masks(self, attention_mask: str, input_ids: str, windows: set) -> tuple[dict, str]:
        """Boolean masks [batch, 1, seq, past + seq]: causal, padding and, where set, a sliding window; and the
        positions of this call's tokens [seq] (past, ..., past + seq - 1)."""
        b = self.b
        # The past length is the mask's minus this call's, not the past input's: with a shared KV buffer that
        # input holds the buffer's capacity.
        seq = b.op("Shape", [input_ids], "seq_len", start=1, end=2)
        total = b.op("Shape", [attention_mask], "total_len", start=1, end=2)
        past = b.op("Sub", [total, seq], "past_len")
        zero, one = b.i64(0), b.i64(1)
        sq = lambda t: b.op("Squeeze", [t, zero])
        kv_idx = b.op("Range", [sq(zero), sq(total), sq(one)], "kv_idx")
        q_idx = b.op("Range", [sq(past), sq(b.op("Add", [past, seq])), sq(one)], "q_idx")
        kv_row = b.op("Unsqueeze", [kv_idx, zero])  # [1, T]
        q_col = b.op("Unsqueeze", [q_idx, one])  # [S, 1]
        causal = b.op("LessOrEqual", [kv_row, q_col], "causal")
        pad = b.op("Unsqueeze", [b.op("Cast", [attention_mask], to=TensorProto.BOOL), b.i64(1, 2)], "pad")
        masks = {}
        for w in windows:
            allowed = causal
            if w is not None:
                lo = b.op("Sub", [q_col, b.i64(int(w))])
                allowed = b.op("And", [causal, b.op("Greater", [kv_row, lo])], "window")
            masks[w] = b.op("And", [allowed, pad], "mask")
        return masks, q_idx

    def _dense_rows(self, q_idx: str) -> str:
        """bool [seq]: the positions the gate policy computes dense."""
        b = self.b
        until = b.i64(self.dense_first)
        if self.dense_prompt:
            until = b.op("Max", [b.op("Reshape", ["dense_until", b.i64(1)], "prompt_len"), until], "dense_until")
        return b.op("Less", [q_idx, b.op("Squeeze", [until, b.i64(0)])], "dense_rows")

    def _sliding_window(self, layer):
        attn = self.adapter.attn(layer)
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(self.cfg, "sliding_window", None)

    def _attention_fused(self, l: int, layer, x: str, caches: dict, biases: dict, past_k: str, past_v: str):
        """q, k, v projections, then RotaryEmbedding on q and k and one GroupQueryAttention node, which appends
        to the cache and attends. It is told every sequence fills the whole mask (seqlens_k = total - 1), so its
        own causal mask is ours; padding and sliding windows come in as an additive bias built once per graph."""
        b, H, KV, D = self.b, self.heads, self.kv_heads, self.head_dim
        attn = self.adapter.attn(layer)
        off = self.adapter.norm_offset

        def normed(t: str, n: int, norm) -> str:
            if norm is None:
                return t
            t = b.op("Reshape", [t, b.i64(0, 0, n, D)], "heads")
            t = _rms(b, t, norm, off, f"layers.{l}.{'q' if n == H else 'k'}_norm")
            return b.op("Reshape", [t, b.i64(0, 0, n * D)], "flat")

        cache = caches.get(getattr(attn, "layer_type", None)) or caches[""]
        q, k, v = self._linears(l, layer, ("q", "k", "v"), x)
        q = self._rope_fused(normed(q, H, getattr(attn, "q_norm", None)), H, cache)
        k = self._rope_fused(normed(k, KV, getattr(attn, "k_norm", None)), KV, cache)
        bias = biases[self._sliding_window(layer)]
        seqlens, total = self.gqa_lengths
        attrs = {"num_heads": H, "kv_num_heads": KV, "scale": float(attn.scaling)}
        cap = getattr(attn, "attn_logit_softcapping", None)
        if cap:
            attrs["softcap"] = float(cap)
        ctx, present_k, present_v = b.op(
            "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, "", "", "", bias], domain=MS_DOMAIN,
            out=[b._name("attn"), f"present.{l}.key", f"present.{l}.value"], **attrs)
        return self._linear(l, layer, "o", ctx), present_k, present_v

    def _gqa_lengths(self, attention_mask: str, input_ids: str) -> tuple[str, str]:
        """seqlens_k [batch] int32 = total - 1 for every row, and total_sequence_length, int32 scalar."""
        b = self.b
        total = b.op("Shape", [attention_mask], "total_len", start=1, end=2)
        batch = b.op("Shape", [input_ids], "batch", start=0, end=1)
        total32 = b.op("Cast", [total], "total32", to=TensorProto.INT32)
        seqlens = b.op("Expand", [b.op("Sub", [total32, b.init("const_i32_1", np.array([1], np.int32))]), batch],
                       "seqlens_k")
        return seqlens, b.op("Squeeze", [total32, b.i64(0)], "total_seq")

    def _attention(self, l: int, layer, x: str, tables: dict, masks: dict, past_k: str, past_v: str):
        b, H, KV, D = self.b, self.heads, self.kv_heads, self.head_dim
        attn = self.adapter.attn(layer)
        off = self.adapter.norm_offset

        def heads(t: str, n: int, norm) -> str:
            t = b.op("Reshape", [t, b.i64(0, 0, n, D)], "heads")
            if norm is not None:
                t = _rms(b, t, norm, off, f"layers.{l}.{'q' if n == H else 'k'}_norm")
            return b.op("Transpose", [t], "bhsd", perm=[0, 2, 1, 3])

        q, k, v = self._linears(l, layer, ("q", "k", "v"), x)
        q = heads(q, H, getattr(attn, "q_norm", None))
        k = heads(k, KV, getattr(attn, "k_norm", None))
        v = heads(v, KV, None)
        layer_type = getattr(attn, "layer_type", None)
        table = tables.get(layer_type) or tables[""]
        q, k = self._apply_rope(q, table), self._apply_rope(k, table)
        present_k = b.op("Concat", [past_k, k], axis=2, out=f"present.{l}.key")
        present_v = b.op("Concat", [past_v, v], axis=2, out=f"present.{l}.value")
        # Grouped-query attention without copying the cache: queries as [B, KV, rep, S, D] against K and V as
        # [B, KV, 1, T, D], so MatMul broadcasts each group's cache over its query heads.
        rep = H // KV
        kk, vv, mask = present_k, present_v, masks[self._sliding_window(layer)]  # mask [B, 1, S, T]
        if rep > 1:
            q = b.op("Reshape", [q, b.i64(0, KV, rep, -1, D)], "q_grouped")
            kk, vv = b.op("Unsqueeze", [kk, b.i64(2)], "k_grouped"), b.op("Unsqueeze", [vv, b.i64(2)], "v_grouped")
            mask = b.op("Unsqueeze", [mask, b.i64(1)], "mask_grouped")
        perm = [0, 1, 2, 4, 3] if rep > 1 else [0, 1, 3, 2]
        scores = b.op("MatMul", [q, b.op("Transpose", [kk], perm=perm)], "scores")
        scores = b.op("Mul", [scores, b.scalar(float(attn.scaling))])
        scores = _softcap(b, scores, getattr(attn, "attn_logit_softcapping", None))
        scores = b.op("Where", [mask, scores, b.scalar(NEG)], "masked")
        probs = b.op("Softmax", [scores], "probs", axis=-1)
        ctx = b.op("MatMul", [probs, vv], "ctx")
        if rep > 1:
            ctx = b.op("Reshape", [ctx, b.i64(0, H, -1, D)], "ctx_heads")
        ctx = b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 2, 1, 3]), b.i64(0, 0, H * D)], "ctx")
        return self._linear(l, layer, "o", ctx), present_k, present_v

    def _mlp(self, l: int, layer, x: str) -> str:
        b = self.b
        gate, up = self._linears(l, layer, ("gate", "up"), x)
        return self._linear(l, layer, "down", b.op("Mul", [_activation(b, gate, self.act), up], "gated_up"))

    def _half(self, l: int, layer, h: str, which: str, body) -> tuple[str, tuple]:
        b, ad = self.b, self.adapter
        shortcut = getattr(layer, f"wina_shortcut_{which}", None)
        residual = h if shortcut is None else b.op("MatMul", [h, b.f32(f"layers.{l}.shortcut_{which}", shortcut)])
        norm = ad.attn_norm(layer) if which == "attn" else ad.mlp_norm(layer)
        out, extra = body(_rms(b, h, norm, ad.norm_offset, f"layers.{l}.{which}_norm"))
        post = ad.post_attn_norm(layer) if which == "attn" else ad.post_mlp_norm(layer)
        if post is not None:
            out = _rms(b, out, post, ad.norm_offset, f"layers.{l}.post_{which}_norm")
            rot = getattr(layer, f"wina_post_rot_{which}", None)
            if rot is not None:
                out = b.op("MatMul", [out, b.f32(f"layers.{l}.post_rot_{which}", rot)])
        return b.op("Add", [residual, out], f"h{l}_{which}"), extra

    # -- the whole graph -------------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        b, ad, cfg = self.b, self.adapter, self.cfg
        L, KV, D = len(ad.layers()), self.kv_heads, self.head_dim
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
                  helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
                  helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", int(cfg.vocab_size)])]
        for i in range(L):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32,
                                                            ["batch", KV, "past", D]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32, ["batch", KV, "total", D]))
        if self.dense_prompt:
            inputs.append(helper.make_tensor_value_info("dense_until", i64, []))

        emb = ad.embedding()
        h = b.op("Gather", [b.weight("embed_tokens.weight", emb.weight), "input_ids"], "embed", axis=0)
        h = b.as_float(h)
        scale = getattr(emb, "embed_scale", None)
        if scale is not None:
            h = b.op("Mul", [h, b.scalar(float(torch.as_tensor(scale).to(emb.weight.dtype)))], "embed_scaled")
        fused = self.attention == "fused"
        tables = self._rope_caches() if fused else self._rope_tables("position_ids")
        windows = {self._sliding_window(layer) for layer in ad.layers()}
        masks, q_idx = self._masks("attention_mask", "input_ids", windows)
        if fused:
            masks = {w: b.op("Where", [m, b.scalar(0.0), b.scalar(NEG)], "attn_bias") for w, m in masks.items()}
            self.gqa_lengths = self._gqa_lengths("attention_mask", "input_ids")
        if self.has_policy:
            self.dense_rows = self._dense_rows(q_idx)
        attend = self._attention_fused if fused else self._attention
        for l, layer in enumerate(ad.layers()):
            past_k, past_v = f"past_key_values.{l}.key", f"past_key_values.{l}.value"

            def attention(x, l=l, layer=layer, past_k=past_k, past_v=past_v):
                o, pk, pv = attend(l, layer, x, tables, masks, past_k, past_v)
                return o, (pk, pv)

            h, _ = self._half(l, layer, h, "attn", attention)
            h, _ = self._half(l, layer, h, "mlp", lambda x: (self._mlp(l, layer, x), None))
        h = _rms(b, h, ad.final_norm(), ad.norm_offset, "final_norm")
        logits = b.op("MatMul", [h, b.as_float(b.weight("lm_head.weight_t", ad.lm_head().weight.t()))], "lm_head")
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = _softcap(b, logits, cap)
        b.op("Identity", [logits], out="logits")

        graph = helper.make_graph(b.nodes, "wina_decoder", inputs, outputs, initializer=b.inits)
        opsets = [helper.make_opsetid("", ops.OPSET), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)]
        if fused:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets,
                                  functions=ops.functions(), producer_name="wina")
        model.ir_version = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14
        if fused:  # GroupQueryAttention appends to a past buffer bound as its present output too
            helper.set_model_props(model, {KV_CACHE_KEY: SHARED_BUFFER})
        return model
