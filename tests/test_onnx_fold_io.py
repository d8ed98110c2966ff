"""Files: external data kept external and lazy, atomic writes, one-line load errors."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_cases import Builder, count, feeds, reference, rel_err, run_ort

from bnfold.errors import BadInputError
from bnfold.io.external_data import files_named_by
from bnfold.io.fileio import load_onnx, save_onnx
from bnfold.passes.onnx.fold import fold_onnx, inspect_onnx


def _external_model(tmp_path) -> tuple[onnx.ModelProto, str]:
    b = Builder(30)
    b.node("Conv", ["x", b.rand("w1", [16, 8, 3, 3])], ["c1"], pads=[1, 1, 1, 1])
    b.bn("c1", "n1", 16)
    b.node("Relu", ["n1"], ["r"])
    b.node("Conv", ["r", b.rand("w2", [8, 16, 3, 3])], ["c2"], pads=[1, 1, 1, 1])
    b.node("MatMul", ["x", b.rand("untouched", [6, 6])], ["y2"])  # never read by a fold
    m = b.model({"x": [1, 8, 6, 6]}, {"c2": None, "y2": None})
    path = tmp_path / "m.onnx"
    ir.save(ir.serde.deserialize_model(m), path, external_data="m.onnx.data",
            size_threshold_bytes=64)
    return m, str(path)


def test_external_data_lazy_and_preserved(tmp_path) -> None:
    original, path = _external_model(tmp_path)
    folded, report = fold_onnx(path)
    assert isinstance(folded, ir.Model) and len(report.folded) == 1
    tensors = {v.name: v.const_value for v in folded.graph.initializers.values()}
    assert isinstance(tensors["untouched"], ir.ExternalTensor)
    assert isinstance(tensors["w2"], ir.ExternalTensor)
    assert not isinstance(tensors["w1"], ir.ExternalTensor)  # rewritten by the fold
    out = tmp_path / "sub" / "folded.onnx"
    save_onnx(folded, out)
    (data,) = files_named_by(out)  # <name>.<content hash>.data, beside it
    assert data.parent == out.parent
    assert re.fullmatch(r"folded\.onnx\.[0-9a-f]{16}\.data", data.name)
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer
               if t.name in ("w1", "w2"))  # tensors < 256 bytes are written inline
    x = feeds(original)
    result = run_ort(onnx.load(str(out)), x)
    assert rel_err(result, reference(original, x)) < 1e-5
    assert count(onnx.load(str(out))) == 0


def test_save_over_the_source_file(tmp_path) -> None:
    original, path = _external_model(tmp_path)
    folded, _ = fold_onnx(path)
    save_onnx(folded, path)  # reads its lazy tensors from the file it replaces
    x = feeds(original)
    assert rel_err(run_ort(onnx.load(path), x), reference(original, x)) < 1e-5


def test_inspect_path_changes_nothing(tmp_path) -> None:
    _, path = _external_model(tmp_path)
    before = (tmp_path / "m.onnx").read_bytes(), (tmp_path / "m.onnx.data").read_bytes()
    report = inspect_onnx(path)
    assert [(e.action, e.into) for e in report.entries] == [("folded", "Conv_0")]
    assert before == ((tmp_path / "m.onnx").read_bytes(), (tmp_path / "m.onnx.data").read_bytes())


def test_save_accepts_modelproto_and_is_atomic(tmp_path) -> None:
    b = Builder(31)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.bn("c", "y", 4)
    m = b.model({"x": [1, 3, 2, 2]}, {"y": None})
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous")
    folded, _ = fold_onnx(m)
    save_onnx(folded, out)
    assert count(onnx.load(str(out))) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(BadInputError):
        save_onnx(folded, tmp_path / "o.onnx" / "inside")  # parent is a file
    assert count(onnx.load(str(out))) == 0


@pytest.mark.parametrize("content", [None, b"", b"\x00garbage\xff" * 10, "dir"])
def test_load_errors_are_one_line(tmp_path, content) -> None:
    path = tmp_path / "x.onnx"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(BadInputError) as err:
        load_onnx(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_big_tensors_go_external(tmp_path, monkeypatch) -> None:
    import bnfold.io.fileio as fileio

    monkeypatch.setattr(fileio, "EXTERNAL_THRESHOLD", 100)
    b = Builder(32)
    b.node("Conv", ["x", b.rand("w", [8, 8, 3, 3])], ["y"])
    m = b.model({"x": [1, 8, 4, 4]}, {"y": None})
    save_onnx(m, tmp_path / "big.onnx")
    assert [p.parent for p in files_named_by(tmp_path / "big.onnx")] == [tmp_path.resolve()]
    x = feeds(m)
    np.testing.assert_allclose(run_ort(onnx.load(str(tmp_path / "big.onnx")), x)[0],
                               run_ort(m, x)[0])


def test_files_named_by_parses_only_files_that_can_name_data(tmp_path, monkeypatch) -> None:
    """A graph whose tensors are all inline names no data file and is not parsed; one that
    merely holds the bytes ``location`` (a tensor so named) is parsed and names none."""
    import bnfold.io.external_data as external_data

    parsed = []
    real = onnx.load_model_from_string
    monkeypatch.setattr(external_data.onnx, "load_model_from_string",
                        lambda data: parsed.append(len(data)) or real(data))
    b = Builder(33)
    b.node("Conv", ["x", b.rand("w", [8, 8, 3, 3])], ["y"])
    inline = b.model({"x": [1, 8, 4, 4]}, {"y": None})
    onnx.save(inline, tmp_path / "inline.onnx")
    assert files_named_by(tmp_path / "inline.onnx") == set() and parsed == []
    b = Builder(33)
    b.node("Conv", ["x", b.rand("location", [8, 8, 3, 3])], ["y"])
    onnx.save(b.model({"x": [1, 8, 4, 4]}, {"y": None}), tmp_path / "named.onnx")
    assert files_named_by(tmp_path / "named.onnx") == set() and len(parsed) == 1
    _external_model(tmp_path)
    assert files_named_by(tmp_path / "m.onnx") == {(tmp_path / "m.onnx.data").resolve()}
    assert len(parsed) == 2


def test_output_is_byte_identical_across_processes(tmp_path) -> None:
    """Same input, two processes with different hash seeds: the same bytes (names, order)."""
    import os
    import subprocess
    import sys

    b = Builder(33)
    w = b.rand("w", [4, 4, 1, 1])
    b.node("Conv", ["x", w], ["c1"])
    b.node("Conv", ["x", w], ["c2"])  # shared weight: copies get fresh names
    b.bn("c1", "y1", 4)
    b.bn("c2", "y2", 4)
    b.node("MatMul", ["x", b.rand("m", [3, 5])], ["mm"])
    b.node("Transpose", ["mm"], ["t"], perm=[0, 1, 3, 2])
    b.bn("t", "y3", 4)  # axes do not line up: kept
    m = b.model({"x": [2, 4, 3, 3]}, {"y1": [2, 4, 3, 3], "y2": [2, 4, 3, 3], "y3": [2, 4, 5, 3]},
                infer=False)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    script = ("import sys, onnx; from bnfold.passes.onnx.fold import fold_onnx; "
              "sys.stdout.buffer.write(fold_onnx(onnx.load(sys.argv[1])).model"
              ".SerializeToString())")
    outs = [subprocess.run([sys.executable, "-c", script, str(src)], capture_output=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")]
    assert outs[0] == outs[1] and count(onnx.load_from_string(outs[0])) == 1
