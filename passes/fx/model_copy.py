"""``copy.deepcopy`` of a model, made the same way, minus its generic per-object cost.

``copy.deepcopy(model)`` rebuilds every submodule through the pickle protocol
(``__reduce_ex__``) and deep-copies its ``__dict__`` entry by entry: ~25 entries a module,
most of them empty hook dictionaries, each through the generic dispatch. :func:`deep_copy`
takes the same steps directly for a module whose class keeps ``nn.Module``'s copy protocol:
a new instance (``cls.__new__(cls)``, as ``copyreg.__newobj__``), entered in the memo before
its state is copied, the state of ``Module.__getstate__`` with every value copied, set by the
class's ``__setstate__`` (``_ConvNd`` and RNNs have their own). Values: atoms (and tuples of
atoms) as they are, empty dicts, ordered dicts and sets and lists of atoms as new ones,
string-keyed dicts (``_parameters``, ``_buffers``, ``_modules``) entry by entry, submodules
recursively, a plain tensor that owns its whole storage (a BN's statistics) as a copy of that
storage (:func:`_tensor`), anything else (parameters, views, hooks, user attributes) through
``copy.deepcopy`` with the one shared memo, so whatever is shared in the model (a module, a
tensor, a storage) is shared in the copy. One value ``copy.deepcopy`` refuses is copied too: a
tensor with autograd history (the weight that an old-style ``torch.nn.utils.weight_norm``
hook computes and stores on its module before each call, and computes again at the next),
as a detached copy of its values. A module whose
class changes the protocol (``__deepcopy__``, ``__reduce_ex__``, ``__reduce__``,
``__getstate__``, ``__getnewargs__``, a ``copyreg`` entry: ``GraphModule``, parametrized
modules...) goes to ``copy.deepcopy`` whole. The result is the one ``copy.deepcopy`` gives
(where it gives one): no tensor is shared with ``model``.
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.overrides import has_torch_function_unary

_ATOMS = frozenset({type(None), bool, int, float, str, bytes})
_PROTOCOL = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__getnewargs__",
             "__getnewargs_ex__")
_MODULE_PROTOCOL = {name: getattr(nn.Module, name, None) for name in _PROTOCOL}
_MISSING = object()


def deep_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, built as described in the module docstring."""
    return _value(model, {})


def _value(v: Any, memo: dict[Any, Any]) -> Any:
    """The deep copy of ``v`` (``copy.deepcopy(v, memo)``, directly where that is plain)."""
    kind = type(v)
    if kind in _ATOMS:
        return v
    done = memo.get(id(v), _MISSING)
    if done is not _MISSING:
        return done
    if isinstance(v, nn.Module) and _plain_protocol(v):
        return _module(v, memo)
    if kind is torch.Tensor and _owns_its_storage(v, memo):
        return _tensor(v, memo)
    if kind is nn.Parameter:
        return v.__deepcopy__(memo)  # what copy.deepcopy calls, minus its dispatch
    if kind is torch.Tensor and v.grad_fn is not None:  # (copy.deepcopy refuses it)
        new = memo[id(v)] = v.detach().clone()
        return new
    if kind is tuple and all(type(a) in _ATOMS for a in v):
        return v  # deepcopy returns a tuple of atoms itself
    if (kind is dict or kind is OrderedDict or kind is set) and not v:
        new = memo[id(v)] = kind()
        return new
    if kind is list and all(type(a) in _ATOMS for a in v):
        new = memo[id(v)] = list(v)
        return new
    if kind is dict and all(type(k) is str for k in v):
        new = memo[id(v)] = {}
        for key, item in v.items():
            new[key] = _value(item, memo)
        return new
    return copy.deepcopy(v, memo)


def _plain_protocol(module: nn.Module) -> bool:
    """True when ``copy.deepcopy`` would copy ``module`` through ``nn.Module``'s own
    protocol (no override on its class or instance, no ``copyreg`` entry)."""
    cls = type(module)
    own = vars(module)
    return cls not in copyreg.dispatch_table and all(
        getattr(cls, name, None) is held and name not in own
        for name, held in _MODULE_PROTOCOL.items())


def _module(module: nn.Module, memo: dict[Any, Any]) -> nn.Module:
    cls = type(module)
    new = memo[id(module)] = cls.__new__(cls)
    state = {key: _value(item, memo) for key, item in module.__getstate__().items()}
    new.__setstate__(state)
    return new


def _owns_its_storage(t: torch.Tensor, memo: dict[Any, Any]) -> bool:
    """True for a plain dense tensor (no subclass, grad, autograd history, attributes, conj or
    neg bit, quantization) laid out contiguously over the whole of a storage not copied yet:
    a BN's running statistics, most buffers."""
    if has_torch_function_unary(t) or not t.is_leaf or t.layout is not torch.strided or \
            t.is_nested or t.device.type not in ("cpu", "cuda"):
        return False
    if t.requires_grad or t.grad is not None or vars(t) or t.is_quantized or t.is_conj() or \
            t.is_neg() or t.storage_offset() != 0 or not t.is_contiguous():
        return False
    storage = t.untyped_storage()
    return storage.nbytes() == t.numel() * t.element_size() and \
        storage._cdata not in memo.get("torch", {})


def _tensor(t: torch.Tensor, memo: dict[Any, Any]) -> torch.Tensor:
    """``Tensor.__deepcopy__`` of a tensor :func:`_owns_its_storage`: a new storage holding a
    copy, viewed with the same sizes and strides, entered in the memo where
    ``UntypedStorage.__deepcopy__`` enters it (views of the storage copied later share it)."""
    new = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    new.copy_(t)
    memo.setdefault("torch", {})[t.untyped_storage()._cdata] = new.untyped_storage()
    memo[id(t)] = new
    return new
