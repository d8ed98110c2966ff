"""Turning a torch model into a ``torch.fx.GraphModule`` the fold pass can rewrite, with shapes.

``symbolic_trace`` first (it keeps module calls, so reports name ``layer1.conv1``); when it
fails (Python control flow on traced values or shapes) and example inputs are given,
``torch.export`` (non-strict) and its unlifted graph module. When both fail, an
:class:`~bnfold.errors.UntraceableError` names the line of the model's own code that stopped
tracing.
"""

from __future__ import annotations

import copy
import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp

from bnfold.errors import BadInputError, UntraceableError
from bnfold.modules import FeatureBatchNorm

_TORCH_DIR = os.path.dirname(torch.__file__)


def as_args(example_inputs: Any) -> tuple[Any, ...] | None:
    """Normalize ``example_inputs`` (a tensor, a tuple/list of inputs, or None) to a tuple."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def graph_module_of(
    model: torch.nn.Module, args: tuple[Any, ...] | None, *, inplace: bool
) -> tuple[fx.GraphModule, str]:
    """Return ``(graph module, how it was obtained)`` for ``model``.

    Without ``inplace`` the model is deep-copied first (parameters shared inside the model stay
    shared inside the copy), so rewriting the result never touches the caller's tensors.
    """
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    work = model if inplace else copy.deepcopy(model)
    if isinstance(work, fx.GraphModule):
        return work, "graph module"
    try:
        graph = _Tracer().trace(work)
        return fx.GraphModule(work, graph, type(work).__name__), "symbolic_trace"
    except Exception as trace_exc:
        where = _user_frame(trace_exc)
        first = _one_line(trace_exc)
        if args is None:
            raise UntraceableError(
                f"cannot trace {type(model).__name__}: {first}{where}; "
                "pass example_inputs to try torch.export instead"
            ) from trace_exc
        try:
            exported = torch.export.export(work, args, strict=False)
        except Exception as export_exc:
            raise UntraceableError(
                f"cannot trace {type(model).__name__}: {first}{where}; "
                f"torch.export also failed: {_one_line(export_exc)}{_user_frame(export_exc)}"
            ) from export_exc
        return exported.module(), f"torch.export (symbolic_trace failed: {first}{where})"


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer, keeping bnfold's own BN modules as calls (leaves)."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FeatureBatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _user_frame(exc: BaseException) -> str:
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


def annotate_shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Record every node's output in ``node.meta`` by running ``gm`` on ``args``.

    Fake tensors first (no compute); real execution when an op has no fake kernel. Modules run
    in eval mode meanwhile, so no BatchNorm updates its running statistics.
    """
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        try:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            FakeTensorProp(gm, mode).propagate(*fake)
        except Exception:
            with torch.no_grad():
                ShapeProp(gm).propagate(*args)
    except Exception as exc:
        raise BadInputError(
            f"example_inputs do not run through the model: {_one_line(exc)}"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training


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
