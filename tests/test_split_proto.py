"""Single-file models read with their large weights held apart (bnfold.io.split_proto).

``read_split`` must give exactly the model ``onnx.load`` parses (``whole()``), write back
byte for byte the file it read, fall back to a whole parse on anything its wire walk does not
split (and then fail as ``onnx.load`` fails), and the CLI, which folds on it, must write the
same bytes as the ``ModelProto`` route, on the fast path and the onnx-ir one, in place too.
``to_ir`` must be onnx-ir's model of ``whole()``, copying the file's bytes unless told not to;
``fold_onnx(path)``, which reads the file split, must return what the onnx-ir route returns
and keep no view of the file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from onnx_cases import feeds, reference, rel_err, run_ort
from test_proto_stream import _zoo

from benchmarks.bench_onnx_fold import chain_model
from bnfold.cli import commands as cli
from bnfold.errors import BadInputError
from bnfold.io import fileio, split_proto
from bnfold.io.fileio import save_onnx
from bnfold.io.proto_stream import STREAM_MIN, frame, write_proto
from bnfold.io.split_proto import SplitProto, read_split
from bnfold.passes.onnx import fold as fold_module
from bnfold.passes.onnx.fold import fold_onnx


def _chain() -> onnx.ModelProto:
    """Six Conv -> BN -> Relu blocks of 128 channels: 3.5 MB, each weight 590 KB."""
    return chain_model(6, 128)


def _float_data_only() -> onnx.ModelProto:
    """A large weight stored as ``float_data``: nothing to hold apart."""
    model = chain_model(3, 128)
    weight = model.graph.initializer[0]
    values = numpy_helper.to_array(weight)
    weight.ClearField("raw_data")
    weight.float_data.extend(values.reshape(-1).tolist())
    return model


MODELS = {"conv chain": _chain, "many dtypes, subgraph, function": _zoo,
          "float_data only": _float_data_only}


def _held_indices(model: onnx.ModelProto) -> set[int]:
    return {i for i, t in enumerate(model.graph.initializer) if len(t.raw_data) >= STREAM_MIN}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_split_model_is_the_file(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert path.stat().st_size >= split_proto.SPLIT_MIN
    split = read_split(path)
    assert set(split.data) == _held_indices(model)
    assert len(split.data) == {"conv chain": 6, "float_data only": 2}.get(name, len(split.data))
    for index, data in split.data.items():
        assert data.dtype == np.uint8 and not data.flags.writeable
        assert split.proto.graph.initializer[index].raw_data == b""
        assert split.raw_size(index) == data.size == len(model.graph.initializer[index].raw_data)
    assert split.whole().SerializeToString() == onnx.load(path).SerializeToString()
    written = io.BytesIO()
    write_proto(split.proto, written, buffers=split.data)
    assert written.getvalue() == path.read_bytes()


def _graph_field(graph: onnx.GraphProto, *extra: bytes) -> bytes:
    body = graph.SerializeToString() + b"".join(extra)
    return frame(7, len(body)) + body


def _without_graph(model: onnx.ModelProto) -> bytes:
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    return rest.SerializeToString()


def _two_graphs() -> bytes:
    """A second ``graph`` field, which protobuf merges into the first."""
    model = _chain()
    extra = onnx.GraphProto(doc_string="merged")
    return model.SerializeToString() + _graph_field(extra)


def _two_raw_data() -> bytes:
    """A large tensor with a second ``raw_data`` field (the last one counts)."""
    model = _chain()
    names = [t.name for t in model.graph.initializer]
    tensor = model.graph.initializer.pop(names.index("w5"))
    twice = tensor.SerializeToString() + frame(9, len(tensor.raw_data)) + tensor.raw_data[::-1]
    return _without_graph(model) + _graph_field(model.graph, frame(5, len(twice)), twice)


def _group() -> bytes:
    """An unknown group (wire types 3 and 4) among the graph's fields."""
    model = _chain()
    return _without_graph(model) + _graph_field(model.graph, bytes([0xA3, 0x06, 0xA4, 0x06]))


UNUSUAL = {"two graph fields": _two_graphs, "two raw_data fields": _two_raw_data,
           "a group": _group}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_wire_formats_are_parsed_whole(name: str, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(UNUSUAL[name]())
    split = read_split(path)
    assert split.data == {}
    assert split.proto.SerializeToString() == onnx.load(path).SerializeToString()


def test_small_files_and_graphs_of_many_entries_are_parsed_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(_chain().SerializeToString())
    assert read_split(path).data
    monkeypatch.setattr(split_proto, "BYTES_PER_ENTRY", 10**9)
    assert read_split(path).data == {}
    monkeypatch.undo()
    monkeypatch.setattr(split_proto, "SPLIT_MIN", path.stat().st_size + 1)
    split = read_split(path)
    assert split.data == {} and split.whole() is split.proto


@pytest.mark.parametrize("cut", [1, 1000, 600_000, 2_000_000])
def test_a_truncated_file_fails_as_when_parsed_whole(cut: int, tmp_path: Path) -> None:
    """The message the CLI prints is the whole parse's, wherever the file ends."""
    data = _chain().SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[:-cut])
    outcomes = []
    for split in (False, True):
        try:
            loaded = fileio._read_proto(path, split=split)
            proto = loaded.whole() if isinstance(loaded, SplitProto) else loaded
            outcomes.append(proto.SerializeToString())
        except BadInputError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


def test_fold_onnx_of_a_split_model_is_the_proto_fold(tmp_path: Path) -> None:
    model = _chain()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    split = read_split(path)
    before = split.whole().SerializeToString()
    folded = fold_onnx(split)
    want = fold_onnx(model)
    assert isinstance(folded.model, SplitProto) and folded.model.data
    assert folded.model.whole().SerializeToString() == want.model.SerializeToString()
    assert folded.report == want.report
    assert split.whole().SerializeToString() == before  # the input is not changed
    x = feeds(model, seed=5)
    assert rel_err(run_ort(folded.model.whole(), x), reference(model, x)) < 1e-5


@pytest.mark.parametrize("route", ["protobuf", "onnx-ir"])
@pytest.mark.parametrize("flags", [[], ["--validate"], ["--in-place"]])
def test_cli_writes_what_the_proto_route_writes(route: str, flags: list[str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``bnfold fold`` (which reads the model split) writes the bytes that saving
    ``fold_onnx(onnx.load(src))`` writes; the fold is right in float64; the input is kept
    unless it is the output."""
    model = _chain()
    src, out, ref = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "ref.onnx"
    src.write_bytes(model.SerializeToString())
    target = src if "--in-place" in flags else out
    with mock.patch.object(fold_module, "direct_fold", lambda *a, **k: None) \
            if route == "onnx-ir" else mock.patch.object(fold_module, "_working_copy",
                                                         side_effect=AssertionError):
        want = fold_onnx(model)
        args = ["fold", str(src), *([] if target == src else ["-o", str(out)]), "--json", *flags]
        assert cli.main(args) == 0
    save_onnx(want.model, ref)
    doc = json.loads(capsys.readouterr().out)
    assert doc["fold"] == want.report.to_dict() and doc["written"]
    assert target.read_bytes() == ref.read_bytes()
    if target != src:
        assert src.read_bytes() == model.SerializeToString()
    x = feeds(model, seed=3)
    assert rel_err(run_ort(onnx.load(target), x), reference(model, x)) < 1e-5
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(target).graph.node)



def _overwrite(path: Path) -> None:
    """Zero the file in place (same inode: a map of it sees the change)."""
    with open(path, "r+b") as f:
        f.write(bytes(path.stat().st_size))


def _with_int4() -> onnx.ModelProto:
    """:func:`_chain` and a 4-bit tensor stored as ``raw_data``."""
    model = _chain()
    model.graph.initializer.append(onnx.helper.make_tensor(
        "i4", onnx.TensorProto.INT4, [8], b"\x12\x34\x56\x78", raw=True))
    return model


def _name_twice() -> onnx.ModelProto:
    """:func:`_chain` with a second initializer named as its first weight, stored as
    ``float_data`` (never held apart; onnx-ir keeps one of the two)."""
    model = _chain()
    twin = onnx.helper.make_tensor(model.graph.initializer[0].name, onnx.TensorProto.FLOAT,
                                   [2], [1.0, 2.0])
    model.graph.initializer.append(twin)
    return model


TO_IR = {**MODELS, "4-bit raw": _with_int4, "a name used twice": _name_twice}


@pytest.mark.parametrize("name", sorted(TO_IR))
def test_to_ir_is_the_whole_model_and_reads_no_file(name: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``to_ir()`` serializes as onnx-ir's model of ``whole()`` does, with every tensor held
    apart (also 4-bit ones, which go through ``whole()``), and keeps no view of the file."""
    monkeypatch.setattr(split_proto, "STREAM_MIN", 1)  # hold every raw_data apart
    monkeypatch.setattr(split_proto, "BYTES_PER_ENTRY", 1)
    model = TO_IR[name]()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    split = read_split(path)
    assert split.data
    want = ir.serde.serialize_model(ir.serde.deserialize_model(onnx.load(path)))
    converted = split.to_ir()
    _overwrite(path)
    got = ir.serde.serialize_model(converted)
    assert _one_metadata(got).SerializeToString() == _one_metadata(want).SerializeToString()


def _one_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each initializer's metadata entries once (onnx-ir writes those of a
    tensor it read from a proto twice; ``to_ir``'s held tensors have them once, as the
    protobuf route writes them)."""
    for tensor in model.graph.initializer:
        props = {p.key: p.value for p in tensor.metadata_props}
        del tensor.metadata_props[:]
        for key, value in props.items():
            tensor.metadata_props.add(key=key, value=value)
    return model


def _chain_and_spare() -> onnx.ModelProto:
    """:func:`_chain` and a large initializer no fold touches."""
    model = _chain()
    spare = np.random.default_rng(2).normal(size=(300_000,)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(spare, "spare"))
    return model


def test_fold_onnx_of_a_path_folds_the_split_file(tmp_path: Path) -> None:
    """``fold_onnx(path)`` of a plain single-file model folds on the protobuf (never onnx-ir's
    passes) and returns the ``onnx_ir.Model`` the onnx-ir route returns: the same bytes
    saved, the same report, right in float64, and no view of the input file (zeroed after
    the fold, the model saves the same)."""
    model = _chain_and_spare()
    src, out, ref = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "ref.onnx"
    src.write_bytes(model.SerializeToString())
    with mock.patch.object(fold_module, "direct_fold", lambda *a, **k: None):
        want = fold_onnx(src)
    save_onnx(want.model, ref)
    with mock.patch.object(fold_module, "_working_copy", side_effect=AssertionError):
        got = fold_onnx(src)
    assert isinstance(got.model, ir.Model)
    assert got.report == want.report
    _overwrite(src)
    save_onnx(got.model, out)
    assert out.read_bytes() == ref.read_bytes()
    x = feeds(model, seed=4)
    assert rel_err(run_ort(onnx.load(out), x), reference(model, x)) < 1e-5
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(out).graph.node)


def test_a_split_model_off_the_fast_path_keeps_its_views(tmp_path: Path) -> None:
    """A split model the fast path leaves (an Identity between a Conv and its BN) is folded by
    onnx-ir's passes into an ``onnx_ir.Model`` that serializes as the ``ModelProto`` fold's
    result and writes the same bytes; a weight no fold touches is still the file's map, not a
    copy (the CLI writes it from there)."""
    model = _chain_and_spare()
    conv = model.graph.node[0]
    conv.output[0] = "c0_pre"
    model.graph.node.insert(1, onnx.helper.make_node("Identity", ["c0_pre"], ["c0"]))
    path, out, ref = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "ref.onnx"
    path.write_bytes(model.SerializeToString())
    split = read_split(path)
    got, want = fold_onnx(split), fold_onnx(model)
    assert isinstance(got.model, ir.Model) and isinstance(want.model, onnx.ModelProto)
    assert got.report == want.report
    assert ir.serde.serialize_model(got.model).SerializeToString() == \
        want.model.SerializeToString()
    spare = got.model.graph.initializers["spare"].const_value.raw
    held = split.data[len(model.graph.initializer) - 1]
    assert np.shares_memory(spare, held)
    save_onnx(got.model, out)
    save_onnx(want.model, ref)
    assert out.read_bytes() == ref.read_bytes()
    x = feeds(model, seed=6)
    assert rel_err(run_ort(onnx.load(out), x), reference(model, x)) < 1e-5


def test_fold_onnx_of_a_path_onnx_ir_cannot_read_is_one_line_naming_it(tmp_path: Path) -> None:
    tensor = onnx.TensorProto(name="w", data_type=999, dims=[2], raw_data=bytes(8))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [tensor])
    path = tmp_path / "bad.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    with pytest.raises(BadInputError) as info:
        fold_onnx(path)
    assert str(info.value) == (f"{path}: invalid model: tensor 'w' has data_type 999, which is "
                               "no ONNX tensor data type")


def test_an_onnx_ir_read_failure_says_what_its_wrapped_error_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx-ir wraps the error that says what is wrong in one naming its own function."""
    def wrapping(*args: object, **kwargs: object) -> None:
        try:
            raise ValueError("the real problem\nmore")
        except ValueError as exc:
            raise RuntimeError("Error calling _deserialize_graph with: g") from exc

    monkeypatch.setattr(SplitProto, "to_ir", wrapping)
    path = tmp_path / "m.onnx"
    onnx.save(chain_model(1, 4), path)
    with pytest.raises(BadInputError) as info:
        fold_onnx(path)
    assert str(info.value) == f"{path}: could not load the ONNX model (the real problem)"
