"""Turning a torch model into a ``torch.fx.GraphModule`` the fold pass can rewrite, with shapes.

``symbolic_trace`` first (it keeps module calls, so reports name ``layer1.conv1``); when it
fails (Python control flow on traced values or shapes) and example inputs are given,
``torch.export`` (non-strict) and its unlifted graph module. When both fail, an
:class:`~bnfold.errors.UntraceableError` names the line of the model's own code that stopped
tracing. TorchScript modules are refused (no Python forward), ``torch.compile`` wrappers are
unwrapped, and lazy modules must have run once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.nn.modules.lazy import LazyModuleMixin

from bnfold.errors import BadInputError, UnsupportedError, UntraceableError
from bnfold.modules import FeatureBatchNorm
from bnfold.passes.fx.dispatch import RankDispatch
from bnfold.passes.fx.model_copy import deep_copy

_TORCH_DIR = os.path.dirname(torch.__file__)


def as_args(example_inputs: Any) -> tuple[Any, ...] | None:
    """Normalize ``example_inputs`` (a tensor, a tuple/list of inputs, or None) to a tuple."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def open_model(
    model: torch.nn.Module, example_inputs: Any, *, inplace: bool = False
) -> tuple[fx.GraphModule, str, tuple[Any, ...] | None]:
    """The FX passes' one front door: ``(graph module, how it was obtained, example args)``.

    Traces ``model`` (:func:`graph_module_of`: symbolic_trace, then the ``torch.export``
    fallback when example inputs are given) and records every node's shape on the example
    inputs (:func:`annotate_shapes`; a ``torch.export`` graph has them already, read both with
    :func:`shape_of`). Every bad input raises a :class:`~bnfold.errors.BnfoldError`: an
    untraceable model :class:`~bnfold.errors.UntraceableError`, a TorchScript module
    :class:`~bnfold.errors.UnsupportedError`.
    """
    args = as_args(example_inputs)
    gm, how = graph_module_of(model, args, inplace=inplace)
    if args is not None and not how.startswith("torch.export"):
        annotate_shapes(gm, args)
    return gm, how, args


def graph_module_of(
    model: torch.nn.Module, args: tuple[Any, ...] | None, *, inplace: bool
) -> tuple[fx.GraphModule, str]:
    """Return ``(graph module, how it was obtained)`` for ``model``.

    Without ``inplace`` the model is deep-copied first (:func:`~.model_copy.deep_copy`, what
    ``copy.deepcopy`` gives; parameters shared inside the model stay shared inside the copy),
    so rewriting the result never touches the caller's tensors; ``inplace`` is accepted only
    for a ``GraphModule``, which is then returned as is. A traced graph module has no code yet
    (:func:`without_code`): every pass ends with ``gm.recompile()`` after its rewrites.
    """
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script/trace): it has "
            "no Python forward for torch.fx to trace; pass the original nn.Module, then script "
            "the resulting GraphModule"
        )
    original = uncompiled(model)
    compiled = "" if original is model else " (unwrapped from torch.compile)"
    model = original
    _check_materialized(model)
    if inplace and not isinstance(model, fx.GraphModule):
        raise BadInputError(
            f"inplace=True rewrites a torch.fx.GraphModule, but {type(model).__name__}'s own "
            "forward would keep calling its BNs on the folded weights; call fold without "
            "inplace (the model is left untouched) or pass a GraphModule"
        )
    work = model if inplace else deep_copy(model)
    if isinstance(work, fx.GraphModule):
        return work, "graph module" + compiled
    try:
        graph = Tracer().trace(work)
        return without_code(work, graph, type(work).__name__), "symbolic_trace" + compiled
    except Exception as trace_exc:
        where = user_frame(trace_exc)
        first = one_line(trace_exc)
        if args is None:
            raise UntraceableError(
                f"cannot trace {type(model).__name__}: {first}{where}; "
                "pass example_inputs to try torch.export instead"
            ) from trace_exc
        try:
            with _quiet_torch_logs():
                exported = torch.export.export(work, args, strict=False)
        except Exception as export_exc:
            raise UntraceableError(
                f"cannot trace {type(model).__name__}: {first}{where}; "
                f"torch.export also failed: {one_line(export_exc)}{user_frame(export_exc)}"
            ) from export_exc
        return exported.module(), (
            f"torch.export{compiled} (symbolic_trace failed: {first}{where})")


def without_code(root: torch.nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` minus its first code generation.

    The constructor generates and compiles Python code for ``graph`` (``recompile``), which a
    pass throws away when it rewrites the graph and recompiles at its end. ``GraphModule``
    makes a class of its own for every instance; its ``recompile`` is a no-op while the
    constructor runs, so the result has everything but its ``forward`` until the pass's
    ``gm.recompile()``. Where torch makes no such class, the plain constructor runs.
    """
    gm = fx.GraphModule.__new__(fx.GraphModule)
    own = type(gm)
    if own is fx.GraphModule:
        return fx.GraphModule(root, graph, class_name)
    own.recompile = _no_code  # type: ignore[method-assign]
    try:
        gm.__init__(root, graph, class_name)  # type: ignore[misc]
    finally:
        del own.recompile
    return gm


def _no_code(self: fx.GraphModule) -> None:
    """Stands in for ``GraphModule.recompile`` while :func:`without_code` builds a module."""


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Hold back torch.export's warnings and printouts (a failed export prints whole graphs):
    the failure reaches the user as one line."""
    loggers = [logging.getLogger(n) for n in
               ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped, or ``model`` itself."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing is compiled
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        return model._orig_mod
    return model


def _check_materialized(model: torch.nn.Module) -> None:
    """Refuse lazy modules (``LazyConv2d``, ``LazyBatchNorm2d``...) not yet run on an input,
    and tensors on the ``meta`` device (shapes without data: nothing to fold)."""
    for name, module in model.named_modules():
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise BadInputError(
                f"{name or 'the model'} ({type(module).__name__}) has uninitialized lazy "
                "parameters; run the model once on an input before folding"
            )
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise BadInputError(
                f"{name} is on the meta device (a shape without data): load the weights "
                "(e.g. model.to_empty(device='cpu') then load_state_dict) before folding"
            )


class Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer, keeping bnfold's own BN modules as calls (leaves)."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (FeatureBatchNorm, RankDispatch)) or super().is_leaf_module(
            m, module_qualified_name)


def one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def user_frame(exc: BaseException) -> str:
    """`` at file.py:12 in forward: `if x.sum() > 0:` `` for the innermost non-torch frame."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if not os.path.abspath(f.filename).startswith(_TORCH_DIR)
        and os.path.abspath(f.filename) != os.path.abspath(__file__)
    ]
    if not frames:
        return ""
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f" at {os.path.basename(f.filename)}:{f.lineno} in {f.name}{code}"


#: Example inputs of at most this many elements run for real (one forward pass under
#: ``torch.no_grad()`` on one intra-op thread: ~1 ms on the zoo where fake tensors take ~4 ms
#: a node, and ResNet-50 at 1x3x224x224 under its fake-tensor time); larger ones go through
#: fake tensors, whose cost does not grow with the input.
REAL_SHAPES_MAX_ELEMENTS = 1 << 20


def annotate_shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Record every node's output in ``node.meta`` by running ``gm`` on ``args``.

    Small inputs (:data:`REAL_SHAPES_MAX_ELEMENTS`) run for real first and fall back to fake
    tensors; large ones run on fake tensors first (no compute) and fall back to real execution
    when an op has no fake kernel. Modules run in eval mode meanwhile, so no BatchNorm updates
    its running statistics (``gm.eval()`` then each module's mode back, when any module is in
    training mode; a model all in eval mode runs as it is).
    """
    modes = {m: m.training for m in gm.modules()}
    switched = any(modes.values())
    if switched:
        gm.eval()
    elements = sum(a.numel() for a in args if isinstance(a, torch.Tensor))
    try:
        if elements > REAL_SHAPES_MAX_ELEMENTS and _fake_shapes(gm, args):
            return
        real = _RealShapes(gm)
        try:
            with torch.no_grad(), _one_thread():
                real.run(*args)
        except Exception as exc:
            if elements <= REAL_SHAPES_MAX_ELEMENTS and _fake_shapes(gm, args):
                return
            raise BadInputError(
                f"example_inputs do not run through the model: {real.failure}"
            ) from exc
    finally:
        for m, training in modes.items() if switched else ():
            m.training = training


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread meanwhile: a shape pass runs tiny ops, where thread start-up and
    spinning (worse on a loaded machine) cost far more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fake_shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> bool:
    """Propagate fake tensors through ``gm`` (``meta["val"]``); false if an op cannot."""
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        FakeTensorProp(gm, mode).propagate(*fake)
    except Exception:
        return False
    return True


class _RealShapes(fx.Interpreter):
    """Run the graph on real tensors, recording each tensor's shape as ``tensor_meta``."""

    failure = ""  # "at <module or node>: <first line of the error>" once a node raised

    def run_node(self, n: fx.Node) -> Any:
        """``Interpreter.run_node`` minus its per-node context (it records the node as the
        current one for a trace started inside an op, which real tensors never start), plus
        the failure and the metadata."""
        try:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = getattr(self, n.op)(n.target, args, kwargs)
        except Exception as exc:
            where = n.target if n.op == "call_module" else n.name
            self.failure = f"at {where}: {one_line(exc)}"
            raise
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = tensor_metadata(result)
        return result


_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """torch's ``_extract_tensor_metadata(t)`` (what ``ShapeProp`` records), equal field for
    field: for a plain dense, non-quantized tensor the memory format is read by the tensor's
    own contiguity checks (the same definition as torch's symbolic-size-aware Python ones,
    at a fraction of the cost); any other tensor goes to torch's function."""
    if type(t) is not torch.Tensor or t.layout is not torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    fmt = next((f for f in _MEMORY_FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


def shape_of(node: fx.Node) -> tuple[int | None, ...] | None:
    """The recorded output shape of ``node`` (symbolic sizes as None), or None if unknown."""
    val = node.meta.get("val")
    shape: Sequence[Any] | None = None
    if isinstance(val, torch.Tensor):
        shape = val.shape
    elif node.meta.get("tensor_meta") is not None and hasattr(node.meta["tensor_meta"], "shape"):
        shape = node.meta["tensor_meta"].shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)
