"""Reading inputs with one-line errors, and writing outputs atomically (temp file + rename)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import onnx

from bnfold.arguments import check_path
from bnfold.errors import BadInputError, cause_line, first_line
from bnfold.gc_pause import gc_paused
from bnfold.io.external_data import (
    bind_external_data,
    external_slots,
    external_tensors,
    referenced_files,
)
from bnfold.io.filechecks import (
    check_external_data,
    check_initializers,
    check_input_file,
    check_onnx_file,
    check_opset,
    check_single_file,
)
from bnfold.io.proto_stream import read_proto, stored_bytes
from bnfold.io.split_proto import SplitProto, read_split
from bnfold.io.staged_save import StagedFile, StagedModel, stage_onnx
from bnfold.lazy_ir import ir


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    On any exception the temporary file (and any folder made for it) is removed and ``path`` is
    left as it was. The file gets the permissions of the file it replaces, or the usual ones
    for a new file (0666 less the umask), not the private 0600 of a temporary file. A ``path``
    that is not a regular file (``/dev/null``, a FIFO, a symlink to a device) is yielded
    itself: written through, never replaced (:class:`~bnfold.io.staged_save.StagedFile`).
    """
    with StagedFile(path) as staged:
        yield staged.path
        staged.commit()


def load_onnx(model: object, *, base_dir: str | os.PathLike[str] | None = None) -> ir.Model:
    """Return an onnx-ir model from a ModelProto, an ``ir.Model`` or a file path.

    Files are parsed once, without their external data: onnx-ir keeps external tensors lazy
    (memory-mapped when first read), so only the tensors a pass touches are ever loaded.
    Anything that is not a readable ONNX model raises :class:`BadInputError` (one line).
    External data must lie in the file's folder, or for an in-memory model in ``base_dir``
    (required when it has external tensors; :func:`bnfold.io.external_data.bind_external_data`);
    an ``ir.Model`` is returned itself, or a clone when ``base_dir`` binds its tensors (the
    caller's model is not changed).
    """
    if isinstance(model, ir.Model):
        if base_dir is not None and any(not t.base_dir for t in external_tensors(model)):
            model = model.clone()  # (binding puts new tensors in: the caller's stays as it was)
        bind_external_data(model, base_dir)
        return model
    if isinstance(model, SplitProto):
        model = model.whole()
    if isinstance(model, onnx.ModelProto):
        check_initializers(model, "model")
        converted = ir.serde.deserialize_model(model)
        bind_external_data(converted, base_dir)
        return converted
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"expected an ONNX model or a path, got {type(model).__name__}")
    path = Path(model)
    proto = _read_proto(path)
    assert isinstance(proto, onnx.ModelProto)
    check_initializers(proto, str(path))
    return _file_model(proto, path)


def load_split(path: str | os.PathLike[str]) -> SplitProto | ir.Model:
    """:func:`load_onnx` of a file, with its checks and errors, for a pass that folds it: a
    single-file model as a :class:`~bnfold.io.split_proto.SplitProto` (its large weights left
    in the file's memory map), one with external data as an ``onnx_ir.Model`` whose external
    tensors stay lazy."""
    path = Path(path)
    split = _read_proto(path, split=True)
    assert isinstance(split, SplitProto)
    facts = check_initializers(split.proto, str(path))
    if not facts.external:
        split.facts = facts  # (the hollow tensors keep their dims: the whole model's facts)
        return split
    return _file_model(split.whole(), path)


def _file_model(proto: onnx.ModelProto, path: Path) -> ir.Model:
    """The onnx-ir model of ``proto``, read from the file ``path``, its external data bound
    to the file's folder and checked."""
    try:
        with gc_paused():
            loaded = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise BadInputError(f"{path}: could not load the ONNX model ({cause_line(exc)})") from exc
    del proto
    bind_external_data(loaded, path.parent, str(path), model_file=path)
    check_external_data(loaded, str(path))
    return loaded


#: Above this many bytes of tensors a model is written with external data (protobuf's 2 GB
#: limit, with room for the graph itself).
EXTERNAL_THRESHOLD = 1_800_000_000
#: Tensors of at least this many bytes go to the external data file; smaller ones inline.
INLINE_LIMIT = 1024


def save_onnx(model: ir.Model | onnx.ModelProto | SplitProto, path: str | os.PathLike[str], *,
              base_dir: str | os.PathLike[str] | None = None) -> None:
    """Write ``model`` to ``path`` atomically: readers see the old file or the new one.

    If the model had external data (an initializer of any graph still external, or lazy, or
    a node attribute's tensor still external), or its tensors exceed
    :data:`EXTERNAL_THRESHOLD`, tensors of at least :data:`INLINE_LIMIT` bytes are streamed
    one at a time to a new file ``<name>.<content hash>.data`` beside it (a lazy
    tensor is computed, written and dropped, an external one copied and unmapped, so peak memory
    stays about one tensor) and the model's large tensors then refer to it; no existing file is
    overwritten, and saving over the source file is safe (:mod:`bnfold.io.staged_save`). An
    in-memory model with external tensors needs ``base_dir=`` (their folder). Otherwise the file
    is one protobuf message, its large tensors written from their own buffers
    (:mod:`bnfold.io.proto_stream`): an ``ir.Model`` as onnx-ir serializes it, a ``ModelProto``
    as it is (``SerializeToString``'s bytes), a :class:`~bnfold.io.split_proto.SplitProto` as
    its :meth:`~bnfold.io.split_proto.SplitProto.whole` model is. Failures raise
    :class:`BadInputError` with one line; ``path`` is left as it was.
    """
    with stage_save(model, path, base_dir=base_dir) as staged:
        staged.commit()


def stage_save(model: ir.Model | onnx.ModelProto | SplitProto, path: str | os.PathLike[str], *,
               base_dir: str | os.PathLike[str] | None = None,
               keep: Collection[Path] = ()) -> StagedModel:
    """:func:`save_onnx` up to, not including, the final rename: ``.commit()`` it or
    ``.discard()`` it (a ``with`` block discards what was not committed). ``keep``: files that
    inputs read, never removed as the old output's data."""
    check_path(path, "path")
    check_path(base_dir, "base_dir", optional=True)
    with gc_paused():
        if isinstance(model, (onnx.ModelProto, SplitProto)) and check_initializers(
                model, "model").writes_as_is(EXTERNAL_THRESHOLD):
            return stage_onnx(model, Path(path), external=False, inline_limit=INLINE_LIMIT,
                              keep=keep)
        model = load_onnx(model, base_dir=base_dir)
        if Path(path).resolve() in referenced_files(model):
            raise BadInputError(f"{path}: is an external data file the model reads (writing "
                                "the model there would destroy its weights); give another")
        tensors = [v.const_value for g in model.graphs() for v in g.initializers.values()
                   if v.const_value is not None]
        lazy = (ir.ExternalTensor, ir.LazyTensor)  # bnfold folds external weights lazily
        external = any(issubclass(type(t), lazy) for t in tensors) or sum(
            map(stored_bytes, tensors)) > EXTERNAL_THRESHOLD or next(
            external_slots(model, initializers=False), None) is not None
        return stage_onnx(model, Path(path), external=external, inline_limit=INLINE_LIMIT,
                          keep=keep)


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


def load_checked(path: Path) -> ir.Model:
    """Load an ONNX file for a pass: readable (:func:`load_onnx`), a known ai.onnx opset
    (:func:`~bnfold.io.filechecks.check_opset`), and accepted by ``onnx.checker``; else a
    one-line :class:`~bnfold.errors.BnfoldError`."""
    model = load_onnx(path)
    _check_loaded(model, path, lambda: check_onnx_file(path))
    return model


def load_for_pass(path: str | os.PathLike[str]) -> ir.Model | SplitProto:
    """What the CLI folds: :func:`load_split` (a single-file model as a
    :class:`~bnfold.io.split_proto.SplitProto`, whose large weights stay in the file's memory
    map and which a plain fold never takes into onnx-ir, :mod:`bnfold.passes.onnx.direct`;
    one with external data as an ``onnx_ir.Model`` whose external tensors stay lazy), with
    the checks and errors of :func:`load_checked`. The file is parsed once."""
    path = Path(path)
    model = load_split(path)
    if isinstance(model, SplitProto):
        _check_loaded(model.proto, path, lambda: check_single_file(path, model))
    else:
        _check_loaded(model, path, lambda: check_onnx_file(path))
    return model


def _check_loaded(model: ir.Model | onnx.ModelProto, path: Path,
                  checker: Callable[[], None]) -> None:
    """A known ai.onnx opset, and ``onnx.checker`` accepts the file (``checker()``)."""
    check_opset(model, str(path))
    try:
        checker()
    except Exception as exc:
        raise BadInputError(f"{path}: invalid ONNX model ({first_line(exc)})") from exc


def _read_proto(path: Path, *, split: bool = False) -> onnx.ModelProto | SplitProto:
    """The ``ModelProto`` in the file ``path`` (external data not read; with ``split``, as a
    :class:`~bnfold.io.split_proto.SplitProto`), or a one-line :class:`BadInputError`: not a
    readable regular file, not ONNX, no graph, no opset."""
    if check_input_file(path) == 0:
        raise BadInputError(f"{path}: empty file, not an ONNX model")
    try:
        loaded = read_split(path) if split else read_proto(path)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ValueError...
        raise BadInputError(f"{path}: not a readable ONNX model ({_sniff(path) or first_line(exc)})"
                            ) from exc
    proto = loaded.proto if isinstance(loaded, SplitProto) else loaded
    if not proto.graph.node and not proto.graph.output:
        raise BadInputError(f"{path}: not an ONNX model (no graph)")
    if not proto.opset_import:
        raise BadInputError(f"{path}: not an ONNX model (no opset import)")
    return loaded
