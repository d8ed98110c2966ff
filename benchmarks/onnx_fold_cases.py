"""Known failure cases of ONNX BN folders as ModelProtos, each with what a correct folder does.

``expect`` is ``"fold"`` (the BN folds exactly; a tool that leaves it only misses a chance) or
``"keep"`` (folding it changes the model's meaning, or would write non-finite weights).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from onnx_cases import (
    Builder,
    constant_node_weight,
    dynamo_bias_subgraph,
    shared_weight,
    torch_convtranspose_bn,
)


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # "fold" or "keep"
    build: Callable[[], onnx.ModelProto]
    reference: Callable[[onnx.ModelProto, np.ndarray], list[np.ndarray]] | None = None


def _conv_bn(dtype: int = TensorProto.FLOAT, opset: int = 17, param_dtype: int | None = None,
             **bn_attrs) -> Builder:
    b = Builder(1, dtype=dtype, param_dtype=param_dtype)
    b.node("Conv", ["x", b.rand("w", [4, 3, 3, 3]), b.rand("bias", [4])], ["c"])
    b.bn("c", "y", 4, **bn_attrs)
    return b


def training_mode() -> onnx.ModelProto:
    b = _conv_bn(training_mode=1)
    b.nodes[-1].output.extend(["rm", "rv"])
    return b.model({"x": [2, 3, 6, 6]}, {"y": [2, 4, 4, 4]})


def opset6_is_test0() -> onnx.ModelProto:
    return _conv_bn(is_test=0).model({"x": [2, 3, 6, 6]}, {"y": [2, 4, 4, 4]}, opset=6,
                                     ir_version=4)


def stats_outputs_used() -> onnx.ModelProto:
    b = _conv_bn()
    b.nodes[-1].output.extend(["rm", "rv", "sm", "sv"])
    return b.model({"x": [2, 3, 6, 6]}, {"y": [2, 4, 4, 4], "rm": [4]}, opset=9)


def spatial0(uniform: bool) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        b = Builder(2)
        b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
        b.bn("c", "y", [4, 2, 2], spatial=0)
        if uniform:
            for t in b.inits[-4:]:
                arr = onnx.numpy_helper.to_array(t)
                t.CopyFrom(onnx.numpy_helper.from_array(
                    np.broadcast_to(arr[:, :1, :1], arr.shape).copy(), t.name))
        return b.model({"x": [2, 3, 2, 2]}, {"y": None}, opset=7)
    return build


def bf16() -> onnx.ModelProto:
    return _conv_bn(TensorProto.BFLOAT16).model({"x": [2, 3, 6, 6]}, {"y": None}, opset=22)


def bn15_mixed() -> onnx.ModelProto:
    return _conv_bn(TensorProto.FLOAT16, param_dtype=TensorProto.FLOAT).model(
        {"x": [2, 3, 6, 6]}, {"y": None}, opset=15)


def fp16() -> onnx.ModelProto:
    b = Builder(3, dtype=TensorProto.FLOAT16)
    b.node("Conv", ["x", b.rand("w", [64, 32, 3, 3])], ["c"])
    b.bn("c", "y", 64)
    return b.model({"x": [1, 32, 5, 5]}, {"y": None})


def fp16_overflow() -> onnx.ModelProto:
    b = Builder(4, dtype=TensorProto.FLOAT16)
    b.node("Conv", ["x", b.init("w", np.full([4, 3, 1, 1], 60000.0))], ["c"])
    b.bn("c", "y", 4)
    for t in b.inits:
        if t.name == "y_var":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(4, 1e-3, np.float16), t.name))
    return b.model({"x": [1, 3, 2, 2]}, {"y": None})


def gemm(trans_b: int) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        b = Builder(5)
        w = b.rand("w", [6, 5] if trans_b else [5, 6])
        b.node("Gemm", ["x", w, b.rand("c0", [6])], ["g"], transB=trans_b, alpha=0.5, beta=2.5)
        b.bn("g", "y", 6)
        return b.model({"x": [3, 5]}, {"y": None})
    return build


def grouped_conv_transpose() -> onnx.ModelProto:
    b = Builder(6)
    b.node("ConvTranspose", ["x", b.rand("w", [4, 3, 2, 2]), b.rand("bias", [6])], ["c"],
           group=2, strides=[2, 2])
    b.bn("c", "y", 6)
    return b.model({"x": [2, 4, 3, 3]}, {"y": None})


def conv_output_shared() -> onnx.ModelProto:
    b = _conv_bn()
    b.node("Add", ["y", "c"], ["z"])
    return b.model({"x": [2, 3, 6, 6]}, {"z": None})


CASES = [
    Case("BN training_mode=1", "keep", training_mode),
    Case("opset-6 BN is_test=0", "keep", opset6_is_test0),
    Case("BN mean/var outputs used", "keep", stats_outputs_used),
    Case("opset-7 spatial=0, per-channel", "fold", spatial0(True)),
    Case("opset-7 spatial=0, per-position", "keep", spatial0(False)),
    Case("bf16 Conv+BN (opset 22)", "fold", bf16),
    Case("BN-15 fp16 data, fp32 params", "fold", bn15_mixed),
    Case("fp16 Conv+BN (ulp of weights)", "fold", fp16),
    Case("fp16 fold overflows 65504", "keep", fp16_overflow),
    Case("Gemm alpha=.5 beta=2.5 transB=0", "fold", gemm(0)),
    Case("Gemm alpha=.5 beta=2.5 transB=1", "fold", gemm(1)),
    Case("grouped ConvTranspose", "fold", grouped_conv_transpose, torch_convtranspose_bn),
    Case("weight in a Constant node", "fold", lambda: constant_node_weight(7)),
    Case("weight shared by two Conv+BN", "fold", lambda: shared_weight(8)),
    Case("bias from Shape/Expand subgraph", "fold", lambda: dynamo_bias_subgraph(9)),
    Case("conv output also feeds Add", "keep", conv_output_shared),
]
