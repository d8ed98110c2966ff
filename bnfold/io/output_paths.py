"""Checks, before any work, on the files a CLI command writes besides its models.

``--report``, ``--html``, ``--save-inputs`` and ``--save-outputs`` name files a command writes
(atomically, or through a special file such as ``/dev/null`` or a FIFO:
:func:`bnfold.io.fileio.atomic_path`). None of them may be a folder, one of the command's model
files, an external data file one of those models reads, a sample file the command reads
(``--inputs``, ``--load-inputs``), or the file another of them names;
in folder mode no output model may be an external data file of any input. Each refusal is a
one-line :class:`~bnfold.errors.BadInputError` (exit 2, nothing written).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from bnfold.errors import BadInputError
from bnfold.io.external_data import files_named_by


def check_written_path(flag: str, path: Path | None, models: Iterable[Path],
                       samples: Iterable[Path] = ()) -> None:
    """Refuse ``flag``'s ``path`` if it is a folder, one of ``models`` or a data file of one,
    or one of the sample files (``samples``) the command reads."""
    if path is None:
        return
    models = list(models)
    if path.is_dir():
        raise BadInputError(f"{flag} {path}: is a directory; give a file")
    if path.exists() and any(path.resolve() == s.resolve() for s in samples):
        raise BadInputError(f"{flag} {path}: is a sample file this command reads; give another")
    if path.resolve() != Path(os.devnull) and any(path.resolve() == m.resolve() for m in models):
        raise BadInputError(f"{flag} {path}: is a model file of this command; give another")
    if path.exists() and any(path.resolve() in files_named_by(m) for m in models):
        raise BadInputError(f"{flag} {path}: is an external data file of a model of this "
                            "command; give another")


def check_written_paths(paths: Mapping[str, Path | None], models: Iterable[Path],
                        samples: Iterable[Path] = ()) -> None:
    """:func:`check_written_path` for each ``flag: path``, and no two flags on one file
    (``/dev/null`` excepted)."""
    models, samples = list(models), list(samples)
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        check_written_path(flag, path, models, samples)
        if path is None or path.resolve() == Path(os.devnull):
            continue
        if path.resolve() in seen:
            raise BadInputError(f"{flag} {path}: is also the {seen[path.resolve()]} file; "
                                "give another")
        seen[path.resolve()] = flag


def check_folder_outputs(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Refuse a folder run whose output model would replace an external data file that one
    of the ``inputs`` reads (the input would then compute wrong numbers, or not load)."""
    data = {file: src for src in inputs for file in files_named_by(src)}
    for out in outputs:
        src = data.get(out.resolve())
        if src is not None:
            raise BadInputError(f"{out}: is an external data file of the input {src}; give "
                                "another output folder")
