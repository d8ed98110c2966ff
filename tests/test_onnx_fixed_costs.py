"""Fast paths for small models give what the slow paths give: reused reference kernels
(:func:`bnfold.passes.onnx.consts._run`) and shapes read off the inferred protobuf
(:mod:`bnfold.passes.onnx.shapes`)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference.ops import load_op

from bnfold.passes.onnx.consts import _run

_X = np.arange(24, dtype=np.float32).reshape(2, 3, 4)


@pytest.mark.parametrize(("op", "attrs", "args"), [
    ("Shape", {"start": 1}, [_X]),
    ("Shape", {"start": 0, "end": 2}, [_X]),  # same op, other attributes: another kernel
    ("Shape", {}, [_X]),
    ("Transpose", {"perm": [2, 0, 1]}, [_X]),  # a list attribute: built afresh
    ("Expand", {}, [np.float32(1.5), np.array([2, 3], np.int64)]),
    ("CastLike", {}, [np.float64(0.25), _X]),
    ("Softmax", {"axis": 1}, [_X]),
    ("Softmax", {"axis": 2}, [_X]),
])
def test_run_equals_a_fresh_kernels_eval(op: str, attrs: dict, args: list) -> None:
    node = ir.Node("", op, [ir.Value(name=f"x{i}") for i in range(len(args))],
                   [ir.Attr(k, ir.AttributeType.INTS if isinstance(v, list)
                            else ir.AttributeType.INT, v) for k, v in attrs.items()])
    for _ in range(2):  # the second run reuses the kernel the first built
        out = _run(node, args, 17)
        expected = load_op("", op, 17).eval(*args, **attrs)
        assert out is not None and len(out) == 1
        np.testing.assert_array_equal(out[0], expected)
        assert out[0].dtype == np.asarray(expected).dtype


def test_run_of_an_op_it_cannot_evaluate_is_none() -> None:
    node = ir.Node("", "NoSuchOp", [ir.Value(name="x")])
    assert _run(node, [_X], 17) is None
