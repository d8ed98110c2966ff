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
from bnfold.filechecks import check_external_data, check_initializers, check_input_file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    On any exception the temporary file is removed and ``path`` is left as it was. The file
    gets the permissions of the file it replaces, or the usual ones for a new file (0666
    less the umask), not the private 0600 of a temporary file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, _file_mode(target))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _file_mode(target: Path) -> int:
    """The permission bits a file written at ``target`` should get."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def load_onnx(model: object) -> ir.Model:
    """Return an onnx-ir model from a ModelProto, an ``ir.Model`` or a file path.

    Files are parsed once, without their external data: onnx-ir keeps external tensors lazy
    (memory-mapped when first read), so only the tensors a pass touches are ever loaded.
    Anything that is not a readable ONNX model raises :class:`BadInputError` (one line).
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        check_initializers(model, "model")
        return ir.serde.deserialize_model(model)
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"expected an ONNX model or a path, got {type(model).__name__}")
    path = Path(model)
    if check_input_file(path) == 0:
        raise BadInputError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ValueError...
        raise BadInputError(f"{path}: not a readable ONNX model ({_sniff(path) or _short(exc)})"
                            ) from exc
    if not proto.graph.node and not proto.graph.output:
        raise BadInputError(f"{path}: not an ONNX model (no graph)")
    if not proto.opset_import:
        raise BadInputError(f"{path}: not an ONNX model (no opset import)")
    check_initializers(proto, str(path))
    try:
        loaded = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise BadInputError(f"{path}: could not load the ONNX model ({_short(exc)})") from exc
    del proto
    ir.external_data.set_base_dir(loaded.graph, path.parent)
    check_external_data(loaded, str(path))
    return loaded


#: Above this many bytes of tensors a model is written with external data (protobuf's 2 GB
#: limit, with room for the graph itself).
EXTERNAL_THRESHOLD = 1_800_000_000
#: Tensors of at least this many bytes go to the external data file; smaller ones inline.
INLINE_LIMIT = 1024


def save_onnx(model: ir.Model | onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` atomically (temp files + rename).

    If the model had external data (an initializer of any graph still external, or lazy), or its
    tensors exceed :data:`EXTERNAL_THRESHOLD`, tensors of at least :data:`INLINE_LIMIT` bytes
    are streamed one at a time to ``<name>.data`` beside it: a lazy tensor is computed, written
    and dropped, an external one is copied and unmapped, so peak memory stays about one tensor.
    The model's large tensors then refer to the new file (saving over the source file is
    safe). Failures raise :class:`BadInputError` with one line; ``path`` is left as it was.
    """
    if isinstance(model, onnx.ModelProto):
        check_initializers(model, str(path))
        model = ir.serde.deserialize_model(model)
    target = Path(path)
    values = [v for g in model.graphs() for v in g.initializers.values()
              if v.const_value is not None]
    lazy = (ir.ExternalTensor, ir.LazyTensor)  # bnfold folds external weights lazily
    external = any(isinstance(v.const_value, lazy) for v in values) or sum(
        v.const_value.nbytes for v in values) > EXTERNAL_THRESHOLD
    try:
        with atomic_path(target) as tmp:
            if external:
                _save_external(model, values, target, tmp)
            else:
                ir.save(model, tmp)
    except OSError as exc:
        raise BadInputError(f"{target}: could not write ({_short(exc)})") from exc


def _save_external(model: ir.Model, values: list[ir.Value], target: Path, tmp: Path) -> None:
    """Stream large tensors to a temporary data file, save the graph, then commit the data."""
    data_name = target.name + ".data"
    fd, data_tmp = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, _file_mode(target.parent / data_name))
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        with os.fdopen(fd, "wb") as f:
            for value in values:
                tensor = value.const_value
                assert tensor is not None
                if tensor.nbytes < INLINE_LIMIT:
                    if isinstance(tensor, ir.ExternalTensor):  # small: inline, off the old file
                        swapped.append((value, tensor))
                        value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name)
                    continue
                offset = f.tell()
                f.write(tensor.tobytes())
                swapped.append((value, tensor))
                value.const_value = ir.ExternalTensor(
                    data_name, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                    name=tensor.name or value.name or "", base_dir=target.parent)
                release_mapping(tensor)
        ir.save(model, tmp)
        os.replace(data_tmp, target.parent / data_name)
    except BaseException:
        for value, tensor in swapped:
            value.const_value = tensor
        raise
    finally:
        if os.path.exists(data_tmp):
            os.unlink(data_tmp)


def release_mapping(tensor: object) -> None:
    """Unmap an external tensor's pages now if nothing else views them (else at collection)."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):
            tensor.release()


def _sniff(path: Path) -> str | None:
    """What a file that is not ONNX looks like, from its first bytes, if recognisable."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive: a PyTorch checkpoint or an .npz?"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5
        return "it is a Python pickle: a PyTorch state dict?"
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
