"""A bad-input corpus for the ``bnfold`` command, built at test time (no binaries checked in).

:func:`build` writes malformed and hostile files into a folder (truncated, random and
non-ONNX files, special files, odd names, invalid graphs, bad BN parameters and attributes,
bad shapes, bad external data, sparse initializers, bad sample files) and returns the
command lines to try on them: every subcommand with bad arguments too. Each :class:`Case`
says which exit codes are right for it and, when the error is specific, a fragment the
error line must contain; ``output`` names the model a successful fold writes, which the test
then compares with the input.

Run as a script, ``python tests/corpus.py CASES.json RESULTS.json`` runs each case's argv
through ``bnfold.cli.main`` in this one process, with file descriptors 1 and 2 redirected per
case (so output from C++ libraries is caught too), and writes ``[{rc, stdout, stderr}]``.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

C = 4  # channels of the corpus's Conv -> BN model
F32 = TensorProto.FLOAT


@dataclass
class Case:
    """One command line and what a right answer to it is."""

    name: str
    argv: list[str]
    codes: tuple[int, ...] = (2,)
    contains: str | None = None
    output: str | None = None  # the model a successful fold writes (compared with ``source``)
    source: str | None = None
    usage: bool = False  # an argparse usage error: its usage line comes first
    folder: bool = False  # a folder run: per-file errors are in its table, not on stderr


def params(c: int = C, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-trivial BN statistics and a Conv weight/bias for ``c`` output channels."""
    rng = np.random.default_rng(seed)
    return {"W": rng.normal(0, 0.3, (c, 3, 3, 3)), "B": rng.normal(0, 0.5, c),
            "gamma": rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c),
            "beta": rng.normal(0, 0.5, c), "mean": rng.normal(0, 0.5, c),
            "var": rng.uniform(0.3, 3.0, c)}


def conv_bn(*, inits: dict | None = None, bn_attrs: dict | None = None,
            conv_attrs: dict | None = None) -> onnx.ModelProto:
    """``x [N, 3, 8, 8] -> Conv -> BN -> Relu -> y``; ``inits`` replaces tensors (a value of
    ``None`` drops one)."""
    tensors: dict = {k: v.astype(np.float32) for k, v in params().items()}
    tensors.update(inits or {})
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["h"], name="conv",
                         **({"pads": [1, 1, 1, 1]} | (conv_attrs or {}))),
        helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["z"],
                         name="bn", **({"epsilon": 1e-5} | (bn_attrs or {}))),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    initializers = [numpy_helper.from_array(np.asarray(t), k) for k, t in tensors.items()
                    if t is not None]
    graph = helper.make_graph(
        nodes, "corpus", [helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", F32, ["N", C, 8, 8])],
        initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _edited(base: onnx.ModelProto, edit: Callable[[onnx.ModelProto], object]
            ) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(base)
    edit(m)
    return m


def _init(m: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def sparsify(m: onnx.ModelProto, name: str) -> None:
    """Move initializer ``name`` of ``m`` to ``sparse_initializer``."""
    dense = _init(m, name)
    m.graph.initializer.remove(dense)
    flat = numpy_helper.to_array(dense).reshape(-1)
    idx = np.nonzero(flat)[0].astype(np.int64)
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(flat[idx], name), numpy_helper.from_array(idx, f"{name}_i"),
        list(dense.dims)))


def _set_external(m: onnx.ModelProto, name: str, **fields: str) -> None:
    for entry in _init(m, name).external_data:
        if entry.key in fields:
            entry.value = fields.pop(entry.key)
    for key, value in fields.items():
        _init(m, name).external_data.add(key=key, value=value)


def graph_models() -> dict[str, tuple[onnx.ModelProto, tuple[int, ...], str | None]]:
    """Invalid or odd models: ``name -> (model, right exit codes, error fragment)``."""
    good = conv_bn()
    p = params()
    n: dict[str, tuple[onnx.ModelProto, tuple[int, ...], str | None]] = {}

    def add(name: str, model: onnx.ModelProto, codes: tuple[int, ...] = (2,),
            contains: str | None = None) -> None:
        n[name] = (model, codes, contains)

    add("opset99", _edited(good, lambda m: setattr(m.opset_import[0], "version", 99)),
        contains="opset 99")
    add("opset6", _edited(good, lambda m: setattr(m.opset_import[0], "version", 6)),
        contains="opset 6")
    add("no_opset", _edited(good, lambda m: m.ClearField("opset_import")))
    add("custom_domain_only", _edited(good, lambda m: setattr(
        m.opset_import[0], "domain", "com.example")))
    add("no_graph", _edited(good, lambda m: m.ClearField("graph")))
    add("unknown_op", _edited(good, lambda m: setattr(m.graph.node[2], "op_type", "Frobnicate")))
    add("undefined_input", _edited(good, lambda m: m.graph.node[0].input.__setitem__(0, "nope")))
    add("duplicate_output", _edited(good, lambda m: m.graph.node[2].output.__setitem__(0, "h")))
    add("cycle", _edited(good, lambda m: m.graph.node[0].input.__setitem__(0, "z")))
    add("bn_three_inputs", _edited(good, lambda m: m.graph.node[1].input.__delitem__(4)))
    add("bn_no_inputs", _edited(good, lambda m: m.graph.node[1].ClearField("input")))
    for k in ("gamma", "beta", "mean", "var"):
        add(f"bn_{k}_len1", conv_bn(inits={k: np.ones(1, np.float32)}), contains="channel")
        add(f"bn_{k}_len7", conv_bn(inits={k: np.ones(7, np.float32)}), contains="channel")
        add(f"bn_{k}_2d", conv_bn(inits={k: p[k].astype(np.float32).reshape(2, 2)}),
            contains="1-D")
        add(f"bn_{k}_int", conv_bn(inits={k: np.ones(C, np.int64)}), contains="float tensor")
        add(f"bn_{k}_scalar", conv_bn(inits={k: np.float32(1.0)}), contains="channel")
        add(f"bn_{k}_graph_input", _edited(good, lambda m, k=k: m.graph.input.append(
            helper.make_tensor_value_info(k, F32, [C]))), (0,))
    add("bn_all_len3", conv_bn(inits={k: np.ones(3, np.float32) for k in
                                      ("gamma", "beta", "mean", "var")}), contains="channel")
    add("bn_var_negative", conv_bn(inits={"var": -np.ones(C, np.float32)}), (0,))
    add("bn_var_nan", conv_bn(inits={"var": np.full(C, np.nan, np.float32)}), (0,))
    add("bn_mean_inf", conv_bn(inits={"mean": np.full(C, np.inf, np.float32)}), (0,))
    add("bn_gamma_huge", conv_bn(inits={"gamma": np.full(C, 3e38, np.float32)}), (0,))
    add("bn_eps_negative", conv_bn(bn_attrs={"epsilon": -10.0}), (0,))
    add("bn_eps_string", conv_bn(bn_attrs={"epsilon": "tiny"}), (0, 2))
    add("bn_eps_ints", conv_bn(bn_attrs={"epsilon": [1, 2]}), (0, 2))
    add("bn_training_mode_2", conv_bn(bn_attrs={"training_mode": 2}), (0, 2))
    add("bn_training_mode_1", conv_bn(bn_attrs={"training_mode": 1}), (0,))
    add("bn_momentum_string", conv_bn(bn_attrs={"momentum": "fast"}), (0, 2))
    add("bn_unknown_attr", conv_bn(bn_attrs={"colour": 3}), (0, 2))
    add("bn_spatial_at_17", conv_bn(bn_attrs={"spatial": 0}), (0, 2))
    add("bn_x_graph_input", _edited(good, lambda m: (
        m.graph.node[1].input.__setitem__(0, "x"))), (0, 2))
    add("bn_stats_outputs_read", _edited(good, lambda m: (
        m.graph.node[1].output.extend(["rm", "rv"]),
        m.graph.output.append(helper.make_tensor_value_info("rm", F32, [C])))), (0, 2))
    add("conv_weight_scalar", conv_bn(inits={"W": np.float32(2.0)}), contains="rank")
    add("conv_weight_1d", conv_bn(inits={"W": np.ones(C, np.float32)}), contains="rank")
    add("conv_weight_2d", conv_bn(inits={"W": np.ones((C, 3), np.float32)}), contains="rank")
    add("conv_weight_6ch", conv_bn(inits={"W": np.ones((6, 3, 3, 3), np.float32)}),
        contains="channel")
    add("conv_weight_int", conv_bn(inits={"W": np.ones((C, 3, 3, 3), np.int32)}), (0, 2))
    add("conv_weight_fp16", conv_bn(inits={"W": p["W"].astype(np.float16)}), (0, 2))
    add("conv_weight_missing", conv_bn(inits={"W": None}))
    add("conv_bias_len3", conv_bn(inits={"B": np.ones(3, np.float32)}), contains="bias")
    add("conv_bias_2d", conv_bn(inits={"B": np.ones((C, 1), np.float32)}), contains="bias")
    add("conv_group0", conv_bn(conv_attrs={"group": 0}), contains="group")
    add("conv_group3", conv_bn(conv_attrs={"group": 3}), contains="group")
    add("conv_group_negative", conv_bn(conv_attrs={"group": -1}), contains="group")
    add("conv_pads_short", conv_bn(conv_attrs={"pads": [1]}), contains="pads")
    add("conv_strides_zero", conv_bn(conv_attrs={"strides": [0, 0]}), (0, 2))
    add("conv_kernel_shape_wrong", conv_bn(conv_attrs={"kernel_shape": [5, 5]}),
        contains="kernel_shape")
    add("conv_strides_short", conv_bn(conv_attrs={"strides": [1]}), contains="strides")
    add("conv_weight_nan", conv_bn(inits={"W": np.full((C, 3, 3, 3), np.nan, np.float32)}),
        (0,))
    for name, perm in (("out_of_range", [0, 5, 2, 3]), ("duplicate", [0, 1, 1, 3]),
                       ("negative", [0, -1, 2, 3])):
        add(f"transpose_perm_{name}", _edited(good, lambda m, perm=perm: (
            m.graph.node[1].input.__setitem__(0, "t"),
            m.graph.node.insert(1, helper.make_node("Transpose", ["h"], ["t"], name="tr",
                                                    perm=perm)))), contains="perm")
    add("transpose_perm_too_short", _edited(good, lambda m: (  # needs the rank: kept or refused
        m.graph.node[1].input.__setitem__(0, "t"),
        m.graph.node.insert(1, helper.make_node("Transpose", ["h"], ["t"], perm=[0, 1])))),
        (0, 2))
    add("reshape_bad_shape", _edited(good, lambda m: (
        m.graph.node[1].input.__setitem__(0, "r"),
        m.graph.initializer.append(numpy_helper.from_array(np.array([7, 7], np.int64), "rs")),
        m.graph.node.insert(1, helper.make_node("Reshape", ["h", "rs"], ["r"])))), (0, 2))
    add("flatten_axis_9", _edited(good, lambda m: (
        m.graph.node[1].input.__setitem__(0, "f"),
        m.graph.node.insert(1, helper.make_node("Flatten", ["h"], ["f"], axis=9)))), (0, 2))
    add("constant_no_value", _edited(good, lambda m: (
        m.graph.initializer.remove(_init(m, "mean")),
        m.graph.node.insert(0, helper.make_node("Constant", [], ["mean"])))), (0, 2))
    add("constant_mean", _edited(good, lambda m: (
        m.graph.initializer.remove(_init(m, "mean")),
        m.graph.node.insert(0, helper.make_node("Constant", [], ["mean"], value_floats=[
            0.1, 0.2, 0.3, 0.4])))), (0,))
    add("init_raw_data_short", _edited(good, lambda m: setattr(
        _init(m, "W"), "raw_data", _init(m, "W").raw_data[:40])))
    add("init_raw_data_long", _edited(good, lambda m: setattr(
        _init(m, "var"), "raw_data", _init(m, "var").raw_data * 2)))
    add("init_undefined_type", _edited(good, lambda m: setattr(_init(m, "mean"), "data_type",
                                                                0)))
    add("init_type_999", _edited(good, lambda m: setattr(_init(m, "mean"), "data_type", 999)))
    add("init_negative_dim", _edited(good, lambda m: _init(m, "B").dims.__setitem__(0, -4)))
    add("init_no_name", _edited(good, lambda m: setattr(_init(m, "B"), "name", "")))
    add("init_duplicate", _edited(good, lambda m: m.graph.initializer.append(_init(m, "W"))))
    add("sparse_weight", _edited(good, lambda m: sparsify(m, "W")), contains="sparse")
    add("sparse_var", _edited(good, lambda m: sparsify(m, "var")), contains="sparse")
    add("gemm_weight_1d", _gemm(np.ones(5, np.float32)), contains="matrices")
    add("gemm_weight_3d", _gemm(np.ones((C, 5, 1), np.float32)), contains="matrices")
    add("gemm_bias_len3", _gemm(np.ones((C, 5), np.float32), np.ones(3, np.float32)), (0, 2))
    add("gemm_trans_b_2", _gemm(np.ones((C, 5), np.float32), trans_b=2), (0, 2))
    add("matmul_weight_3d", _matmul(np.ones((2, 5, C), np.float32)), (0, 2))
    add("matmul_weight_scalar", _matmul(np.float32(2.0)), (0, 2))
    add("string_output", _edited(good, lambda m: (
        m.graph.node.append(helper.make_node("Cast", ["y"], ["s"], to=TensorProto.STRING)),
        m.graph.output.append(helper.make_tensor_value_info("s", TensorProto.STRING,
                                                            ["N", C, 8, 8])))),
        (0,))
    add("expand_bomb_bias", _expand_bomb(), (0,))
    add("ir_version_3", _edited(good, lambda m: (setattr(m, "ir_version", 3), m.graph.input.extend(
        helper.make_tensor_value_info(t.name, F32, list(t.dims))
        for t in m.graph.initializer))), (0, 2))
    add("ir_version_99", _edited(good, lambda m: setattr(m, "ir_version", 99)), (0, 2))
    add("functions_with_bn", _with_function(good), (0,))
    add("if_branch_sparse", _if_model(sparse=True), contains="sparse")
    add("if_branch_bn", _if_model(sparse=False), (0,))
    return n


def _gemm(weight: np.ndarray, bias: np.ndarray | None = None, trans_b: int = 1
          ) -> onnx.ModelProto:
    p = params()
    inits = {"Wg": weight, **({"Bg": bias} if bias is not None else {}),
             **{k: p[k].astype(np.float32) for k in ("gamma", "beta", "mean", "var")}}
    nodes = [helper.make_node("Gemm", ["x", "Wg", *(["Bg"] if bias is not None else [])],
                              ["h"], name="fc", transB=trans_b),
             helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"],
                              ["y"], name="bn")]
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("x", F32, ["N", 5])],
        [helper.make_tensor_value_info("y", F32, ["N", C])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmul(weight: np.ndarray) -> onnx.ModelProto:
    m = _gemm(np.ones((C, 5), np.float32))
    m.graph.node[0].op_type = "MatMul"
    del m.graph.node[0].attribute[:]
    _init(m, "Wg").CopyFrom(numpy_helper.from_array(np.asarray(weight), "Wg"))
    return m


def _expand_bomb() -> onnx.ModelProto:
    """A Conv bias from ``ConstantOfShape([2**40])``: its evaluation must fail quietly."""
    m = conv_bn(inits={"B": None})
    m.graph.initializer.append(numpy_helper.from_array(np.array([2**40], np.int64), "shp"))
    m.graph.node.insert(0, helper.make_node(
        "ConstantOfShape", ["shp"], ["B"], value=numpy_helper.from_array(
            np.zeros(1, np.float32))))
    return m


def _with_function(good: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(good)
    fn = helper.make_function(
        "local", "Norm", ["a", "g", "b", "mu", "v"], ["o"],
        [helper.make_node("BatchNormalization", ["a", "g", "b", "mu", "v"], ["o"])],
        [helper.make_opsetid("", 17)])
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.graph.node[2].input[0] = "z2"
    m.graph.node.insert(2, helper.make_node("Norm", ["z", "gamma", "beta", "mean", "var"],
                                            ["z2"], domain="local"))
    return m


def _if_model(*, sparse: bool) -> onnx.ModelProto:
    """``If(cond)`` whose then-branch holds Conv -> BN (its weight sparse if asked)."""
    body = conv_bn().graph
    branch = onnx.GraphProto()
    branch.CopyFrom(body)
    del branch.input[:]
    branch.name = "then"
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", F32, ["N", 3, 8, 8])])
    if sparse:
        holder = onnx.ModelProto(graph=branch)
        sparsify(holder, "W")
        branch.CopyFrom(holder.graph)
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other)
    graph = helper.make_graph(
        [node], "if", [helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8]),
                       helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", F32, ["N", None, 8, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def external_models(folder: Path) -> dict[str, tuple[Path, tuple[int, ...], str | None]]:
    """Models with external data in their own subfolders of ``folder``, each broken in one
    way: ``name -> (model path, right exit codes, error fragment)``."""
    out: dict[str, tuple[Path, tuple[int, ...], str | None]] = {}

    def make(name: str, edit: Callable[[onnx.ModelProto, Path], object] | None,
             codes: tuple[int, ...] = (2,), contains: str | None = None) -> None:
        d = folder / name
        d.mkdir()
        onnx.save_model(conv_bn(), d / "m.onnx", save_as_external_data=True,
                        location="m.data", size_threshold=0)
        if edit is not None:
            m = onnx.load(d / "m.onnx", load_external_data=False)
            edit(m, d)
            onnx.save(m, d / "m.onnx")
        out[name] = (d / "m.onnx", codes, contains)

    make("ext_ok", None, (0,))
    make("ext_missing_file", lambda m, d: (d / "m.data").unlink())
    make("ext_offset_past_end", lambda m, d: _set_external(m, "W", offset="100000"),
         contains="past the end")
    make("ext_length_past_end", lambda m, d: _set_external(m, "var", length="100000"),
         contains="length")
    make("ext_length_short", lambda m, d: _set_external(m, "W", length="8"), contains="length")
    make("ext_offset_negative", lambda m, d: _set_external(m, "W", offset="-8"))
    make("ext_offset_text", lambda m, d: _set_external(m, "W", offset="abc"))
    make("ext_absolute", lambda m, d: _set_external(m, "W", location="/etc/passwd"))
    make("ext_dotdot", lambda m, d: _set_external(m, "W", location="../ext_ok/m.data"))
    make("ext_empty_location", lambda m, d: _set_external(m, "W", location=""))
    make("ext_data_is_dir", lambda m, d: ((d / "m.data").unlink(), (d / "m.data").mkdir()))
    make("ext_data_is_fifo", lambda m, d: ((d / "m.data").unlink(), os.mkfifo(d / "m.data")))
    make("ext_truncated_data", lambda m, d: (d / "m.data").write_bytes(
        (d / "m.data").read_bytes()[:100]), contains="past the end")

    def symlink_out(m: onnx.ModelProto, d: Path) -> None:
        (folder / "elsewhere").mkdir(exist_ok=True)
        (d / "m.data").rename(folder / "elsewhere" / "m.data")
        (d / "link").symlink_to(folder / "elsewhere")
        for t in m.graph.initializer:
            _set_external(m, t.name, location="link/m.data")

    def symlink_in(m: onnx.ModelProto, d: Path) -> None:
        (d / "real").mkdir()
        (d / "m.data").rename(d / "real" / "m.data")
        (d / "link").symlink_to("real")
        for t in m.graph.initializer:
            _set_external(m, t.name, location="link/m.data")

    make("ext_symlinked_folder_out", symlink_out, contains="symlink")
    make("ext_symlinked_folder_in", symlink_in, (0,))
    return out


def files(folder: Path, good: Path) -> dict[str, tuple[Path, tuple[int, ...], str | None]]:
    """Files that are not ONNX models, or special, or oddly named: ``name -> (path, right
    exit codes, error fragment)``."""
    data = good.read_bytes()
    out: dict[str, tuple[Path, tuple[int, ...], str | None]] = {}

    def put(name: str, content: bytes | None, codes: tuple[int, ...] = (2,),
            contains: str | None = None, filename: str | None = None) -> Path:
        path = folder / (filename or f"{name}.onnx")
        if content is not None:
            path.write_bytes(content)
        out[name] = (path, codes, contains)
        return path

    put("missing", None, contains="no such file")
    (folder / "adir.onnx").mkdir()
    put("directory", None, filename="adir.onnx")  # fold takes it for a folder of models
    put("empty", b"", contains="empty")
    for cut in (1, 10, 50, 100, 200, 300, 400, len(data) - 10, len(data) - 1):
        put(f"truncated_{cut}", data[:cut])
    for seed in range(4):
        put(f"random_{seed}", np.random.default_rng(seed).bytes(777))
    put("tensor_proto", numpy_helper.from_array(np.ones(3, np.float32)).SerializeToString())
    put("graph_proto", onnx.load(good).graph.SerializeToString())
    zipped = folder / "zip.onnx"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", b"x")
    out["zip"] = (zipped, (2,), "zip archive")
    put("pickle", pickle.dumps({"w": [1.0, 2.0]}, protocol=2), contains="pickle")
    put("gzip", gzip.compress(data))
    put("text", b"ir_version: 8\ngraph { }\n")
    put("json", json.dumps({"graph": {}}).encode())
    put("nul_bytes", b"\0" * 1000)
    fifo = folder / "fifo.onnx"
    os.mkfifo(fifo)
    out["fifo"] = (fifo, (2,), "regular file")
    out["dev_null"] = (Path("/dev/null"), (2,), "regular file")
    (folder / "dangling.onnx").symlink_to(folder / "nowhere.onnx")
    out["dangling_symlink"] = (folder / "dangling.onnx", (2,), "no such file")
    (folder / "loop_a.onnx").symlink_to(folder / "loop_b.onnx")
    (folder / "loop_b.onnx").symlink_to(folder / "loop_a.onnx")
    out["symlink_loop"] = (folder / "loop_a.onnx", (2,), "symbolic links")
    out["name_too_long"] = (folder / ("n" * 300 + ".onnx"), (2,), "too long")
    out["under_a_file"] = (good / "x.onnx", (2,), None)
    huge = folder / "huge.onnx"
    with open(huge, "wb") as f:  # sparse: 3 GiB of holes, never read
        f.truncate(3 * 2**30)
    out["huge_sparse"] = (huge, (2,), "bytes")
    put("non_utf8_name", data, (0,), filename=os.fsdecode(b"m\xff\xfe.onnx"))
    put("spaces_and_unicode", data, (0,), filename="my model ünïcode.onnx")
    put("leading_dash", data, (0,), filename="-m.onnx")
    return out


def sample_files(folder: Path) -> dict[str, tuple[Path, tuple[int, ...], str | None]]:
    """``--inputs`` files for the corpus model (``x: [N, 3, 8, 8]`` float32)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    out: dict[str, tuple[Path, tuple[int, ...], str | None]] = {}

    def npz(name: str, codes: tuple[int, ...] = (2,), contains: str | None = None,
            **arrays: np.ndarray) -> None:
        path = folder / f"{name}.npz"
        np.savez(path, **arrays)
        out[name] = (path, codes, contains)

    npz("npz_ok", (0,), x=x)
    npz("npz_object", contains="Python objects", x=np.array([1, "a"], dtype=object))
    npz("npz_wrong_dtype", contains="dtype", x=x.astype(np.float64))
    npz("npz_wrong_shape", contains="shape", x=x[:, :2])
    npz("npz_wrong_rank", contains="shape", x=x[0])
    npz("npz_extra_key", contains="unknown", x=x, y=x)
    npz("npz_missing_key", contains="missing", y=x)
    npz("npz_empty", contains="missing")
    np.save(folder / "ok.npy", x)
    out["npy_ok"] = (folder / "ok.npy", (0,), None)
    np.save(folder / "object.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    out["npy_object"] = (folder / "object.npy", (2,), "Python objects")
    (folder / "trunc.npz").write_bytes((folder / "npz_ok.npz").read_bytes()[:200])
    out["npz_truncated"] = (folder / "trunc.npz", (2,), "not a readable")
    (folder / "text.npz").write_text("1 2 3")
    out["npz_text"] = (folder / "text.npz", (2,), "not an .npy/.npz file")
    huge = folder / "huge.npy"
    with open(huge, "wb") as f:
        f.truncate(3 * 2**30)
    out["npy_huge_sparse"] = (huge, (2,), "budget")
    bomb = folder / "bomb.npz"  # its zip directory says 3 GiB (a compressed bomb would)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", (folder / "ok.npy").read_bytes())
        z.filelist[0].file_size = 3 * 2**30
    out["npz_unpacks_too_large"] = (bomb, (2,), "unpack")
    fifo = folder / "fifo.npz"
    os.mkfifo(fifo)
    out["npz_fifo"] = (fifo, (2,), "regular file")
    (folder / "dir.npz").mkdir()
    out["npz_directory"] = (folder / "dir.npz", (2,), "directory")
    out["npz_missing"] = (folder / "missing.npz", (2,), "no such file")
    return out


@dataclass
class Corpus:
    """The cases, and the folders whose files must be byte-identical after running them."""

    cases: list[Case] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)


def build(root: Path) -> Corpus:
    """Write the corpus under ``root`` (inputs in ``root/in``, outputs go to ``root/out``)."""
    src, out = root / "in", root / "out"
    src.mkdir(parents=True)
    out.mkdir()
    good = src / "good.onnx"
    onnx.save(conv_bn(), good)
    corpus = Corpus(inputs=[src])
    cases = corpus.cases
    g = str(good)

    def fold(name: str, path: Path, codes: tuple[int, ...], contains: str | None,
             *extra: str) -> None:
        target = out / f"{name}.onnx"
        cases.append(Case(f"fold:{name}", ["fold", str(path), "-o", str(target), *extra],
                          codes, contains, output=str(target), source=str(path)))

    for name, (path, codes, contains) in files(src, good).items():
        fold(name, path, codes, contains)
        cases.append(Case(f"inspect:{name}", ["inspect", str(path), "--json"], codes, contains))
        cases.append(Case(f"validate-b:{name}", ["validate", g, str(path), "--providers",
                                                 "cpu", "--samples", "1"], codes, contains))
        if name in ("missing", "truncated_100", "zip", "fifo", "huge_sparse", "non_utf8_name",
                    "name_too_long", "symlink_loop"):
            cases.append(Case(f"validate-a:{name}", ["validate", str(path), g, "--providers",
                                                     "cpu", "--samples", "1"], codes, contains))
            cases.append(Case(f"insert:{name}", ["insert", str(path), "-o",
                                                 str(out / f"ins_{name}.onnx")], codes,
                              contains))
    (src / "graphs").mkdir()
    for name, (model, codes, contains) in graph_models().items():
        path = src / "graphs" / f"{name}.onnx"
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        fold(name, path, codes, contains)
        cases.append(Case(f"inspect:{name}", ["inspect", str(path)], codes, contains))
        cases.append(Case(f"insert:{name}", ["insert", str(path), "-o",
                                             str(out / f"ins_{name}.onnx")], (0, 2)))
        cases.append(Case(f"validate-b:{name}", ["validate", str(path), str(path),
                                                 "--providers", "cpu", "--samples", "1"],
                          (0, 2)))
        if name in ("string_output", "expand_bomb_bias", "bn_var_len1", "conv_weight_scalar",
                    "transpose_perm_out_of_range", "sparse_weight"):
            ort_fails = {"string_output": "string", "expand_bomb_bias": "ONNX Runtime"}
            fold(f"{name}-validated", path, (2,) if name in ort_fails else codes,
                 ort_fails.get(name, contains), "--validate", "--providers", "cpu")
    (src / "external").mkdir()
    for name, (path, codes, contains) in external_models(src / "external").items():
        fold(name, path, codes, contains)
        cases.append(Case(f"inspect:{name}", ["inspect", str(path)], codes, contains))
        cases.append(Case(f"validate-b:{name}", ["validate", g, str(path), "--providers",
                                                 "cpu", "--samples", "1"], codes, contains))
    (src / "samples").mkdir()
    for name, (path, codes, contains) in sample_files(src / "samples").items():
        cases.append(Case(f"inputs:{name}", ["validate", g, g, "--providers", "cpu",
                                             "--inputs", str(path)], codes, contains))
    cases.extend(argument_cases(g, src, out))
    return corpus


def argument_cases(g: str, src: Path, out: Path) -> list[Case]:
    """Bad (and a few odd but valid) arguments for each subcommand, on the good model."""
    o = str(out / "arg.onnx")
    check = ["validate", g, g, "--providers", "cpu", "--samples", "1"]
    usage = [
        [], ["frobnicate"], ["fold"], ["validate", g], ["inspect"], ["insert", g, "--eps"],
        [*check, "--dim", "N"], [*check, "--dim", "N=0"], [*check, "--dim", "N=-3"],
        [*check, "--dim", "=4"], [*check, "--dim", "N=x"], [*check, "--atol", "nan"],
        [*check, "--rtol", "-1"], [*check, "--atol", "inf"], [*check, "--samples", "2.5"],
        [*check, "--seed", "x"], ["insert", g, "-o", o, "--position", "sideways"],
        ["fold", g, "-o", o, "--frobnicate"], ["demo", "--model"],
    ]
    cases = [Case(f"usage:{i}", [str(a) for a in argv], usage=True)
             for i, argv in enumerate(usage)]
    (src / "folder").mkdir()
    (src / "folder" / "a.onnx").write_bytes(Path(g).read_bytes())
    (src / "folder" / "bad.onnx").write_bytes(b"garbage")
    (src / "folder" / os.fsdecode(b"\xff.onnx")).write_bytes(Path(g).read_bytes())
    (src / "emptyfolder").mkdir()
    (out / "afile").write_text("x")
    bad: list[tuple[str, list[str], tuple[int, ...], str | None]] = [
        ("fold_no_output", ["fold", g], (2,), "-o"),
        ("fold_output_is_input", ["fold", g, "-o", g], (2,), "in-place"),
        ("fold_output_is_dir", ["fold", g, "-o", str(out)], (2,), "directory"),
        ("fold_output_under_file", ["fold", g, "-o", str(out / "afile" / "x.onnx")], (2,),
         None),
        ("fold_output_too_long", ["fold", g, "-o", str(out / ("o" * 300 + ".onnx"))], (2,),
         "too long"),
        ("fold_report_dir", ["fold", g, "-o", o, "--report", str(out)], (2,), "directory"),
        ("fold_report_input", ["fold", g, "-o", o, "--report", g], (2,), "model file"),
        ("fold_report_too_long", ["fold", g, "-o", str(out / "r.onnx"), "--report",
                                  str(out / ("r" * 300 + ".json"))], (2,), "too long"),
        ("validate_samples_0", [*check[:-1], "0"], (2,), "samples"),
        ("validate_samples_negative", [*check[:-1], "-4"], (2,), "samples"),
        ("validate_samples_huge", [*check[:-1], "100000000"], (2,), "samples"),
        ("validate_seed_negative", [*check, "--seed", "-1"], (2,), "seed"),
        ("validate_seed_huge", [*check, "--seed", str(2**70)], (0,), None),
        ("validate_dim_huge", [*check, "--dim", "N=1000000000000"], (2,), "budget"),
        ("validate_dim_budget", [*check, "--dim", "N=100000000"], (2,), "76800000000"),
        ("validate_samples_budget", ["validate", g, g, "--providers", "cpu", "--samples",
                                     "10000", "--dim", "N=2000"], (2,), "budget"),
        ("validate_dim_unknown_name", [*check, "--dim", "batch=3"], (0,), None),
        ("validate_providers_bogus", [*check, "--providers", "tpu"], (2,), "tpu"),
        ("validate_providers_empty", [*check, "--providers", ""], (0,), None),
        ("validate_require_bogus", [*check, "--require", "tpu"], (2,), "tpu"),
        ("validate_report_is_input", [*check, "--report", g], (2,), "model file"),
        ("validate_a_is_dir", ["validate", str(src), g], (2,), "directory"),
        ("inspect_report_dir", ["inspect", g, "--report", str(out)], (2,), "directory"),
        ("insert_no_output", ["insert", g], (2,), "-o"),
        ("insert_output_is_input", ["insert", g, "-o", g], (2,), "in-place"),
        ("insert_momentum_2", ["insert", g, "-o", o, "--momentum", "2"], (2,), "momentum"),
        ("insert_momentum_nan", ["insert", g, "-o", o, "--momentum", "nan"], (2,), "momentum"),
        ("insert_eps_negative", ["insert", g, "-o", o, "--eps", "-1"], (2,), "eps"),
        ("insert_eps_nan", ["insert", g, "-o", o, "--eps", "nan"], (2,), "eps"),
        ("insert_include_nothing", ["insert", g, "-o", str(out / "ins.onnx"), "--include",
                                    "nomatch*"], (0,), None),
        ("demo_unknown_model", ["demo", "--model", "nope"], (2,), "zoo"),
        ("folder_no_output", ["fold", str(src / "folder")], (2,), "OUTDIR"),
        ("folder_output_is_input", ["fold", str(src / "folder"), "-o", str(src / "folder")],
         (2,), "in-place"),
        ("folder_output_is_file", ["fold", str(src / "folder"), "-o", str(out / "afile")],
         (2,), "not a directory"),
        ("folder_empty", ["fold", str(src / "emptyfolder"), "-o", str(out / "e")], (2,),
         "no .onnx"),
    ]
    cases += [Case(f"args:{name}", argv, codes, contains) for name, argv, codes, contains in bad]
    cases.append(Case("args:folder_with_a_bad_file", ["fold", str(src / "folder"), "-o",
                                                      str(out / "folded")], (2,), folder=True))
    return cases


# ------------------------------------------------------------------------------------------
# Running cases in one process
# ------------------------------------------------------------------------------------------

def run_in_process(cases: list[list[str]]) -> list[dict]:
    """Run each argv through ``bnfold.cli.main``, catching fds 1 and 2 per case."""
    from bnfold import cli

    results = []
    for argv in cases:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                rc = cli.main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 2
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            out.seek(0)
            err.seek(0)
            results.append({"rc": rc, "stdout": out.read().decode(errors="backslashreplace"),
                            "stderr": err.read().decode(errors="backslashreplace")})
    return results


if __name__ == "__main__":
    argvs = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run_in_process(argvs)))
