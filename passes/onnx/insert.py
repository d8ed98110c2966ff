"""Insert ``BatchNormalization`` after the dense and conv nodes of an ONNX graph (onnx-ir).

One rule per candidate: match (Conv, ConvTranspose, Gemm, MatMul with a constant 2-D weight)
-> check (include / exclude, already normalized, produces a graph output, channel count
known) -> rewrite -> record. Where the BN goes, and on which axis:

* Conv / ConvTranspose: output ``[N, C, ...]``, BN on axis 1, ``C`` = ``W.shape[0]`` (Conv) or
  ``W.shape[1] * group`` (ConvTranspose).
* Gemm: output ``[M, C]``, BN on axis 1, ``C`` from ``B`` and ``transB``.
* MatMul ``X @ W`` with ``W`` constant ``[K, C]`` (a following ``Add`` of a constant bias counts
  as part of the layer): output ``[..., C]``. A 2-D output gets the BN directly; otherwise (or
  when the rank is unknown) ``Reshape(-1, C) -> BN -> Reshape(Shape(y))`` so that BN
  normalizes the features, not dim 1.

The new BN has ``epsilon = eps`` and ONNX ``momentum = 1 - momentum`` (ONNX weights the
running value, PyTorch the batch value), and no ``spatial`` attribute (its default 1 is
per-channel on opsets 7-8). Its parameters are new initializers named after the BN node
(``<layer>_bn.scale`` / ``.bias`` / ``.mean`` / ``.var``) with identity statistics: scale 1,
bias 0, mean 0, var 1.

* ``training_mode=False`` (default): an inference-mode BN (outputs ``Y`` only; on opset >= 14
  ``training_mode`` stays at its default 0). It computes ``y / sqrt(1 + eps)`` until its
  parameters are trained elsewhere.
* ``training_mode=True``: a training-mode BN, written as ``torch.onnx.export(...,
  training=TrainingMode.TRAINING)`` writes one. Opset >= 14: attribute ``training_mode=1`` and
  outputs ``Y, running_mean, running_var``; opsets 7-13 (no such attribute; the outputs say
  the mode): ``Y, mean, var, saved_mean, saved_var``. ``Y`` normalizes with the batch's mean
  and population variance; the running outputs are ``input * momentum + batch * (1 -
  momentum)`` in ONNX's convention, with the *population* variance (PyTorch stores the
  unbiased one). The running outputs are node outputs, not graph outputs: a training runtime
  (ONNX Runtime training) binds them to the ``.mean`` / ``.var`` initializers, which must then
  be frozen (not trainable) parameters. ONNX Runtime's CPU kernel runs both forms; its CUDA
  kernel refuses ``training_mode=1`` on opset >= 14 (onnxruntime issue #16867).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.arguments import check_flags, check_path
from bnfold.errors import BadInputError, UnsupportedError
from bnfold.io.fileio import load_onnx
from bnfold.lazy_ir import ir
from bnfold.passes.insert_policy import (
    check_options,
    following_norm,
    last_layers,
    selector_list,
    skip_reason,
)
from bnfold.passes.onnx.consts import Namer, const_tensor
from bnfold.passes.onnx.layers import LAYERS, layer_kind
from bnfold.report import Entry, PassResult, Report

LAYER_OPS = tuple(LAYERS)
ACTIVATION_OPS = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Celu",
                  "HardSigmoid", "HardSwish", "Mish", "Softplus", "Softsign", "Clip",
                  "ThresholdedRelu"}
NORM_OPS = {"BatchNormalization", "LayerNormalization", "GroupNormalization",
            "InstanceNormalization", "RMSNormalization", "SkipLayerNormalization"}
_SHAPE_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
_MIN_OPSET = 7


@dataclass(frozen=True)
class _Plan:
    """Where one BN goes: after ``anchor``'s first output, with ``channels`` channels."""

    anchor: ir.Node
    channels: int
    flatten: bool  # Reshape to [-1, C] around the BN (MatMul with output rank != 2)
    dtype: ir.DataType


def insert_bn_onnx(
    model: Any,
    *,
    position: str = "before_activation",
    skip_last: bool = True,
    include: Any = None,
    exclude: Any = None,
    eps: float = 1e-5,
    momentum: float = 0.1,
    drop_bias: bool = False,
    training_mode: bool = False,
    base_dir: Any = None,
) -> PassResult:
    """Return ``(onnx_ir.Model, Report)``: ``model`` with a BatchNormalization after each
    selected Conv / ConvTranspose / Gemm / MatMul-with-constant-weight node.

    ``model``: ``onnx.ModelProto``, ``onnx_ir.Model`` (not modified: a copy is rewritten) or a
    path. ``position``: ``"before_activation"`` (layer -> BN -> activation) or
    ``"after_activation"`` (layer -> activation -> BN when the layer's only reader is an
    activation, else right after the layer). ``skip_last``: leave alone each layer with a path
    to a graph output that crosses no other layer. ``include`` / ``exclude``: node-name globs
    or op types (``"Conv"``), a string or a list; ``exclude`` wins. ``eps``, ``momentum``: the
    BN's, in PyTorch's convention. ``drop_bias``: remove a Conv / ConvTranspose / Gemm bias
    (an initializer read by that node only) when the BN follows the layer directly; exact in
    training mode, where BN subtracts the batch mean. ``training_mode``: write training-mode
    BNs (see the module docstring). Idempotent: a layer already followed by a normalization
    (directly, after its activation, or through dropouts and reshapes) gets none. Layers
    inside If / Loop / Scan bodies are not considered (the report's notes count them).
    ``base_dir``: the folder of an in-memory model's external data (required when it has any).
    """
    check_options(position, eps, momentum, why_no_none="ONNX BatchNormalization has no "
                  "cumulative average, PyTorch's momentum=None")
    check_flags(skip_last=skip_last, drop_bias=drop_bias, training_mode=training_mode)
    check_path(base_dir, "base_dir", optional=True)
    given = model
    out = load_onnx(model, base_dir=base_dir)
    if out is given:
        out = out.clone()
    opset = out.opset_imports.get("", out.opset_imports.get("ai.onnx"))
    if opset is None or opset < _MIN_OPSET:
        raise UnsupportedError(f"ONNX opset {opset} is not supported (need {_MIN_OPSET} or newer)")
    graph = out.graph
    layers = [n for n in graph if layer_kind(n) is not None]
    if not layers:
        raise BadInputError(
            "the graph has no Conv, ConvTranspose, Gemm or MatMul node to insert BatchNorm after"
        )
    includes, excludes = _selectors(include, "include"), _selectors(exclude, "exclude")
    last = {v.producer() for v in last_layers(
        graph.outputs, _sources, {o for n in graph.all_nodes() if layer_kind(n) is not None
                                  for o in n.outputs})} if skip_last else set()
    names = Namer(out)
    report = Report("insert_bn_onnx")
    nested = sum(1 for n in graph.all_nodes() if n.graph is not graph and n.op_type in LAYER_OPS)
    if nested:
        report.notes.append(f"{nested} Conv/ConvTranspose/Gemm/MatMul node(s) inside If/Loop/"
                            "Scan bodies were not considered")
    for index, node in enumerate(layers):
        name = node.name or f"{node.op_type}_{index}"
        reason = _skip_reason(node, name, includes, excludes, last)
        plan = None if reason else _plan(node, position)
        if isinstance(plan, str):
            reason, plan = plan, None
        if plan is None:
            report.add(name, "skipped", reason=reason)
            continue
        bn_name = names.fresh(f"{name}_bn")
        running = _rewrite(graph, plan, bn_name, names, eps, 1.0 - momentum,
                           opset if training_mode else None)
        entry = report.add(bn_name, "inserted", into=name, after=plan.anchor.name or name,
                           kind="BatchNormalization", channels=plan.channels,
                           axis="last (Reshape to [-1, C])" if plan.flatten else 1,
                           position=_placement(node, plan, position),
                           mode="training" if training_mode else "inference")
        if running:
            entry.details["running_stats"] = running
        if drop_bias:
            _drop_bias(node, plan, entry, opset)
    if out.ir_version < 4:  # (IR < 4 lists every initializer among the graph inputs)
        graph.inputs.extend([v for v in graph.initializers.values() if not v.is_graph_input()])
    return PassResult(out, report)


# ---------------------------------------------------------------------------------------------
# Check.
# ---------------------------------------------------------------------------------------------

def _sources(value: ir.Value) -> list[ir.Value]:
    """The values ``value`` is computed from: its producer's inputs and, for a node with
    bodies, the body outputs that become ``value`` (an ``If`` branch's output at the same
    index, a ``Loop`` body's after its condition; other ops: every body output). Walked back
    value by value (:func:`~bnfold.passes.insert_policy.last_layers`), a body's nodes lead
    on to the enclosing graphs' values they capture by name, and a layer inside a body stops
    the walk like one outside."""
    node = value.producer()
    if node is None:
        return []
    sources = [v for v in node.inputs if v is not None]
    index = next(i for i, out in enumerate(node.outputs) if out is value)
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            bodies = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            bodies = list(attr.value)
        else:
            continue
        for body in bodies:
            at = index + (node.op_type == "Loop")
            if node.op_type in ("If", "Loop", "Scan") and at < len(body.outputs):
                sources.append(body.outputs[at])
            else:
                sources.extend(body.outputs)
    return sources


def _selectors(value: Any, what: str) -> list[str]:
    return selector_list(value, what, lambda item: isinstance(item, str),
                         "node-name globs or op types (strings)")


def _selected_by(node: ir.Node, name: str, specs: Iterable[str]) -> str | None:
    for spec in specs:
        if spec == node.op_type or fnmatch.fnmatchcase(name, spec):
            return repr(spec)
    return None


def _skip_reason(node: ir.Node, name: str, includes: list[str], excludes: list[str],
                 last: set[ir.Node]) -> str | None:
    return skip_reason(lambda specs: _selected_by(node, name, specs), includes, excludes,
                       lambda: _following_norm(_layer_output(node)), node in last,
                       "a graph output")


def _following_norm(value: ir.Value) -> str | None:
    """The normalization node reading ``value`` directly or through activations / reshapes."""
    def passes_through(user: ir.Node, read: ir.Value) -> ir.Value | None:
        keeps = user.op_type in ACTIVATION_OPS or user.op_type in _SHAPE_OPS
        return user.outputs[0] if keeps and user.inputs and user.inputs[0] is read else None

    return following_norm(value, lambda v: v.consumers(), lambda user: f"{user.op_type} "
                          f"{user.name!r}" if user.op_type in NORM_OPS else None, passes_through)


def _const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The static shape of ``value``: recorded, or that of its constant (a ``Constant`` node's
    output often has no recorded shape)."""
    if value is None:
        return None
    if value.shape is not None and value.shape.is_static():
        return tuple(int(d) for d in value.shape)
    tensor = const_tensor(value)
    return None if tensor is None else tuple(int(d) for d in tensor.shape)


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and const_tensor(value) is not None


def _layer_output(node: ir.Node) -> ir.Value:
    """The layer's output; for MatMul followed by ``Add(constant)``, the Add's output."""
    y = node.outputs[0]
    if node.op_type == "MatMul" and len(users := y.consumers()) == 1 and (
            users[0].op_type == "Add" and not y.is_graph_output()):
        other = [v for v in users[0].inputs if v is not y]
        if len(other) == 1 and _is_constant(other[0]):
            return users[0].outputs[0]
    return y


def _plan(node: ir.Node, position: str) -> _Plan | str:
    """Where the BN goes and its channel count, or why none fits."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = _const_shape(weight)
    if node.op_type == "MatMul" and not _is_constant(weight):
        return "MatMul weight (second input) is not a constant"
    if shape is None:
        return "weight shape unknown: channel count unknown"
    if node.op_type == "MatMul" and len(shape) != 2:
        return f"MatMul weight has rank {len(shape)}, not [K, C]"
    channels = LAYERS[node.op_type].channels(node, shape)
    y = _layer_output(node)
    anchor = y.producer()
    assert anchor is not None
    if position == "after_activation" and len(users := y.consumers()) == 1 and (
            users[0].op_type in ACTIVATION_OPS and users[0].inputs[0] is y
            and not y.is_graph_output()):
        anchor = users[0]
    x_rank = _rank(node.inputs[0])
    flatten = node.op_type == "MatMul" and x_rank != 2
    dtype = y.dtype or (weight.dtype if weight is not None else None) or ir.DataType.FLOAT
    return _Plan(anchor, channels, flatten, dtype)


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _placement(layer: ir.Node, plan: _Plan, position: str) -> str:
    if plan.anchor.op_type in ACTIVATION_OPS:
        return f"after activation {plan.anchor.op_type} {plan.anchor.name!r}"
    where = "after the layer" if plan.anchor is layer else "after the layer's bias Add"
    if position == "after_activation":
        where += " (no activation is its only reader)"
    return where


# ---------------------------------------------------------------------------------------------
# Rewrite.
# ---------------------------------------------------------------------------------------------

def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape),
                     type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _rewrite(graph: ir.Graph, plan: _Plan, bn_name: str, names: Namer, eps: float,
             onnx_momentum: float, training_opset: int | None) -> list[str]:
    """Insert the BN (and its reshapes); return the names of its running-statistics outputs
    (training mode only)."""
    y = plan.anchor.outputs[0]
    c = plan.channels
    np_dtype = plan.dtype.numpy()
    params = [_initializer(graph, names.fresh(f"{bn_name}.{key}"), value.astype(np_dtype))
              for key, value in (("scale", np.ones(c)), ("bias", np.zeros(c)),
                                 ("mean", np.zeros(c)), ("var", np.ones(c)))]
    uses = list(y.uses())
    attrs: dict[str, Any] = {"epsilon": float(eps), "momentum": float(onnx_momentum)}
    extra: tuple[str, ...] = ()
    if training_opset is not None:
        if training_opset >= 14:
            attrs["training_mode"] = 1
            extra = ("running_mean", "running_var")
        else:
            extra = ("running_mean", "running_var", "saved_mean", "saved_var")
    n_out = 1 + len(extra)
    if plan.flatten:
        flat_shape = _initializer(graph, names.fresh(f"{bn_name}.flat_shape"),
                                  np.array([-1, c], np.int64))
        shape = ir.node("Shape", [y], name=names.fresh(f"{bn_name}_shape"))
        flat = ir.node("Reshape", [y, flat_shape], name=names.fresh(f"{bn_name}_flatten"))
        bn = ir.node("BatchNormalization", [flat.outputs[0], *params], attrs, name=bn_name,
                     num_outputs=n_out)
        back = ir.node("Reshape", [bn.outputs[0], shape.outputs[0]],
                       name=names.fresh(f"{bn_name}_unflatten"))
        new_nodes = [shape, flat, bn, back]
        for node in new_nodes:
            node.outputs[0].name = names.fresh(f"{node.name}_out")
        flat.outputs[0].type = bn.outputs[0].type = y.type
    else:
        bn = ir.node("BatchNormalization", [y, *params], attrs, name=bn_name, num_outputs=n_out)
        bn.outputs[0].name = names.fresh(f"{bn_name}_out")
        new_nodes = [bn]
    for value, key in zip(bn.outputs[1:], extra, strict=True):
        value.name = names.fresh(f"{bn_name}.{key}")
        value.type, value.shape = ir.TensorType(plan.dtype), ir.Shape([c])
    result = new_nodes[-1].outputs[0]
    result.type, result.shape = y.type, y.shape
    graph.insert_after(plan.anchor, new_nodes)
    for user, index in uses:
        user.replace_input_with(index, result)
    if y.is_graph_output():  # the graph output keeps its name and now reads the BN
        graph.outputs[:] = [result if v is y else v for v in graph.outputs]
        old = y.name
        y.name = names.fresh(f"{old}_before_bn")
        result.name = old
    return [v.name for v in bn.outputs[1:3] if v.name]


def _drop_bias(layer: ir.Node, plan: _Plan, entry: Entry, opset: int) -> None:
    entry.details["bias"] = _drop_bias_reason(layer, plan, opset) or \
        "dropped (BN's bias takes its role)"


def _drop_bias_reason(layer: ir.Node, plan: _Plan, opset: int) -> str | None:
    index = LAYERS[layer.op_type].bias_index
    if index is None:
        return f"kept: a {layer.op_type} bias is a separate Add"
    if plan.anchor is not layer:
        return "kept: an activation sits between the layer and its BN"
    if len(layer.inputs) <= index or layer.inputs[index] is None:
        return "none (the layer has no bias)"
    if layer.op_type == "Gemm" and opset < 11:
        return "kept: Gemm's C input is required before opset 11"
    bias = layer.inputs[index]
    if not bias.is_initializer() or len(bias.uses()) != 1:
        return "kept: the bias is not an initializer read by this layer only"
    if layer.op_type == "Gemm":
        beta = layer.attributes.get("beta")
        if beta is not None and beta.as_float() == 0.0:
            return "none (Gemm beta is 0)"
    layer.resize_inputs(index)
    graph = layer.graph
    assert graph is not None
    del graph.initializers[bias.name]
    if bias.is_graph_input():  # (IR < 4 lists initializers among the graph inputs)
        graph.inputs.remove(bias)
    return None
