"""The models of a folder for ``bnfold fold DIR``, and the subfolders that could not be read.

``Path.rglob`` skips a subfolder it may not list without a word; a folder run must instead
say which parts of the tree it never saw, so those are returned with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

from bnfold.io.filechecks import os_problem


def model_files(folder: Path, exclude: Path | None = None
                ) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(files, unreadable)``: the ``.onnx`` files under ``folder`` (sorted, symlinked
    folders not followed, none whose resolved path is inside ``exclude``), and each subfolder
    that could not be listed with the operating system's reason."""
    files: list[Path] = []
    unreadable: list[tuple[Path, str]] = []

    def failed(exc: OSError) -> None:
        unreadable.append((Path(exc.filename or folder), os_problem(exc)))

    for root, _, names in os.walk(folder, onerror=failed):
        for name in names:
            path = Path(root) / name
            if name.endswith(".onnx") and path.is_file() and not (
                    exclude is not None and path.resolve().is_relative_to(exclude)):
                files.append(path)
    return sorted(files), unreadable
