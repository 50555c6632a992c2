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


def functions() -> list[onnx.FunctionProto]:
    return [_function(GATED, _gated_nodes(), "threshold", False), _function(TOPK, _topk_nodes(), "k", False),
            _function(GATED_ROWS, _gated_nodes(), "threshold", True), _function(TOPK_ROWS, _topk_nodes(), "k", True)]
