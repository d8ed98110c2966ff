"""Write an ONNX model and its external data so that a reader sees the old pair or the new one.

:func:`stage_onnx` does all the writing beside the target and returns a :class:`StagedModel`;
its :meth:`~StagedModel.commit` puts the model in place with one rename, and
:meth:`~StagedModel.discard` (also on leaving a ``with`` block uncommitted) removes every file
the stage wrote. The sequence, and why a reader never sees a mix:

1. Large tensors stream to a temporary file, which is flushed to disk and renamed to a data
   file name that did not exist: ``<target name>.<content hash>.data`` (``-1``, ``-2``... when
   that name is taken), in the target's folder. No existing file is ever overwritten: not an
   unrelated one, not a data file of the input, not the data of the graph now at the target.
2. The graph, naming that data file, goes to a temporary file, flushed to disk.
3. Commit: the graph is renamed onto the target (atomic), then the data file the replaced graph
   named is removed if bnfold wrote it for this target and no input, and not the new graph,
   reads it. bnfold wrote it when both its name (``<target name>.<16 hex>.data``) and the
   replaced graph say so: a graph bnfold writes with external data records its data file's
   name in the model's metadata (:data:`~bnfold.io.external_data.OWN_DATA_KEY`), so a user's
   own data file that happens to match the name pattern is never removed; nor is one that
   another file in the folder names (a copy of the old model kept beside it). A failure before
   the rename leaves the old pair untouched; two writers to one target each write their own
   data file, and the graph that wins names its own.

A target that exists and is not a regular file (``/dev/null``, a FIFO, a symlink to a device)
is written through, never replaced; a model with external data cannot go to one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import os
import re
import stat
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import onnx

from bnfold.errors import BadInputError
from bnfold.io.external_data import (
    OWN_DATA_KEY,
    data_files_of,
    external_slots,
    named_by_another,
    referenced_files,
)
from bnfold.io.proto_stream import tensor_bytes, write_model, write_proto
from bnfold.io.split_proto import SplitProto
from bnfold.lazy_ir import ir

#: What follows the target's name in the name of a data file bnfold wrote for it.
OWN_DATA_SUFFIX = re.compile(r"\.[0-9a-f]{16}(?:-[0-9]+)?\.data")


class StagedModel:
    """A model written beside its target, not yet visible there: ``commit()`` or ``discard()``.

    ``keep``: resolved paths of files that inputs read, never removed by the commit.
    """

    def __init__(self, target: Path, keep: Collection[Path] = ()) -> None:
        self.target = target
        self.keep = {Path(p).resolve() for p in keep}
        self.graph_tmp: Path | None = None
        self.data: Path | None = None
        self.payload: bytes | None = None  # the serialized model, for a target not a file
        #: where the stage put another tensor, and the tensor that was there
        self.swapped: list[tuple[Callable[[ir.TensorProtocol], None], ir.TensorProtocol]] = []
        #: the model whose metadata now names :attr:`data`, and the entry it had before
        self.marked: tuple[ir.Model, str | None] | None = None
        self.reads: set[Path] = set()  # what the staged graph names (its own data)
        self.folders: list[Path] = []  # folders made for the target (removed on discard)
        self.committed = False

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def commit(self) -> None:
        """Put the model in place (one rename), then remove the data file it made obsolete."""
        with one_line_oserror(self.target):
            if self.payload is not None:
                with open(self.target, "wb") as f:
                    f.write(self.payload)
                self.committed = True
                return
            assert self.graph_tmp is not None
            named, own = data_files_of(self.target)
            obsolete = named - self.keep - self.reads
            os.replace(self.graph_tmp, self.target)
            self.graph_tmp, self.committed = None, True
        _fsync_folder(self.target.parent)
        folder = self.target.parent.resolve() if obsolete else None
        for path in obsolete:
            name = path.name
            if path.parent == folder and name == own and name.startswith(self.target.name) \
                    and OWN_DATA_SUFFIX.fullmatch(name[len(self.target.name):]) \
                    and not named_by_another(path, self.target):
                with contextlib.suppress(OSError):
                    path.unlink()

    def release_model(self) -> None:
        """Drop the references to the in-memory model (a discard then only removes files)."""
        self.swapped.clear()
        self.marked = None

    def discard(self) -> None:
        """Remove what the stage wrote and give the model back its tensors (no-op after a
        commit, except that no temporary file is left)."""
        if self.graph_tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self.graph_tmp.unlink()
            self.graph_tmp = None
        if self.committed:
            return
        if self.data is not None:
            with contextlib.suppress(FileNotFoundError):
                self.data.unlink()
            self.data = None
        for put, tensor in reversed(self.swapped):
            put(tensor)
        self.swapped.clear()
        if self.marked is not None:
            _mark(*self.marked)
            self.marked = None
        remove_folders(self.folders)


def stage_onnx(model: ir.Model | onnx.ModelProto | SplitProto, target: Path, *, external: bool,
               inline_limit: int, keep: Collection[Path] = ()) -> StagedModel:
    """Write ``model`` beside ``target`` (see the module docstring); ``external``: tensors of
    at least ``inline_limit`` bytes go to a new data file (an ``ir.Model`` only; a
    ``ModelProto`` or :class:`~bnfold.io.split_proto.SplitProto` is written as it is,
    :meth:`~bnfold.io.proto_stream.TensorFacts.writes_as_is`).
    :class:`BadInputError` on failure, with nothing left behind."""
    staged = StagedModel(target, keep)
    try:
        with one_line_oserror(target):
            mode = _stat_mode(target)  # one stat: special file? which permissions?
            if _is_special(mode):
                if external:
                    raise BadInputError(
                        f"{target}: not a regular file; a model with external data is written "
                        "only to a regular file (its data file goes beside it)")
                staged.payload = (model if isinstance(model, onnx.ModelProto)
                                  else model.whole() if isinstance(model, SplitProto)
                                  else ir.serde.serialize_model(model)).SerializeToString()
                return staged
            if mode is None:  # a new file: its folder may be new too
                staged.folders = make_folders(target.parent)
            perms = _permissions(mode)
            if external:
                assert isinstance(model, ir.Model)
                _write_data(model, target, inline_limit, staged, perms)
            fd, tmp = _new_temp(target, ".tmp", perms)
            staged.graph_tmp = Path(tmp)
            with os.fdopen(fd, "wb") as f:
                if isinstance(model, onnx.ModelProto):
                    write_proto(model, f)
                elif isinstance(model, SplitProto):
                    write_proto(model.proto, f, buffers=model.data)
                else:
                    write_model(model, f)
                f.flush()
                os.fsync(f.fileno())
            staged.reads = set() if isinstance(model, (onnx.ModelProto, SplitProto)) \
                else referenced_files(model)
    except BaseException:
        staged.discard()
        raise
    return staged


def _write_data(model: ir.Model, target: Path, inline_limit: int, staged: StagedModel,
                perms: int) -> None:
    """Stream large tensors (one at a time: lazy ones computed, external ones copied and
    unmapped) to a new data file and point the model at it; small external ones inline.
    Initializers, and node attributes' external tensors (a ``Constant``'s, in any graph):
    else those would still name the input's data file, beside another folder."""
    from bnfold.io.fileio import release_mapping

    slots: list[tuple[ir.TensorProtocol, Callable[[ir.TensorProtocol], None], str]] = [
        (v.const_value, functools.partial(setattr, v, "const_value"),
         v.const_value.name or v.name or "")
        for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
    slots += [(t, put, t.name or "") for t, put in external_slots(model, initializers=False)]
    fd, tmp = _new_temp(target, ".data.tmp", perms)
    digest = hashlib.blake2b(digest_size=8)
    placed: list[tuple[Callable[[ir.TensorProtocol], None], ir.TensorProtocol, str, int,
                       int]] = []
    try:
        with os.fdopen(fd, "wb") as f:
            for tensor, put, name in slots:
                if tensor.nbytes < inline_limit:
                    if isinstance(tensor, ir.ExternalTensor):  # small: inline, off the old file
                        staged.swapped.append((put, tensor))
                        put(ir.Tensor(tensor.numpy().copy(), name=tensor.name))
                    continue
                data = tensor_bytes(tensor)  # a numpy tensor's array itself, no copy
                placed.append((put, tensor, name, f.tell(), len(data)))
                f.write(data)
                digest.update(data)
                del data
                release_mapping(tensor)
            f.flush()
            os.fsync(f.fileno())
        if placed:  # else every tensor is inline: no data file
            staged.data = _reserve(target, digest.hexdigest())
            os.replace(tmp, staged.data)
            staged.marked = (model, model.metadata_props.get(OWN_DATA_KEY))
            _mark(model, staged.data.name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for put, tensor, name, offset, length in placed:
        assert staged.data is not None
        staged.swapped.append((put, tensor))
        put(ir.ExternalTensor(staged.data.name, offset, length, tensor.dtype,
                              shape=tensor.shape, name=name, base_dir=target.parent))


class StagedFile:
    """A file to write at ``target``, written first under a temporary name beside it
    (:attr:`path`; the folders it needs are made), by ``write(path)`` when given (a failure
    leaves nothing behind) or by the caller: ``commit()`` renames it onto ``target``,
    ``discard()`` (also on leaving a ``with`` block uncommitted) removes it and the folders
    made for it. A ``target`` that is not a regular file (``/dev/null``, a FIFO) is written
    through: :attr:`path` is ``target`` itself. Lets a command stage every file it writes and
    commit them only once all were written (exit 2 then means nothing was)."""

    def __init__(self, target: str | os.PathLike[str],
                 write: Callable[[Path], object] | None = None) -> None:
        self.target, self.committed = Path(target), False
        self.folders: list[Path] = []
        self._tmp: Path | None = None
        self.path = self.target
        try:
            if not is_special_file(self.target):
                self.folders = make_folders(self.target.parent)
                fd, tmp = _new_temp(self.target, ".tmp", file_mode(self.target))
                os.close(fd)
                self.path = self._tmp = Path(tmp)
            if write is not None:
                write(self.path)
        except BaseException:
            self.discard()
            raise

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def commit(self) -> None:
        """Put the file in place (one rename)."""
        if self._tmp is not None:
            os.replace(self._tmp, self.target)
            self._tmp = None
        self.committed = True

    def discard(self) -> None:
        """Remove the temporary file and, unless committed, the folders made for it."""
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
            self._tmp = None
        if not self.committed:
            remove_folders(self.folders)


def make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and any missing parent; return the ones made, outermost first
    (``NotADirectoryError`` naming the first that exists and is no folder)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    made: list[Path] = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue  # (made by another process meanwhile: not ours to remove)
        except BaseException:
            remove_folders(made)
            raise
        made.append(path)
    return made


def remove_folders(folders: list[Path]) -> None:
    """Remove the folders :func:`make_folders` made, innermost first, while they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return
    folders.clear()


def _mark(model: ir.Model, data_name: str | None) -> None:
    """Record ``data_name`` in ``model``'s metadata as the data file bnfold wrote for it
    (``None``: no entry)."""
    if data_name is None:
        model.metadata_props.pop(OWN_DATA_KEY, None)
    else:
        model.metadata_props[OWN_DATA_KEY] = data_name


def _reserve(target: Path, digest: str) -> Path:
    """Create, empty, a data file name beside ``target`` that did not exist (O_EXCL)."""
    for n in itertools.count():
        path = target.with_name(f"{target.name}.{digest}{f'-{n}' if n else ''}.data")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def _new_temp(target: Path, suffix: str, perms: int) -> tuple[int, str]:
    """A new hidden temporary file beside ``target`` with permission bits ``perms``: its open
    descriptor and its path (removed again if setting the bits fails)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    try:
        os.fchmod(fd, perms)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def file_mode(target: Path) -> int:
    """The permission bits a file written at ``target`` should get: those of the file it
    replaces, or the usual ones for a new file (0666 less the umask)."""
    return _permissions(_stat_mode(target))


def _permissions(mode: int | None) -> int:
    """:func:`file_mode` from the ``st_mode`` of the target (``None``: it does not exist)."""
    if mode is not None:
        return mode & 0o7777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def is_special_file(path: Path) -> bool:
    """True if ``path`` exists (following symlinks) and is neither a regular file nor a folder:
    a device, a FIFO, a socket. Such a path is written through, never replaced."""
    return _is_special(_stat_mode(path))


def _is_special(mode: int | None) -> bool:
    """:func:`is_special_file` from the ``st_mode`` of the path (``None``: it does not exist)."""
    return mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _stat_mode(path: Path) -> int | None:
    """``path``'s ``st_mode`` (following symlinks), or ``None`` when it cannot be read."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


@contextlib.contextmanager
def one_line_oserror(target: Path) -> Iterator[None]:
    """Turn an ``OSError`` into :class:`BadInputError` ``"<target>: could not write (...)"``."""
    try:
        yield
    except OSError as exc:
        text = (exc.strerror or str(exc)).strip().splitlines()
        raise BadInputError(f"{target}: could not write ({text[0] if text else exc!r})"
                            ) from exc


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        _fsync(folder)
