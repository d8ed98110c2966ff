"""onnx-ir imported at first use (``bnfold/lazy_ir.py``) and the dry run that never needs it.

A plain model's ``bnfold inspect`` runs on the protobuf (``direct_inspect``) and must say
exactly what the onnx-ir dry run says; the table of dtype widths written out for it must be
onnx-ir's.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from test_onnx_direct import NOT_PLAIN, PLAIN

from benchmarks.bench_onnx_fold import chain_model
from bnfold.errors import BnfoldError
from bnfold.io.proto_stream import BITS
from bnfold.io.split_proto import SplitProto
from bnfold.lazy_ir import ir as lazy
from bnfold.passes.onnx.direct import direct_inspect
from bnfold.passes.onnx.fold import inspect_onnx
from bnfold.passes.onnx.reparam import inspect_branches
from bnfold.report import Report

ROOT = Path(__file__).resolve().parents[1]


def test_the_lazy_module_is_onnx_ir() -> None:
    assert lazy.Model is ir.Model and lazy.serde is ir.serde
    assert isinstance(ir.Tensor(np.ones(2)), lazy.Tensor)
    with pytest.raises(AttributeError):
        _ = lazy.no_such_name


def test_the_written_out_dtype_widths_are_onnx_irs() -> None:
    widths = {}
    for dtype in ir.DataType:
        with contextlib.suppress(TypeError):
            widths[dtype.value] = dtype.bitwidth
    assert widths == BITS


def _full_inspect(model: onnx.ModelProto) -> Report:
    return inspect_onnx(ir.serde.deserialize_model(model))  # (an onnx-ir model: the full path)


@pytest.mark.parametrize("name", [*PLAIN, *NOT_PLAIN])
def test_the_protobuf_dry_run_says_what_the_full_one_says(name: str) -> None:
    model = (PLAIN | NOT_PLAIN)[name]()
    before = model.SerializeToString()
    fast = direct_inspect(model)
    assert (fast is None) == (name in NOT_PLAIN)
    try:
        want = _full_inspect(model)
    except BnfoldError as exc:  # (an invalid model: both refuse it alike)
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            inspect_onnx(model)
        return
    got = inspect_onnx(model)
    assert got.to_dict() == want.to_dict() and got.dry_run and not got.changed
    assert model.SerializeToString() == before
    if fast is not None:
        assert fast.to_dict() == want.to_dict()


def test_a_plain_split_proto_is_dry_run_on_the_protobuf(tmp_path) -> None:
    from bnfold.io.fileio import load_for_pass

    path = tmp_path / "m.onnx"
    onnx.save(chain_model(3, 4), path)
    split = load_for_pass(path)
    assert isinstance(split, SplitProto)
    assert inspect_onnx(split).to_dict() == _full_inspect(onnx.load(path)).to_dict()


def test_branch_blocks_of_a_protobuf_without_add_are_none() -> None:
    model = chain_model(3, 4)
    report = inspect_branches(model)
    assert report.entries == [] and report.dry_run
    assert report.to_dict() == inspect_branches(ir.serde.deserialize_model(model)).to_dict()


def test_inspect_of_a_plain_file_never_imports_onnx_ir(tmp_path) -> None:
    """Nor sympy, which onnx-ir imports (most of ``bnfold inspect``'s start-up time)."""
    path = tmp_path / "m.onnx"
    onnx.save(chain_model(2, 4), path)
    code = f"""
        import json, sys
        from bnfold import cli
        assert cli.main(["inspect", {str(path)!r}, "--freeze-initializer-inputs"]) == 0
        assert cli.main(["inspect", {str(path)!r}, "--json"]) == 0
        print(json.dumps(sorted(m for m in ("onnx_ir", "onnx_ir._core", "sympy")
                                if m in sys.modules)))
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == []
    first = next(i for i, line in enumerate(lines) if line == "{")
    assert json.loads("\n".join(lines[first:-1]))["report"]["counts"]["folded"] == 2
