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
import copy
import io
import logging
import operator
import os
import sys
import traceback
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from torch.utils._sympy.numbers import int_oo

from bnfold.arguments import check_module
from bnfold.errors import BadInputError, UnsupportedError, UntraceableError
from bnfold.modules import FeatureBatchNorm
from bnfold.passes.fx.constants import state_kept
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


#: ``gm.meta`` key of the example inputs whose shape pass waits for the first shape asked for
_PENDING = "bnfold.shapes_pending"


def open_model(
    model: torch.nn.Module, example_inputs: Any, *, inplace: bool = False,
    shapes_on_demand: bool = False,
) -> tuple[fx.GraphModule, str, tuple[Any, ...] | None]:
    """The FX passes' one front door: ``(graph module, how it was obtained, example args)``.

    Traces ``model`` (:func:`graph_module_of`: symbolic_trace, then the ``torch.export``
    fallback when example inputs are given) and records every node's shape on the example
    inputs (:func:`record_shapes`; a ``torch.export`` graph has them already, read both with
    :func:`shape_of`). With ``shapes_on_demand`` (and not ``inplace``) that shape pass waits
    until :func:`shape_of` first finds a node without a shape, and never runs if none is asked
    for; :func:`drop_pending_shapes` ends the wait. It may then run on a graph some folds have
    rewritten, which is sound because a fold leaves the shape of every remaining node as it was.
    Not with ``inplace``: bad example inputs found halfway would leave the caller's graph
    half rewritten. Every bad input raises a :class:`~bnfold.errors.BnfoldError`: an
    untraceable model :class:`~bnfold.errors.UntraceableError`, a TorchScript module
    :class:`~bnfold.errors.UnsupportedError`.
    """
    args = as_args(example_inputs)
    gm, how = graph_module_of(model, args, inplace=inplace)
    if args is not None and not how.startswith("torch.export"):
        _forget_other_inputs_shapes(gm, args)
        if shapes_on_demand and not inplace:
            _forget(gm, "tensor_meta")  # (shapes an earlier pass recorded: not these inputs')
            gm.meta[_PENDING] = args
        else:
            record_shapes(gm, args)
    return gm, how, args


def _forget_other_inputs_shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Drop the ``val`` (and ``tensor_meta``) of every node of a graph module traced or
    propagated on other inputs than ``args`` (:func:`_recorded_for_other_input`):
    :func:`shape_of` reads ``val`` first, which the shape pass does not overwrite."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node, arg in zip(placeholders, args, strict=False):
        if "val" in node.meta and _recorded_for_other_input(node.meta["val"], arg):
            _forget(gm, "val", "tensor_meta")
            return


def _forget(gm: fx.GraphModule, *keys: str) -> None:
    """Drop ``keys`` from every node's ``meta``."""
    for node in gm.graph.nodes:
        for key in keys:
            node.meta.pop(key, None)


def _recorded_for_other_input(val: Any, arg: Any) -> bool:
    """True when a placeholder's recorded ``val`` describes another input than ``arg``: leaf
    by leaf through lists, tuples and dicts, a tensor of another rank or fixed size (a
    symbolic size matches any), a Python number of another value, another structure."""
    vals, given = _leaves(val), _leaves(arg)
    if len(vals) != len(given):
        return True
    for v, a in zip(vals, given, strict=True):
        if isinstance(v, torch.Tensor):
            if not isinstance(a, torch.Tensor) or v.dim() != a.dim() or any(
                    isinstance(d, int) and d != size
                    for d, size in zip(v.shape, a.shape, strict=True)):
                return True
        elif type(v) in (int, float, bool) and v != a:
            return True
    return False


def _leaves(value: Any) -> list[Any]:
    """The leaves of ``value`` through lists, tuples and dicts, in order."""
    out: list[Any] = []
    fx.node.map_aggregate(value, lambda leaf: out.append(leaf))
    return out


def record_shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """:func:`annotate_shapes` on copies of ``args`` (a forward that writes its input in
    place leaves the caller's as it was), leaving every model tensor the graph writes, the
    global random state and every ``torch.Generator`` a module holds as they were."""
    args = fx.node.map_aggregate(args, lambda a: a.detach().clone().requires_grad_(
        a.requires_grad) if isinstance(a, torch.Tensor) else a)
    owned = [g for m in gm.modules() for g in vars(m).values() if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in owned]
    rng = torch.random.get_rng_state()
    try:
        with state_kept(gm):  # (a forward that writes a buffer in place runs here)
            annotate_shapes(gm, args)
    finally:
        torch.random.set_rng_state(rng)  # (a forward's draws leave the caller's stream)
        for generator, state in zip(owned, states, strict=True):
            generator.set_state(state)  # (and the model's own generators where they were)


def drop_pending_shapes(gm: fx.GraphModule) -> bool:
    """End an on-demand shape pass's wait (:func:`open_model`); true if it never ran."""
    return gm.meta.pop(_PENDING, None) is not None


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
    check_module(model)
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
    work = model if inplace else _copy(model)
    if isinstance(work, fx.GraphModule):
        return work, "graph module" + compiled
    try:
        before, rng = _state(work), torch.random.get_rng_state()
        graph = Tracer().trace(work)
        _refuse_writes_at_trace(work, before)
        if not torch.equal(rng, torch.random.get_rng_state()):
            torch.random.set_rng_state(rng)  # (the caller's draws go on as if never traced)
            raise _SideEffectAtTrace("its forward draws random numbers outside the traced "
                                     "graph (once, at trace time: constants of the graph)")
        gm = without_code(work, graph, type(work).__name__)
    except Exception as trace_exc:
        where = user_frame(trace_exc)
        first = one_line(trace_exc)
        if args is None:
            raise UntraceableError(
                f"cannot trace {type(model).__name__}: {first}{where}; "
                "pass example_inputs to try torch.export instead"
            ) from trace_exc
        work = _copy(model)  # (the failed trace may have written the copy it traced)
        rng, seed = torch.random.get_rng_state(), torch.initial_seed()
        try:
            with _quiet_torch_logs():
                exported = _export(work, args)
        except Exception as export_exc:
            raise UntraceableError(
                f"cannot trace {type(model).__name__}: {first}{where}; "
                f"torch.export also failed: {one_line(export_exc)}{user_frame(export_exc)}"
            ) from export_exc
        finally:
            reseeded = torch.initial_seed() != seed
            torch.random.set_rng_state(rng)  # (the export ran the forward for real)
        if reseeded:
            raise UntraceableError(
                f"cannot trace {type(model).__name__}: its forward seeds torch's random "
                "generator (torch.manual_seed), which neither symbolic_trace nor torch.export "
                "keeps in the graph") from trace_exc
        return _in_its_mode(exported.module(), work.training), (
            f"torch.export{compiled} (symbolic_trace failed: {first}{where}); the input "
            f"shapes the result takes: {_input_shapes(exported)} (a number: fixed to the "
            "example's, where the model or torch.export needs it)")
    return gm, "symbolic_trace" + compiled


def _in_its_mode(module: fx.GraphModule, training: bool) -> fx.GraphModule:
    """``module`` (``torch.export``'s, which refuses every ``train()``/``eval()``: its graph
    is fixed to the mode it was exported in) accepting the mode it is in (``eval()``, and
    ``torch.onnx.export``'s ``train(False)``), and refusing a change with the reason."""
    def train(self: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
        if mode != training:
            raise NotImplementedError(
                f"this model was traced by torch.export in {'training' if training else 'eval'}"
                " mode (symbolic_trace could not trace it): its graph has no other mode")
        return self

    module.train = types.MethodType(train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(lambda self: self.train(False), module)  # type: ignore
    for sub in module.modules():  # (torch leaves them in the default training=True)
        sub.training = training
    return module


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    """:func:`~.model_copy.deep_copy` of ``model``; :class:`UnsupportedError` (one line) for
    a model ``copy.deepcopy`` cannot copy (a sparse parameter: torch's own copy refuses it)."""
    try:
        with quiet_pytree_warning():  # (torch's own, on copying a torch.export module)
            work = deep_copy(model)
        if isinstance(model, fx.GraphModule):
            _restore_plain_attributes(model, work)
        return work
    except Exception as exc:
        raise UnsupportedError(
            f"cannot copy {type(model).__name__} ({one_line(exc)}{user_frame(exc)}): bnfold "
            "rewrites a copy and leaves the model as it is") from exc


@contextlib.contextmanager
def quiet_pytree_warning() -> Iterator[None]:
    """Hold back torch's ``FutureWarning`` about its own pytree specs (``isinstance(treespec,
    LeafSpec)``), which copying or lowering a torch.export module prints."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`isinstance\(treespec, LeafSpec\)`")
        yield


def _restore_plain_attributes(gm: fx.GraphModule, work: torch.nn.Module) -> None:
    """Give ``work``, a deep copy of ``gm``, the attributes that are not callables which the
    copy dropped (``copy.deepcopy`` of a GraphModule keeps only what ``GraphModule`` knows:
    torch.export's unlifted module loses ``validate_inputs`` and ``range_constraints``, which
    its input-check pre-hook, carried over by :func:`~.hooks.carry_hooks`, reads)."""
    held = vars(work)
    for key, value in vars(gm).items():
        if key not in held and not callable(value):
            setattr(work, key, copy.deepcopy(value))


class _SideEffectAtTrace(Exception):
    """The model's ``forward`` changed one of its tensors, or drew random numbers, while it
    was traced, where the graph records neither."""


#: Buffers of at most this many elements are compared by value after the trace as well (a
#: write through ``.data`` bumps no version counter of the buffer itself).
_COMPARED_BUFFER_MAX = 1 << 16
_GONE = object()  # (an attribute the trace deleted: not looked at, as before it was none)


@dataclass
class _Held:
    """One tensor a module holds before the trace: where (the module, its path and the
    attribute), the tensor, its version counter and, for a small buffer, a copy of its
    values."""

    module: torch.nn.Module
    name: str
    key: str
    tensor: torch.Tensor
    version: int
    values: torch.Tensor | None


def _state(model: torch.nn.Module) -> list[_Held]:
    """Every tensor ``model``'s modules hold (under each path a module has)."""
    out = []
    for path, module in model.named_modules(remove_duplicate=False):
        buffers = module._buffers
        for key, t in (*module._parameters.items(), *buffers.items(), *vars(module).items()):
            if isinstance(t, torch.Tensor) and not t.is_inference():
                small = key in buffers and t.numel() <= _COMPARED_BUFFER_MAX and not t.is_meta
                out.append(_Held(module, f"{path}.{key}" if path else key, key, t, t._version,
                                 t.detach().clone() if small else None))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` holds ``a``'s values (NaN equal to NaN)."""
    if torch.equal(a, b):
        return True
    if not a.is_floating_point() or a.shape != b.shape:
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def _refuse_writes_at_trace(model: torch.nn.Module, before: list[_Held]) -> None:
    """Raise :class:`_SideEffectAtTrace` if tracing ``model`` changed a tensor of ``before``
    (:func:`_state`): wrote it in place (its version counter; a small buffer's values too,
    since a write through ``.data`` bumps another counter) or put another tensor in its place
    (``self.n = self.n + 1``). Code that reaches a tensor past the tracer's proxies (a buffer
    through its attribute, ``self.parameters()``) runs once, at trace time, and leaves no
    node, so the graph would run without the change the model makes at each call (a counter,
    a cache) and read the value the trace left."""
    changed = []
    for held in before:
        now = getattr(held.module, held.key, _GONE)
        if now is not _GONE and (now is not held.tensor or held.tensor._version != held.version
                                 or (held.values is not None and not _same(held.values, now))):
            changed.append(held.name)
    if changed:
        shown = ", ".join(sorted(set(changed))[:3])
        hint = " (training mode?)" if any(m.training for m in model.modules()) else ""
        raise _SideEffectAtTrace(f"its forward writes {shown} outside the traced graph (once, "
                                 f"at trace time){hint}")


def _export(model: torch.nn.Module, args: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on ``args`` with every dim of every tensor input left to
    torch (``Dim.AUTO``: dynamic where the model allows it), so the folded module takes the
    shapes the model takes, not only the example's; a program that cannot be had so is
    exported on the example's shapes."""
    auto = tuple({d: torch.export.Dim.AUTO for d in range(a.dim())}
                 if isinstance(a, torch.Tensor) else None for a in args)
    try:
        return torch.export.export(model, args, strict=False, dynamic_shapes=auto)
    except Exception:  # (e.g. a non-tensor input of a kind dynamic_shapes cannot describe)
        return torch.export.export(model, args, strict=False)


def _input_shapes(program: torch.export.ExportedProgram) -> str:
    """``"x [s0, 3, s1, s2] (traced for s0 >= 2, ...)"``: each tensor input's dims as the
    program accepts them, and the range torch.export traced each symbolic dim for
    (``Dim.AUTO`` dims start at 2: a model that branches on a size of 1 took the other
    branch, and runs it at size 1 too)."""
    names = set(program.graph_signature.user_inputs)
    shapes, ranges = [], {}
    for node in program.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if node.name not in names or not isinstance(val, torch.Tensor):
            continue
        shapes.append(f"{node.name} [{', '.join(str(d) for d in val.shape)}]")
        for d in val.shape:
            bounds = program.range_constraints.get(d.node.expr) if isinstance(
                d, torch.SymInt) and d.node.expr.is_Symbol else None
            if bounds is not None:
                lower, upper = int(bounds.lower), upper_bound(bounds)
                ranges[str(d)] = f"{d} >= {lower}" if upper is None else \
                    f"{lower} <= {d} <= {upper}"
    return "; ".join(shapes) + (f" (traced for {', '.join(ranges.values())})" if ranges else "")


def upper_bound(bounds: Any) -> int | None:
    """The upper end of a torch.export value range, or None where there is none (torch's
    integer infinity, the bound of a dim given no max, calls itself finite)."""
    upper = bounds.upper
    return int(upper) if upper.is_finite and upper != int_oo else None


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
                "parameters; run the model once on an input first"
            )
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise BadInputError(
                f"{name} is on the meta device (a shape without data): load the weights "
                "(e.g. model.to_empty(device='cpu') then load_state_dict) first"
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
#: fake tensors, whose cost does not grow with the input, when the shape pass below fails on
#: the ``meta`` device.
REAL_SHAPES_MAX_ELEMENTS = 1 << 20
#: A node whose tensor inputs hold more than this many elements, and every node after it, runs
#: on the ``meta`` device (shapes without data): a full-size convolution costs milliseconds to
#: seconds for real and about 50 us on meta, where the zoo's tiny tensors run faster for real.
META_FROM_ELEMENTS = 1 << 16


def annotate_shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Record every node's output in ``node.meta`` by running ``gm`` on ``args``.

    :class:`_Shapes` runs the graph for real while its tensors are small and on the ``meta``
    device once they are not (:data:`META_FROM_ELEMENTS`); an op that cannot run on meta
    (data-dependent shapes, a tensor made inside ``forward`` on the CPU, no meta kernel) sends
    the whole graph to the former way: small inputs (:data:`REAL_SHAPES_MAX_ELEMENTS`) run for
    real and fall back to fake tensors, large ones run on fake tensors first and fall back to
    real execution. Every way records the same shapes and dtypes (strides too, except where
    a meta kernel lays out a permuted or channels-last tensor otherwise than the CPU kernel:
    tests/test_shape_passes.py). Modules run in eval mode meanwhile, so no BatchNorm updates
    its running statistics (``gm.eval()`` then each module's mode back, when any module is in
    training mode; a model all in eval mode runs as it is).
    """
    modes = {m: m.training for m in gm.modules()}
    switched = any(modes.values())
    if switched:
        gm.eval()
    elements = sum(a.numel() for a in args if isinstance(a, torch.Tensor))
    try:
        if _shapes_meta_when_large(gm, args):
            return
        if elements > REAL_SHAPES_MAX_ELEMENTS and _fake_shapes(gm, args):
            return
        real = _Shapes(gm, None)
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


def _shapes_meta_when_large(gm: fx.GraphModule, args: tuple[Any, ...]) -> bool:
    """Run :class:`_Shapes` (real while small, meta after); false if a node raised."""
    try:
        with torch.no_grad(), _one_thread():
            _Shapes(gm, META_FROM_ELEMENTS).run(*args)
    except Exception:
        return False
    return True


def _fake_shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> bool:
    """Propagate fake tensors through ``gm`` (``meta["val"]``); false if an op cannot (its
    failure is not logged: the caller reports it in one line)."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        FakeTensorProp(gm, mode).propagate(*fake)
    except Exception:
        return False
    finally:
        log.setLevel(level)
    return True


#: The ``forward`` of modules whose output, in eval mode on a floating tensor in a dense
#: memory format, is a tensor like their input: on meta :class:`_Shapes` makes it
#: (:func:`_like`) instead of running the module (BatchNorm's meta kernel is a Python
#: decomposition, ~1 ms). A subclass with a ``forward`` of its own runs.
_LIKE_INPUT_FORWARDS = frozenset(c.forward for c in (
    torch.nn.modules.batchnorm._BatchNorm, torch.nn.SyncBatchNorm, torch.nn.ReLU,
    torch.nn.ReLU6, torch.nn.SiLU, torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.Sigmoid,
    torch.nn.Tanh, torch.nn.GELU, torch.nn.LeakyReLU, torch.nn.Identity, torch.nn.Dropout))
#: Functions and methods of that kind (their first argument is the tensor), and binary
#: elementwise ops, like their first operand when the other is a Python number or a tensor of
#: the same shape, dtype and strides, or like the operand of the output's shape when both are
#: contiguous and one broadcasts to the other.
_LIKE_INPUT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid,
                         torch.sigmoid, torch.tanh, F.gelu, F.leaky_relu, F.dropout,
                         F.batch_norm, "relu", "sigmoid", "tanh"}
_ELEMENTWISE = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
                torch.add, torch.mul, torch.sub, "add", "mul", "sub", "add_", "mul_"}
#: Those whose output is also like a second operand that the first broadcasts to (an
#: in-place op's output is its first operand, which cannot broadcast).
_SYMMETRIC = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub}
_DENSE = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _like(x: Any, others: Iterator[Any] | tuple[Any, ...]) -> torch.Tensor | None:
    """A tensor like ``x`` (its shape, strides and dtype; ``torch.empty_strided``, which
    costs ~1 us on meta where ``empty_like``'s Python decomposition costs ~150 us) when an op
    of the tables above, given ``x`` and ``others``, makes one: ``x`` a floating tensor in a
    dense memory format and every other tensor argument of its dtype (for ``_ELEMENTWISE``
    see :meth:`_Shapes._like`); else ``None`` (the op runs on meta)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or \
            not any(x.is_contiguous(memory_format=f) for f in _DENSE):
        return None
    for other in others:
        if isinstance(other, torch.Tensor) and other.dtype != x.dtype:
            return None
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def _to_meta(value: Any) -> Any:
    """``value`` with each tensor in it moved to the ``meta`` device (its ``requires_grad``
    kept: the recorded metadata are the real tensor's)."""
    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return t
        return t.to("meta").requires_grad_(t.requires_grad)
    return fx.node.map_aggregate(value, move)


class _Shapes(fx.Interpreter):
    """Run the graph, recording each tensor's metadata as ``tensor_meta``: for real until a
    node's tensor inputs hold more than ``meta_from`` elements, on the ``meta`` device from
    that node on (``None``: all for real). Each module then runs as a shallow copy holding
    its parameters and buffers on meta (a parametrized one, which refuses a shallow copy and
    holds its tensors in submodules, through ``torch.func.functional_call`` on meta copies
    of them all), and a :data:`_LIKE_INPUT_FORWARDS` module without hooks is not run at
    all."""

    failure = ""  # "at <module or node>: <first line of the error>" once a node raised
    on_meta = False

    def __init__(self, gm: fx.GraphModule, meta_from: int | None) -> None:
        super().__init__(gm)
        self.meta_from = meta_from
        self.twins: dict[str, torch.nn.Module] = {}

    def run_node(self, n: fx.Node) -> Any:
        """``Interpreter.run_node`` minus its per-node context (it records the node as the
        current one for a trace started inside an op, which real tensors never start), plus
        the move to meta, the failure and the metadata."""
        try:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if self._moved_to_meta((args, kwargs)):
                args, kwargs = _to_meta(args), _to_meta(kwargs)
            result = getattr(self, n.op)(n.target, args, kwargs)
        except Exception as exc:
            where = n.target if n.op == "call_module" else n.name
            self.failure = f"at {where}: {one_line(exc)}"
            raise
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = tensor_metadata(result)
        return result

    def placeholder(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = super().placeholder(target, args, kwargs)
        self._moved_to_meta(value)
        return _to_meta(value) if self.on_meta else value

    def _moved_to_meta(self, value: Any) -> bool:
        """Go on meta (every value computed so far with it) when the tensors in ``value``, a
        node's inputs, hold more than ``meta_from`` elements; true if this call did."""
        if self.on_meta or self.meta_from is None or _elements(value) <= self.meta_from:
            return False
        self.on_meta = True
        self.env = {k: _to_meta(v) for k, v in self.env.items()}
        return True

    def get_attr(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = super().get_attr(target, args, kwargs)
        return _to_meta(value) if self.on_meta else value

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        if not self.on_meta:
            return module(*args, **kwargs)
        if type(module).forward in _LIKE_INPUT_FORWARDS and not module.training and \
                len(args) == 1 and not kwargs and not (
                    module._forward_hooks or module._forward_pre_hooks
                    or torch.nn.modules.module._global_forward_hooks
                    or torch.nn.modules.module._global_forward_pre_hooks):
            like = _like(args[0], tuple(module.parameters(recurse=False)))
            if like is not None:
                return like
        if parametrize.is_parametrized(module):  # (copy.copy refuses it; its tensors nest)
            tensors = {name: _to_meta(t) for name, t in (
                *module.named_parameters(remove_duplicate=False),
                *module.named_buffers(remove_duplicate=False))}
            return torch.func.functional_call(module, tensors, args, kwargs)
        twin = self.twins.get(target)
        if twin is None:
            twin = self.twins[target] = copy.copy(module)
            twin._parameters = {k: _to_meta(v) for k, v in module._parameters.items()}
            twin._buffers = {k: _to_meta(v) for k, v in module._buffers.items()}
        return twin(*args, **kwargs)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> Any:
        like = self._like(target, args, kwargs) if self.on_meta else None
        return like if like is not None else super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        like = self._like(target, args, kwargs) if self.on_meta else None
        return like if like is not None else super().call_method(target, args, kwargs)

    @staticmethod
    def _like(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> torch.Tensor | None:
        """The output of a :data:`_LIKE_INPUT_FUNCTIONS` or :data:`_ELEMENTWISE` op made
        without running it (:func:`_like`), or ``None``."""
        if not args:
            return None
        if target in _LIKE_INPUT_FUNCTIONS:
            return _like(args[0], (*args[1:], *kwargs.values()))
        if target in _ELEMENTWISE and len(args) == 2 and not kwargs:
            a, b = args
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if a.shape == b.shape and a.stride() == b.stride():
                    return _like(a, (b,))
                if not (a.is_contiguous() and b.is_contiguous()):
                    return None  # (a broadcast's layout follows its operands')
                wide = torch.broadcast_shapes(a.shape, b.shape)
                return _like(a, (b,)) if wide == a.shape else (
                    _like(b, (a,)) if wide == b.shape and target in _SYMMETRIC else None)
            if isinstance(b, (float, int)) and not isinstance(b, bool):
                return _like(a, ())
        return None


def _elements(value: Any) -> int:
    """How many elements the tensors in ``value`` hold."""
    total = 0

    def count(t: Any) -> Any:
        nonlocal total
        if isinstance(t, torch.Tensor):
            total += t.numel()
        return t
    fx.node.map_aggregate(value, count)
    return total


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
    """The recorded output shape of ``node`` (symbolic sizes as None), or None if unknown; the
    first node found without one runs a pending shape pass (:func:`open_model`)."""
    shape = _recorded_shape(node)
    gm = node.graph.owning_module
    if shape is None and gm is not None and _PENDING in gm.meta:
        record_shapes(gm, gm.meta.pop(_PENDING))
        shape = _recorded_shape(node)
    return shape


def _recorded_shape(node: fx.Node) -> tuple[int | None, ...] | None:
    """:func:`shape_of` from ``node.meta`` alone."""
    val = node.meta.get("val")
    shape: Sequence[Any] | None = None
    if isinstance(val, torch.Tensor):
        shape = val.shape
    elif node.meta.get("tensor_meta") is not None and hasattr(node.meta["tensor_meta"], "shape"):
        shape = node.meta["tensor_meta"].shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)
