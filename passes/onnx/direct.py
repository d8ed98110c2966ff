"""The ONNX fold's fast path: plain ``layer -> BN`` graphs folded on the protobuf itself.

Most inference graphs are plain: every ``BatchNormalization`` reads the output of a
default-domain Conv / ConvTranspose / Gemm (:data:`.layers.LAYERS`; MatMul needs shapes) that
only it reads (``CastLike``/``Shape`` reading only its type aside), and the layer's weight and
bias and the BN's parameters are initializers that are not graph inputs (or fills torch's
dynamo exporter computes, :mod:`.dynamo_fills`). :func:`direct_fold` folds such a model in one
linear scan of its ``ModelProto`` (:mod:`.proto_view`) and returns exactly what the full
onnx-ir path (:func:`.fold.fold_onnx`) returns for it: the same graph (as onnx-ir serializes
it), the same tensors byte for byte, the same report. It returns
``None`` (the caller then runs the full path) unless it can prove that, i.e. whenever anything
is not the plain case:

* IR version < 4, no default opset or one below 7, a subgraph, a model-local function that
  holds a BN, external data, sparse initializers, training info or quantization annotations
  (onnx-ir drops or rewrites them), a node reading a value before it is produced, or an
  invalid node :mod:`.validity` would refuse (the full path raises it);
* a BN in training mode or with a statistics output (:mod:`.bn`), excluded by the user, on a
  possibly constant input (:mod:`.constant_bn`), after anything but a plain layer (no-ops,
  layout ops, MatMul, Add), or whose layer output has another data reader or is a graph
  output (or has a type-only reader while the BN output is a graph output);
* a weight or bias that is not an initializer (or a bias that is no :mod:`.dynamo_fills`
  fill), is a graph input or is not a float, a BN parameter that is neither such an
  initializer, a ``Constant`` node's ``value`` nor a fill, or one tensor read twice by the
  same fold; a ``Mul``/``Div`` with a possibly constant operand (a BN-like affine chain,
  :mod:`.sites`; not when an input is a stored non-float tensor, :func:`_maybe_affine`);
  any refusal of the algebra (invalid variance, overflow, non-finite).

The rewrite replays the full path's: :func:`bnfold.algebra.fold_forward` with the arguments
:mod:`.forward` passes (float64, rounded once; alike folds stacked into a few numpy calls by
:func:`bnfold.algebra.fold_forward_many`, bit for bit the same), the bias then the weight written as
:func:`.consts.set_initializer` does (in place when the layer is the tensor's only data
reader and it is no graph input or output, else a new ``<layer>_bnfold_...`` initializer named
by :class:`.consts.Namer`'s rules), Gemm's ``beta`` set to 1, the BN removed as
:func:`.edit.remove_bn` does (its readers read the layer output; a BN output that is a graph
output renames the layer output), and what a fold released that nobody reads any more
pruned as :func:`.edit.prune` prunes it (initializers, ``Constant`` nodes, a fill's cone).
tests/test_onnx_direct.py checks equality with the full path on a corpus and on random
graphs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np
import onnx

from bnfold.algebra import BATCH_MAX_WEIGHT, Folded, fold_forward_many
from bnfold.errors import UnsafeFoldError
from bnfold.io.proto_stream import STREAM_MIN, TensorFacts, copy_fields, proto_bytes
from bnfold.io.split_proto import SplitProto
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import display_name, params, training_reason
from bnfold.passes.onnx.consts import MIN_BUDGET, Namer
from bnfold.passes.onnx.dynamo_fills import computed_fill
from bnfold.passes.onnx.layers import DEFAULT_DOMAINS, LAYERS
from bnfold.passes.onnx.names import module_path
from bnfold.passes.onnx.proto_view import GraphView, NodeView, NotPlain, ValueView
from bnfold.passes.onnx.validity import CHECKED_OPS, node_problem
from bnfold.report import Entry, PassResult, Report
from bnfold.selection import EVERY_BN, Selection

_FORWARD_LAYERS = ("Conv", "ConvTranspose", "Gemm")
_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.dtype(np.float32),
                onnx.TensorProto.DOUBLE: np.dtype(np.float64),
                onnx.TensorProto.FLOAT16: np.dtype(np.float16),
                onnx.TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16)}
_DATA_TYPES = {dtype: code for code, dtype in _FLOAT_TYPES.items()}
_STORED = {code: dtype.newbyteorder("<") for code, dtype in _FLOAT_TYPES.items()}
_AFFINE_HEADS = ("Mul", "Div")


def direct_fold(model: onnx.ModelProto | SplitProto, *, select: Selection = EVERY_BN,
                progress: Callable[[int, int], Any] | None = None,
                max_const_elements: int | None = None) -> PassResult | None:
    """``fold_onnx(model)`` for a plain model (see the module docstring), else ``None``.

    The result is a new model of ``model``'s kind built from its parts (never changed): a
    ``ModelProto``, or a :class:`~bnfold.io.split_proto.SplitProto` whose large tensors (the
    input's held apart, and new ones of at least
    :data:`~bnfold.io.proto_stream.STREAM_MIN` bytes) are held apart as arrays.
    ``progress(done, total)`` is called once per BN as its fold is written (the algebra runs
    for every BN first, so a refusal, which sends the caller to the full path, comes before).
    ``max_const_elements``: :func:`.fold.fold_onnx`'s bound on a computed constant (a
    :mod:`.dynamo_fills` fill over it takes the full path, which keeps that BN and says why).
    """
    planned = _planned(model, select, max_const_elements, progress)
    return None if planned is None else PassResult(planned[0].build(), planned[1])


def direct_inspect(model: onnx.ModelProto | SplitProto, *,
                   max_const_elements: int | None = None) -> Report | None:
    """``inspect_onnx(model)`` for a plain model: :func:`direct_fold`'s report as a dry run
    (every fold planned and checked, no model built), else ``None``. It reads no onnx-ir
    (:mod:`bnfold.lazy_ir`): a plain model's ``bnfold inspect`` never imports it."""
    planned = _planned(model, EVERY_BN, max_const_elements, None)
    if planned is None:
        return None
    report = planned[1]
    report.pass_name, report.dry_run = "inspect_onnx", True
    return report


def _planned(model: onnx.ModelProto | SplitProto, select: Selection, budget: int | None,
             progress: Callable[[int, int], Any] | None) -> tuple[_Plan, Report] | None:
    """The plan of a plain model's folds, and their report; ``None`` if it is not plain."""
    try:
        plan = _Plan.of(model, select, budget)
        if plan is None:
            return None
        with np.errstate(over="ignore"):  # an overflowing fold is refused
            return plan, plan.fold(progress)
    except (NotPlain, UnsafeFoldError):
        return None


class _Plan:
    """The BN sites of a plain model and the edits their folds make."""

    def __init__(self, model: onnx.ModelProto | SplitProto, view: GraphView, opset: int,
                 sites: list[tuple[NodeView, NodeView]],
                 computed: dict[str, np.ndarray]) -> None:
        self.split = isinstance(model, SplitProto)  # then the output holds tensors apart too
        #: the input's tensor facts, when known (the output's are then worked out, not walked)
        self.facts = model.facts if isinstance(model, SplitProto) else None
        self.model = model.proto if isinstance(model, SplitProto) else model
        self.view, self.opset, self.sites = view, opset, sites
        #: initializer name -> its bytes, for the input's tensors held apart
        self.held: dict[str, np.ndarray] = {} if not isinstance(model, SplitProto) else {
            self.model.graph.initializer[i].name: data for i, data in model.data.items()}
        #: name -> its array: tensors read so far, computed fills (:mod:`.dynamo_fills`)
        self.arrays: dict[str, np.ndarray] = dict(computed)
        self.replaced: set[str] = set()  # initializers given a new value (in self.arrays)
        self.added: dict[str, None] = {}  # new initializers, in order (in self.arrays)
        self.released: list[str] = []
        self.removed: set[int] = set()  # node indices
        self.edited: set[int] = set()
        self.rescaled: set[int] = set()  # Gemms whose beta is now 1
        self.renamed: set[str] = set()  # value_info entries that no longer name a value
        self._namer: Namer | None = None

    @classmethod
    def of(cls, model: onnx.ModelProto | SplitProto, select: Selection,
           budget: int | None = None) -> _Plan | None:
        proto = model.proto if isinstance(model, SplitProto) else model
        opset = _default_opset(proto)
        if proto.ir_version < 4 or opset is None or opset < 7 or _bn_in_functions(proto):
            return None
        graph = proto.graph
        if proto.training_info or proto.configuration or graph.quantization_annotation:
            return None  # (parts onnx-ir rewrites or drops)
        if graph.sparse_initializer:
            return None
        view = GraphView(graph)  # (its tensors' wrappers kept: read once for the checks below)
        facts = model.facts if isinstance(model, SplitProto) else None
        unknown = facts is None or facts.external or facts.negative is not None  # (else: none)
        if unknown and (onnx.TensorProto.EXTERNAL in map(operator.attrgetter("data_location"),
                                                         view.initializers.values())
                        or min(itertools.chain.from_iterable(view.dims.values()),
                               default=0) < 0):
            return None
        sites = []  # (first: most models the fast path leaves have a BN that is no site)
        computed: dict[str, np.ndarray] = {}
        for index in view.by_op.get("BatchNormalization", ()):
            site = _site(view, view.view(index), opset, select, computed, budget)
            if site is None:
                return None
            sites.append(site)
        if _invalid_node(view, opset) or any(
                _maybe_affine(view, index)
                for op in _AFFINE_HEADS for index in view.by_op.get(op, ())):
            return None
        return cls(model, view, opset, sites, computed)

    # ------------------------------------------------------------------ the folds

    def fold(self, progress: Callable[[int, int], Any] | None) -> Report:
        """Every site's fold: the algebra first, alike folds stacked
        (:func:`bnfold.algebra.fold_forward_many`, bit for bit the per-BN result), then the
        edits in graph order (they read the readers the earlier edits leave)."""
        report = Report("fold_onnx")
        folded = self._folded()
        for done, ((bn, layer), result) in enumerate(zip(self.sites, folded, strict=True), 1):
            if progress is not None:
                progress(done, len(self.sites))
            report.entries.append(self._edit(bn, layer, result))
        return report

    def _folded(self) -> list[Folded]:
        """``fold_forward`` of every site, as :mod:`.forward` calls it, in site order.

        Reading every array first is what folding one site at a time would read: a tensor a
        fold rewrites in place has that layer as its only data reader (:meth:`_set_initializer`),
        so no other site reads it."""
        self._read_arrays(name for bn, layer in self.sites
                          for name in (*layer.input_names[1:3], *bn.input_names[1:5]))
        groups: dict[tuple, list[int]] = {}
        calls = []
        for index, (bn, layer) in enumerate(self.sites):
            kind = LAYERS[layer.op_type]
            bn_params = params(bn, self.opset, self)
            if isinstance(bn_params, str):
                raise NotPlain(bn_params)
            names = layer.input_names
            weight = self._array(names[1])
            bias = self._array(names[2]) if len(names) > 2 and names[2] else None
            args = (kind.out_axis(layer), kind.groups(layer), kind.bias_scale(layer))
            calls.append((weight, bias, bn_params))
            key = (*args, weight.shape, weight.dtype, bn_params.eps,
                   None if bias is None else (bias.shape, bias.dtype),
                   bn_params.gamma is None, bn_params.beta is None)
            groups.setdefault(key, []).append(index)
        results: list[Folded | None] = [None] * len(calls)
        for key, members in groups.items():
            out_axis, n_groups, bias_scale = key[:3]
            weights, biases, bns = zip(*(calls[i] for i in members), strict=True)
            for i, result in zip(members, fold_forward_many(
                    weights, biases, bns, out_axis=out_axis, groups=n_groups,
                    bias_scale=bias_scale), strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def _edit(self, bn: NodeView, layer: NodeView, folded: Folded) -> Entry:
        name = display_name(bn)
        kind = LAYERS[layer.op_type]
        base = display_name(layer)
        self._set_initializer(layer, 2, folded.bias, f"{base}_bnfold_bias")
        if kind.bias_scale_attr is not None:  # folded into the new bias: set to 1
            self.rescaled.add(layer.index)
            self.edited.add(layer.index)
        self._set_initializer(layer, 1, folded.weight, f"{base}_bnfold_weight")
        self._remove_bn(bn, layer)
        details = {"direction": "forward", "layer": layer.op_type, "kind": "BatchNormalization"}
        return Entry(name, "folded", display_name(layer), details=details,
                     module=module_path(bn))

    def array(self, value: ValueView | None) -> np.ndarray:
        """The current array of initializer ``value`` (the duck-typed ``consts.array`` that
        :func:`.bn.params` reads)."""
        assert value is not None
        arr = self.arrays.get(value.name)  # (most often read already: no second call)
        return arr if arr is not None else self._array(value.name)

    def _array(self, name: str) -> np.ndarray:
        """:meth:`array` of the value named ``name``."""
        arr = self.arrays.get(name)
        if arr is None:
            tensor = self.view.initializers.get(name)
            if tensor is None:
                tensor = self.view.constant_tensor(name)
            assert tensor is not None
            arr = self.arrays[name] = _tensor_array(tensor, self.held.get(name))
        return arr

    def _read_arrays(self, names: Iterable[str]) -> None:
        """Read the initializers among ``names`` into ``self.arrays`` at once
        (:func:`_tensor_arrays`)."""
        view, arrays = self.view, self.arrays
        todo = [n for n in dict.fromkeys(names) if n in view.initializers and n not in arrays]
        read = _tensor_arrays([view.initializers[n] for n in todo], [view.dims[n] for n in todo],
                              [self.held.get(n) for n in todo])
        arrays.update(zip(todo, read, strict=True))

    def _set_initializer(self, node: NodeView, index: int, array: np.ndarray,
                         base: str) -> None:
        """:func:`.consts.set_initializer` on the protobuf."""
        view, names = self.view, node.input_names
        old = names[index] if index < len(names) and names[index] else None
        if old is not None:
            self.released.append(old)
            if (self._is_initializer(old) and len(view.data_readers(old)) == 1
                    and old not in view.inputs and old not in view.outputs):
                self.arrays[old] = array
                self.replaced.add(old)
                return
            view.readers[old].remove((node.index, index))
        name = self._fresh(base)
        self.arrays[name] = array
        self.added[name] = None
        view.readers[name] = [(node.index, index)]
        if index >= len(names):
            names.extend([""] * (index + 1 - len(names)))
        names[index] = name
        self.edited.add(node.index)

    def _is_initializer(self, name: str) -> bool:
        return name in self.view.initializers or name in self.added

    def _remove_bn(self, bn: NodeView, layer: NodeView) -> None:
        """:func:`.edit.remove_bn` then :func:`.edit.prune` of its parameters."""
        view, index, names = self.view, bn.index, bn.input_names
        x, y = names[0], bn.output_names[0]
        self.removed.add(index)
        self.renamed.add(y)
        all_readers = view.readers
        for i, name in enumerate(names):
            if name:
                all_readers[name].remove((index, i))
        self.released.extend(n for n in names[1:] if n)
        readers = all_readers.pop(y, [])
        if y in view.outputs:  # the layer output takes over the graph output's name
            self.renamed.add(x)
            layer.output_names[0] = y
            self.edited.add(layer.index)
            view.readers[y] = readers
            view.producer[y] = layer.index
        else:
            for node, i in readers:
                view.input_names[node][i] = x
                self.edited.add(node)
            view.readers[x] = view.readers.get(x, []) + readers  # (after its type readers)

    def _fresh(self, base: str) -> str:
        """:meth:`.consts.Namer.fresh` over the names :class:`.consts.Namer` takes."""
        if self._namer is None:
            view = self.view
            self._namer = Namer(used=view.known.union(
                view.outputs, map(operator.attrgetter("name"), view.nodes)))
        return self._namer.fresh(base)

    # ------------------------------------------------------------------ the output

    def build(self) -> onnx.ModelProto | SplitProto:
        """The folded model: ``self.model`` with the edits, copied field by field (a
        :class:`~bnfold.io.split_proto.SplitProto` when the input is one, carrying the
        :class:`~bnfold.io.proto_stream.TensorFacts` the input's facts and the edits give:
        the save then walks no tensor)."""
        src, view = self.model, self.view
        dead = self._prune()
        out = onnx.ModelProto()
        copy_fields(src, out, lambda field: field.name != "graph")
        graph = out.graph
        copy_fields(src.graph, graph, lambda field: field.name not in (
            "node", "initializer", "value_info"))
        graph.node.extend([n for i, n in enumerate(view.nodes) if i not in self.removed])
        edited = sorted(self.edited - self.removed)
        positions = np.subtract(edited, np.searchsorted(sorted(self.removed), edited))
        for index, position in zip(edited, positions.tolist(), strict=True):
            self._write_node(index, graph.node[position])
        held: dict[int, np.ndarray] = {}
        replaced, arrays, apart, kept = self.replaced, self.arrays, self.held, graph.initializer
        for name, tensor in view.initializers.items():
            if name in replaced:
                self._add_tensor(graph, arrays[name], name, held)
            elif name not in dead:
                if name in apart:
                    held[len(kept)] = apart[name]
                kept.append(tensor)
        for name in self.added:
            if name not in dead:
                self._add_tensor(graph, self.arrays[name], name, held)
        graph.value_info.extend(v for v in src.graph.value_info if v.name not in self.renamed)
        if not self.split:
            return out
        return SplitProto(out, held, self._output_facts(dead))

    def _output_facts(self, dead: set[str]) -> TensorFacts | None:
        """The :class:`~bnfold.io.proto_stream.TensorFacts` of :meth:`build`'s output (``dead``:
        the initializers it drops), from the input's, when known: the same but for the
        initializers' bytes (the input had no negative dim nor sparse tensor, or its load
        would have refused it; the new tensors are float arrays). Those bytes are counted
        over the input's tensors the fold dropped or replaced, or over those it kept, whichever
        are fewer."""
        if self.facts is None:
            return None
        view, arrays = self.view, self.arrays
        gone = {n for n in dead | self.replaced if n in view.initializers}
        tensors: Iterable[str] = gone if 2 * len(gone) <= len(view.initializers) else (
            n for n in view.initializers if n not in gone)
        counted = sum(proto_bytes(view.initializers[n], view.dims[n]) for n in tensors)
        kept = self.facts.initializer_bytes - counted if tensors is gone else counted
        new = sum(arrays[n].nbytes for n in itertools.chain(self.replaced, self.added)
                  if n not in dead)
        return dataclasses.replace(self.facts, initializer_bytes=kept + new)

    def _prune(self) -> set[str]:
        """:func:`.edit.prune` of the released names: an unread initializer is dead (the
        names returned); a node whose outputs nobody reads and none of which is a graph
        output goes (into ``removed``: a ``Constant``, a fill's cone), and its inputs are
        looked at in turn. Graph inputs stay."""
        view = self.view
        readers, graph_outputs, inputs = view.readers, view.outputs, view.inputs
        initializers, added = view.initializers, self.added
        dead: set[str] = set()
        todo = list(self.released)
        while todo:
            name = todo.pop()
            if readers.get(name) or name in graph_outputs or name in inputs:
                continue
            if name in initializers or name in added:  # (self._is_initializer)
                dead.add(name)
                continue
            index = view.producer.get(name)
            outputs = [] if index is None else [o for o in view.output_names[index] if o]
            if index is None or index in self.removed or any(
                    readers.get(o) or o in graph_outputs for o in outputs):
                continue
            self.removed.add(index)
            self.renamed.update(outputs)
            for i, read in enumerate(view.input_names[index]):
                if read:
                    readers[read].remove((index, i))
                    todo.append(read)
        return dead

    def _add_tensor(self, graph: onnx.GraphProto, array: np.ndarray, name: str,
                    held: dict[int, np.ndarray]) -> None:
        """Append ``array`` as initializer ``name`` (:func:`_write_tensor`); for a split
        output one of at least :data:`~bnfold.io.proto_stream.STREAM_MIN` bytes is hollow,
        its bytes held apart (a view of ``array`` when it is C-ordered little-endian)."""
        hollow = self.split and array.nbytes >= STREAM_MIN
        _write_tensor(graph, array, name, hollow=hollow)
        if hollow:
            held[len(graph.initializer) - 1] = np.ascontiguousarray(
                _little_endian(array)).reshape(-1).view(np.uint8)

    def _write_node(self, index: int, proto: onnx.NodeProto) -> None:
        """Write node ``index``'s edited names (and Gemm's ``beta``) into its copy ``proto``."""
        inputs, outputs = self.view.input_names[index], self.view.output_names[index]
        if proto.input[:] != inputs:
            del proto.input[:]
            proto.input.extend(inputs)
        if proto.output[:] != outputs:
            del proto.output[:]
            proto.output.extend(outputs)
        if index in self.rescaled:
            attr = LAYERS[self.view.op_types[index]].bias_scale_attr
            assert attr is not None
            _set_float(proto, attr, 1.0)


def _invalid_node(view: GraphView, opset: int) -> bool:
    """Whether :func:`.validity.node_problem` refuses a default-domain node of ``view``."""
    return any(node_problem(view.view(index), opset, view.shape)
               for op in CHECKED_OPS for index in view.by_op.get(op, ()))


def _site(view: GraphView, bn: NodeView, opset: int, select: Selection,
          computed: dict[str, np.ndarray], budget: int | None = None
          ) -> tuple[NodeView, NodeView] | None:
    """``(bn, layer)`` when ``bn`` is a plain forward-fold site, else ``None``; a layer bias
    or BN parameter computed as :mod:`.dynamo_fills` reads it goes into ``computed``
    (``budget``: the most elements the full path evaluates a computed constant to; by default
    at least the weight's size, what :class:`.consts.Constants` admits at the least)."""
    if training_reason(bn, opset) or any(bn.output_names[1:]) or len(bn.input_names) != 5:
        return None
    if select != EVERY_BN and select.refusal((display_name(bn), module_path(bn))):
        return None
    x, y = bn.input_names[0], bn.output_names[0]
    producer = view.producer.get(x)
    if not x or x in view.constant or x in view.outputs or producer is None \
            or view.data_readers(x) != [(bn.index, 0)] \
            or (y in view.outputs and view.readers[x] != [(bn.index, 0)]):
        return None  # (a renamed layer output would leave its type-only readers behind)
    layer = view.view(producer)
    if layer.domain not in DEFAULT_DOMAINS or layer.op_type not in _FORWARD_LAYERS \
            or layer.output_names[0] != x:
        return None
    names = layer.input_names
    if not 2 <= len(names) <= 3 or not names[1]:
        return None
    tensors = [n for n in names[1:] if n]
    parameters = bn.input_names[1:]
    if len(set(tensors + parameters)) != len(tensors) + len(parameters) \
            or not _float_tensor(view, tensors[0]):
        return None
    weight = view.initializers[tensors[0]]
    limit = max(math.prod(view.dims[tensors[0]]), MIN_BUDGET) if budget is None else budget
    for name in tensors[1:]:
        if _plain_tensor(view, name):
            if not _float_tensor(view, name):
                return None
            continue
        bias = computed_fill(view, name, limit)
        if bias is None or bias.dtype != _FLOAT_TYPES[weight.data_type]:
            return None
        computed[name] = bias
    for name in parameters:
        if not _plain_tensor(view, name) and view.constant_tensor(name) is None:
            fill = computed_fill(view, name, limit)
            if fill is None:
                return None
            computed[name] = fill
    return bn, layer


def _float_tensor(view: GraphView, name: str) -> bool:
    return _plain_tensor(view, name) and view.initializers[name].data_type in _FLOAT_TYPES


def _plain_tensor(view: GraphView, name: str) -> bool:
    return name in view.initializers and name not in view.inputs


def _tensor_array(tensor: onnx.TensorProto, held: np.ndarray | None = None) -> np.ndarray:
    """The array onnx-ir reads from ``tensor`` (raw little-endian bytes read directly, or
    ``held``, its ``raw_data`` held apart; other encodings through onnx-ir itself);
    :class:`NotPlain` if its data does not fill its shape."""
    dtype = _STORED.get(tensor.data_type)
    if held is not None and dtype is None:
        raise NotPlain(f"tensor {tensor.name!r} is held apart and not a float tensor")
    if dtype is not None and (held is not None or tensor.HasField("raw_data")):
        raw = tensor.raw_data if held is None else held
        count = math.prod(tensor.dims)
        if len(raw) != count * dtype.itemsize:
            raise NotPlain(f"tensor {tensor.name!r} data does not fill its shape")
        return np.frombuffer(raw, dtype).reshape(tuple(tensor.dims))
    try:
        return ir.serde.TensorProtoTensor(tensor).numpy()
    except ValueError as exc:
        raise NotPlain(str(exc)) from exc


def _tensor_arrays(tensors: list[onnx.TensorProto], shapes: list[tuple[int, ...]],
                   held: list[np.ndarray | None]) -> list[np.ndarray]:
    """``[_tensor_array(t, h) for t, h in zip(tensors, held)]`` (``shapes``: their dims;
    ``held``: each one's bytes held apart, or ``None``): the same arrays, with
    the raw tensors of one data type and non-empty shape read by one numpy call over their
    joined bytes (each array a row of it). A tensor of more than
    :data:`~bnfold.algebra.BATCH_MAX_WEIGHT` elements is read alone: joining it would copy
    its bytes once more for no saving."""
    arrays: list[np.ndarray | None] = [None] * len(tensors)
    alike: dict[tuple[np.dtype, tuple[int, ...]], list[int]] = {}
    for i, (tensor, shape, data) in enumerate(zip(tensors, shapes, held, strict=True)):
        dtype = _STORED.get(tensor.data_type)
        if dtype is not None and shape and math.prod(shape) <= BATCH_MAX_WEIGHT \
                and (data is not None or tensor.HasField("raw_data")):
            alike.setdefault((dtype, shape), []).append(i)
        else:
            arrays[i] = _tensor_array(tensor, data)
    for (dtype, shape), members in alike.items():
        raws = [tensors[i].raw_data if held[i] is None else held[i] for i in members]
        if {len(raw) for raw in raws} != {math.prod(shape) * dtype.itemsize}:
            raise NotPlain("a tensor's data does not fill its shape")
        rows = np.frombuffer(b"".join(raws), dtype).reshape(len(members), *shape)
        for i, row in zip(members, rows, strict=True):
            arrays[i] = row
    return arrays  # type: ignore[return-value]


def _write_tensor(graph: onnx.GraphProto, array: np.ndarray, name: str, *,
                  hollow: bool = False) -> None:
    """Append to ``graph``'s initializers the ``TensorProto`` onnx-ir serializes for
    ``ir.Tensor(array, name=name)``: dims, data type, name and little-endian raw data (empty,
    but present, if ``hollow``), set in one call."""
    graph.initializer.add(dims=array.shape, data_type=_DATA_TYPES[array.dtype], name=name,
                          raw_data=b"" if hollow else _little_endian(array).tobytes())


def _little_endian(array: np.ndarray) -> np.ndarray:
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def _set_float(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _maybe_affine(view: GraphView, index: int) -> bool:
    """Whether ``Mul``/``Div`` node ``index`` may belong to a BN-like affine chain
    (:mod:`.sites`): it reads a possibly constant value, and no input of it is a stored tensor
    (an initializer or a ``Constant``'s ``value``) of a non-float type. ONNX gives both inputs
    one type, and the steps of a chain share it, so such a node's chain holds a non-float
    constant, which :func:`.sites.affine_site` never takes for a site (nor reports): shape
    arithmetic, as TorchScript exports ``chunk``."""
    names = view.input_names[index]
    if not any(n in view.constant for n in names):
        return False
    for name in names:
        tensor = view.initializers.get(name) or view.constant_tensor(name)
        if tensor is not None and tensor.data_type not in _FLOAT_TYPES:
            return False
    return True


def _default_opset(model: onnx.ModelProto) -> int | None:
    versions = {i.domain: i.version for i in model.opset_import}
    return versions.get("", versions.get("ai.onnx"))


def _bn_in_functions(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "BatchNormalization" or any(a.type in (
        onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
        for f in model.functions for n in f.node)
