"""The streamed model writer (bnfold.io.proto_stream) writes, byte for byte, what protobuf and
onnx-ir would: every dtype, Constant nodes, subgraphs, functions, metadata, tensors above and
below the streaming size (``STREAM_MIN`` also lowered to 1 byte, so that every tensor with
bytes streams), varint lengths of 1 to 4 bytes; the model it is given is left as it was."""

from __future__ import annotations

import io

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper
from onnx_cases import Builder, feeds, reference, rel_err, run_ort

from benchmarks.bench_onnx_fold import chain_model
from bnfold.errors import BadInputError
from bnfold.io import proto_stream
from bnfold.io.external_data import files_named_by
from bnfold.io.fileio import load_onnx, save_onnx
from bnfold.io.proto_stream import (
    copy_fields,
    read_proto,
    stored_bytes,
    tensor_bytes,
    tensor_facts,
    write_model,
    write_proto,
)
from bnfold.passes.onnx.fold import fold_onnx

#: dtype, shape: one initializer each, some over STREAM_MIN (64 KiB), one over 2 MiB.
ARRAYS = [
    (np.float32, (64, 64, 3, 3)), (np.float16, (300, 200)), (ml_dtypes.bfloat16, (256, 257)),
    (np.int8, (70_000,)), (np.uint64, (9000,)), (np.bool_, (66_000,)), (np.float64, (3, 2)),
    (np.int64, (0,)), (np.float32, (1024, 640)),
]


def _zoo(seed: int = 0) -> onnx.ModelProto:
    """Initializers of many dtypes and sizes (also an int4, a string, a float_data one, one
    with a doc string and metadata), a Constant node holding a large tensor, an ``If`` whose
    branch has its own large initializer, a local function, model metadata."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.normal(size=s) * 50).astype(d), f"t{i}")
             for i, (d, s) in enumerate(ARRAYS)]
    inits.append(helper.make_tensor("i4", TensorProto.INT4, [5], [1, -2, 3, -4, 5]))
    inits.append(helper.make_tensor("str", TensorProto.STRING, [2], [b"a", b"bc"]))
    inits.append(helper.make_tensor("fd", TensorProto.FLOAT, [70_000],
                                    rng.normal(size=70_000).astype(np.float32)))
    inits[0].doc_string = "weights"
    inits[0].metadata_props.add(key="origin", value="test")
    branch_w = numpy_helper.from_array(rng.normal(size=(20_000,)).astype(np.float32), "bw")
    then = helper.make_graph([helper.make_node("Identity", ["bw"], ["o1"])], "then", [],
                             [helper.make_tensor_value_info("o1", TensorProto.FLOAT, None)],
                             [branch_w])
    other = helper.make_graph([helper.make_node("Identity", ["t6"], ["o2"])], "else", [],
                              [helper.make_tensor_value_info("o2", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
            rng.normal(size=(40_000,)).astype(np.float32), "k")),
        helper.make_node("Add", ["k", "t8"], ["a"], name="add"),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        helper.make_node("Twice", ["a"], ["z"], domain="local"),
    ]
    twice = helper.make_function("local", "Twice", ["x"], ["y"],
                                 [helper.make_node("Add", ["x", "x"], ["y"])],
                                 [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        nodes, "zoo", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("local", 1)],
                              functions=[twice], producer_name="zoo", doc_string="doc")
    helper.set_model_props(model, {"author": "bnfold"})
    return model


def _numpy_backed(model: ir.Model) -> ir.Model:
    """``model`` with its numeric initializers held as numpy arrays, as a fold leaves them: C
    order, Fortran order and a strided view (copies to write), packed int4 (a copy)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor.dtype in (ir.DataType.STRING,):
            continue
        array = tensor.numpy()
        if value.name == "t0":
            array = np.asfortranarray(array)
        if value.name == "t8":
            array = np.stack([array, array], axis=-1)[..., 0]  # a strided view
        value.const_value = ir.Tensor(array, dtype=tensor.dtype, name=value.name,
                                      doc_string=tensor.doc_string,
                                      metadata_props=dict(tensor.metadata_props))
    return model


@pytest.fixture(params=["default", "everything"])
def stream_min(request, monkeypatch) -> int:
    if request.param == "everything":
        monkeypatch.setattr(proto_stream, "STREAM_MIN", 1)
    return proto_stream.STREAM_MIN


def _written(write, model) -> bytes:
    out = io.BytesIO()
    write(model, out)
    return out.getvalue()


def test_proto_bytes_are_protobufs(stream_min) -> None:
    model = _zoo()
    before = model.SerializeToString()
    assert _written(write_proto, model) == before
    assert model.SerializeToString() == before  # not changed


@pytest.mark.parametrize("backing", ["protos", "arrays"])
def test_ir_bytes_are_onnx_irs(stream_min, backing) -> None:
    model = ir.serde.deserialize_model(_zoo())
    if backing == "arrays":
        model = _numpy_backed(model)
    tensors = {v.name: v.const_value for v in model.graph.initializers.values()}
    want = ir.serde.serialize_model(model).SerializeToString()
    assert _written(write_model, model) == want
    assert {v.name: v.const_value for v in model.graph.initializers.values()} == tensors
    assert all(v.const_value is tensors[v.name] for v in model.graph.initializers.values())
    assert ir.serde.serialize_model(model).SerializeToString() == want


def test_ir_model_is_restored_when_serializing_fails(monkeypatch) -> None:
    model = _numpy_backed(ir.serde.deserialize_model(_zoo()))
    tensors = [v.const_value for v in model.graph.initializers.values()]

    def broken(_model):
        raise RuntimeError("serializer failed")

    monkeypatch.setattr(ir.serde, "serialize_model", broken)
    with pytest.raises(RuntimeError):
        write_model(model, io.BytesIO())
    assert [v.const_value for v in model.graph.initializers.values()] == tensors


def test_folded_chain_saves_as_before(tmp_path) -> None:
    """A folded model (new numpy weights beside loaded protos) saved by save_onnx: the file
    is onnx-ir's serialization; a ModelProto is written as it is."""
    b = Builder(41)
    b.node("Conv", ["x", b.rand("w", [64, 32, 3, 3])], ["c"], pads=[1, 1, 1, 1])
    b.bn("c", "n", 64)
    b.node("Conv", ["n", b.rand("w2", [48, 64, 3, 3])], ["y"])
    model = b.model({"x": [1, 32, 5, 5]}, {"y": None})
    folded = fold_onnx(ir.serde.deserialize_model(model)).model
    save_onnx(folded, tmp_path / "ir.onnx")
    assert (tmp_path / "ir.onnx").read_bytes() == \
        ir.serde.serialize_model(folded).SerializeToString()
    proto = fold_onnx(model).model
    save_onnx(proto, tmp_path / "proto.onnx")
    assert (tmp_path / "proto.onnx").read_bytes() == proto.SerializeToString()
    x = feeds(model)
    for name in ("ir.onnx", "proto.onnx"):
        assert rel_err(run_ort(onnx.load(str(tmp_path / name)), x), reference(model, x)) < 1e-5


def test_a_proto_with_external_data_goes_the_external_way(tmp_path) -> None:
    """A ModelProto whose tensors lie in a file (an initializer, a Constant, a branch's
    initializer) is not written as it is: its data is copied to a new data file beside the
    output, as for an onnx-ir model."""
    b = Builder(42)
    b.node("Conv", ["x", b.rand("w", [16, 8, 3, 3])], ["y"])
    model = b.model({"x": [1, 8, 4, 4]}, {"y": None})
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the tensors of the proto it is given out
    onnx.save(copy, tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert not tensor_facts(proto).writes_as_is(10**9)
    assert tensor_facts(model).writes_as_is(10**9)
    assert not tensor_facts(model).writes_as_is(100)  # over the size limit
    for where in ("constant", "branch"):  # a tensor attribute, a subgraph's initializer
        zoo = _zoo()
        tensor = (zoo.graph.node[0].attribute[0].t if where == "constant" else
                  next(a.g for a in zoo.graph.node[2].attribute if a.name == "then_branch"
                       ).initializer[0])
        tensor.data_location = TensorProto.EXTERNAL
        assert tensor_facts(_zoo()).writes_as_is(10**9), where
        assert not tensor_facts(zoo).writes_as_is(10**9), where
    save_onnx(proto, tmp_path / "out" / "o.onnx", base_dir=tmp_path)
    (data,) = files_named_by(tmp_path / "out" / "o.onnx")
    assert data.parent == (tmp_path / "out").resolve()
    x = feeds(model)
    assert rel_err(run_ort(onnx.load(str(tmp_path / "out" / "o.onnx")), x),
                   run_ort(model, x)) < 1e-6


def test_large_proto_saves_load_back_equal(tmp_path) -> None:
    """A 1-4 byte varint at every level: a proto with a 5 MB tensor, saved and loaded."""
    model = _zoo(1)
    model.graph.initializer.append(numpy_helper.from_array(
        np.arange(1_250_000, dtype=np.float32), "big"))
    save_onnx(model, tmp_path / "big.onnx")
    assert onnx.load(str(tmp_path / "big.onnx")) == model
    loaded = load_onnx(tmp_path / "big.onnx")
    np.testing.assert_array_equal(loaded.graph.initializers["big"].const_value.numpy(),
                                  np.arange(1_250_000, dtype=np.float32))


@pytest.mark.parametrize("suffix", [".onnx", ".bin", ".json"])
def test_read_proto_is_onnx_load(tmp_path, suffix) -> None:
    """A binary file parsed from its memory map, a text one by onnx: as onnx.load; a file
    cut short is refused with protobuf's error, as onnx.load refuses it."""
    path = tmp_path / f"m{suffix}"
    onnx.save(_zoo(), path)
    assert read_proto(path) == onnx.load(str(path), load_external_data=False) == _zoo()
    if suffix != ".json":
        path.write_bytes(path.read_bytes()[:-100])
        with pytest.raises(DecodeError):
            onnx.load(str(path), load_external_data=False)
        with pytest.raises(DecodeError):
            read_proto(path)


def test_tensor_bytes_are_tobytes() -> None:
    """The view a numpy tensor is written from holds ``tobytes()``, for every layout and dtype;
    a view only where no copy is needed."""
    model = _numpy_backed(ir.serde.deserialize_model(_zoo()))
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor.dtype == ir.DataType.STRING:
            continue
        got = tensor_bytes(tensor)
        assert bytes(got) == tensor.tobytes(), value.name
        viewed = isinstance(got, np.ndarray) and np.shares_memory(got, tensor.raw)
        assert viewed == (value.name not in ("t0", "t7", "t8", "i4")), value.name  # t7: empty


def test_a_shared_tensor_is_written_twice_and_named_as_onnx_ir_names_it() -> None:
    model = ir.serde.deserialize_model(_zoo())
    shared = ir.Tensor(np.arange(20_000, dtype=np.float32))
    for name in ("t1", "t2"):
        model.graph.initializers[name].const_value = shared
    got = _written(write_model, model)
    left = shared.name
    assert got == ir.serde.serialize_model(model).SerializeToString()
    assert left == shared.name == "t2"


def test_stored_bytes_is_nbytes() -> None:
    """The size save_onnx weighs against its external-data threshold is onnx-ir's nbytes, for
    tensors held as protos, as arrays (int4 too) and lazily; a string tensor's is its bytes."""
    for model in (ir.serde.deserialize_model(_zoo()),
                  _numpy_backed(ir.serde.deserialize_model(_zoo()))):
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor.dtype == ir.DataType.STRING:
                assert stored_bytes(tensor) == 3, value.name
                continue
            lazy = ir.LazyTensor(lambda t=tensor: t, tensor.dtype, tensor.shape)
            assert stored_bytes(tensor) == stored_bytes(lazy) == tensor.nbytes, value.name


def test_tensor_facts_walk_every_graph_in_order() -> None:
    """One walk finds the initializer bytes (main graph and branch), the first negative dim
    in depth-first order (the main graph's before a branch's), sparse initializers, and a
    tensor stored outside in a sparse value or a Constant."""
    zoo = _zoo()
    facts = tensor_facts(zoo)
    branch = next(a.g for a in zoo.graph.node[2].attribute if a.name == "then_branch")
    every = [*zoo.graph.initializer, *branch.initializer]
    assert facts.initializer_bytes == sum(proto_stream.proto_bytes(t) for t in every)
    assert not facts.external and facts.negative is None and facts.sparse == []
    branch.initializer[0].dims[0] = -1
    assert tensor_facts(zoo).negative.name == "bw"
    zoo.graph.initializer[3].dims.append(-2)
    assert tensor_facts(zoo).negative.name == zoo.graph.initializer[3].name
    sparse = zoo.graph.sparse_initializer.add()
    sparse.values.CopyFrom(helper.make_tensor("sv", TensorProto.FLOAT, [1], [1.0]))
    sparse.dims.append(4)
    assert tensor_facts(zoo).sparse == ["sv"] and not tensor_facts(zoo).external
    sparse.values.data_location = TensorProto.EXTERNAL
    assert tensor_facts(zoo).external
    constant = _zoo()
    constant.graph.node[0].attribute[0].t.data_location = TensorProto.EXTERNAL
    assert tensor_facts(constant).external


def _messages(model: onnx.ModelProto) -> list:
    """``model``, its graph, every initializer, node and function, a branch graph, and a
    tensor whose scalars are set to their defaults (set, so copied)."""
    graph = model.graph
    defaults = onnx.TensorProto(data_type=0, data_location=TensorProto.DEFAULT, name="")
    return [model, graph, *graph.initializer, *graph.node, *model.functions,
            graph.node[2].attribute[0].g, defaults]


@pytest.mark.parametrize("keep", [
    lambda field: True, lambda field: False, lambda field: field.name != "raw_data",
    lambda field: 3 <= field.number <= 9, lambda field: field.number % 2 == 0])
def test_copy_fields_copies_the_kept_set_fields(keep) -> None:
    """The same message as a whole copy with every refused set field cleared."""
    for message in _messages(_zoo()):
        want = type(message)()
        want.CopyFrom(message)
        for field, _ in message.ListFields():
            if not keep(field):
                want.ClearField(field.name)
        got = type(message)()
        copy_fields(message, got, keep)
        assert got == want
        assert got.SerializeToString() == want.SerializeToString()
        assert [f.name for f, _ in got.ListFields()] == [f.name for f, _ in want.ListFields()]


@pytest.mark.parametrize("entry", [("offset", "abc"), ("offset", "-4"), ("length", "1e3"),
                                   ("length", "")])
def test_an_external_entry_that_is_no_count_of_bytes_is_one_line(tmp_path, entry):
    """onnx-ir's reader fails on such an entry with an error naming its own function."""
    model = chain_model(1, 4)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    tensor = proto.graph.initializer[0]
    key, value = entry
    for e in tensor.external_data:
        if e.key == key:
            e.value = value
            break
    else:
        tensor.external_data.add(key=key, value=value)
    onnx.save(proto, tmp_path / "bad.onnx")
    for model_in in (tmp_path / "bad.onnx", proto):
        kwargs = {"base_dir": tmp_path} if isinstance(model_in, onnx.ModelProto) else {}
        with pytest.raises(BadInputError, match=rf"invalid model: tensor 'w0' has external "
                                                rf"data {key} '{value}', which is no count"):
            fold_onnx(model_in, **kwargs)
