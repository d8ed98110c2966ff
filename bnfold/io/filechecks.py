"""Checks made before bnfold reads a file, each failing with one line that names the file.

* :func:`check_input_file`: the path names a readable regular file (not a folder, FIFO or
  device, which would block or never end) no larger than a limit, so nothing is read whole
  that cannot be held: an ONNX file over protobuf's 2 GiB message limit cannot be parsed
  anyway, and a sample file over the validation memory budget is refused unread.
* :func:`check_external_data`: every external tensor of a loaded model (whose location
  :func:`bnfold.io.external_data.bind_external_data` has already kept inside the model's
  folder, also after following symlinks) lies in a regular file, and its bytes
  ``[offset, offset + length)`` are all in that file, with ``length`` equal to what its shape
  and dtype need. A model that breaks this is invalid and is refused, not "repaired".
* :func:`check_initializers`: onnx-ir drops ``sparse_initializer`` entries, so a model that
  has them is refused rather than written without them.
* :func:`check_onnx_file`: ``onnx.checker`` on a file, also one whose name is not valid
  UTF-8 (the checker's C++ side takes only UTF-8 paths).
* :func:`check_single_file`: ``onnx.checker`` on a single-file model already parsed, its large
  initializers checked here and handed to the checker hollow (no second read and parse of the
  file's bytes); the same verdict and message as the checker on the file.
* :func:`os_problem`: the words for an ``OSError`` (``"Permission denied"``...); the first
  line of any other error is :func:`bnfold.errors.first_line`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx

from bnfold.errors import BadInputError, UnsupportedError
from bnfold.io.proto_stream import TensorFacts, copy_fields, tensor_facts
from bnfold.io.split_proto import SplitProto
from bnfold.lazy_ir import ir

#: protobuf cannot parse a message of 2 GiB or more.
MAX_MODEL_BYTES = 2**31 - 1


def os_problem(exc: OSError) -> str:
    """What went wrong, in the operating system's words, without the file name."""
    return exc.strerror or str(exc) or type(exc).__name__


#: the oldest ai.onnx opset bnfold reads (BatchNormalization-7 and its neighbours).
MIN_OPSET = 7


def check_opset(model: onnx.ModelProto | ir.Model, label: str) -> None:
    """Refuse a model whose ai.onnx opset bnfold and ONNX do not know."""
    newest = onnx.defs.onnx_opset_version()
    imports = ([(i.domain, i.version) for i in model.opset_import]
               if isinstance(model, onnx.ModelProto) else list(model.opset_imports.items()))
    for domain, version in imports:
        if domain in ("", "ai.onnx") and not MIN_OPSET <= version <= newest:
            raise UnsupportedError(f"{label}: ai.onnx opset {version} is not supported "
                                   f"(supported: {MIN_OPSET} to {newest})")


def check_input_file(path: Path, what: str = "ONNX model", limit: int = MAX_MODEL_BYTES,
                     why: str = "protobuf's limit") -> int:
    """Refuse ``path`` unless it is a readable regular file of at most ``limit`` bytes (said
    to be ``why``); return its size."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the {what} ({os_problem(exc)})") from exc
    if stat.S_ISDIR(info.st_mode):
        raise BadInputError(f"{path}: is a directory, not an {what} file")
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(f"{path}: not a regular file (a FIFO, socket or device); "
                            f"give an {what} file")
    if info.st_size > limit:
        raise BadInputError(f"{path}: {info.st_size} bytes, more than {what}s may have "
                            f"({limit} bytes, {why})")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the {what} ({os_problem(exc)})") from exc
    return info.st_size


def check_external_data(model: ir.Model, label: str) -> None:
    """Refuse a model whose external tensors are not in a regular file or run past its end
    (containment in the folder is :func:`bnfold.io.external_data.check_contained`'s, run by
    ``bind_external_data`` first)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                problem = external_problem(tensor)
                if problem:
                    raise BadInputError(f"{label}: invalid external data for tensor "
                                        f"{value.name!r}: {problem}")


def external_problem(tensor: ir.ExternalTensor) -> str | None:
    """What makes ``tensor``'s bytes unreadable (its file missing, not a regular file, too
    short, or a length that is not its shape's), or ``None``."""
    location = os.fspath(tensor.location)
    path = os.path.join(os.fspath(tensor.base_dir or "."), location)
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"cannot read {location!r} ({os_problem(exc)})"
    if not stat.S_ISREG(info.st_mode):
        return f"{location!r} is not a regular file"
    offset = tensor.offset or 0
    length = tensor.length if tensor.length is not None else tensor.nbytes
    if length != tensor.nbytes:
        return (f"length {length} bytes, but its shape {list(tensor.shape)} and dtype "
                f"{tensor.dtype.name} need {tensor.nbytes}")
    if offset < 0 or offset + length > info.st_size:
        return (f"bytes {offset} to {offset + length} are past the end of {location!r} "
                f"({info.st_size} bytes)")
    return None


def check_initializers(model: onnx.ModelProto | SplitProto, label: str) -> TensorFacts:
    """Refuse a model with an initializer with a negative dim, a tensor of a data type ONNX
    does not define or with an external ``offset``/``length`` that is no count of bytes, or
    with sparse initializers (in any graph); return the
    :class:`~bnfold.io.proto_stream.TensorFacts` of that walk (a
    :class:`~bnfold.io.split_proto.SplitProto` that carries its ``facts`` passed this check
    when it was made: they are returned, nothing walked). Data that does not fill its shape is
    found when a pass reads the tensor (:func:`bnfold.passes.onnx.consts.const_array`):
    checking every tensor here would copy all of a model's bytes once more."""
    if isinstance(model, SplitProto):
        if model.facts is not None:
            return model.facts
        model = model.proto
    facts = tensor_facts(model)
    if facts.negative is not None:
        raise BadInputError(f"{label}: invalid model: initializer {facts.negative.name!r} "
                            f"has a negative dim {list(facts.negative.dims)}")
    if facts.problem is not None:
        raise BadInputError(f"{label}: invalid model: {facts.problem}")
    if facts.sparse:
        raise UnsupportedError(
            f"{label}: sparse initializers ({', '.join(sorted(facts.sparse)[:3])}) are not "
            "supported (bnfold would drop them); convert them to dense initializers first")
    return facts


def utf8_path(path: Path | str) -> bool:
    """Whether ``path`` can be handed to C++ code (ONNX, ONNX Runtime) as UTF-8 text."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Initializers with at least this many bytes of ``raw_data`` go to the checker hollow.
HOLLOW_MIN = 64 * 1024

#: Bytes per element of the dtypes whose ``raw_data`` size ``onnx.checker``'s ``check_tensor``
#: compares with ``dims`` (whole bytes per element; packed and 6-bit types are not hollowed).
_CHECKED_WIDTHS = {
    **dict.fromkeys((onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.BOOL,
                     onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
                     onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ,
                     onnx.TensorProto.FLOAT8E8M0), 1),
    **dict.fromkeys((onnx.TensorProto.UINT16, onnx.TensorProto.INT16,
                     onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16), 2),
    **dict.fromkeys((onnx.TensorProto.FLOAT, onnx.TensorProto.INT32,
                     onnx.TensorProto.UINT32), 4),
    **dict.fromkeys((onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
                     onnx.TensorProto.COMPLEX64), 8),
    onnx.TensorProto.COMPLEX128: 16,
}
_INT64_MAX = 2**63 - 1
_OTHER_DATA = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
               "uint64_data")
#: What a hollow tensor holds in ``raw_data``: enough for one element of any checked dtype.
_STAND_IN_DATA = bytes(16)


def check_single_file(path: Path, model: onnx.ModelProto | SplitProto) -> None:
    """``onnx.checker.check_model`` on the file at ``path``, which has no external data and
    parses as ``model``: the same verdict and message, in most cases without reading and
    parsing the file's bytes again (a :class:`~bnfold.io.split_proto.SplitProto`'s hollow
    tensors count with the bytes held apart).

    When the main graph's initializers hold on average at least :data:`HOLLOW_MIN` bytes of
    the file (most weights in large tensors), each large one that the checker's
    ``check_tensor`` would accept (:func:`_accepted_raw`) is handed over as a stand-in that it
    also accepts (its name and dtype, no dims, 16 zero bytes); every other tensor, and all
    else, as it is. Exact: the checker reads an initializer's ``dims`` and ``raw_data`` only in
    ``check_tensor``. Otherwise (many small tensors: a copy of the graph would cost more than
    the file) the checker runs on the file's bytes."""
    split = model if isinstance(model, SplitProto) else SplitProto(model)
    initializers = split.proto.graph.initializer
    if initializers and path.stat().st_size >= HOLLOW_MIN * len(initializers):
        accepted = [_accepted_raw(tensor, split.raw_size(i))
                    for i, tensor in enumerate(initializers)]
        if any(accepted):
            onnx.checker.check_model(_hollow(split, accepted).SerializeToString())
            return
    onnx.checker.check_model(path.read_bytes())


def _hollow(split: SplitProto, hollow: list[bool]) -> onnx.ModelProto:
    """A copy of ``split``'s model whose main-graph initializers marked in ``hollow`` are
    stand-ins: the name (if set) and dtype, and :data:`_STAND_IN_DATA` as ``raw_data``; all
    that the checker reads of an initializer that ``check_tensor`` accepts is its name. Every
    other initializer is as the file holds it."""
    proto = split.proto
    out = onnx.ModelProto()
    copy_fields(proto, out, lambda field: field.name != "graph")
    copy_fields(proto.graph, out.graph, lambda field: field.name != "initializer")
    for index, (tensor, stand_in) in enumerate(zip(proto.graph.initializer, hollow,
                                                   strict=True)):
        if stand_in:
            copy = out.graph.initializer.add(data_type=tensor.data_type,
                                             raw_data=_STAND_IN_DATA)
            if tensor.HasField("name"):
                copy.name = tensor.name
        else:
            out.graph.initializer.append(tensor)
            if index in split.data:
                out.graph.initializer[-1].raw_data = split.data[index].tobytes()
    return out


def _accepted_raw(tensor: onnx.TensorProto, size: int) -> bool:
    """Whether ``tensor`` holds at least :data:`HOLLOW_MIN` bytes of ``raw_data`` that
    ``check_tensor`` accepts: a dtype of :data:`_CHECKED_WIDTHS`, stored inside the model,
    ``raw_data`` its only data, dims that are not negative, whose product (taken left to
    right, as the checker does) and byte size fit in an int64, more than zero elements, and
    at least that many bytes (``size``: its ``raw_data`` length)."""
    width = _CHECKED_WIDTHS.get(tensor.data_type) if tensor.HasField("data_type") else None
    if width is None or tensor.data_location == onnx.TensorProto.EXTERNAL or any(
            len(getattr(tensor, name)) for name in _OTHER_DATA):
        return False
    count = 1
    for dim in tensor.dims:
        count *= dim
        if dim < 0 or count > _INT64_MAX:
            return False
    return size >= HOLLOW_MIN and 0 < count * width <= min(size, _INT64_MAX)


def check_onnx_file(path: Path) -> None:
    """``onnx.checker.check_model`` on the file at ``path`` (its external data included).

    A name that is not valid UTF-8 is checked in memory, from the model's own folder, so that
    its external data locations still resolve."""
    if utf8_path(path.resolve()):
        onnx.checker.check_model(str(path))
        return
    proto = onnx.load(str(path), load_external_data=False)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        onnx.checker.check_model(proto)
    finally:
        os.chdir(cwd)
