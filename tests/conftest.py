"""Shared fixtures: small ONNX models built with onnx.helper, and a CLI runner.

* ``conv_bn_proto(dtype=np.float32)`` -> Conv(bias) -> BatchNormalization -> Relu, input
  ``x: [batch, 3, 8, 8]`` (``batch`` symbolic), BN with non-trivial statistics.
* ``hand_folded(proto)`` -> the same model with its BN folded by ``bnfold.algebra`` (independent
  of the fold passes), the exact candidate a correct folder produces.
* ``run_cli(*args)`` -> ``CompletedProcess`` of the installed ``bnfold`` console script;
  ``run_cli.many([args, ...])`` runs several at once (each is a separate process start).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from bnfold.algebra import BNParams, fold_forward

BNFOLD = Path(sys.executable).parent / "bnfold"
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA_EP, reason="onnxruntime has no CUDAExecutionProvider (needs onnxruntime-gpu)")


def _conv_bn(dtype: type = np.float32, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    c = 6
    inits = {
        "W": rng.normal(0, 0.3, (c, 3, 3, 3)), "B": rng.normal(0, 0.5, c),
        "gamma": rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c),
        "beta": rng.normal(0, 0.5, c), "mean": rng.normal(0, 0.5, c),
        "var": rng.uniform(0.3, 3.0, c),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["z"],
                         name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("x", elem, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", elem, ["batch", c, 8, 8])],
        [numpy_helper.from_array(v.astype(dtype), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _hand_folded(proto: onnx.ModelProto) -> onnx.ModelProto:
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    bn = BNParams(init["mean"], init["var"], 1e-5, init["gamma"], init["beta"])
    folded = fold_forward(init["W"], init["B"], bn)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    del graph.initializer[:]
    graph.initializer.extend([numpy_helper.from_array(folded.weight, "W"),
                              numpy_helper.from_array(folded.bias, "B")])
    conv, _, relu = list(graph.node)
    del graph.node[:]
    conv.output[0] = "z"
    graph.node.extend([conv, relu])
    return out


@pytest.fixture
def conv_bn_proto() -> Callable[..., onnx.ModelProto]:
    return _conv_bn


@pytest.fixture
def hand_folded() -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    return _hand_folded


class CliRunner:
    """Runs the ``bnfold`` console script in real subprocesses."""

    def __call__(self, *args: object, cwd: Path | None = None
                 ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BNFOLD), *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, timeout=300, check=False)

    def many(self, commands: list[list[object]], width: int = 4
             ) -> list[subprocess.CompletedProcess[str]]:
        """Each command's result, in order; ``width`` processes at a time."""
        with ThreadPoolExecutor(width) as pool:
            return list(pool.map(lambda argv: self(*argv), commands))


@pytest.fixture
def run_cli() -> CliRunner:
    return CliRunner()
