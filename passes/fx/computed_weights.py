"""Layers whose weight (or bias) is computed at each call: ``weight_norm``, ``spectral_norm``.

torch reparameterizes a layer's tensor two ways: ``torch.nn.utils.parametrize`` (what
``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` / ``orthogonal`` and user
parametrizations register: the module's class becomes ``Parametrized<Class>``, a subclass of
its own, and reading ``module.weight`` evaluates the parametrization), and the older forward
pre-hooks of ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (a ``WeightNorm`` /
``SpectralNorm`` hook sets ``module.weight`` from ``weight_g`` and ``weight_v``, or
``weight_orig`` and the power-iteration vectors, before each call).

In eval mode such a layer computes the same tensor at every call, from tensors a fold does not
touch, so it is a plain layer with that tensor as its parameter. A fold reads it
(:func:`effective`, the tensor the forward computes, in the forward's own arithmetic) and,
when it writes the layer, first :func:`materialize`\\ s it: torch's own removal of the
reparameterization, which stores exactly that tensor as a plain parameter (the model's output
is unchanged, bit for bit), and the folded tensors then replace it. A reparameterization in
training mode (``spectral_norm`` runs a power-iteration step at each training call) is not
a constant: :func:`refusal` says so and the BN is kept.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

#: The older reparameterizations, kept as forward pre-hooks, by the name users know.
_PRE_HOOK_NAMES: dict[type, str] = {WeightNorm: "weight_norm", SpectralNorm: "spectral_norm"}
#: Their types.
PRE_HOOKS = tuple(_PRE_HOOK_NAMES)


def plain_class(module: nn.Module) -> type:
    """The class ``module`` is an instance of, before ``parametrize`` subclassed it."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def reparameterization_hooks(module: nn.Module) -> list[object]:
    """``module``'s ``WeightNorm`` / ``SpectralNorm`` forward pre-hooks."""
    return [h for h in module._forward_pre_hooks.values() if type(h) in _PRE_HOOK_NAMES]


def describe(module: nn.Module) -> list[str]:
    """What computes ``module``'s tensors, e.g. ``["weight_norm of weight"]`` (empty: none)."""
    found = [f"{_PRE_HOOK_NAMES[type(h)]} of {h.name}"  # type: ignore[attr-defined]
             for h in reparameterization_hooks(module)]
    if parametrize.is_parametrized(module):
        for name, chain in module.parametrizations.items():  # type: ignore[union-attr]
            kinds = " then ".join(_parametrization_name(p) for p in chain)
            found.append(f"{kinds} of {name}")
    return found


def _parametrization_name(p: nn.Module) -> str:
    name = type(p).__name__.lstrip("_")
    return {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm",
            "Orthogonal": "orthogonal"}.get(name, f"parametrization {name}")


def refusal(label: str, module: nn.Module) -> str | None:
    """Why ``module``'s computed tensors are no constants a fold may read, or ``None``."""
    training = [m for m in _reparameterizers(module) if m.training]
    if training:
        return (f"{label}'s {', '.join(describe(module))} is in training mode: it may compute "
                "a different weight at each call (call model.eval() first)")
    return None


def _reparameterizers(module: nn.Module) -> list[nn.Module]:
    """The modules whose mode decides what the reparameterization computes: the layer itself
    for a pre-hook (``spectral_norm`` iterates when the layer trains), each parametrization."""
    found = [module] if reparameterization_hooks(module) else []
    if parametrize.is_parametrized(module):
        found += list(module.parametrizations.modules())  # type: ignore[union-attr]
    return found


def effective(module: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor ``name`` (``weight`` / ``bias``) that ``module``'s forward uses now: a
    pre-hook's ``compute_weight`` (not the attribute, which holds the last call's), or the
    parametrization evaluated; the attribute itself when nothing computes it."""
    with torch.no_grad():
        for hook in reparameterization_hooks(module):
            if hook.name == name:  # type: ignore[attr-defined]
                if isinstance(hook, SpectralNorm):
                    return hook.compute_weight(module, do_power_iteration=False)
                return hook.compute_weight(module)  # type: ignore[attr-defined]
        return getattr(module, name)


def materialize(module: nn.Module) -> list[str]:
    """Store each computed tensor of ``module`` as a new plain tensor holding what
    :func:`effective` reads, and give the module back its plain class; the
    reparameterizations removed, as :func:`describe` names them.

    A pre-hook goes by torch's own removal (which computes the tensor the same way). A
    parametrization is taken off by hand: torch's ``remove_parametrizations`` deletes the
    property from the ``Parametrized<Class>`` class, which a deep copy of the module shares
    with the original (so the user's model would break), and with ``leave_parametrized=True``
    writes the computed tensor into a single original (which a tied layer may read). The new
    tensor is a parameter when an original is one (``requires_grad`` when one requires it),
    else a buffer."""
    removed = describe(module)
    for hook in reparameterization_hooks(module):
        remove = remove_spectral_norm if isinstance(hook, SpectralNorm) else remove_weight_norm
        remove(module, hook.name)  # type: ignore[attr-defined]
    if not parametrize.is_parametrized(module):
        return removed
    chains = module.parametrizations
    computed = {name: (effective(module, name), list(chain.parameters(recurse=False)))
                for name, chain in chains.items()}  # type: ignore[union-attr]
    module.__class__ = plain_class(module)
    del module.parametrizations
    for name, (tensor, originals) in computed.items():
        if originals:
            grad = any(p.requires_grad for p in originals)
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=grad))
        else:
            module.register_buffer(name, tensor)
    return removed
