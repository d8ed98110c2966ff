"""Reading inputs with one-line errors, and writing outputs atomically (temp file + rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from bnfold.errors import BadInputError

ModelLike = "onnx.ModelProto | ir.Model | str | os.PathLike[str]"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_atomic(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def load_onnx(model: object) -> ir.Model:
    """Return an onnx-ir model from a ModelProto, an ``ir.Model`` or a file path.

    Files are read lazily by onnx-ir (external tensors stay on disk until touched). Anything
    that is not a readable ONNX model raises :class:`BadInputError` with a one-line message.
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"expected an ONNX model or a path, got {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ValueError...
        raise BadInputError(f"{path}: not a readable ONNX model ({_short(exc)})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise BadInputError(f"{path}: not an ONNX model (no graph)")
    if not proto.opset_import:
        raise BadInputError(f"{path}: not an ONNX model (no opset import)")
    try:
        return ir.load(str(path))
    except Exception as exc:
        raise BadInputError(f"{path}: could not load the ONNX model ({_short(exc)})") from exc


def save_onnx(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` atomically. External data, if the model had any, is written
    beside it as ``<name>.data``."""
    target = Path(path)
    has_external = any(
        isinstance(v.const_value, ir.ExternalTensor)
        for v in model.graph.initializers.values()
    )
    if has_external:
        # onnx-ir writes tensors before renaming the model file; the model file is the commit.
        data_name = target.name + ".data"
        with atomic_path(target) as tmp:
            ir.save(model, tmp, external_data=data_name)
            produced = tmp.parent / data_name
            if not produced.exists():
                raise BadInputError(f"{target}: external data was not written")
        return
    with atomic_path(target) as tmp:
        ir.save(model, tmp)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
