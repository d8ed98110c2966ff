"""Run a reference and a candidate in ONNX Runtime (CPU, CUDA) and compare every output.

``validate(reference, candidate)`` takes two ONNX models (paths, ``onnx.ModelProto`` or
``onnx_ir.Model``), or a torch module and an ONNX model plus ``example_inputs`` (export
parity: torch eager in eval mode is the reference). For each requested provider it opens one
session per model, runs the same input samples through both and compares each output with
:func:`bnfold.validation.metrics.compare_output` (dtype-aware tolerances). When CPU and CUDA both
ran, the candidate's CPU and CUDA outputs are compared too.

Guards against false confidence:

* ORT graph optimizations are disabled by default (``optimize=False``): ORT's own fusions
  (it folds Conv+BN itself) would otherwise run on the reference and could mask a wrong fold.
* The CPU EP always runs; CUDA runs when asked for. ORT only warns when a requested provider
  is missing and silently runs on the CPU; after opening each session
  ``session.get_providers()`` is checked and the provider that really ran is reported. A CUDA
  session that fell back to CPU, or that failed to open or run, is reported as "CUDA EP not
  available" with the reason; ``require=("cuda",)`` turns that into a failure. An EP without
  a kernel for some node (ORT's NOT_IMPLEMENTED, e.g. float64 Conv or bfloat16 on CPU) is
  reported the same way; when no provider could run the models at all,
  :class:`UnsupportedError` is raised: a validation that compared nothing never passes.
* CUDA sessions disable TF32 (``use_tf32=0``) so float32 is compared at float32 precision.
* ORT's own log output is silenced: its errors come back as one-line :class:`BnfoldError`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bnfold.arguments import check_callable, check_flags, check_path, shown
from bnfold.errors import BadInputError, BnfoldError, UnsupportedError, first_line
from bnfold.io.external_data import external_tensors
from bnfold.io.filechecks import check_opset, utf8_path
from bnfold.io.fileio import load_onnx
from bnfold.lazy_ir import ir
from bnfold.validation.inputs import (
    InputSpec,
    Sample,
    check_counts,
    check_dims,
    float_dtypes,
    generate_samples,
    input_specs,
    load_samples,
    numpy_dtype,
    random_array,
)
from bnfold.validation.metrics import (
    CROSS_PROVIDER_FACTOR,
    coarsest,
    compare_output,
    did_not_run,
    dtype_name,
    tolerance_rule,
)
from bnfold.validation.result import ProviderRun, ValidationResult
from bnfold.validation.upcast import float64_torch_outputs, is_low_precision, upcast_to_float32

if TYPE_CHECKING:  # onnxruntime is imported when a session is opened (start-up time)
    import onnxruntime as ort


def __getattr__(name: str) -> Any:
    """``validation.ort``: onnxruntime, imported on first use rather than with this module."""
    if name == "ort":
        import onnxruntime

        return onnxruntime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

EP_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ORT_SILENT = 4  # ORT log severity "fatal": its errors reach the user as BnfoldError lines
EXTERNAL_DIR_KEY = "session.model_external_initializers_file_folder_path"
Progress = Callable[[int, int], None]


@dataclass
class _Model:
    """A model ready for ORT: a label for reports, its proto (for signatures), what
    ``InferenceSession`` opens (a path, so external data resolves, or serialized bytes) and,
    for bytes, the folder its external data files are in."""

    label: str
    proto: onnx.ModelProto
    source: str | bytes
    data_dir: str | None = None


@dataclass
class _Torch:
    label: str
    module: Any
    outputs: list[list[np.ndarray]] = field(default_factory=list)


def validate(
    reference: Any,
    candidate: Any,
    example_inputs: Any = None,
    *,
    providers: Sequence[str] = ("cpu", "cuda"),
    require: Sequence[str] = (),
    inputs: Any = None,
    dims: Mapping[str, int] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    samples: int = 3,
    optimize: bool = False,
    progress: Progress | None = None,
    labels: Sequence[str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    upcast_reference: bool = True,
) -> ValidationResult:
    """Compare ``candidate`` against ``reference`` on every provider in ``providers``.

    ``inputs``: a ``.npy``/``.npz`` path, a dict of arrays, or a list of those; otherwise
    ``samples`` random samples are generated from the reference's input signature with
    ``seed``, dynamic dims taken from ``dims`` (see :mod:`bnfold.validation.inputs`); for a torch
    reference, ``example_inputs`` then random samples of their shapes, unless ``inputs`` is
    given. ``atol``/``rtol`` replace the dtype-aware defaults (:mod:`bnfold.validation.metrics`).
    ``providers``: CPU always runs, plus these. ``require``: providers whose absence is a
    failure rather than a note. ``progress(done, total)`` is called after each ORT run.
    ``labels`` names (reference, candidate) in the report. ``upcast_reference``: when the
    models compute in float16/bfloat16, the reference is the reference graph computed in
    float32 (:mod:`bnfold.validation.upcast`), or a torch reference run in float64, not the 16-bit
    reference itself; ``settings["reference_model"]`` says which was used. Raises
    :class:`BadInputError` for unreadable models or inputs that do not fit,
    :class:`UnsupportedError` when no provider can run the models. ``base_dir``: the folder
    of the external data of in-memory models (required when they have any).
    """
    wanted = _check_providers(providers, require)
    _check_tolerance(atol, "atol")
    _check_tolerance(rtol, "rtol")
    check_counts(samples, seed)
    check_dims(dims)
    _check_labels(labels)
    check_flags(optimize=optimize, upcast_reference=upcast_reference)
    check_callable(progress, "progress(done, total)")
    check_path(base_dir, "base_dir", optional=True)
    cand = _check_exchangeable(_as_model(candidate, "candidate", base_dir))
    torch_mod = sys.modules.get("torch")
    notes: list[str] = []
    if torch_mod is not None and isinstance(reference, torch_mod.nn.Module):
        ref: _Model | _Torch = _Torch(f"torch {type(reference).__name__} (eval)", reference)
        specs = input_specs(cand.proto)
        if inputs is not None:
            feeds = load_samples(inputs, specs)
            source_note = f"given ({_describe_source(inputs)})"
        else:
            feeds = _torch_samples(example_inputs, specs, samples, seed)
            source_note = "example_inputs, then random samples of the same shapes and dtypes"
        compute = coarsest(sorted(float_dtypes(cand.proto), key=str))
    else:
        if example_inputs is not None:
            raise BadInputError("example_inputs is only for a torch reference; use inputs=")
        ref = _check_exchangeable(_as_model(reference, "reference", base_dir))
        specs = input_specs(ref.proto)
        _check_same_inputs(specs, input_specs(cand.proto))
        if inputs is not None:
            feeds = load_samples(inputs, specs)
            source_note = f"given ({_describe_source(inputs)})"
        else:
            feeds, notes = generate_samples(specs, dims, samples, seed)
            source_note = f"generated, seeds {seed}..{seed + samples - 1}"
        compute = coarsest(sorted(float_dtypes(ref.proto) | float_dtypes(cand.proto), key=str))
    if labels is not None:
        ref.label, cand.label = labels
    how = _upcast(ref, compute) if upcast_reference else "as given"
    result = ValidationResult(
        reference=ref.label, candidate=cand.label,
        settings={
            "providers": list(wanted), "require": list(require), "samples": len(feeds),
            "seed": seed, "ort_graph_optimizations": "enabled" if optimize else "disabled",
            "atol": atol, "rtol": rtol, "tolerance_rule": tolerance_rule(),
            "compute_dtype": dtype_name(compute) if compute is not None else None,
            "reference_model": how,
        },
        inputs=[_describe_input(s.name, feeds, source_note) for s in specs],
        notes=notes,
        samples=feeds,
    )
    if isinstance(ref, _Torch) and how.startswith("torch module run in float64"):
        ref.outputs = float64_torch_outputs(ref.module, feeds, [
            numpy_dtype(o.type.tensor_type.elem_type) for o in cand.proto.graph.output])
    elif isinstance(ref, _Torch):
        ref.outputs = [_run_torch(ref.module, feed) for feed in feeds]
    out_names = _output_names(ref, cand, result.notes)
    for model in (ref, cand):
        if isinstance(model, _Model):  # (a torch reference's outputs are tensors)
            _check_numeric_outputs(model)
    ticker = _Ticker(progress, len(feeds) * len(wanted) * (1 if isinstance(ref, _Torch) else 2))
    cand_outputs: dict[str, list[list[np.ndarray]]] = {}
    tol = _Tolerance(atol, rtol, compute)
    for provider in wanted:
        try:
            run = _run_provider(provider, ref, cand, feeds, out_names, optimize, tol, ticker)
        except _RunFailed as exc:
            if inputs is not None or isinstance(ref, _Torch):
                raise
            raise BadInputError(f"{exc}; the inputs were generated (normal floats, integers in "
                                f"[0, 10)): give real samples (.npz)") from exc
        run.required = provider in require
        result.runs.append(run)
        if run.status == "ran" and run.outputs:
            cand_outputs[provider] = run.outputs
    if not any(run.status == "ran" for run in result.runs):
        raise UnsupportedError("no execution provider could run the models: " + "; ".join(
            f"{r.provider}: {r.note}" for r in result.runs))
    if {"cpu", "cuda"} <= cand_outputs.keys():
        result.runs.append(_cross_run(cand, cand_outputs, out_names, tol))
    return result


def _upcast(ref: _Model | _Torch, compute: np.dtype | None) -> str:
    """Make a 16-bit reference compute in float32 (ONNX) or float64 (torch); say how."""
    if compute is None or not is_low_precision(dtype_name(compute)):
        return "as given"
    if isinstance(ref, _Torch):
        ref.label += " in float64"
        return f"torch module run in float64, outputs rounded once to {dtype_name(compute)}"
    base_dir = ref.data_dir if ref.data_dir is not None or not isinstance(ref.source, str) \
        else str(Path(ref.source).parent)  # (a path: its external data lies beside it)
    try:
        ref.proto = upcast_to_float32(ref.proto, base_dir)
    except Exception as exc:  # e.g. external data out of reach: compare as given, and say so
        return f"as given (could not compute the reference in float32: {first_line(exc, 240)})"
    ref.source, ref.label = ref.proto.SerializeToString(), f"{ref.label} (float32)"
    ref.data_dir = base_dir  # (the bytes may still name external tensors of other dtypes)
    return (f"the reference graph computed in float32 (weights and inputs are the "
            f"{dtype_name(compute)} values; outputs rounded once to their dtype), not the "
            f"{dtype_name(compute)} graph itself")


class _RunFailed(BadInputError):
    """ONNX Runtime loaded a model but failed to run it on the inputs."""


@dataclass(frozen=True)
class _Tolerance:
    """The user's ``atol``/``rtol`` (None: dtype-aware default) and the model's compute dtype."""

    atol: float | None
    rtol: float | None
    compute: np.dtype | None

    def compare(self, name: str, refs: list[np.ndarray], cands: list[np.ndarray],
                factor: float = 1.0) -> Any:
        return compare_output(name, refs, cands, atol=self.atol, rtol=self.rtol,
                              tol_factor=factor, compute_dtype=self.compute)


def _check_tolerance(value: float | None, name: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
        raise BadInputError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_labels(labels: object) -> None:
    """``labels``: ``None`` or two strings, (reference, candidate)."""
    if labels is not None and not (isinstance(labels, (list, tuple)) and len(labels) == 2
                                   and all(isinstance(label, str) for label in labels)):
        raise BadInputError("labels takes two strings, (reference, candidate), got "
                            f"{shown(labels)}")


def _check_providers(providers: Sequence[str], require: Sequence[str]) -> list[str]:
    """``cpu`` first, then the other providers asked for or required, each once."""
    if isinstance(providers, str):
        providers = [providers]
    if isinstance(require, str):
        raise BadInputError("require takes a list of providers, e.g. ('cuda',)")
    for name, names in (("providers", providers), ("require", require)):
        listed = isinstance(names, (list, tuple, set, frozenset))
        if not listed or not all(isinstance(p, str) for p in names):
            raise BadInputError(f"{name} takes a list of provider names, e.g. ('cpu', 'cuda'), "
                                f"got {names!r}")
    wanted = [p.strip().lower() for p in providers if p.strip()]
    for p in [*wanted, *require]:
        if p not in EP_NAMES:
            raise BadInputError(f"unknown provider {p!r}; choose from {', '.join(EP_NAMES)}")
    return list(dict.fromkeys(["cpu", *wanted, *require]))


def _as_model(model: Any, role: str, base_dir: str | os.PathLike[str] | None = None) -> _Model:
    data_dir = None
    if isinstance(model, (str, os.PathLike)):
        loaded = load_onnx(model)  # one-line BadInputError for missing/garbage files
        proto = ir.serde.serialize_model(loaded)
        label, source = str(model), str(Path(model))
        if not utf8_path(Path(model).resolve()):  # ORT takes UTF-8 paths only: give the bytes
            source, data_dir = proto.SerializeToString(), str(Path(model).parent)
    else:
        if isinstance(model, onnx.ModelProto):
            proto = model
            if next(external_tensors(load_onnx(model, base_dir=base_dir)), None) is not None:
                data_dir = os.fspath(base_dir)  # type: ignore[arg-type]  # checked: not None
        else:
            loaded = load_onnx(model, base_dir=base_dir)
            proto = ir.serde.serialize_model(loaded)
            data_dir = _external_dir(loaded)
        label, source = f"{role} ({proto.graph.name or 'in memory'})", proto.SerializeToString()
    check_opset(proto, label)
    return _Model(label, proto, source, data_dir)


def _external_dir(model: ir.Model) -> str | None:
    """The folder of the external data files an in-memory model still refers to, if any."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return str(value.const_value.base_dir or ".")
    return None


def _describe_input(name: str, feeds: list[Sample], source: str) -> dict[str, Any]:
    """``{name, dtype, shape (first sample's), source}``, plus ``shapes`` when they differ."""
    shapes = list(dict.fromkeys(tuple(f[name].shape) for f in feeds))
    out: dict[str, Any] = {"name": name, "dtype": dtype_name(feeds[0][name].dtype),
                           "shape": list(shapes[0]), "source": source}
    if len(shapes) > 1:
        out["shapes"] = [list(shape) for shape in shapes]
    return out


def _describe_source(inputs: Any) -> str:
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    files = [str(i) for i in items if isinstance(i, (str, os.PathLike))]
    return ", ".join(files) if len(files) == len(items) else f"{len(items)} in-memory samples"


def _check_same_inputs(ref: Sequence[InputSpec], cand: Sequence[InputSpec]) -> None:
    """Same names and dtypes, in order, and no fixed dim that differs."""
    if [(s.name, s.dtype) for s in ref] != [(s.name, s.dtype) for s in cand]:
        def show(specs: Sequence[InputSpec]) -> str:
            return ", ".join(f"{s.name}:{s.dtype}" for s in specs) or "none"
        raise BadInputError(f"the models take different inputs: reference {show(ref)}, "
                            f"candidate {show(cand)}")
    for r, c in zip(ref, cand, strict=True):
        if r.shape is None or c.shape is None:
            continue
        clash = len(r.shape) != len(c.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b
            for a, b in zip(r.shape, c.shape, strict=True))
        if clash:
            raise BadInputError(f"input {r.name!r} has shape {list(r.shape)} in the reference "
                                f"but {list(c.shape)} in the candidate")


def _output_names(ref: _Model | _Torch, cand: _Model, notes: list[str]) -> list[tuple[str, str]]:
    """Pairs (reference output, candidate output), by name when they agree, else by position."""
    cand_names = [o.name for o in cand.proto.graph.output]
    if isinstance(ref, _Torch):
        count = len(ref.outputs[0])
        if count != len(cand_names):
            raise BadInputError(f"torch returns {count} outputs, the ONNX model {len(cand_names)}")
        return [(f"torch[{i}]", n) for i, n in enumerate(cand_names)]
    ref_names = [o.name for o in ref.proto.graph.output]
    if sorted(ref_names) == sorted(cand_names):
        return [(n, n) for n in ref_names]
    if len(ref_names) != len(cand_names):
        raise BadInputError(f"the models have different outputs: {ref_names} vs {cand_names}")
    notes.append("output names differ; outputs matched by position")
    return list(zip(ref_names, cand_names, strict=True))


def _check_numeric_outputs(model: _Model) -> None:
    """Refuse outputs that are not numeric tensors: there is no tolerance to compare them by."""
    for out in model.proto.graph.output:
        kind = out.type.WhichOneof("value")
        elem = out.type.tensor_type.elem_type if kind == "tensor_type" else None
        if kind != "tensor_type" or elem == onnx.TensorProto.STRING:
            what = "string tensor" if elem == onnx.TensorProto.STRING else (kind or "untyped")
            raise UnsupportedError(f"{model.label}: output {out.name!r} is a {what}; bnfold "
                                   "validates numeric tensor outputs only")


def _check_exchangeable(model: _Model) -> _Model:
    """Refuse bfloat16 inputs or outputs, which ONNX Runtime's Python API does not exchange."""
    for what, values in (("input", model.proto.graph.input), ("output", model.proto.graph.output)):
        for value in values:
            if value.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
                raise UnsupportedError(
                    f"{model.label}: {what} {value.name!r} is bfloat16, which ONNX Runtime's "
                    "Python API does not exchange; validate a model whose inputs and outputs "
                    "are of another float type (bfloat16 inside the graph is fine)")
    return model


class _Ticker:
    def __init__(self, callback: Progress | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)


def open_session(model: _Model, provider: str, optimize: bool
                 ) -> tuple[ort.InferenceSession | None, str | None]:
    """An ORT session on ``provider``, or ``(None, why)`` when that provider cannot run it.

    Raises :class:`BadInputError` when ORT cannot load the model at all (on the CPU EP).
    """
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    if provider == "cuda" and EP_NAMES["cuda"] not in ort.get_available_providers():
        return None, "CUDA EP not available (install onnxruntime-gpu)"
    options = ort.SessionOptions()
    options.log_severity_level = ORT_SILENT
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if model.data_dir is not None:
        options.add_session_config_entry(EXTERNAL_DIR_KEY, model.data_dir)
    eps: list[Any] = ["CPUExecutionProvider"]
    if provider == "cuda":
        eps.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
    try:
        with warnings.catch_warnings():  # the fallback warning; get_providers() says it below
            warnings.filterwarnings("ignore", message="Specified provider", category=UserWarning)
            session = ort.InferenceSession(model.source, options, providers=eps)
    except OrtNotImplemented as exc:
        return None, f"{EP_NAMES[provider]} cannot run {model.label} ({first_line(exc, 240)})"
    except Exception as exc:
        if provider == "cuda":
            return None, ("CUDA EP not available (it failed to open the model: "
                          f"{first_line(exc, 240)})")
        raise BadInputError(f"{model.label}: ONNX Runtime cannot load the model "
                            f"({first_line(exc, 240)})") from exc
    if session.get_providers()[0] != EP_NAMES[provider]:
        return None, (f"CUDA EP not available (ORT fell back to "
                      f"{session.get_providers()[0]}: CUDA libraries failed to load)")
    return session, None


def _run_provider(provider: str, ref: _Model | _Torch, cand: _Model, feeds: list[Sample],
                  names: list[tuple[str, str]], optimize: bool, tol: _Tolerance,
                  ticker: _Ticker) -> ProviderRun:
    comparison = f"{ref.label} vs {cand.label}"
    ref_sess, why = open_session(ref, provider, optimize) if isinstance(ref, _Model) else (
        None, None)
    cand_sess = None
    if why is None:
        cand_sess, why = open_session(cand, provider, optimize)
    if cand_sess is None:
        return ProviderRun(provider, comparison, "unavailable", [], note=why)
    try:
        if ref_sess is not None:
            ref_out = [_run_ort(ref_sess, feed, [r for r, _ in names], ref.label, ticker)
                       for feed in feeds]
        else:
            ref_out = ref.outputs  # type: ignore[union-attr]
        try:
            cand_out = [_run_ort(cand_sess, feed, [c for _, c in names], cand.label, ticker)
                        for feed in feeds]
        except _RunFailed as exc:
            if provider != "cpu":
                raise
            # (the reference ran on these inputs: the candidate does not compute what it does)
            return ProviderRun(provider, comparison, "ran", cand_sess.get_providers(), [
                did_not_run(c, ref_out[0][i], str(exc)) for i, (_, c) in enumerate(names)],
                ref_outputs=ref_out)
    except BnfoldError as exc:
        if provider == "cpu":  # the CPU ran first: a CUDA-only failure is the EP's, not the input's
            raise
        return ProviderRun(provider, comparison, "unavailable", [],
                           note=f"CUDA EP not available (it failed to run the model: {exc})")
    comps = [tol.compare(c, [o[i] for o in ref_out], [o[i] for o in cand_out])
             for i, (_, c) in enumerate(names)]
    return ProviderRun(provider, comparison, "ran", cand_sess.get_providers(), comps,
                       outputs=cand_out, ref_outputs=ref_out)


def _cross_run(cand: _Model, outputs: dict[str, list[list[np.ndarray]]],
               names: list[tuple[str, str]], tol: _Tolerance) -> ProviderRun:
    cpu, cuda = outputs["cpu"], outputs["cuda"]
    comps = [tol.compare(c, [o[i] for o in cpu], [o[i] for o in cuda], CROSS_PROVIDER_FACTOR)
             for i, (_, c) in enumerate(names)]
    return ProviderRun("cpu vs cuda", f"{cand.label}: CPU EP vs CUDA EP", "ran",
                       [EP_NAMES["cpu"], EP_NAMES["cuda"]], comps)


def _run_ort(session: ort.InferenceSession, feed: Sample, names: list[str], label: str,
             ticker: _Ticker) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = ORT_SILENT
    try:
        out = session.run(names, feed, options)
    except Exception as exc:
        raise _RunFailed(f"{label}: ONNX Runtime failed to run it on these inputs "
                            f"({first_line(exc, 240)})") from exc
    ticker.tick()
    return [np.asarray(o) for o in out]


def samples_like(example_inputs: Any, model: Any, samples: int, seed: int) -> list[Sample]:
    """Feeds for ``model``'s inputs (by position): ``example_inputs`` (tensors), then
    ``samples - 1`` random samples of the same shapes and dtypes."""
    proto = model if isinstance(model, onnx.ModelProto) else _as_model(model, "model").proto
    return _torch_samples(example_inputs, input_specs(proto), samples, seed)


def _torch_samples(example_inputs: Any, specs: Sequence[InputSpec], samples: int, seed: int
                   ) -> list[Sample]:
    import torch

    if example_inputs is None:
        raise BadInputError("a torch reference needs example_inputs")
    first = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (
        example_inputs,)
    if len(first) != len(specs) or not all(isinstance(t, torch.Tensor) for t in first):
        raise BadInputError(f"example_inputs must be {len(specs)} tensor(s), one per ONNX input")
    base = [t.detach().cpu().numpy() for t in first]
    feeds = [dict(zip([s.name for s in specs], base, strict=True))]
    for i in range(1, samples):
        rng = np.random.default_rng(seed + i)
        feeds.append({s.name: random_array(a.shape, a.dtype, rng)
                      for s, a in zip(specs, base, strict=True)})
    return feeds


def _run_torch(module: Any, feed: Sample) -> list[np.ndarray]:
    import torch

    return torch_outputs(module, [torch.from_numpy(np.ascontiguousarray(a))
                                  for a in feed.values()])


def torch_outputs(module: Any, args: Sequence[Any]) -> list[np.ndarray]:
    """The outputs of the torch reference ``module`` on ``args``, as arrays. One-line
    :class:`BadInputError` when it is in training mode, or when its forward fails on the
    samples (with the first line of its error)."""
    import torch

    if module.training:
        raise BadInputError("the torch reference is in training mode; call model.eval() first")
    try:
        with torch.no_grad():
            out = module(*args)
    except BnfoldError:
        raise
    except Exception as exc:
        raise BadInputError("the input samples do not fit the torch model "
                            f"({first_line(exc)})") from exc
    return [t.detach().cpu().numpy() for t in _leaves(out)]


def _leaves(out: Any) -> list[Any]:
    """The tensors a torch module returned, in order (lists, tuples and dicts walked); a
    one-line :class:`BadInputError` for anything else (``None``, a number)."""
    import torch

    if isinstance(out, (list, tuple)):
        return [leaf for o in out for leaf in _leaves(o)]
    if isinstance(out, dict):
        return [leaf for o in out.values() for leaf in _leaves(o)]
    if not isinstance(out, torch.Tensor):
        raise BadInputError(f"the torch model returns {type(out).__name__}, not tensors: bnfold "
                            "compares tensor outputs only")
    return [out]

