"""Single-file ONNX models read without a copy of their large weights: :class:`SplitProto`.

Most of a large model file is the ``raw_data`` of its large main-graph initializers
(``ModelProto.graph`` field 7, ``GraphProto.initializer`` field 5, ``TensorProto.raw_data``
field 9). Parsing the file copies those bytes into the proto, and every read of
``tensor.raw_data`` copies them again. :func:`read_split` instead walks the protobuf wire
format of the memory-mapped file down to those fields, parses the file with each such
``raw_data`` empty (a *hollow* tensor: every other field as it is), and keeps the bytes as
read-only views of the map. :func:`~bnfold.io.proto_stream.write_proto` writes a
``SplitProto`` back from those views (``buffers=``), so that the bytes of an unchanged weight
go from the input's page cache to the output file and nowhere else, and a folded weight goes
from its numpy array. Exact: :meth:`SplitProto.whole` is the proto ``onnx.load`` parses, and the
file written is byte for byte that proto serialized.

Anything unusual on the wire (a second ``graph`` field, a second ``raw_data``, a group, a
length past the end), a file under :data:`SPLIT_MIN` bytes, or a graph with more entries than
the walk's budget (one per :data:`BYTES_PER_ENTRY` bytes of file: a graph of many small
tensors is cheaper to parse whole) is parsed whole, as :func:`~bnfold.io.proto_stream.read_proto`
does, with no buffers.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfold.io.proto_stream import (
    FIELD_GRAPH,
    FIELD_INITIALIZER,
    FIELD_RAW_DATA,
    LITTLE_ENDIAN,
    STREAM_MIN,
    TensorFacts,
    frame,
    read_proto,
)
from bnfold.lazy_ir import ir

#: Files smaller than this are parsed whole: their copies cost less than the walk.
SPLIT_MIN = 1 << 20
#: The walk gives up on a graph with more entries than one per this many bytes of file.
BYTES_PER_ENTRY = 16 * 1024

_LENGTH_DELIMITED = 2


@dataclass(eq=False)
class SplitProto:
    """An ONNX model as ``proto`` with the bytes of some main-graph initializers held apart.

    ``data[i]``: the ``raw_data`` of ``proto.graph.initializer[i]``, whose own ``raw_data`` is
    empty, as a flat read-only ``uint8`` array (a view of the file it was read from, or a new
    array a fold wrote). With no ``data`` it is just ``proto``. ``facts``: the
    :func:`~bnfold.io.proto_stream.tensor_facts` of a model that passed
    :func:`~bnfold.io.filechecks.check_initializers`, when whoever made it knows them
    (:func:`bnfold.io.fileio.load_split` does): a fold then does not walk its tensors again.
    A ``SplitProto`` is not changed once made."""

    proto: onnx.ModelProto
    data: dict[int, np.ndarray] = field(default_factory=dict)
    facts: TensorFacts | None = None

    def whole(self) -> onnx.ModelProto:
        """The model as one ``ModelProto`` (``proto`` itself when no bytes are held apart;
        else a copy with each hollow tensor's ``raw_data`` filled in)."""
        if not self.data:
            return self.proto
        out = onnx.ModelProto()
        out.CopyFrom(self.proto)
        for index, data in self.data.items():
            out.graph.initializer[index].raw_data = data.tobytes()
        return out

    def to_ir(self, *, copy: bool = True) -> ir.Model:
        """The model as an ``onnx_ir.Model``: ``ir.serde.deserialize_model`` of :meth:`whole`,
        each tensor held apart an ``ir.Tensor`` of its bytes as an array. With ``copy``, those
        still in the file's map are copied, so that the model needs no file and never reads
        one that may change; without, they stay views of the map (for a caller that is done
        with the model before the file can change, as the CLI is). An array a fold wrote is
        used as it is. Tensors whose bytes are not one element type per whole byte (4-bit,
        strings), and any on a big-endian host, take :meth:`whole`."""
        tensors = self.proto.graph.initializer
        kinds = {i: ir.DataType(tensors[i].data_type) for i in self.data}
        if not LITTLE_ENDIAN or any(
                kind == ir.DataType.STRING or kind.bitwidth % 8 for kind in kinds.values()):
            return ir.serde.deserialize_model(self.whole())
        model = ir.serde.deserialize_model(self.proto)  # (hollow tensors: never read)
        values = model.graph.initializers
        if len(values) != len(tensors):  # (a name used twice: as onnx-ir reads it whole)
            return ir.serde.deserialize_model(self.whole())
        for index, data in self.data.items():
            tensor, kind = tensors[index], kinds[index]
            if copy and _in_map(data):
                data = data.copy()
            array = data.view(kind.numpy()).reshape(tuple(tensor.dims))
            values[tensor.name].const_value = ir.Tensor(
                array, dtype=kind, name=tensor.name, doc_string=tensor.doc_string or None,
                metadata_props={p.key: p.value for p in tensor.metadata_props})
        return model

    def raw_size(self, index: int) -> int:
        """The ``raw_data`` length of main-graph initializer ``index``."""
        data = self.data.get(index)
        return len(self.proto.graph.initializer[index].raw_data) if data is None else data.size


def _in_map(data: np.ndarray) -> bool:
    """Whether ``data`` is a view of a file's map (what :func:`read_split` holds)."""
    base = data.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


class _Unusual(Exception):
    """The wire format holds something the walk does not split: parse the file whole."""


def read_split(path: Path) -> SplitProto:
    """The model in the file at ``path`` (no external data read) as a :class:`SplitProto`:
    its large main-graph ``raw_data`` fields as views of a read-only map of the file when the
    walk finds any, else parsed whole by :func:`~bnfold.io.proto_stream.read_proto` (whose
    errors are protobuf's, as from ``onnx.load``)."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(path.suffix)
    if fmt not in (None, "protobuf") or path.stat().st_size < SPLIT_MIN:
        return SplitProto(read_proto(path))
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return SplitProto(read_proto(path))
    try:
        found = _hollow(mapped, len(mapped) // BYTES_PER_ENTRY)
    except (_Unusual, IndexError):
        found = None
    if found is not None:
        hollow, spans = found
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(hollow)
        except Exception:  # protobuf's own error comes from parsing the file whole
            found = None
    if found is None:
        mapped.close()
        return SplitProto(read_proto(path))
    return SplitProto(proto, {index: np.frombuffer(mapped, np.uint8, end - start, start)
                              for index, (start, end) in spans.items()})


def _hollow(buf: mmap.mmap, budget: int) -> tuple[bytes, dict[int, tuple[int, int]]] | None:
    """The file's bytes with each main-graph initializer's ``raw_data`` of at least
    :data:`~bnfold.io.proto_stream.STREAM_MIN` bytes made empty (the lengths of the fields
    around it rewritten), and where each of those payloads lies, by initializer index;
    ``None`` when there is none or the graph has more than ``budget`` entries."""
    graphs = [f for f in _fields(buf, 0, len(buf)) if f[0] == FIELD_GRAPH]
    if len(graphs) != 1:
        raise _Unusual
    _, graph_field, graph_start, graph_end = graphs[0]
    pieces: list[bytes] = []
    spans: dict[int, tuple[int, int]] = {}
    copied = graph_start  # the graph's bytes before this offset are in pieces
    index = -1
    for count, (number, entry, start, end) in enumerate(_fields(buf, graph_start, graph_end)):
        if count > budget:
            return None
        if number != FIELD_INITIALIZER:
            continue
        index += 1
        if end - start < STREAM_MIN:
            continue
        raws = [f for f in _fields(buf, start, end) if f[0] == FIELD_RAW_DATA]
        if len(raws) > 1:
            raise _Unusual
        if not raws or raws[0][3] - raws[0][2] < STREAM_MIN:
            continue
        _, raw_field, raw_start, raw_end = raws[0]
        tensor = buf[start:raw_field] + frame(FIELD_RAW_DATA, 0) + buf[raw_end:end]
        pieces += [buf[copied:entry], frame(FIELD_INITIALIZER, len(tensor)), tensor]
        copied = end
        spans[index] = (raw_start, raw_end)
    if not spans:
        return None
    pieces.append(buf[copied:graph_end])
    body = b"".join(pieces)
    return buf[:graph_field] + frame(FIELD_GRAPH, len(body)) + body + buf[graph_end:], spans


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, field offset, value start, value end)`` of each length-delimited field
    in ``buf[start:end]`` (other wire types are skipped); :class:`_Unusual` on a group or a
    field past ``end``."""
    pos = start
    while pos < end:
        at = pos
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LENGTH_DELIMITED:
            length, pos = _read_varint(buf, pos)
            pos += length
            if pos > end:
                raise _Unusual
            yield key >> 3, at, pos - length, pos
        else:
            raise _Unusual
    if pos != end:
        raise _Unusual


def _read_varint(buf: mmap.mmap, pos: int) -> tuple[int, int]:
    """The base-128 varint at ``buf[pos]`` and the offset after it."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Unusual
