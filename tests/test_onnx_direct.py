"""The protobuf fast path (``passes/onnx/direct.py``) equals the full onnx-ir fold.

For every model of a corpus, ``direct_fold`` either declines (``None``: the full path runs)
or returns the model and report the full path returns: the graphs compared after one onnx-ir
round trip (both sides then serialize the same way, so nodes, attributes, initializer bytes,
inputs, outputs and value_info are compared exactly), the reports entry by entry. The cases
that must take the fast path are listed, and folded models are checked against a float64
evaluation of the unfolded model on fresh random inputs.
"""

from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from unittest import mock

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx_cases import (
    Builder,
    constant_node_weight,
    count,
    dynamo_bias_subgraph,
    feeds,
    reference,
    rel_err,
    run_ort,
    shared_weight,
    torch_convtranspose_bn,
)
from test_onnx_fold_zoo import TORCHSCRIPT, _export, _float64_reference
from test_onnx_reach import torchscript_export

from benchmarks.bench_onnx_fold import chain_model
from bnfold.cli import commands as cli
from bnfold.io import filechecks
from bnfold.io.filechecks import check_initializers
from bnfold.io.fileio import load_for_pass, load_split, save_onnx
from bnfold.io.proto_stream import tensor_facts
from bnfold.io.split_proto import SplitProto
from bnfold.models import arch, zoo
from bnfold.passes.onnx import fold as fold_module
from bnfold.passes.onnx.consts import TYPE_ONLY_INPUTS
from bnfold.passes.onnx.direct import _tensor_array, _tensor_arrays, direct_fold
from bnfold.passes.onnx.fold import fold_onnx
from bnfold.passes.onnx.proto_view import GraphView, NotPlain
from bnfold.selection import Selection

TOL = {TensorProto.FLOAT: 1e-5, TensorProto.DOUBLE: 1e-12, TensorProto.FLOAT16: 5e-3,
       TensorProto.BFLOAT16: 8e-3}


@contextmanager
def _no_fast_path():
    with mock.patch.object(fold_module, "direct_fold", lambda *a, **k: None):
        yield


def _full(model: onnx.ModelProto, **kw):
    with _no_fast_path():
        return fold_onnx(model, **kw)


def _normal(model: onnx.ModelProto) -> bytes:
    return ir.serde.serialize_model(ir.serde.deserialize_model(model)).SerializeToString()


def _check(model: onnx.ModelProto, include=None, exclude=None):
    """``direct_fold``'s result (or ``None``), asserted equal to the full path's."""
    before = model.SerializeToString()
    fast = direct_fold(model, select=Selection.of(include, exclude))
    assert model.SerializeToString() == before, "the input was changed"
    if fast is None:
        return None
    full = _full(model, include=include, exclude=exclude)
    assert fast.report.to_dict() == full.report.to_dict()
    assert fast.report.entries == full.report.entries
    assert _normal(fast.model) == _normal(full.model)
    onnx.checker.check_model(fast.model, full_check=True)
    return fast


def _numerics(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """The folded model (ONNX Runtime; onnx's reference evaluator for types ORT lacks) against
    the unfolded one in float64, on fresh random inputs."""
    x = feeds(original, seed=11)
    grouped_transpose = any(n.op_type == "ConvTranspose" for n in original.graph.node)
    want = (torch_convtranspose_bn(original, next(iter(x.values()))) if grouped_transpose
            else reference(original, x))
    dtype = original.graph.input[0].type.tensor_type.elem_type
    ort_types = (TensorProto.FLOAT, TensorProto.FLOAT16)
    got = run_ort(folded, x) if dtype in ort_types else reference(folded, x)
    assert rel_err(got, want) < TOL[dtype]


# ------------------------------------------------------------------ the corpus


def _conv(dtype=TensorProto.FLOAT, bias=True, group=1, unnamed=False, out_is_output=False,
          metadata=False, seed=0) -> onnx.ModelProto:
    b = Builder(seed, dtype)
    inputs = ["x", b.rand("w", [6, 6 // group, 3, 3])] + ([b.rand("cb", [6])] if bias else [])
    b.node("Conv", inputs, ["c"], pads=[1, 1, 1, 1], group=group)
    b.bn("c", "y", 6)
    b.node("Relu", ["y"], ["r"])
    if unnamed:
        for node in b.nodes:
            node.name = ""
    if metadata:
        helper.set_metadata_props(b.nodes[1], {
            "pkg.torch.onnx.name_scopes": "['', 'features', 'features.1', 'op']"})
    outputs = {"r": None, "y": None} if out_is_output else {"r": None}
    return b.model({"x": [2, 6, 5, 5]}, outputs)


def _conv_transpose(group=2, bias=True, seed=0) -> onnx.ModelProto:
    b = Builder(seed)
    inputs = ["x", b.rand("w", [4, 6 // group, 3, 3])] + ([b.rand("cb", [6])] if bias else [])
    b.node("ConvTranspose", inputs, ["c"], group=group, strides=[2, 2])
    b.bn("c", "y", 6)
    return b.model({"x": [2, 4, 3, 3]}, {"y": None})


def _gemm(trans_b=0, bias_shape=(5,), alpha=1.0, beta=1.0, dtype=TensorProto.FLOAT,
          seed=0) -> onnx.ModelProto:
    b = Builder(seed, dtype)
    inputs = ["x", b.rand("w", [5, 4] if trans_b else [4, 5])]
    if bias_shape is not None:
        inputs.append(b.rand("gc", list(bias_shape)))
    b.node("Gemm", inputs, ["g"], transB=trans_b, alpha=alpha, beta=beta)
    b.bn("g", "y", 5)
    return b.model({"x": [3, 4]}, {"y": None})


def _constant_parameters(shared: bool) -> onnx.ModelProto:
    """Affine-less BNs as TorchScript exports them: scale and B are Constant nodes (pruned
    with the BN; ``shared``: one pair read by two BNs)."""
    b = Builder(6)
    for i in range(2):
        b.node("Conv", ["x" if i == 0 else "y0", b.rand(f"w{i}", [4, 4, 1, 1])], [f"c{i}"])
        b.bn(f"c{i}", f"y{i}", 4)
        if i == 0 or not shared:
            ones, zeros = (helper.make_tensor(f"t{i}{v}", TensorProto.FLOAT, [4], [v] * 4)
                           for v in (1, 0))
            b.nodes.insert(0, helper.make_node("Constant", [], [f"one{i}"], value=ones))
            b.nodes.insert(0, helper.make_node("Constant", [], [f"zero{i}"], value=zeros))
        k = 0 if shared else i
        b.nodes[-1].input[1:3] = [f"one{k}", f"zero{k}"]
    b.inits = [t for t in b.inits if not t.name.endswith(("_scale", "_B"))]
    return b.model({"x": [2, 4, 3, 3]}, {"y1": None})


def _partly_plain() -> onnx.ModelProto:
    """One plain Conv+BN and one BN after a Relu (kept): the whole model takes the full
    path."""
    b = Builder(3)
    b.node("Conv", ["x", b.rand("w", [4, 4, 1, 1])], ["c"])
    b.bn("c", "y", 4)
    b.node("Relu", ["y"], ["r"])
    b.bn("r", "z", 4)
    return b.model({"x": [2, 4, 3, 3]}, {"z": None})


def _affine_after_conv() -> onnx.ModelProto:
    """Conv+BN, then a BN-like ``Mul`` by a per-channel constant (an affine site)."""
    b = Builder(4)
    b.node("Conv", ["x", b.rand("w", [4, 4, 1, 1])], ["c"])
    b.bn("c", "y", 4)
    b.node("Mul", ["y", b.rand("k", [4, 1, 1])], ["z"])
    return b.model({"x": [2, 4, 3, 3]}, {"z": None})


def _training_bn() -> onnx.ModelProto:
    b = Builder(5)
    b.node("Conv", ["x", b.rand("w", [4, 4, 1, 1])], ["c"])
    b.bn("c", "y", 4, training_mode=1)
    b.nodes[-1].output.extend(["running_mean", "running_var"])
    return b.model({"x": [2, 4, 3, 3]}, {"y": None})


def _weight_is_input() -> onnx.ModelProto:
    m = _conv()
    m.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [6, 6, 3, 3]))
    return m


def _dynamo_cones(fill: float = 0.0, spare: bool = False, batch: int | str = 2,
                  graph_output: bool = False, typed: bool = False,
                  bn_output: bool = False) -> onnx.ModelProto:
    """Two Conv + BN, each with the zero bias dynamo writes (``optimize=False``):
    ``Expand(CastLike(c, x), Expand(Shape(w)[0:1], [1]))``, the scalar ``c`` one ``Constant``
    both cones read. ``fill``: ``c``; ``spare``: a third Conv, with no BN, reads the second
    cone's bias (the cone must stay); ``batch``: the first dim of ``x`` (a symbolic one: the
    full path cannot evaluate ``CastLike``); ``graph_output``: the first cone's ``CastLike``
    output is also a graph output (it must stay); ``typed``: another ``CastLike``, a graph
    output, reads the type of the first Conv's output (its BN still folds); ``bn_output``: the
    first BN's output is a graph output too."""
    b = Builder(3)
    b.node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(fill, np.float32)))
    x = "x"
    for i in range(2):
        w = b.rand(f"w{i}", [4, 4 if i else 3, 1, 1])
        b.node("Shape", [w], [f"s{i}"], start=0, end=1)
        b.node("Constant", [], [f"one{i}"], value_ints=[1])
        b.node("Expand", [f"s{i}", f"one{i}"], [f"n{i}"])
        b.node("CastLike", ["c", x], [f"z{i}"])
        b.node("Expand", [f"z{i}", f"n{i}"], [f"bias{i}"])
        b.node("Conv", [x, w, f"bias{i}"], [f"l{i}"])
        x = b.node("Relu", [b.bn(f"l{i}", f"y{i}", 4)], [f"r{i}"])
    outputs: dict[str, None] = {x: None}
    if spare:
        outputs[b.node("Conv", [x, "w1", "bias1"], ["spare"])] = None
    if graph_output:
        outputs["z0"] = None
    if typed:
        outputs[b.node("CastLike", ["c", "l0"], ["typed"])] = None
    if bn_output:
        outputs["y0"] = None
    return b.model({"x": [batch, 3, 4, 4]}, outputs)


def _dynamo_affine_less(batch: int | str = 2) -> onnx.ModelProto:
    """Conv + BN without affine parameters as dynamo writes it (``optimize=False``): scale
    ``Expand(CastLike([1.0], l), Shape(l)[1:2])`` and B the same with 0, ``l`` the Conv
    output (read for its type only)."""
    b = Builder(5)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1]), b.rand("b", [4])], ["l"])
    fills = []
    for name, value in (("scale", 1.0), ("B", 0.0)):
        b.node("Constant", [], [f"{name}_c"], value_floats=[value])
        b.node("CastLike", [f"{name}_c", "l"], [f"{name}_like"])
        b.node("Shape", ["l"], [f"{name}_n"], start=1, end=2)
        fills.append(b.node("Expand", [f"{name}_like", f"{name}_n"], [name]))
    mean = b.init("mean", b.rng.normal(0, 0.5, [4]))
    var = b.init("var", b.rng.random([4]) * 2.7 + 0.3)
    b.node("BatchNormalization", ["l", *fills, mean, var], ["y"])
    return b.model({"x": [batch, 3, 4, 4]}, {b.node("Relu", ["y"], ["r"]): None})


def _documented_output() -> onnx.ModelProto:
    """Conv + BN whose BN output is a graph output declared with a doc string and metadata
    (dynamo marks user outputs so), its layer output declared with others."""
    model = _conv(out_is_output=True)
    out = next(o for o in model.graph.output if o.name == "y")
    out.doc_string = "the features"
    helper.set_metadata_props(out, {"pkg.torch.export.graph_signature.OutputSpec.kind":
                                    "USER_OUTPUT"})
    info = next(v for v in model.graph.value_info if v.name == "c")
    info.doc_string = "the conv output"
    helper.set_metadata_props(info, {"note": "conv"})
    return model


def test_a_renamed_graph_output_keeps_its_declaration() -> None:
    """The layer output that takes over a folded BN's graph output takes its doc string and
    metadata too (the output's declaration is unchanged); the fast path gives the same."""
    model = _documented_output()
    for folded in (_full(model).model, _check(model).model):
        _numerics(model, folded)
        out = next(o for o in folded.graph.output if o.name == "y")
        assert out.doc_string == "the features"
        assert {p.key: p.value for p in out.metadata_props} == {
            "pkg.torch.export.graph_signature.OutputSpec.kind": "USER_OUTPUT"}
        assert "c" not in {v.name for v in folded.graph.value_info}


PLAIN = {
    "chain": lambda: chain_model(4, 6, kernel=3),
    "chain, weights folded one by one": lambda: chain_model(3, 96, kernel=3),  # > 2**16 each
    "conv": _conv,
    "conv no bias": lambda: _conv(bias=False),
    "conv grouped": lambda: _conv(group=3),
    "conv fp16": lambda: _conv(TensorProto.FLOAT16),
    "gemm bf16": lambda: _gemm(dtype=TensorProto.BFLOAT16),
    "conv fp64": lambda: _conv(TensorProto.DOUBLE),
    "unnamed": lambda: _conv(unnamed=True),
    "BN output is a graph output": lambda: _conv(out_is_output=True),
    "unnamed, BN output is a graph output": lambda: _conv(unnamed=True, out_is_output=True),
    "torch metadata": lambda: _conv(metadata=True),
    "convtranspose grouped": _conv_transpose,
    "convtranspose no bias": lambda: _conv_transpose(group=1, bias=False),
    "gemm": _gemm,
    "gemm transB alpha beta": lambda: _gemm(1, alpha=0.7, beta=0.3),
    "gemm no C": lambda: _gemm(bias_shape=None, beta=0.5),
    "gemm C [1]": lambda: _gemm(bias_shape=(1,)),
    "gemm C [M, N]": lambda: _gemm(1, bias_shape=(3, 5), beta=2.0),
    "gemm fp16": lambda: _gemm(dtype=TensorProto.FLOAT16),
    "shared weight": lambda: shared_weight(0),
    "Constant node parameters": lambda: _constant_parameters(shared=False),
    "Constant node parameters, shared": lambda: _constant_parameters(shared=True),
    "dynamo bias subgraph": lambda: dynamo_bias_subgraph(0),
    "dynamo bias cones, one shared Constant": _dynamo_cones,
    "dynamo bias cones filled with 0.5": lambda: _dynamo_cones(fill=0.5),
    "dynamo bias cone also read by a Conv without BN": lambda: _dynamo_cones(spare=True),
    "dynamo bias cone, a CastLike that is a graph output":
        lambda: _dynamo_cones(graph_output=True),
    "a layer output whose type another node reads": lambda: _dynamo_cones(typed=True),
    "dynamo BN without affine parameters": _dynamo_affine_less,
}
NOT_PLAIN = {
    "partly plain": _partly_plain,
    "affine Mul after": _affine_after_conv,
    "training-mode BN": _training_bn,
    "weight is a graph input": _weight_is_input,
    "Constant node weight": lambda: constant_node_weight(0),
    "dynamo bias cone on a symbolic batch": lambda: _dynamo_cones(batch="n"),
    "dynamo BN without affine parameters on a symbolic batch":
        lambda: _dynamo_affine_less(batch="n"),
    "a type-read layer output whose BN output is a graph output":
        lambda: _dynamo_cones(typed=True, bn_output=True),
    "IR version 3": lambda: _edited(_conv(), lambda m: setattr(m, "ir_version", 3)),
    "training info": lambda: _edited(_conv(), lambda m: m.training_info.add()),
    "invalid BN": lambda: _edited(_conv(), lambda m: m.graph.initializer[2].dims.__setitem__(
        0, 2)),
    "negative variance after a large weight": lambda: _edited(
        chain_model(2, 96, kernel=3), _negative_variance),
}


def _negative_variance(model: onnx.ModelProto) -> None:
    """The last BN's running variance made negative (the algebra refuses that fold)."""
    name = [n for n in model.graph.node if n.op_type == "BatchNormalization"][-1].input[4]
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor) - 1, name))


def _edited(model: onnx.ModelProto, edit) -> onnx.ModelProto:
    edit(model)
    return model


@pytest.mark.parametrize("name", PLAIN)
def test_plain_models_take_the_fast_path_and_equal_the_full_one(name: str) -> None:
    model = PLAIN[name]()
    fast = _check(model)
    assert fast is not None, f"{name}: not folded directly"
    assert count(fast.model) == 0 and len(fast.report.folded) == count(model)
    _numerics(model, fast.model)


@pytest.mark.parametrize("name", NOT_PLAIN)
def test_other_models_take_the_full_path(name: str) -> None:
    assert _check(NOT_PLAIN[name]()) is None


def test_selections_that_exclude_a_bn_take_the_full_path() -> None:
    model = _conv(metadata=True)
    assert _check(model, exclude="features.*") is None
    assert _check(model, include="nothing") is None
    assert _check(model, include="features.1") is not None  # selects every BN


def test_fold_onnx_of_a_plain_proto_never_builds_an_onnx_ir_model() -> None:
    model = chain_model(3, 4)
    want = _full(model)
    with mock.patch.object(fold_module, "_working_copy", side_effect=AssertionError):
        got = fold_onnx(model)
    assert got.model.SerializeToString() != model.SerializeToString()
    assert _normal(got.model) == _normal(want.model) and got.report == want.report


def test_cli_folds_a_plain_file_on_the_protobuf(tmp_path, capsys) -> None:
    """``bnfold fold`` of a single-file plain model: no onnx-ir model is built to fold it,
    and the file written equals the full path's model; the report is the full path's."""
    model = chain_model(3, 4)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    want = _full(model)
    with mock.patch.object(fold_module, "_working_copy", side_effect=AssertionError):
        assert cli.main(["fold", str(src), "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fold"] == want.report.to_dict()
    assert _normal(onnx.load(out)) == _normal(want.model)
    assert src.read_bytes() == model.SerializeToString()


def test_progress_is_the_full_paths() -> None:
    model = chain_model(5, 4)
    fast_calls: list[tuple[int, int]] = []
    full_calls: list[tuple[int, int]] = []
    assert direct_fold(model, progress=lambda *a: fast_calls.append(a)) is not None
    _full(model, progress=lambda *a: full_calls.append(a))
    assert fast_calls == full_calls == [(i, 5) for i in range(1, 6)]


# ------------------------------------------------------------------ zoo exports

#: Exports whose every BN follows a plain layer: folded on the protobuf (convtranspose_decoder
#: has an affine-less BN whose scale and B are Constant nodes; in the dynamo exports, convs'
#: zero biases and affine-less BNs' parameters are fills, :mod:`bnfold.passes.onnx.dynamo_fills`).
PLAIN_EXPORTS = {("plain_cnn", False), ("resnet_small", False), ("mlp_bn1d", True),
                 ("plain_cnn", True), ("resnet_small", True), ("mobilenet_blocks", True),
                 ("shared_conv", True), ("convtranspose_decoder", True), ("conv1d_net", True),
                 ("conv3d_net", True), ("mlp_heads", True)}


@pytest.mark.parametrize(("name", "dynamo"),
                         [(n, True) for n in zoo.ZOO] + [(n, False) for n in TORCHSCRIPT])
def test_zoo_exports_equal_the_full_path(name: str, dynamo: bool) -> None:
    model = _export(name, dynamo)
    fast = _check(model)
    if (name, dynamo) in PLAIN_EXPORTS:
        assert fast is not None, f"{name}: not folded directly"
    if fast is not None:  # against the unfolded torch model in float64, on a fresh input
        x = zoo.example_input(name, seed=7)
        got = run_ort(fast.model, {model.graph.input[0].name: x.numpy()})
        assert rel_err(got, _float64_reference(name, x)) < TOL[TensorProto.FLOAT]


#: Architectures whose exports keep BNs a fold cannot remove (the onnx-ir path says why).
ARCH_KEPT = {"densenet121", "repvgg_a0", "mobileone_s0"}


@pytest.mark.parametrize("name", list(arch.ARCHS))
def test_architecture_exports_equal_the_full_path(name: str) -> None:
    """Narrow TorchScript exports of the full-size families: every one without a BN to keep
    folds on the protobuf (ShuffleNet's ``chunk`` exports as integer ``Div``/``Mul`` shape
    arithmetic, which is no BN-like affine chain), equal to the full path."""
    model = arch.get(name, width=0.125)
    x = arch.example_input(name, small=True)
    proto = torchscript_export(model, x)
    fast = _check(proto)
    assert (fast is None) == (name in ARCH_KEPT)
    if fast is not None:
        fresh = arch.example_input(name, seed=7, small=True)
        with torch.no_grad():
            want = model.double()(fresh.double())
        wants = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
        got = run_ort(fast.model, {proto.graph.input[0].name: fresh.numpy()})
        assert rel_err(got, wants) < TOL[TensorProto.FLOAT]


def _shape_arithmetic(dtype: int) -> onnx.ModelProto:
    """Conv+BN, then ``Div``/``Mul`` of a value read off the input's shape by Constants of
    ``dtype``: integer shape arithmetic (no affine site) or a float ``Mul`` (possibly one)."""
    b = Builder(6)
    b.node("Conv", ["x", b.rand("w", [4, 4, 1, 1])], ["c"])
    b.bn("c", "y", 4)
    b.node("Shape", ["x"], ["s"])
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    b.node("Constant", [], ["two"], value=numpy_helper.from_array(np.array([2], np_type)))
    b.node("Cast", ["s"], ["sc"], to=dtype)
    b.node("Div", ["sc", "two"], ["half"])
    b.node("Mul", ["half", "two"], ["even"])
    b.node("Cast", ["even"], ["dims"], to=TensorProto.FLOAT)
    return b.model({"x": [2, 4, 3, 3]}, {"y": None, "dims": None})


def test_integer_shape_arithmetic_stays_on_the_fast_path() -> None:
    assert _check(_shape_arithmetic(TensorProto.INT64)) is not None
    assert _check(_shape_arithmetic(TensorProto.FLOAT)) is None


# ------------------------------------------------------------------ random plain graphs

_DTYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@st.composite
def _plain_graphs(draw) -> onnx.ModelProto:
    """Chains of Conv / ConvTranspose / Gemm + BN, with or without bias (a Conv's possibly the
    zero bias dynamo computes, its scalar one shared ``Constant``), some layers sharing a
    weight, some BN outputs graph outputs, some nodes unnamed."""
    dtype = draw(st.sampled_from(_DTYPES))
    b = Builder(draw(st.integers(0, 2**16)), dtype)
    spatial = draw(st.booleans()) and dtype != TensorProto.BFLOAT16  # (no bf16 Conv at 17)
    c = draw(st.sampled_from([2, 4, 6]))
    x, outputs = "x", {}
    shared: dict[tuple, str] = {}
    for i in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["Conv", "ConvTranspose"] if spatial else ["Gemm"]))
        group = draw(st.sampled_from([1, 2])) if spatial else 1
        trans_b = draw(st.integers(0, 1))
        shape = [c, c // group, 1, 1] if spatial else [c, c]
        key = (op, group)
        if key in shared and draw(st.booleans()):
            w = shared[key]
        else:
            w = shared[key] = b.rand(f"w{i}", shape)
        inputs = [x, w]
        bias = draw(st.sampled_from(["tensor", "none"] + (["fill"] if op == "Conv" else [])))
        if bias == "tensor":
            inputs.append(b.rand(f"b{i}", [c]))
        elif bias == "fill":  # dynamo's zero bias (dynamo_fills.py)
            if not any(n.output[0] == "zero" for n in b.nodes):
                b.node("Constant", [], ["zero"],
                       value=numpy_helper.from_array(np.array(0, np.float32)))
            start, end = draw(st.sampled_from([(0, 1), (-4, -3), (-9, 1)]))  # all dim 0
            shape = b.node("Shape", [w], [f"s{i}"], start=start, end=end)
            if draw(st.booleans()):  # dynamo's own form: that expanded to shape [1]
                b.node("Constant", [], [f"one{i}"], value_ints=[1])
                shape = b.node("Expand", [shape, f"one{i}"], [f"len{i}"])
            b.node("CastLike", ["zero", x], [f"z{i}"])
            inputs.append(b.node("Expand", [f"z{i}", shape], [f"cone{i}"]))
        attrs = ({"group": group} if spatial else
                 {"transB": trans_b, "alpha": draw(st.sampled_from([1.0, 0.5])),
                  "beta": draw(st.sampled_from([1.0, 0.25]))})
        b.node(op, inputs, [f"l{i}"], **attrs)
        b.bn(f"l{i}", f"n{i}", c)
        if draw(st.booleans()):
            outputs[f"n{i}"] = None
        x = b.node("Relu", [f"n{i}"], [f"r{i}"])
        if draw(st.booleans()):
            b.nodes[-3].name = ""
    outputs[x] = None
    return b.model({"x": [2, c, 3, 3] if spatial else [3, c]}, outputs)


@settings(database=None, derandomize=True, deadline=None, max_examples=60)
@given(_plain_graphs())
def test_random_plain_graphs_fold_directly_as_the_full_path_does(model) -> None:
    assert _check(model) is not None


# ------------------------------------------------------------------ bulk readers


def _tensors() -> list[onnx.TensorProto]:
    """Raw tensors of several dtypes and shapes (some alike, one scalar, one empty, two alike
    over the stacking limit), one of float_data and one of a non-float type."""
    b = Builder(9)
    for i, (shape, dtype) in enumerate([([4], TensorProto.FLOAT), ([2, 3], TensorProto.FLOAT),
                                        ([4], TensorProto.FLOAT), ([4], TensorProto.FLOAT16),
                                        ([], TensorProto.FLOAT), ([0, 2], TensorProto.DOUBLE),
                                        ([4], TensorProto.BFLOAT16), ([2, 3], TensorProto.FLOAT),
                                        ([3], TensorProto.DOUBLE), ([300, 300], TensorProto.FLOAT),
                                        ([300, 300], TensorProto.FLOAT)]):  # (read alone)
        b.init(f"t{i}", b.rng.normal(size=shape), dtype)
    return [*b.inits, helper.make_tensor("f", TensorProto.FLOAT, [2], [1.5, -2.0]),
            helper.make_tensor("i", TensorProto.INT64, [3], [1, 2, 3])]


def _held_apart(tensors: list[onnx.TensorProto]) -> tuple[list[onnx.TensorProto],
                                                          list[np.ndarray | None]]:
    """Copies of ``tensors``, every other raw float one hollow (empty ``raw_data``) with its
    bytes held apart in a ``uint8`` array at an odd offset (as a view of a file map may be)."""
    copies, held = [], []
    for i, tensor in enumerate(tensors):
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        data = None
        if i % 2 and tensor.HasField("raw_data") and tensor.data_type != TensorProto.INT64:
            data = np.frombuffer(b"\0" + tensor.raw_data, np.uint8)[1:]
            copy.raw_data = b""
        copies.append(copy)
        held.append(data)
    return copies, held


@pytest.mark.parametrize("apart", [False, True], ids=["in the proto", "held apart"])
def test_bulk_tensor_reading_equals_reading_each_tensor(apart: bool) -> None:
    tensors = _tensors()
    read, held = _held_apart(tensors) if apart else (tensors, [None] * len(tensors))
    assert any(h is not None for h in held) or not apart
    got = _tensor_arrays(read, [tuple(t.dims) for t in read], held)
    for tensor, arr, copy, data in zip(tensors, got, read, held, strict=True):
        want = _tensor_array(tensor)
        assert type(arr) is np.ndarray, tensor.name
        assert (arr.dtype, arr.shape) == (want.dtype, want.shape), tensor.name
        assert arr.tobytes() == want.tobytes() == _tensor_array(copy, data).tobytes(), \
            tensor.name


def test_bulk_tensor_reading_refuses_data_that_does_not_fill_its_shape() -> None:
    tensors = _tensors()
    tensors[2].raw_data = tensors[2].raw_data[:-4]
    with pytest.raises(NotPlain):
        _tensor_array(tensors[2])
    with pytest.raises(NotPlain):
        _tensor_arrays(tensors, [tuple(t.dims) for t in tensors], [None] * len(tensors))
    read, held = _held_apart(_tensors())
    held[3] = held[3][:-1]  # (t3, fp16, held apart one byte short)
    with pytest.raises(NotPlain):
        _tensor_arrays(read, [tuple(t.dims) for t in read], held)


def _scan_node_by_node(graph: onnx.GraphProto) -> tuple[dict, dict, set]:
    """Producers, readers and possibly-constant values of ``graph`` read one node at a time
    in graph order (what :class:`GraphView` computes over whole lists); :class:`NotPlain` for a
    value read before it is produced or produced twice."""
    constant = {t.name for t in graph.initializer}
    known = constant | {v.name for v in graph.input}
    producer: dict[str, int] = {}
    readers: dict[str, list[tuple[int, int]]] = {}
    for index, node in enumerate(graph.node):
        default = node.domain in ("", "ai.onnx")
        type_only = TYPE_ONLY_INPUTS.get(node.op_type, ()) if default else ()
        is_constant = default
        for i, name in enumerate(node.input):
            if name:
                if name not in known:
                    raise NotPlain("read before it is produced")
                readers.setdefault(name, []).append((index, i))
                is_constant = is_constant and (name in constant or i in type_only)
        for name in filter(None, node.output):
            if name in known:
                raise NotPlain("produced twice")
            known.add(name)
            producer[name] = index
            if is_constant:
                constant.add(name)
    return producer, readers, constant


@st.composite
def _dags(draw) -> onnx.GraphProto:
    """Graphs of Constant, Shape, CastLike, Add, Clip (an omitted input) and custom-domain
    nodes over a graph input and an initializer, some reading a later value or their own
    output, some producing a name twice."""
    values, nodes = ["x", "k"], []
    for index in range(draw(st.integers(1, 12))):
        op = draw(st.sampled_from(["Constant", "Shape", "CastLike", "Add", "Clip", "Foo"]))
        arity = {"Constant": 0, "Shape": 1, "Clip": 3, "Foo": 1}.get(op, 2)
        inputs = [draw(st.sampled_from(values)) for _ in range(arity)]
        if inputs and draw(st.integers(0, 9)) == 0:
            inputs[0] = draw(st.sampled_from(["later", f"v{index}"]))
        if op == "Clip":
            inputs[1] = ""
        output = draw(st.sampled_from(values)) if draw(st.integers(0, 14)) == 0 else f"v{index}"
        nodes.append(helper.make_node(op, inputs, [output], domain="custom" if op == "Foo"
                                      else draw(st.sampled_from(["", "ai.onnx"]))))
        values.append(output)
    return helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [],
        [helper.make_tensor("k", TensorProto.FLOAT, [1], [1.0])])


@settings(database=None, derandomize=True, deadline=None, max_examples=200)
@given(_dags())
def test_the_graph_scan_equals_a_node_by_node_scan(graph) -> None:
    try:
        want = _scan_node_by_node(graph)
    except NotPlain:
        with pytest.raises(NotPlain):
            GraphView(graph)
        return
    view = GraphView(graph)
    assert (view.producer, view.readers, view.constant) == want


def test_the_fast_path_leaves_no_reference_cycles() -> None:
    """The graph view and its node views are freed by reference counting as the fold returns:
    a cycle among them would leave a large graph's many small objects to the cyclic
    collector, whose scan of them cost about a tenth of the fold."""
    model = chain_model(20, 4, kernel=1)
    gc.collect()
    gc.disable()
    try:
        result = direct_fold(model)
        assert result is not None
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_fill_over_max_const_elements_takes_the_full_path() -> None:
    """``max_const_elements`` bounds a dynamo fill as it bounds any computed constant: over it,
    the full path runs and keeps the BN, saying why; at it, the fast path folds."""
    model = _dynamo_cones()  # fills of 4 elements
    assert direct_fold(model, max_const_elements=3) is None
    got, want = fold_onnx(model, max_const_elements=3), _full(model, max_const_elements=3)
    assert got.report.entries == want.report.entries
    assert any("max_const_elements" in (e.reason or "") for e in got.report.entries)
    assert _check_budget(model, 4) is not None


def _check_budget(model: onnx.ModelProto, budget: int):
    fast = direct_fold(model, max_const_elements=budget)
    if fast is not None:
        assert _normal(fast.model) == _normal(_full(model, max_const_elements=budget).model)
        _numerics(model, fast.model)
    return fast


@st.composite
def _fill_graphs(draw) -> onnx.ModelProto:
    """Conv + BN chains whose conv biases are dynamo fills in their variants: the scalar
    ``c`` (0 or another value, one shared ``Constant`` or one each), the weight's first dim
    picked by positive or negative ``start``/``end``, the length expanded to ``[1]`` or not,
    some BNs without affine parameters (their scale and B fills of the conv output's
    channel dim), a fill also read by a Conv without BN."""
    dtype = draw(st.sampled_from((TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)))
    b = Builder(draw(st.integers(0, 2**16)), dtype)
    c = draw(st.sampled_from([2, 4]))
    shared = draw(st.booleans())
    value = draw(st.sampled_from([0.0, 0.5, -1.25]))
    x, outputs = "x", {}

    def fill(name: str, like: str, length: tuple[str, int, int]) -> str:
        scalar = "c" if shared else f"{name}_c"
        if not any(n.output[0] == scalar for n in b.nodes):
            b.node("Constant", [], [scalar], value=numpy_helper.from_array(
                np.array(value, np.float32)))
        n = b.node("Shape", [length[0]], [f"{name}_n"], start=length[1], end=length[2])
        if draw(st.booleans()):
            b.node("Constant", [], [f"{name}_one"], value_ints=[1])
            n = b.node("Expand", [n, f"{name}_one"], [f"{name}_len"])
        b.node("CastLike", [scalar, like], [f"{name}_like"])
        return b.node("Expand", [f"{name}_like", n], [name])

    for i in range(draw(st.integers(1, 3))):
        w = b.rand(f"w{i}", [c, c, 1, 1])
        start, end = draw(st.sampled_from([(0, 1), (-4, -3), (-9, 1)]))
        bias = fill(f"bias{i}", x, (w, start, end))
        b.node("Conv", [x, w, bias], [f"l{i}"])
        if draw(st.booleans()):  # an affine-less BN: its scale and B are fills too
            mean = b.init(f"mean{i}", b.rng.normal(0, 0.5, [c]))
            var = b.init(f"var{i}", b.rng.random([c]) * 2.7 + 0.3)
            scale = fill(f"scale{i}", f"l{i}", (f"l{i}", 1, 2))
            shift = fill(f"shift{i}", f"l{i}", (f"l{i}", -3, -2))
            b.node("BatchNormalization", [f"l{i}", scale, shift, mean, var], [f"n{i}"])
        else:
            b.bn(f"l{i}", f"n{i}", c)
        x = b.node("Relu", [f"n{i}"], [f"r{i}"])
        if draw(st.booleans()):
            outputs[b.node("Conv", [x, w, bias], [f"spare{i}"])] = None
    outputs[x] = None
    return b.model({"x": [2, c, 3, 3]}, outputs)


@settings(database=None, derandomize=True, deadline=None, max_examples=40)
@given(_fill_graphs())
def test_random_dynamo_fills_fold_directly_as_the_full_path_does(model) -> None:
    fast = _check(model)
    assert fast is not None
    _numerics(model, fast.model)


def test_a_budget_under_the_weights_rank_takes_the_full_path() -> None:
    """The full path counts ``Shape(w)``'s result as ``w``'s rank (4) before the slice: with a
    budget of 3 it cannot evaluate a fill of 2 elements, and neither path folds by it."""
    b = Builder(3)
    b.node("Shape", [b.rand("w", [2, 3, 1, 1])], ["s"], start=0, end=1)
    b.node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(0.0, np.float32)))
    b.node("CastLike", ["c", "x"], ["z"])
    b.node("Expand", ["z", "s"], ["bias"])
    b.node("Conv", ["x", "w", "bias"], ["l"])
    b.bn("l", "y", 2)
    small = b.model({"x": [2, 3, 4, 4]}, {"y": None})
    assert direct_fold(small, max_const_elements=3) is None
    assert _full(small, max_const_elements=3).report.entries[0].action == "kept"
    assert _check_budget(small, 4) is not None


def _external_tensor(model: onnx.ModelProto) -> None:
    """An unread initializer stored outside the file."""
    tensor = model.graph.initializer.add(name="outside", data_type=TensorProto.FLOAT, dims=[2])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="outside.bin")


def _negative_dim(model: onnx.ModelProto) -> None:
    """An unread initializer with a negative dim."""
    model.graph.initializer.add(name="negative", data_type=TensorProto.FLOAT, dims=[-2, -1],
                                raw_data=np.zeros(2, np.float32).tobytes())


@pytest.mark.parametrize("edit", [_external_tensor, _negative_dim])
def test_any_external_or_negatively_shaped_initializer_takes_the_full_path(edit) -> None:
    """The checks over every initializer, read off the graph view, refuse even a tensor no
    fold reads."""
    assert direct_fold(_conv()) is not None
    assert direct_fold(_edited(_conv(), edit)) is None


# ------------------------------------------------------------------ tensor facts carried


def _carried(model: onnx.ModelProto) -> SplitProto:
    """``model`` as a SplitProto that carries its tensor facts, as load_split makes it."""
    return SplitProto(model, facts=check_initializers(model, "model"))


def _check_facts(model: onnx.ModelProto) -> None:
    """The fast path's fold of ``model`` carrying its facts (its checks then skip the walk of
    its initializers) equals the fold of it carrying none, and carries the facts of its
    output that a walk of it finds."""
    carried = direct_fold(_carried(model))
    bare = direct_fold(SplitProto(model))
    assert (carried is None) == (bare is None)
    if carried is not None:
        assert carried.model.whole().SerializeToString() == \
            bare.model.whole().SerializeToString()
        assert carried.report.to_dict() == bare.report.to_dict()
        assert carried.model.facts == tensor_facts(carried.model.whole())
        assert bare.model.facts is None


@pytest.mark.parametrize("name", [*PLAIN, *NOT_PLAIN])
def test_a_fold_of_a_model_carrying_its_facts_equals_one_without(name: str) -> None:
    _check_facts({**PLAIN, **NOT_PLAIN}[name]())


def test_facts_of_a_fold_that_keeps_most_tensors() -> None:
    """The output's initializer bytes counted over the few tensors the fold dropped or
    replaced (one Conv -> BN among convs without BN, and a string tensor kept)."""
    model = chain_model(1, 6, kernel=3)
    graph, rng, x = model.graph, np.random.default_rng(0), model.graph.output[0].name
    for i in range(4):
        graph.initializer.extend([
            numpy_helper.from_array(rng.normal(size=(6, 6, 1, 1)).astype(np.float32), f"w_{i}"),
            numpy_helper.from_array(rng.normal(size=6).astype(np.float32), f"b_{i}")])
        graph.node.append(helper.make_node("Conv", [x, f"w_{i}", f"b_{i}"], [f"y_{i}"]))
        x = f"y_{i}"
    graph.initializer.append(numpy_helper.from_array(np.array(["a", "bc"], dtype=object), "s"))
    graph.output[0].name = x
    graph.output.append(helper.make_tensor_value_info("s", TensorProto.STRING, [2]))
    assert direct_fold(SplitProto(model)) is not None
    _check_facts(model)


@settings(database=None, derandomize=True, deadline=None, max_examples=30)
@given(_plain_graphs())
def test_random_folds_carrying_facts_equal_those_without(model) -> None:
    _check_facts(model)


@pytest.mark.parametrize(("make", "expected"), [(lambda: chain_model(4, 6, kernel=3), 1),
                                             (_partly_plain, 1)],
                         ids=["fast path", "onnx-ir path"])
def test_the_cli_route_walks_the_inputs_tensors_once(make, expected, tmp_path,
                                                   monkeypatch) -> None:
    """load_for_pass's check walks the input's tensors, the fold does not walk them again,
    whichever path it takes, and the save walks no output: the fast path's carries the facts
    its edits give, an onnx-ir model is written without a walk of protobuf tensors."""
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(make(), src)
    walks = []

    def counted(proto):
        walks.append(proto)
        return tensor_facts(proto)

    monkeypatch.setattr(filechecks, "tensor_facts", counted)
    save_onnx(fold_onnx(load_for_pass(src)).model, dst)
    assert len(walks) == expected
    monkeypatch.undo()
    assert _normal(onnx.load(str(dst))) == _normal(_full(onnx.load(str(src))).model)


def test_load_split_carries_the_facts_of_its_check(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(chain_model(6, 96, kernel=3), path)  # (over SPLIT_MIN: its weights held apart)
    split = load_split(path)
    assert split.data and split.facts == tensor_facts(split.whole())


def test_load_for_pass_takes_a_str_path(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(chain_model(2, 4, kernel=1), path)
    assert _normal(load_for_pass(str(path)).whole()) == _normal(onnx.load(str(path)))
