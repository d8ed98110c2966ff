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

:class:`Deferred` is the fold's cheaper copy: the parameters of the conv, linear and BN
modules that nothing but their module can reach are not copied; the fold reads the model's
own and :meth:`Deferred.finish` copies those it did not replace. A fold replaces most of them
(a ResNet-50's 25M folded weights were copied only to be dropped: about a third of its fold
time).
"""

from __future__ import annotations

import bisect
import copy
import copyreg
import sys
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


def deep_copy(model: nn.Module, deferred: Deferred | None = None) -> nn.Module:
    """``copy.deepcopy(model)``, built as described in the module docstring; with
    ``deferred``, the parameters it may defer (:meth:`Deferred.stand_in`) are stand-ins,
    recorded in it."""
    memo: dict[Any, Any] = {}
    if deferred is not None:
        memo[_DEFERRED] = deferred
    return _value(model, memo)


#: The module types whose parameters a :class:`Deferred` copy may leave the model's: their
#: ``forward`` only reads them.
DEFERRABLE = frozenset({nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                        nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear, nn.BatchNorm1d,
                        nn.BatchNorm2d, nn.BatchNorm3d})
_DEFERRED = "bnfold.deferred"  # (the memo key of the Deferred, where one is given)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class Deferred:
    """The parameters a :func:`deep_copy` did not copy: the model's own, until :meth:`finish`.

    A parameter is deferred only when its module is of a :data:`DEFERRABLE` type in eval mode
    with no hooks (nor global ones), nothing in Python holds it but its module's
    ``_parameters`` entry (reference count) and no other tensor views its storage (storage
    use count). The copy holds a stand-in for it, a parameter of the same shape and dtype on
    the ``meta`` device (no data), while the model's Python ``forward`` is traced: code that
    reaches parameters without the tracer's proxies (``self.parameters()``) writes nothing of
    the model's. :meth:`restore` then puts the model's own parameters in the traced graph
    module, whose graph reads them only through its module calls: the pass copies those it
    reads by attribute (:meth:`unshare`) before it runs the graph, writes only new tensors
    into the module (a fold replaces a weight, never writes into it) and calls
    :meth:`finish` on its result, which copies what is left of the model's."""

    def __init__(self) -> None:
        #: id of a stand-in -> (the stand-in, the model's parameter)
        self.stand_ins: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
        #: the memory of the restored parameters: (first byte's address, end address), sorted
        self.spans: list[tuple[int, int]] = []

    def takes(self, module: nn.Module) -> bool:
        """Whether ``module``'s parameters may be deferred (:class:`Deferred`'s conditions on
        the module; each parameter is checked in :meth:`stand_in`)."""
        return type(module) in DEFERRABLE and not module.training and _plain_protocol(module) \
            and not any(getattr(module, hooks, None) for hooks in _HOOKS) and not _global_hooks()

    def stand_in(self, table: dict[str, Any], key: str) -> nn.Parameter | None:
        """The stand-in for ``table[key]`` (a module's ``_parameters`` entry), recorded, or
        ``None`` when it must be copied now."""
        t = table[key]
        if type(t) is not nn.Parameter or sys.getrefcount(t) != _ALONE \
                or t.device.type != "cpu" or has_torch_function_unary(t) \
                or torch._C._storage_Use_Count(t.untyped_storage()._cdata) != _STORAGE_ALONE:
            return None
        new = nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"),
                           requires_grad=t.requires_grad)
        self.stand_ins[id(new)] = (new, t)
        return new

    def restore(self, root: nn.Module) -> None:
        """Put the model's parameters in place of their stand-ins in ``root``'s modules."""
        for module in root.modules():
            table = module._parameters
            for key, t in table.items():
                pair = self.stand_ins.get(id(t))
                if pair is not None and pair[0] is t:
                    table[key] = pair[1]
                    storage = pair[1].untyped_storage()
                    if storage.data_ptr():  # (an empty tensor has no memory to share)
                        bisect.insort(self.spans, (storage.data_ptr(),
                                                   storage.data_ptr() + storage.nbytes()))
        self.stand_ins.clear()

    def unshare(self, root: nn.Module, tensors: list[torch.Tensor]) -> None:
        """Copy the restored parameters among ``tensors`` now wherever ``root``'s modules hold
        them (the graph reads them by attribute, so running it may write them)."""
        spans = [span for span in self.spans if any(_overlaps(t, [span]) for t in tensors)]
        if spans:
            _copy_in(root, spans, {})
            self.spans = [span for span in self.spans if span not in spans]

    def finish(self, root: nn.Module) -> None:
        """Copy every tensor of ``root``'s modules that is a stand-in (the model's parameter
        then) or shares memory with a restored parameter (what the pass kept of the model's
        own), sharing kept as :func:`deep_copy` keeps it; then nothing of ``root`` is the
        model's."""
        if self.spans or self.stand_ins:
            _copy_in(root, self.spans, self.stand_ins)
        self.spans, self.stand_ins = [], {}


def _copy_in(root: nn.Module, spans: list[tuple[int, int]],
             stand_ins: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Replace every tensor of ``root``'s modules that is one of ``stand_ins`` or whose memory
    overlaps one of the sorted ``spans`` by a deep copy of the model's tensor (one memo: what
    was shared stays shared)."""
    memo: dict[Any, Any] = {}
    for module in root.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                pair = stand_ins.get(id(t))
                if pair is not None and pair[0] is t:
                    table[key] = _value(pair[1], memo)
                elif isinstance(t, torch.Tensor) and _overlaps(t, spans):
                    table[key] = _value(t, memo)
        shared = [key for key, t in vars(module).items()
                  if isinstance(t, torch.Tensor) and _overlaps(t, spans)]
        for key in shared:
            setattr(module, key, _value(getattr(module, key), memo))


def _overlaps(t: torch.Tensor, spans: list[tuple[int, int]]) -> bool:
    """Whether ``t``'s memory overlaps one of the sorted, disjoint ``spans`` (only the last
    one starting before ``t``'s end can)."""
    if not spans:
        return False
    storage = t.untyped_storage()
    start = storage.data_ptr()
    i = bisect.bisect_left(spans, (start + storage.nbytes(),)) - 1
    return bool(start) and i >= 0 and spans[i][1] > start


def _global_hooks() -> bool:
    """Whether hooks are registered for every module (``register_module_forward_hook``...)."""
    from torch.nn.modules import module as nn_module

    return any(getattr(nn_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _alone_counts() -> tuple[int, int]:
    """The reference count and storage use count :meth:`Deferred.defer` sees for a tensor
    that only its module holds (measured the way it measures them)."""
    table = nn.Linear(1, 1)._parameters
    t = table["weight"]
    return sys.getrefcount(t), torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_ALONE, _STORAGE_ALONE = _alone_counts()


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
    deferred = memo.get(_DEFERRED)
    if deferred is not None and deferred.takes(module):
        state = {key: _parameters(item, memo, deferred) if key == "_parameters"
                 else _value(item, memo) for key, item in module.__getstate__().items()}
    else:
        state = {key: _value(item, memo) for key, item in module.__getstate__().items()}
    new.__setstate__(state)
    return new


def _parameters(table: dict[str, Any], memo: dict[Any, Any], deferred: Deferred
                ) -> dict[str, Any]:
    """A module's ``_parameters`` copied, its deferred parameters as stand-ins."""
    new = memo[id(table)] = type(table)()
    for key in table:
        stand_in = deferred.stand_in(table, key)
        new[key] = stand_in if stand_in is not None else _value(table[key], memo)
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
