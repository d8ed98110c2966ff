"""Which files a model's external tensors name, and the folder they must stay inside.

An ONNX tensor stored outside the model names a file by a ``location`` relative to a base
folder (the model file's folder). bnfold reads such a file only when it lies inside that folder:
the location is relative, does not climb out with ``..``, and does not reach out through a
symlink. A model that comes as a path has its folder; an in-memory model has none, so one that
names external files needs ``base_dir=`` (else :class:`BadInputError`), and then the same checks
apply as for a path.
"""

from __future__ import annotations

import functools
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx

from bnfold.errors import BadInputError
from bnfold.gc_pause import gc_paused
from bnfold.lazy_ir import ir

#: A graph file larger than this is not parsed just to list the data files it names (a model
#: with external data keeps its graph small; a larger file holds its tensors inline).
GRAPH_SCAN_LIMIT = 64 * 1024**2
#: The key of the ``external_data`` entry that holds a tensor's file name, as serialized.
_LOCATION_KEY = b"location"
#: The model metadata key under which bnfold records the name of the data file it wrote for
#: that model (:mod:`bnfold.io.staged_save` removes an obsolete data file only when so named).
OWN_DATA_KEY = "bnfold.data_file"


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every external tensor of ``model``: initializers and tensor attributes, in every graph
    and function body."""
    return (tensor for tensor, _ in external_slots(model))


def external_slots(model: ir.Model, *, initializers: bool = True
                   ) -> Iterator[tuple[ir.ExternalTensor, Callable[[ir.TensorProtocol], None]]]:
    """:func:`external_tensors` (those of node attributes only, without ``initializers``),
    each with a function that puts another tensor in its place (the initializer's value, or
    the node attribute that holds it)."""
    walked = (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS, ir.AttributeType.GRAPH,
              ir.AttributeType.GRAPHS)
    bodies: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    while bodies:  # every graph, subgraph and function body, each node visited once
        body = bodies.pop()
        if isinstance(body, ir.Graph) and initializers:
            for value in body.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    yield value.const_value, functools.partial(setattr, value, "const_value")
        for node in body:
            if not node.attributes:
                continue
            for key, attr in list(node.attributes.items()):
                if attr.type not in walked or attr.is_ref() or attr.value is None:
                    continue
                single = attr.type in (ir.AttributeType.TENSOR, ir.AttributeType.GRAPH)
                items = [attr.value] if single else list(attr.value)
                if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                    bodies.extend(items)
                    continue
                for i, tensor in enumerate(items):
                    if isinstance(tensor, ir.ExternalTensor):
                        yield tensor, functools.partial(_put_attr, node, key, i)


def _put_attr(node: ir.Node, key: str, index: int, tensor: ir.TensorProtocol) -> None:
    """Put ``tensor`` at ``index`` of ``node``'s tensor attribute ``key`` (a new attribute:
    the old one, maybe shared with another model, is not changed)."""
    old = node.attributes[key]
    if old.type == ir.AttributeType.TENSOR:
        node.attributes[key] = ir.Attr(key, old.type, tensor, doc_string=old.doc_string)
        return
    items = list(old.value)
    items[index] = tensor
    node.attributes[key] = ir.Attr(key, old.type, items, doc_string=old.doc_string)


def bind_external_data(model: ir.Model, base_dir: str | os.PathLike[str] | None,
                       label: str = "model", model_file: Path | None = None) -> None:
    """Give the external tensors of an in-memory ``model`` their folder and check them.

    ``base_dir`` (if given) becomes the folder of every external tensor that has none (a new
    tensor in its place: the old one, maybe shared with the caller's model, is not changed);
    a tensor with neither is refused, as is any whose file lies outside its folder (absolute
    location, ``..`` escape, symlink out), and one given ``base_dir`` here whose file there is
    missing or too short (:func:`~bnfold.io.filechecks.external_problem`; a model read from a
    file has its files checked by the load), or one that names ``model_file``, the file the
    model was read from (its graph's own bytes are no weights). Raises :class:`BadInputError`
    naming the location.
    """
    for tensor, put in list(external_slots(model)):
        bound = not tensor.base_dir
        if bound:
            if base_dir is None:
                raise BadInputError(
                    f"{label}: an in-memory model whose tensor {tensor.name!r} is stored in "
                    f"external file {tensor.location!r}; pass base_dir= (the folder that file "
                    "is relative to), or give the model's path")
            tensor = ir.ExternalTensor(
                tensor.location, tensor.offset, tensor.length, tensor.dtype,
                shape=tensor.shape, name=tensor.name, doc_string=tensor.doc_string,
                metadata_props=dict(tensor.metadata_props), base_dir=base_dir)
            put(tensor)
        path = check_contained(tensor.location, Path(tensor.base_dir), label)
        if model_file is not None and path.resolve() == model_file.resolve():
            raise BadInputError(f"{label}: external data location {tensor.location!r} names "
                                "the model file itself")
        if bound:
            from bnfold.io.filechecks import external_problem  # (it imports this module)

            problem = external_problem(tensor)
            if problem:
                raise BadInputError(f"{label}: invalid external data for tensor "
                                    f"{tensor.name!r}: {problem}")


def check_contained(location: str, folder: Path, label: str) -> Path:
    """The file ``location`` names inside ``folder``; :class:`BadInputError` if it is not
    inside (absolute, ``..`` out of the folder, or a symlink that leads out)."""
    where = f"{label}: external data location {location!r}"
    if "\0" in location:
        raise BadInputError(f"{where} holds a NUL byte; no file has such a name")
    if not location or os.path.isabs(location) or Path(location).drive:
        raise BadInputError(f"{where} is not a relative path")
    root = Path(os.path.abspath(folder))
    path = Path(os.path.normpath(root / location))
    if not path.is_relative_to(root) or path == root:
        raise BadInputError(f"{where} leaves the folder {root}")
    if not path.resolve().is_relative_to(root.resolve()):
        raise BadInputError(f"{where} leads out of the folder {root} through a symlink")
    return path


def referenced_files(model: ir.Model) -> set[Path]:
    """The resolved paths of the files ``model``'s external tensors read."""
    return {Path(t.path).resolve() for t in external_tensors(model) if t.base_dir}


def files_named_by(path: Path) -> set[Path]:
    """The resolved paths of the external data files that the ONNX file ``path`` names inside
    its folder; empty when it is not a readable, reasonably small ONNX file.

    An external tensor names its file in an entry whose key is the string ``location``, which
    the serialized file holds verbatim: a file without those bytes names no data file and is
    not parsed (the common case, a model whose tensors are inline, costs one search of the
    file's read-only memory map, no copy).
    """
    return data_files_of(path)[0]


def data_files_of(path: Path) -> tuple[set[Path], str | None]:
    """:func:`files_named_by` ``path``, and the data file name bnfold recorded in it as its
    own (:data:`OWN_DATA_KEY`; ``None`` without one), from one parse."""
    try:
        info = os.stat(path)  # (before opening it: a FIFO's open would wait for a writer)
        if not stat.S_ISREG(info.st_mode) or not 0 < info.st_size <= GRAPH_SCAN_LIMIT:
            return set(), None
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(_LOCATION_KEY) < 0:
                return set(), None
            with gc_paused():
                proto = onnx.load_model_from_string(data[:])
                locations = set(_proto_locations(proto))
    except Exception:  # not ONNX (any parse error): it names no data files
        return set(), None
    folder, named = path.parent, set()
    for location in locations:
        try:
            named.add(check_contained(location, folder, str(path)).resolve())
        except BadInputError:
            continue  # a location bnfold would never read
    own = next((p.value for p in proto.metadata_props if p.key == OWN_DATA_KEY), None)
    return named, own


def named_by_another(data: Path, skip: Path) -> bool:
    """Whether a file in ``data``'s folder other than ``skip`` (and ``data`` itself) names
    ``data`` as its external data (:func:`files_named_by`): a copy of a model, kept beside
    it, still reads it. Only files that hold the data file's name are parsed."""
    name = os.fsencode(data.name)
    with os.scandir(data.parent) as entries:
        for entry in entries:
            if entry.name in (data.name, skip.name) or not entry.is_file():
                continue
            try:
                if not 0 < entry.stat().st_size <= GRAPH_SCAN_LIMIT:
                    continue
                with open(entry.path, "rb") as f, \
                        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as held:
                    if held.find(name) < 0:
                        continue
            except OSError:
                continue
            if data in files_named_by(Path(entry.path)):
                return True
    return False


def _proto_locations(proto: onnx.ModelProto) -> Iterator[str]:
    """The ``location`` of every external tensor of ``proto`` (initializers and tensor
    attributes, in every graph, subgraph and function body), read off the protobuf without
    building an onnx-ir model (a listing of a large graph costs a parse, not a conversion)."""
    for tensor in proto_external_tensors(proto):
        yield from (e.value for e in tensor.external_data if e.key == "location")


def proto_external_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``proto`` stored as external data (see :func:`_proto_locations`)."""
    return (t for t, _ in proto_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL)


#: The roles :func:`proto_tensors` gives a tensor.
INITIALIZER, ATTRIBUTE, SPARSE = "initializer", "attribute", "sparse"


def proto_tensors(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """``(tensor, role)`` for every tensor of ``proto``, read off the protobuf: each graph's
    initializers (:data:`INITIALIZER`), the values of its sparse initializers (:data:`SPARSE`),
    then its nodes' tensor attributes (:data:`ATTRIBUTE`) and subgraphs in node order (depth
    first), then the function bodies."""
    yield from _body_tensors(proto.graph)
    for function in proto.functions:
        yield from _body_tensors(function)


def _body_tensors(body: Any) -> Iterator[tuple[onnx.TensorProto, str]]:
    for tensor in getattr(body, "initializer", ()):
        yield tensor, INITIALIZER
    for sparse in getattr(body, "sparse_initializer", ()):
        yield sparse.values, SPARSE
    for node in body.node:
        for attr in node.attribute:
            kind = attr.type  # (what onnx-ir reads: the field of the attribute's type)
            if kind == _TENSOR:
                yield attr.t, ATTRIBUTE
            elif kind == _TENSORS:
                for tensor in attr.tensors:
                    yield tensor, ATTRIBUTE
            elif kind == _GRAPH:
                yield from _body_tensors(attr.g)
            elif kind == _GRAPHS:
                for graph in attr.graphs:
                    yield from _body_tensors(graph)


_TENSOR, _TENSORS, _GRAPH, _GRAPHS = (onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS,
                                      onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
