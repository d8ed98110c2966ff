"""Golden data for ``bnfold validate``: the input samples and the outputs, as ``.npz`` files.

* ``--save-inputs FILE``: every sample the validation ran, keys ``sample<i>/<input name>``;
* ``--save-outputs FILE``: keys ``reference/sample<i>/<output>`` (the reference's outputs on
  the CPU provider, or the torch reference's) and ``<provider>/sample<i>/<output>`` (the
  candidate's, per provider that ran);
* ``--load-inputs FILE``: the samples of a ``--save-inputs`` file (or of an ``.npz`` keyed by
  input name: one sample), checked against the model like ``--inputs``.

Files are read with ``allow_pickle=False``: an ``.npz`` holding object arrays (pickled Python
objects) is refused with one line, never unpickled.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np

from bnfold.errors import BadInputError
from bnfold.io.staged_save import StagedFile
from bnfold.validation.inputs import load_arrays
from bnfold.validation.result import ValidationResult

_SAMPLE = re.compile(r"sample(\d+)/(.+)")


def load_inputs(path: str | os.PathLike[str]) -> list[dict[str, np.ndarray]]:
    """The samples stored in ``path``, in sample order."""
    arrays = load_arrays(Path(path))
    if not isinstance(arrays, dict):
        raise BadInputError(f"--load-inputs {path}: not an .npz of named input arrays")
    if not arrays:  # (what --save-inputs writes for a model without inputs: one sample)
        return [{}]
    samples: dict[int, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        match = _SAMPLE.fullmatch(key)
        index, name = (int(match[1]), match[2]) if match else (0, key)
        samples.setdefault(index, {})[name] = array
    return [samples[i] for i in sorted(samples)]


def save_inputs(result: ValidationResult, path: str | os.PathLike[str]) -> StagedFile:
    """Write the samples ``result`` ran on (``sample<i>/<input>``) for ``path``: staged, put
    in place by the caller's ``commit()``."""
    return _stage(path, {f"sample{i}/{name}": array for i, sample in enumerate(result.samples)
                         for name, array in sample.items()})


def save_outputs(result: ValidationResult, path: str | os.PathLike[str]) -> StagedFile:
    """Write the reference's and each provider's candidate outputs for ``path``: staged, as
    :func:`save_inputs`."""
    arrays: dict[str, np.ndarray] = {}
    for run in result.runs:
        if run.status != "ran" or not run.ref_outputs:
            continue
        names = [c.output for c in run.comparisons]
        if run.provider == "cpu":
            arrays.update(_keyed("reference", run.ref_outputs, names))
        arrays.update(_keyed(run.provider, run.outputs, names))
    return _stage(path, arrays)


def handle_args(args: argparse.Namespace) -> None:
    """``--load-inputs``: replace ``args.inputs`` by the loaded samples (not with ``--inputs``)."""
    if args.load_inputs is None:
        return
    if args.inputs:
        raise BadInputError("give --inputs or --load-inputs, not both")
    args.inputs = load_inputs(args.load_inputs)


def write_requested(args: argparse.Namespace, result: ValidationResult) -> list[StagedFile]:
    """Write the ``--save-inputs`` / ``--save-outputs`` files asked for, staged (the command
    commits them with its report: :class:`~bnfold.io.staged_save.StagedFile`)."""
    staged = []
    with contextlib.ExitStack() as pending:  # (a failed second write discards the first)
        if args.save_inputs is not None:
            staged.append(pending.enter_context(save_inputs(result, args.save_inputs)))
        if args.save_outputs is not None:
            staged.append(pending.enter_context(save_outputs(result, args.save_outputs)))
        pending.pop_all()
    return staged


def _keyed(prefix: str, outputs: list[list[np.ndarray]], names: list[str]
           ) -> dict[str, np.ndarray]:
    return {f"{prefix}/sample{i}/{name}": array for i, sample in enumerate(outputs)
            for name, array in zip(names, sample, strict=True)}


def _stage(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> StagedFile:
    # Through memory: np.savez seeks (a FIFO or /dev/null cannot) and would append ".npz"
    # to a name.
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        return StagedFile(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    except OSError as exc:
        raise BadInputError(f"{path}: could not write ({exc.strerror or exc})") from exc
