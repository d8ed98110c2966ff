"""Run-time state a traced graph does not show: module hooks (and patched forwards).

``symbolic_trace`` keeps leaf modules (Conv, BN, ...) as ``call_module`` nodes, so their hooks
keep running in the GraphModule, but it inlines every other module's ``forward`` and builds a
new root: hooks on inlined modules and on the root would silently stop running. And a hook on
a BN or on a layer observes (or rewrites) the very tensor a fold removes or changes, so such
a BN or layer never takes part in a fold (:func:`hook_reason`).

* hooks of the root module are carried over to the GraphModule (same hook functions, same
  order; they then receive the GraphModule as ``module``), with a report note;
* hooks of a module the trace inlined cannot run in the graph: the fold is refused
  (:class:`~bnfold.errors.UnsupportedError`), since its result would differ from the model
  whether or not a BN folds;
* a hook that is an object (a ``functools.partial``, a bound method, a callable instance) is
  copied with the model, and what it holds is then the copy's: a BN or layer it holds, or
  whose tensors it holds, would have the hook read the folded tensors, so it does not fold
  either (:func:`held_reason`; what a plain function's closure holds is the model's own, which
  no fold changes).
"""

from __future__ import annotations

import collections
import functools
import types
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import UnsupportedError

# Hook kind as users know it -> the nn.Module dict holding it.
_HOOKS = {
    "forward hook": "_forward_hooks",
    "forward pre-hook": "_forward_pre_hooks",
    "backward hook": "_backward_hooks",
    "backward pre-hook": "_backward_pre_hooks",
}
# Everything nn.Module.__call__ reads to run the hooks above.
_HOOK_STATE = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_is_full_backward_hook",
)


def hook_kinds(module: nn.Module, known: tuple[type, ...] = ()) -> list[str]:
    """The kinds of hooks registered on ``module`` (empty when none), hooks of a ``known``
    type aside."""
    return [kind for kind, attr in _HOOKS.items()
            if any(type(h) not in known for h in getattr(module, attr, {}).values())]


def _global_hook_kinds() -> list[str]:
    """The kinds of hooks registered for every module (``register_module_forward_hook``...),
    which run on each BN and layer too."""
    from torch.nn.modules import module as nn_module

    return [f"global {kind} (registered for every module)" for kind, attr in _HOOKS.items()
            if getattr(nn_module, f"_global{attr}", None)]


def hook_reason(name: str, module: nn.Module, known: tuple[type, ...] = ()) -> str | None:
    """Why the BN or layer ``name`` cannot fold because of its hooks (or a ``forward``
    replaced on the instance, which the class's fold rules know nothing of), or None;
    ``known``: hook types the caller accounts for (a layer's ``weight_norm`` pre-hook,
    :mod:`bnfold.passes.fx.computed_weights`)."""
    if "forward" in vars(module):
        return f"{name} has its forward replaced on the instance: what it computes is not " \
               f"what a {type(module).__name__} computes, so it is left as it is"
    kinds = hook_kinds(module, known) + _global_hook_kinds()
    if not kinds:
        return None
    return (f"{name} has a {' and a '.join(kinds)}: it sees the tensors a fold would change "
            "or remove, so folding would silently change what it does (remove the hook to "
            "fold)")


def held_reason(gm: fx.GraphModule, name: str, module: nn.Module) -> str | None:
    """Why the BN or layer ``name`` cannot fold because a hook object of ``gm`` holds it or
    one of its tensors (:func:`_held`), or None."""
    held = _held(gm)
    for obj in (module, *module._parameters.values(), *module._buffers.values()):
        where = held.get(id(obj)) if obj is not None else None
        if where is not None:
            return (f"{name} is held by {where}: the hook would read the folded tensors, so "
                    "folding would silently change what it does")
    return None


_HELD = "bnfold.hook_holdings"  # (the gm.meta key of :func:`_held`'s map)


def forget_holdings(gm: fx.GraphModule) -> None:
    """Drop ``gm``'s map of what its hook objects hold (:func:`_held`): a pass calls it when
    it starts and ends, so no map outlives the hooks it was read from."""
    gm.meta.pop(_HELD, None)


def _held(gm: fx.GraphModule) -> dict[int, str]:
    """id of each module or tensor a hook object of ``gm``'s modules holds (an attribute, an
    argument of a partial, the instance of a bound method, or an item of a list, tuple or
    dict there; through up to two other objects, :func:`_holdings`) -> which hook, read once
    per pass (:func:`forget_holdings`). A module held is not looked into: a hook that holds
    the whole model (a bound method of the model) names no layer."""
    held = gm.meta.get(_HELD)
    if held is None:
        held = gm.meta[_HELD] = {}
        for path, module in gm.named_modules():
            for kind, attr in _HOOKS.items():
                for hook in getattr(module, attr, {}).values():
                    if isinstance(hook, types.FunctionType):
                        continue
                    where = f"a {kind} of {path or 'the model'} ({type(hook).__name__})"
                    for obj in _holdings(hook):
                        held.setdefault(id(obj), where)
    return held


def _holdings(hook: Any, depth: int = 2) -> list[Any]:
    """The modules and tensors ``hook`` holds (see :func:`_held`), looking ``depth`` objects
    deep (a partial of a bound method of an object holding a layer), and into any list,
    tuple, set or dict on the way (``[(name, module), ...]``)."""
    if isinstance(hook, functools.partial):
        values = [hook.func, *hook.args, *hook.keywords.values()]
    elif isinstance(hook, types.MethodType):
        values = [hook.__self__]
    else:
        values = list(getattr(hook, "__dict__", {}).values())
    out: list[Any] = []
    seen: set[int] = set()
    while values:
        item = values.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (nn.Module, torch.Tensor)):
            out.append(item)
        elif isinstance(item, dict):
            values.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            values.extend(item)
        elif depth and not isinstance(item, (type, types.FunctionType, types.ModuleType,
                                             str, bytes, int, float)):
            out.extend(_holdings(item, depth - 1))
    return out


def carry_model_hooks(model: nn.Module, gm: fx.GraphModule, how: str,
                      notes: list[str]) -> None:
    """:func:`carry_hooks` from ``model`` (the module ``torch.compile`` wrapped, if it did)
    onto ``gm``, what the FX front door made of it (``how``: symbolic_trace, or a copy of a
    GraphModule; a torch.export graph runs none of them), the note appended to ``notes``;
    every FX pass calls it, so no model's own hook is lost."""
    from bnfold.passes.fx.trace import uncompiled

    model, note = uncompiled(model), None
    if how.startswith("symbolic_trace"):
        leaves = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        note = carry_hooks(model, gm, leaves)
    elif how.startswith("graph module") and gm is not model:
        note = carry_hooks(model, gm, None)
    if note:
        notes.append(note)


def carry_hooks(model: nn.Module, gm: fx.GraphModule, leaves: set[str] | None) -> str | None:
    """Move ``model``'s hooks onto ``gm`` traced (or copied) from it; return a report note.

    ``leaves`` are the module paths ``gm`` still calls (their hooks run as before). Any other
    submodule with hooks was inlined by the trace: raises :class:`UnsupportedError`. None:
    ``gm`` is a copy of the GraphModule ``model`` (nothing inlined; ``copy.deepcopy`` of a
    GraphModule drops only the root's hooks).
    """
    for name, module in model.named_modules() if leaves is not None else ():
        kinds = hook_kinds(module)
        if name and kinds and name not in leaves and not _leaf_of(name, leaves):
            raise UnsupportedError(
                f"{name} ({type(module).__name__}) has a {' and a '.join(kinds)}, but tracing "
                "inlines its forward, so the hook would not run in the rewritten model; "
                "remove the hook first (hooks on Conv/Linear/BN modules and on the model "
                "itself are kept)")
    kinds = hook_kinds(model)
    if not kinds:
        return None
    for attr in _HOOK_STATE:
        value = getattr(model, attr, None)
        if isinstance(value, dict):
            setattr(gm, attr, collections.OrderedDict(value))
        elif value is not None:
            setattr(gm, attr, value)
    return (f"the model's {', '.join(kinds)} carried over to the new GraphModule (copy."
            "deepcopy of a GraphModule rebuilds it without hooks: register them again there)")


def _leaf_of(name: str, leaves: set[str]) -> bool:
    """True when ``name`` lies inside a module the graph calls as a whole."""
    return any(name.startswith(leaf + ".") for leaf in leaves)
