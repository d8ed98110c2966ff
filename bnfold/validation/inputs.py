"""Inputs for validation: read the graph's input signature, fill dynamic dims, generate random
samples per dtype, or load them from ``.npy`` / ``.npz`` files.

Generated values (stated in every validation report):

* float inputs: standard normal, drawn in float64 and cast once to the input's dtype;
* integer inputs: uniform integers in ``[0, 10)``; bool inputs: fair coin flips;
* a dynamic dim named in ``dims`` takes that size; any other dynamic dim takes
  :data:`DEFAULT_DIM` (2, not 1, so that a batch axis is really exercised); an input of
  unknown rank, or of a non-numeric type, needs samples from the user.

Given samples must match the signature: the same names, the exact dtypes, the fixed dims, and
one size per named dynamic dim across all inputs.

Bounds: at most :data:`MAX_SAMPLES` samples; generated samples together, and each sample file
(its size, and an ``.npz``'s arrays unpacked), at most :data:`INPUT_BUDGET_BYTES` bytes,
checked from the shapes, the file's size or its zip directory before anything is allocated or
read.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx

from bnfold.errors import BadInputError, first_line
from bnfold.io.filechecks import check_input_file

DEFAULT_DIM = 2
INT_HIGH = 10
#: Most samples a validation runs.
MAX_SAMPLES = 10_000
#: Most bytes of input samples a validation holds (generated ones together, or one file).
INPUT_BUDGET_BYTES = 2**31
Sample = dict[str, np.ndarray]
#: The first bytes of an ``.npy`` file, and of an ``.npz`` (a zip archive; an empty one).
NPY_MAGIC = b"\x93NUMPY"
NPZ_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, numpy dtype and shape (``str`` entries are symbolic dims,
    ``None`` unknown ones; ``shape`` is ``None`` when even the rank is unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def numpy_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX tensor element type (bfloat16 via ml_dtypes)."""
    if elem_type == onnx.TensorProto.BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError) as exc:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "undefined"
        raise BadInputError(f"input element type {name} is not supported for validation") from exc


def input_specs(proto: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers), in graph order."""
    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise BadInputError(f"input {value.name!r} is not a tensor; give --inputs instead")
        shape: list[int | str | None] = []
        for d in ttype.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            else:
                shape.append(d.dim_param or None)
        known = ttype.HasField("shape")
        specs.append(InputSpec(value.name, numpy_dtype(ttype.elem_type),
                               tuple(shape) if known else None))
    return specs


def float_dtypes(proto: onnx.ModelProto) -> set[np.dtype]:
    """The float dtypes a model computes in: those of its graph inputs and outputs, weights
    (initializers some node reads, ``Constant`` nodes) and ``Cast`` targets, subgraphs
    included (a ``CastLike`` target is the dtype of a tensor the model holds or reads). An
    initializer nothing reads computes nothing: it does not loosen the tolerance."""
    types: set[int] = set()
    weights: dict[str, int] = {}
    read: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for v in [*graph.input, *graph.output]:
            types.add(v.type.tensor_type.elem_type)
        weights.update((t.name, t.data_type) for t in graph.initializer)
        for node in graph.node:
            read.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    types.add(attr.t.data_type)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)
                elif node.op_type == "Cast" and attr.name == "to":
                    types.add(attr.i)

    visit(proto.graph)
    types.update(dtype for name, dtype in weights.items() if name in read)
    floats = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT,
              onnx.TensorProto.DOUBLE}
    return {numpy_dtype(t) for t in types & floats}


def resolve_shape(spec: InputSpec, dims: Mapping[str, int], notes: list[str]) -> tuple[int, ...]:
    """Concrete shape for ``spec``: named dims from ``dims``, others :data:`DEFAULT_DIM`."""
    if spec.shape is None:
        raise BadInputError(f"input {spec.name!r} has no shape (unknown rank), so no sample can "
                            f"be generated for it; give input samples (.npz)")
    out = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, str) and d in dims:
            out.append(int(dims[d]))
        else:
            note = (f"dim {d!r} not given, used {DEFAULT_DIM}" if d else
                    f"{spec.name}: unnamed dim {axis} not given, used {DEFAULT_DIM}")
            if note not in notes:
                notes.append(note)
            out.append(DEFAULT_DIM)
    return tuple(out)


def random_array(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """One random array of ``dtype`` (see the module docstring for the distributions)."""
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    if dtype.kind != "f" and dtype != np.dtype(ml_dtypes.bfloat16):
        raise BadInputError(f"{dtype} inputs cannot be generated; give input samples (.npz)")
    return rng.standard_normal(shape).astype(dtype)


def check_counts(samples: object, seed: object) -> None:
    """Refuse a sample count outside ``1..MAX_SAMPLES`` or a seed that is not an int >= 0."""
    if not _is_int(samples) or not 1 <= samples <= MAX_SAMPLES:  # type: ignore[operator]
        raise BadInputError(f"samples must be an integer from 1 to {MAX_SAMPLES}, "
                            f"got {samples!r}")
    if not _is_int(seed) or seed < 0:  # type: ignore[operator]
        raise BadInputError(f"seed must be an integer >= 0, got {seed!r}")


def check_dims(dims: object) -> None:
    """Refuse ``dims`` other than ``None`` or a mapping of dim names (``str``) to sizes >= 1."""
    if dims is None:
        return
    if not isinstance(dims, Mapping):
        raise BadInputError("dims must be a mapping of dynamic dim names to sizes, e.g. "
                            f"{{'batch': 4}}, got {type(dims).__name__}")
    names = [k for k in dims if not isinstance(k, str)]
    if names:
        raise BadInputError(f"dims takes dim names (str) as keys, got {names[0]!r}")
    bad = {k: v for k, v in dims.items() if not _is_int(v) or v < 1}
    if bad:
        raise BadInputError(f"dim sizes must be integers >= 1, got {bad}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_budget(specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]],
                  samples: int) -> None:
    """Refuse generated samples that would take more than :data:`INPUT_BUDGET_BYTES`."""
    per_sample = sum(math.prod(shapes[s.name]) * s.dtype.itemsize for s in specs)
    if per_sample * samples > INPUT_BUDGET_BYTES:
        sizes = ", ".join(f"{s.name} {list(shapes[s.name])}" for s in specs)
        raise BadInputError(
            f"the generated inputs would take {per_sample * samples} bytes ({samples} "
            f"sample(s) of {sizes}), more than the {INPUT_BUDGET_BYTES}-byte budget; use "
            "smaller --dim sizes or fewer --samples")


def generate_samples(
    specs: Sequence[InputSpec], dims: Mapping[str, int] | None, samples: int, seed: int,
) -> tuple[list[Sample], list[str]]:
    """``samples`` random input dicts for ``specs`` and the notes saying which defaults applied
    (``dims`` checked by :func:`check_dims`)."""
    notes: list[str] = []
    dims = dict(dims or {})
    shapes = {s.name: resolve_shape(s, dims, notes) for s in specs}
    _check_budget(specs, shapes, samples)
    named = {d for s in specs for d in (s.shape or ()) if isinstance(d, str)}
    unused = sorted(set(dims) - named)
    if unused:
        notes.append(f"dims not in the model's inputs, ignored: {', '.join(unused)} "
                     f"(its dynamic dims: {', '.join(sorted(named)) or 'none'})")
    out = []
    for i in range(samples):
        rng = np.random.default_rng(seed + i)
        out.append({s.name: random_array(shapes[s.name], s.dtype, rng) for s in specs})
    return out, notes


def load_samples(source: Any, specs: Sequence[InputSpec]) -> list[Sample]:
    """Samples given by the user: an ``.npz`` (one array per input name), an ``.npy`` (for a
    single-input model), a dict of arrays, or a list of those. Dtypes are checked, not cast."""
    items = source if isinstance(source, (list, tuple)) else [source]
    samples = [_one_sample(item, specs) for item in items]
    if not samples:
        raise BadInputError("no input samples given")
    return samples


def _check_named_dims(sample: Sample, specs: Sequence[InputSpec]) -> None:
    """One size per named dynamic dim across the inputs of one sample."""
    seen: dict[str, tuple[int, str]] = {}
    for s in specs:
        for axis, d in enumerate(s.shape or ()):
            if not isinstance(d, str):
                continue
            size = sample[s.name].shape[axis]
            if d in seen and seen[d][0] != size:
                raise BadInputError(f"dim {d!r} is {seen[d][0]} in input {seen[d][1]!r} but "
                                    f"{size} in input {s.name!r}")
            seen.setdefault(d, (size, s.name))


def _one_sample(item: Any, specs: Sequence[InputSpec]) -> Sample:
    if isinstance(item, (str, os.PathLike)):
        item = _read_arrays(Path(item), specs)
    if not isinstance(item, Mapping):
        raise BadInputError(f"inputs must be a path or a dict of arrays, got {type(item).__name__}")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in item]
    extra = [k for k in item if k not in names]
    if missing or extra:
        raise BadInputError(
            f"inputs do not match the model: missing {missing or 'none'}, unknown {extra or 'none'}"
        )
    sample = {}
    for s in specs:
        arr = np.asarray(item[s.name])
        if arr.dtype != s.dtype:
            raise BadInputError(
                f"input {s.name!r} has dtype {arr.dtype}, the model wants {s.dtype}")
        if s.shape is not None:
            fixed = [(a, d) for a, d in enumerate(s.shape) if isinstance(d, int)]
            if arr.ndim != len(s.shape) or any(arr.shape[a] != d for a, d in fixed):
                raise BadInputError(f"input {s.name!r} has shape {list(arr.shape)}, the model "
                                    f"wants {list(s.shape)}")
        sample[s.name] = arr
    _check_named_dims(sample, specs)
    return sample


def _check_signature(path: Path) -> None:
    """Refuse a file that starts like neither an ``.npy`` nor an ``.npz``: numpy would read
    any other file as a pickle (refused as an object array, a wrong diagnosis)."""
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if not head.startswith((NPY_MAGIC, *NPZ_MAGICS)):
        raise BadInputError(f"{path}: not an .npy/.npz file (it does not start with the .npy "
                            "signature or a zip archive's)")


def _check_unpacked_size(path: Path) -> None:
    """Refuse an ``.npz`` whose arrays, uncompressed, exceed :data:`INPUT_BUDGET_BYTES` (a
    small compressed file can unpack to any size), from its zip directory alone."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadInputError(f"{path}: not a readable .npz file ({first_line(exc)})") from exc
    if unpacked > INPUT_BUDGET_BYTES:
        raise BadInputError(f"{path}: its arrays unpack to {unpacked} bytes, more than the "
                            f"{INPUT_BUDGET_BYTES}-byte validation input budget")


def load_arrays(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """The array of an ``.npy`` or the named arrays of an ``.npz``, read without pickle and
    within :data:`INPUT_BUDGET_BYTES`: an object array (pickled Python objects) is a one-line
    BadInputError, never unpickled."""
    check_input_file(path, "input sample", INPUT_BUDGET_BYTES, "the validation input budget")
    _check_signature(path)
    _check_unpacked_size(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except Exception as exc:  # numpy raises ValueError, OSError, zipfile errors, EOFError...
        why = ("it holds an object array (pickled Python objects), which bnfold does not "
               "unpickle" if "allow_pickle" in str(exc) or "Object arrays" in str(exc)
               else first_line(exc))
        raise BadInputError(f"{path}: not a readable .npy/.npz file ({why})") from exc


def _read_arrays(path: Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    loaded = load_arrays(path)
    if isinstance(loaded, np.ndarray):
        if len(specs) != 1:
            raise BadInputError(f"{path}: a .npy holds one array but the model has "
                                f"{len(specs)} inputs; use an .npz keyed by input name")
        return {specs[0].name: loaded}
    return loaded
