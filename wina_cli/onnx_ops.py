"""The ai.wina operator set: gated matrix products whose function bodies are made of standard ONNX ops.

A node `ai.wina.GatedMatMul(X, W, scale)` computes Y = (X * keep) @ W with W stored [in, out] and
keep_i = |x_i| * scale_i > threshold (scale = the column norms ||W_orig[:, i]|| for the `wina` criterion, ones for
`teal`). `ai.wina.TopKMatMul` keeps the k highest scores of each row instead. Both carry a model-local function
body, so stock ONNX Runtime runs them on any execution provider; wina's native library registers kernels for the
same domain and names, which then take precedence and read only the weight rows of kept channels.
"""
from __future__ import annotations

import onnx
from onnx import helper, TensorProto

DOMAIN = "ai.wina"
DOMAIN_VERSION = 1
OPSET = 17  # standard opset of the graph and of the function bodies
GATED = "GatedMatMul"
TOPK = "TopKMatMul"


def _ref_attr(name: str, ref: str, kind: int) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, kind
    return a


def _constant_from_attr(out: str, attr: str, kind: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(_ref_attr(kind, attr, onnx.AttributeProto.FLOAT if kind == "value_float"
                                    else onnx.AttributeProto.INT))
    return node


def gated_matmul_function() -> onnx.FunctionProto:
    nodes = [
        helper.make_node("Abs", ["X"], ["absx"]),
        helper.make_node("Mul", ["absx", "scale"], ["score"]),
        _constant_from_attr("thr", "threshold", "value_float"),
        helper.make_node("Greater", ["score", "thr"], ["keep"]),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Where", ["keep", "X", "zero"], ["xk"]),
        helper.make_node("CastLike", ["W", "X"], ["wf"]),
        helper.make_node("MatMul", ["xk", "wf"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, GATED, ["X", "W", "scale"], ["Y"], nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["threshold"])


def topk_matmul_function() -> onnx.FunctionProto:
    nodes = [
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
    return helper.make_function(DOMAIN, TOPK, ["X", "W", "scale"], ["Y"], nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["k"])


def functions() -> list[onnx.FunctionProto]:
    return [gated_matmul_function(), topk_matmul_function()]
