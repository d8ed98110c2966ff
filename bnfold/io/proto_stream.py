"""Read and write ONNX model files without a whole-file copy of their bytes in memory.

:func:`read_proto` parses a file from a read-only memory map of it, not from a ``bytes`` read.

A ``ModelProto`` on the wire is its set fields in field-number order, a length-delimited field
being ``tag varint`` (``field_number << 3 | 2``), ``length varint``, then its bytes. The bulk of
a model is the ``raw_data`` (field 9) of the large ``TensorProto`` initializers (field 5) of its
``GraphProto`` (field 7). :func:`write_proto` serializes every other field in small
part-messages (protobuf's own bytes), writes the framing of those three levels itself, and
writes each large tensor's bytes straight from its buffer, or serializes that tensor alone
just before writing it (so that at most one copy of its bytes is held): the file is byte for
byte ``proto.SerializeToString()`` (unknown fields, which onnx-ir drops too, aside) without that
whole string being built. :func:`write_model` does the same for an onnx-ir model: it
serializes the model with its large numpy tensors hollow (header only) and writes their arrays
in place, so the file is byte for byte what ``onnx_ir.save`` writes.
"""

from __future__ import annotations

import math
import mmap
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from bnfold.io.external_data import INITIALIZER, SPARSE, proto_tensors
from bnfold.lazy_ir import ir

#: Initializers with at least this many bytes of ``raw_data`` are streamed, not serialized.
STREAM_MIN = 64 * 1024

#: Field numbers: ``ModelProto.graph``, ``GraphProto.initializer``, ``TensorProto.raw_data``.
FIELD_GRAPH, FIELD_INITIALIZER, FIELD_RAW_DATA = 7, 5, 9
#: Whether this machine stores numbers as ONNX raw data does (then arrays are written as they are).
LITTLE_ENDIAN = sys.byteorder == "little"

#: A streamed tensor's bytes: an exact ``bytes`` or a flat ``uint8`` array viewing them.
Buffer = bytes | np.ndarray


class _Serialized(NamedTuple):
    """A tensor proto to serialize just before it is written, and its size (its bytes)."""

    tensor: onnx.TensorProto
    nbytes: int


def read_proto(path: Path) -> onnx.ModelProto:
    """Parse the ONNX file at ``path`` as ``onnx.load(path, load_external_data=False)`` does,
    a binary one straight from a read-only memory map of it (no copy of the file in memory;
    the parsed proto owns its bytes, the map is closed on return). Parse errors are
    protobuf's, as from ``onnx.load``; a text format, or a file that cannot be mapped, is
    read by ``onnx.load``."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(path.suffix)
    with open(path, "rb") as f:
        try:
            mapped = None if fmt not in (None, "protobuf") else mmap.mmap(
                f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            mapped = None
        if mapped is None:
            return onnx.load(str(path), load_external_data=False)
        proto = onnx.ModelProto()
        with mapped, memoryview(mapped) as view:
            decoded = proto.ParseFromString(view)
            if decoded is not None and decoded != len(view):
                raise DecodeError(f"protobuf decoding consumed {decoded} of {len(view)} bytes")
    return proto


def write_model(model: ir.Model, f: BinaryIO) -> None:
    """Write ``model`` to ``f``, byte for byte ``ir.serde.serialize_model(model)`` serialized.

    While the model is serialized, each large numpy-backed tensor of the main graph is swapped
    for a hollow stand-in (same name, dtype, shape, doc string and metadata, no bytes), and its
    array is then written as it lies in memory (``tobytes()`` without the copy); a large tensor
    held as a proto is copied into the model proto by onnx-ir as usual and serialized alone as
    it is written.
    The model is as it was afterwards, also on error (the tensors are named after their values,
    as ``serialize_model`` names them)."""
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    streamed: dict[int, Buffer | None] = {}
    swapped: list[tuple[ir.Value, ir.Tensor]] = []
    try:
        for index, value in enumerate(values):  # the order serialize_graph_into writes them in
            tensor = value.const_value
            kind = type(tensor)  # not isinstance: slow on onnx-ir's protocol classes
            if kind is ir.Tensor and isinstance(tensor.raw, np.ndarray):
                if tensor.raw.nbytes >= STREAM_MIN:
                    streamed[index] = tensor_bytes(tensor)
                    swapped.append((value, tensor))
                    value.const_value = _hollow(tensor)
            elif issubclass(kind, ir.serde.TensorProtoTensor) and \
                    tensor.raw.HasField("raw_data") and proto_bytes(tensor.raw) >= STREAM_MIN:
                streamed[index] = None
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:  # in order: a shared tensor ends named as onnx-ir names it
            value.const_value = tensor
            tensor.name = value.name
    write_proto(proto, f, streamed)


def write_proto(proto: onnx.ModelProto, f: BinaryIO,
                streamed: dict[int, Buffer | None] | None = None, *,
                buffers: dict[int, Buffer] | None = None) -> None:
    """Write ``proto`` to ``f``, byte for byte its ``SerializeToString()`` (known fields).

    ``streamed``: the main-graph initializers to write from a buffer, by index, each with its
    bytes (``None``: the tensor proto serialized alone just before it is written, as a proto's
    bytes field has no view: one copy of one tensor at a time, not of them all); by default
    every one whose dims and dtype call for at least :data:`STREAM_MIN` bytes, as ``None``,
    and ``buffers`` (by index: bytes written as that tensor's ``raw_data``, the hollow tensors
    of a :class:`~bnfold.io.split_proto.SplitProto`) on top. ``proto`` is not changed."""
    graph = proto.graph
    if streamed is None:
        streamed = {i: None for i, t in enumerate(graph.initializer)
                    if proto_bytes(t) >= STREAM_MIN}
    if buffers:
        streamed = {**streamed, **buffers}
    if not streamed:
        f.write(proto.SerializeToString())
        return
    parts: list[Buffer | _Serialized] = [_fields(graph, 1, FIELD_INITIALIZER - 1)]
    start = 0
    for index, data in sorted(streamed.items()):
        tensor = graph.initializer[index]
        parts += [_initializers(graph.initializer[start:index]),
                  *(_serialized_parts(tensor) if data is None else _tensor_parts(tensor, data))]
        start = index + 1
    parts += [_initializers(graph.initializer[start:]), _fields(graph, FIELD_INITIALIZER + 1)]
    f.write(_fields(proto, 1, FIELD_GRAPH - 1) + frame(FIELD_GRAPH, sum(
        len(p) if isinstance(p, bytes) else p.nbytes for p in parts)))
    for part in parts:
        f.write(part.tensor.SerializeToString() if isinstance(part, _Serialized) else part)
    f.write(_fields(proto, FIELD_GRAPH + 1))


@dataclass(frozen=True)
class TensorFacts:
    """What the load and save checks need of a ``ModelProto``'s tensors, from one walk
    (:func:`tensor_facts`)."""

    external: bool  #: a tensor of a graph, subgraph or function body is stored outside it
    initializer_bytes: int  #: the bytes the initializers' dims and dtypes call for
    negative: onnx.TensorProto | None  #: the first initializer with a negative dim
    sparse: list[str]  #: the names of the sparse initializers
    #: what onnx-ir could not read in the first such tensor: a data type ONNX does not
    #: define, or an external ``offset``/``length`` that is not a count of bytes
    problem: str | None = None

    def writes_as_is(self, limit: int) -> bool:
        """Whether :func:`write_proto` can write the model whole: no tensor stored outside
        it, and its initializers' bytes within ``limit``."""
        return not self.external and self.initializer_bytes <= limit


def tensor_facts(proto: onnx.ModelProto) -> TensorFacts:
    """:class:`TensorFacts` of ``proto`` (every graph, subgraph and function body)."""
    external, total, negative, sparse, problem = False, 0, None, [], None
    stored_outside = onnx.TensorProto.EXTERNAL
    for tensor, role in proto_tensors(proto):
        if tensor.data_location == stored_outside:
            external = True
            problem = problem or _external_problem(tensor)
        if role == INITIALIZER:
            dims = tensor.dims
            if negative is None and any(d < 0 for d in dims):
                negative = tensor
            total += proto_bytes(tensor)
        elif role == SPARSE:
            sparse.append(tensor.name)
        if problem is None and tensor.data_type not in _DATA_TYPES:
            problem = (f"tensor {tensor.name!r} has data_type {tensor.data_type}, "
                       "which is no ONNX tensor data type")
    return TensorFacts(external, total, negative, sparse, problem)


def _external_problem(tensor: onnx.TensorProto) -> str | None:
    """What is wrong with ``tensor``'s ``offset`` or ``length`` entry (not a count of bytes)."""
    for entry in tensor.external_data:
        value = entry.value
        if entry.key in ("offset", "length") and not (value.isascii() and value.isdigit()):
            return (f"tensor {tensor.name!r} has external data {entry.key} {value!r}, "
                    "which is no count of bytes")
    return None


def _serialized_parts(tensor: onnx.TensorProto) -> list[Buffer | _Serialized]:
    """A ``GraphProto.initializer`` entry for ``tensor``: its framing, then the tensor to
    serialize when it is written."""
    size = tensor.ByteSize()
    return [frame(FIELD_INITIALIZER, size), _Serialized(tensor, size)]


def _tensor_parts(tensor: onnx.TensorProto, data: Buffer) -> list[Buffer]:
    """A ``GraphProto.initializer`` entry whose ``raw_data`` is ``data``, framed, in pieces."""
    head, tail = _fields(tensor, 1, FIELD_RAW_DATA - 1), _fields(tensor, FIELD_RAW_DATA + 1)
    size = data.nbytes if isinstance(data, np.ndarray) else len(data)
    raw = frame(FIELD_RAW_DATA, size)
    return [frame(FIELD_INITIALIZER, len(head) + len(raw) + size + len(tail)), head, raw, data,
            tail]


def _initializers(tensors: Sequence[onnx.TensorProto]) -> bytes:
    """``GraphProto.initializer`` entries for ``tensors``, serialized by protobuf."""
    if not tensors:
        return b""
    part = onnx.GraphProto()
    part.initializer.extend(tensors)
    return part.SerializeToString()


def _fields(message: onnx.ModelProto | onnx.GraphProto | onnx.TensorProto, first: int,
            last: int = 2**29) -> bytes:
    """The wire bytes of ``message``'s set fields numbered ``first`` to ``last``: those fields
    copied into an empty message of its type, serialized."""
    part = type(message)()
    copy_fields(message, part, lambda field: first <= field.number <= last)
    return part.SerializeToString()


def copy_fields(src: Message, dst: Message, keep: Callable[[FieldDescriptor], bool]) -> None:
    """Copy every set field of message ``src`` that ``keep`` accepts into ``dst`` (of the same
    type): repeated fields extended, message fields copied, scalars set. Fields ``keep``
    refuses are never read (a large ``raw_data`` left out is not copied out). For proto2
    messages, as ONNX's are: a singular field is set when ``HasField`` says so."""
    for field in src.DESCRIPTOR.fields:
        if not keep(field):
            continue
        name = field.name
        repeated = field.is_repeated if hasattr(field, "is_repeated") \
            else field.label == field.LABEL_REPEATED  # (protobuf < 5.28 has only ``label``)
        if repeated:
            values = getattr(src, name)
            if len(values):
                getattr(dst, name).extend(values)
        elif not src.HasField(name):
            continue
        elif field.message_type is not None:
            getattr(dst, name).CopyFrom(getattr(src, name))
        else:
            setattr(dst, name, getattr(src, name))


def frame(field: int, length: int) -> bytes:
    """The tag and length varints that open a length-delimited field (wire type 2)."""
    return _encode_varint(field << 3 | 2) + _encode_varint(length)


def _encode_varint(n: int) -> bytes:
    """Protobuf's base-128 varint: 7 bits a byte, low first, high bit set on all but the last."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def stored_bytes(tensor: ir.TensorProtocol) -> int:
    """``tensor.nbytes``, read off the dims of a tensor held as a proto or the size of one held
    as an array (onnx-ir's ``nbytes`` goes through a new shape tuple on each call)."""
    kind = type(tensor)
    if issubclass(kind, ir.serde.TensorProtoTensor):
        return proto_bytes(tensor.raw)
    if kind is ir.Tensor and isinstance(tensor.raw, np.ndarray):  # shape: the array's
        return (tensor.raw.size * tensor.dtype.bitwidth + 7) // 8
    return tensor.nbytes


def proto_bytes(tensor: onnx.TensorProto, dims: Iterable[int] | None = None) -> int:
    """The bytes a tensor proto's dims and dtype call for (its ``raw_data`` length when valid;
    the bytes of its strings for a string tensor, 0 for an unknown dtype); ``dims``: its
    dims, when already read."""
    bits = BITS.get(tensor.data_type)
    if bits is None:
        return sum(map(len, tensor.string_data))
    return (math.prod(tensor.dims if dims is None else dims) * bits + 7) // 8


#: Bits per element of each ONNX dtype of fixed width (not STRING, UNDEFINED), by
#: ``TensorProto.DataType`` code: FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, BOOL,
#: FLOAT16, DOUBLE, UINT32, UINT64, COMPLEX64, COMPLEX128, BFLOAT16, the four FLOAT8s, UINT4,
#: INT4, FLOAT4E2M1, FLOAT8E8M0, UINT2, INT2 and the two FLOAT6s. Written out rather than read
#: from onnx-ir's ``DataType.bitwidth`` (importing onnx-ir is what a plain dry run avoids,
#: :mod:`bnfold.lazy_ir`); tests/test_lazy_ir.py checks they agree.
BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64,
        14: 64, 15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8,
        25: 2, 26: 2, 27: 6, 28: 6}
#: Every tensor data type code ONNX defines: those of :data:`BITS` and STRING (8).
_DATA_TYPES = frozenset(BITS) | {onnx.TensorProto.STRING}


def tensor_bytes(tensor: ir.TensorProtocol) -> Buffer:
    """``tensor.tobytes()``; for a numpy-backed ``ir.Tensor`` whose array holds those very bytes
    (C order, whole bytes per element, little-endian host) a flat ``uint8`` view of it, no
    copy."""
    array = tensor.raw if type(tensor) is ir.Tensor else None  # a subclass may differ
    if isinstance(array, np.ndarray) and LITTLE_ENDIAN and array.flags.c_contiguous and \
            array.dtype.itemsize * 8 == BITS.get(tensor.dtype.value):
        return array.reshape(-1).view(np.uint8)
    return tensor.tobytes()


def _hollow(tensor: ir.Tensor) -> ir.LazyTensor:
    """A large tensor's header for serialization: its name, dtype, shape, doc string and
    metadata, and no bytes (``serialize_tensor_into`` writes an empty ``raw_data``)."""
    return ir.LazyTensor(lambda: ir.Tensor(np.empty(0, np.uint8)), tensor.dtype, tensor.shape,
                         name=tensor.name, doc_string=tensor.doc_string,
                         metadata_props=tensor.metadata_props)
