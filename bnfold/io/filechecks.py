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
* :func:`os_problem`: the words for an ``OSError`` (``"Permission denied"``...); the first
  line of any other error is :func:`bnfold.errors.first_line`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx
import onnx_ir as ir

from bnfold.errors import BadInputError, UnsupportedError
from bnfold.io.proto_stream import TensorFacts, tensor_facts

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
                problem = _external_problem(tensor)
                if problem:
                    raise BadInputError(f"{label}: invalid external data for tensor "
                                        f"{value.name!r}: {problem}")


def _external_problem(tensor: ir.ExternalTensor) -> str | None:
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


def check_initializers(proto: onnx.ModelProto, label: str) -> TensorFacts:
    """Refuse a model with an initializer with a negative dim, or with sparse initializers (in
    any graph); return the :class:`~bnfold.io.proto_stream.TensorFacts` of that walk. Data that
    does not fill its shape is found when a pass reads the tensor
    (:func:`bnfold.passes.onnx.consts.const_array`): checking every tensor here would copy
    all of a model's bytes once more."""
    facts = tensor_facts(proto)
    if facts.negative is not None:
        raise BadInputError(f"{label}: invalid model: initializer {facts.negative.name!r} "
                            f"has a negative dim {list(facts.negative.dims)}")
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


def check_single_file(path: Path) -> None:
    """:func:`check_onnx_file` for a model without external data: the checker on the file's
    bytes, the same checks (no data locations to resolve) without the path API's slower
    load of the file."""
    onnx.checker.check_model(path.read_bytes())


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
