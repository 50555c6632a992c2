"""The ai.wina operator set: gated matrix products whose function bodies are made of standard ONNX ops.

A node `ai.wina.GatedMatMul(X, W, scale)` computes Y = (X * keep) @ W with W stored [in, out] and
keep_i = |x_i| * scale_i > threshold (scale = the column norms ||W_orig[:, i]|| for the `wina` criterion, ones for
`teal`). `ai.wina.TopKMatMul` keeps the k highest scores of each row instead. Both carry a model-local function
body, so stock ONNX Runtime runs them on any execution provider; wina's native library registers kernels for the
same domain and names, which then take precedence and read only the weight rows of kept channels.

A gate policy (some token positions computed dense: the prompt, or the first N tokens) uses the `...DenseRows`
variants, which take a fourth input `dense` bool [S], one flag per position of X [B, S, in]: a flagged row keeps
every channel. They are separate ops rather than an optional input because a function body cannot test whether
an optional input was given.

The projections that read one input (q, k, v; gate, up) can be one node, `ai.wina.FusedGatedMatMul2` or `...3`
(X, W, scale_1, ..., scale_N) -> (Y_1, ..., Y_N) with W [in, sum(splits)] their weights side by side (attribute
`splits`: each one's width) and attribute `thresholds` (one per projection; -inf for one that keeps every channel):
Y_p is what `GatedMatMul(X, W_p, scale_p)` gives with threshold p, W_p being W's column block p. Side by side, an
input channel's weights for all N are one contiguous row, which the native kernel reads in one run. One op per
arity, because a function body has a fixed number of inputs and outputs.
"""
from __future__ import annotations

import onnx
from onnx import helper, TensorProto

DOMAIN = "ai.wina"
DOMAIN_VERSION = 1
OPSET = 17  # standard opset of the graph and of the function bodies
GATED = "GatedMatMul"
TOPK = "TopKMatMul"
GATED_ROWS = "GatedMatMulDenseRows"
TOPK_ROWS = "TopKMatMulDenseRows"
FUSED_ARITIES = (2, 3)


def fused_name(n: int, dense_rows: bool) -> str:
    return f"FusedGatedMatMul{n}" + ("DenseRows" if dense_rows else "")


def _ref_attr(name: str, ref: str, kind: int) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, kind
    return a


def _constant_from_attr(out: str, attr: str, kind: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(_ref_attr(kind, attr, onnx.AttributeProto.FLOAT if kind == "value_float"
                                    else onnx.AttributeProto.INT))
    return node


def _with_dense_rows(nodes: list[onnx.NodeProto], keep: str) -> list[onnx.NodeProto]:
    """The same body with `keep` widened to every channel of the rows `dense` flags ([S] against X [B, S, in])."""
    out = []
    for n in nodes:
        out.append(n)
        if keep in n.output:
            n.output[list(n.output).index(keep)] = keep + "_gate"
            out += [helper.make_node("Constant", [], ["last"], value=helper.make_tensor("a", TensorProto.INT64, [1],
                                                                                      [-1])),
                    helper.make_node("Unsqueeze", ["dense", "last"], ["dense_col"]),
                    helper.make_node("Cast", [keep + "_gate"], ["gate_bool"], to=TensorProto.BOOL),
                    helper.make_node("Or", ["gate_bool", "dense_col"], ["keep_bool"]),
                    helper.make_node("CastLike", ["keep_bool", keep + "_gate"], [keep])]
    return out


def _gated_nodes() -> list[onnx.NodeProto]:
    return [
        helper.make_node("Abs", ["X"], ["absx"]),
        helper.make_node("Mul", ["absx", "scale"], ["score"]),
        _constant_from_attr("thr", "threshold", "value_float"),
        helper.make_node("Greater", ["score", "thr"], ["keep"]),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Where", ["keep", "X", "zero"], ["xk"]),
        helper.make_node("CastLike", ["W", "X"], ["wf"]),
        helper.make_node("MatMul", ["xk", "wf"], ["Y"]),
    ]


def _topk_nodes() -> list[onnx.NodeProto]:
    return [
        helper.make_node("Abs", ["X"], ["absx"]),
        helper.make_node("Mul", ["absx", "scale"], ["score"]),
        _constant_from_attr("k0", "k", "value_int"),
        helper.make_node("Constant", [], ["axis0"], value=helper.make_tensor("a", TensorProto.INT64, [1], [0])),
        helper.make_node("Unsqueeze", ["k0", "axis0"], ["k1"]),
        helper.make_node("TopK", ["score", "k1"], ["vals", "idx"], axis=-1),
        helper.make_node("Shape", ["score"], ["sshape"]),
        helper.make_node("ConstantOfShape", ["sshape"], ["zeros"],
                         value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("Shape", ["vals"], ["vshape"]),
        helper.make_node("ConstantOfShape", ["vshape"], ["ones"],
                         value=helper.make_tensor("o", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ScatterElements", ["zeros", "idx", "ones"], ["keep"], axis=-1),
        helper.make_node("Mul", ["X", "keep"], ["xk"]),
        helper.make_node("CastLike", ["W", "X"], ["wf"]),
        helper.make_node("MatMul", ["xk", "wf"], ["Y"]),
    ]


def _function(name: str, nodes: list[onnx.NodeProto], attr: str, dense_rows: bool) -> onnx.FunctionProto:
    inputs = ["X", "W", "scale"] + (["dense"] if dense_rows else [])
    if dense_rows:
        nodes = _with_dense_rows(nodes, "keep")
    return helper.make_function(DOMAIN, name, inputs, ["Y"], nodes, [helper.make_opsetid("", OPSET)],
                                attributes=[attr])


def _fused_function(n: int, dense_rows: bool) -> onnx.FunctionProto:
    """W split into its column blocks (attribute `splits`), then GatedMatMul's body once per projection, with
    threshold p from the `thresholds` list."""
    thr_all = helper.make_node("Constant", [], ["thr_all"])
    thr_all.attribute.append(_ref_attr("value_floats", "thresholds", onnx.AttributeProto.FLOATS))
    splits = helper.make_node("Constant", [], ["splits"])
    splits.attribute.append(_ref_attr("value_ints", "splits", onnx.AttributeProto.INTS))
    nodes = [thr_all, splits, helper.make_node("Split", ["W", "splits"], [f"W{p}" for p in range(n)], axis=1)]
    shared = {"X", "dense", "thr_all"}
    for p in range(n):
        part = [helper.make_node("Constant", [], ["p"], value=helper.make_tensor("p", TensorProto.INT64, [], [p])),
                helper.make_node("Gather", ["thr_all", "p"], ["thr"], axis=0)] \
            + [node for node in _gated_nodes() if node.output[0] != "thr"]  # thr comes from the list instead
        if dense_rows:
            part = _with_dense_rows(part, "keep")
        rename = {"W": f"W{p}", "scale": f"scale{p}", "Y": f"Y{p}"}
        for node in part:
            node.input[:] = [i if i in shared else rename.get(i, f"{i}_{p}") for i in node.input]
            node.output[:] = [o if o in shared else rename.get(o, f"{o}_{p}") for o in node.output]
        nodes += part
    inputs = ["X", "W"] + [f"scale{p}" for p in range(n)] + (["dense"] if dense_rows else [])
    return helper.make_function(DOMAIN, fused_name(n, dense_rows), inputs, [f"Y{p}" for p in range(n)], nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["thresholds", "splits"])


def functions() -> list[onnx.FunctionProto]:
    return [_function(GATED, _gated_nodes(), "threshold", False), _function(TOPK, _topk_nodes(), "k", False),
            _function(GATED_ROWS, _gated_nodes(), "threshold", True), _function(TOPK_ROWS, _topk_nodes(), "k", True)] \
        + [_fused_function(n, rows) for n in FUSED_ARITIES for rows in (False, True)]
