"""passes/fx/model_copy.deep_copy gives what copy.deepcopy gives: the same classes, attributes
and values, the same sharing inside the copy, and nothing shared with the model."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from bnfold.models import zoo
from bnfold.passes.fx.model_copy import deep_copy


def _same_copy(a: Any, b: Any, ref: Any, seen: dict[int, Any]) -> None:
    """``b`` (deep_copy of ``a``) matches ``ref`` (copy.deepcopy of ``a``) value for value,
    owns every mutable object and tensor storage, and repeats ``a``'s sharing."""
    assert type(b) is type(a) is type(ref)
    if id(a) in seen:
        assert seen[id(a)] is b
        return
    seen[id(a)] = b
    if isinstance(a, torch.Tensor):
        assert b is not a and torch.equal(b, ref) and b.stride() == a.stride()
        assert b.requires_grad == a.requires_grad
        assert a.numel() == 0 or b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    elif isinstance(a, nn.Module):
        assert b is not a and list(vars(b)) == list(vars(ref))
        for key in vars(a):
            _same_copy(vars(a)[key], vars(b)[key], vars(ref)[key], seen)
    elif isinstance(a, (dict, OrderedDict)):
        assert list(b) == list(a) and (b is not a)
        for key in a:
            _same_copy(a[key], b[key], ref[key], seen)
    elif isinstance(a, set):
        assert b is not a and b == ref
    elif isinstance(a, list):
        assert b is not a
        for x, y, z in zip(a, b, ref, strict=True):
            _same_copy(x, y, z, seen)
    elif isinstance(a, tuple):
        for x, y, z in zip(a, b, ref, strict=True):
            _same_copy(x, y, z, seen)
    elif not callable(a):
        assert b == ref


class _Shared(nn.Module):
    """Tied parameters, a module under two names and in a list, a buffer that views another,
    user containers, a hook, a device and a dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3)
        self.b.weight = self.a.weight
        self.again = self.a
        self.listed = [self.a, 3]
        self.register_buffer("v", torch.arange(6.0))
        self.register_buffer("w", self.v[2:4], persistent=False)
        self.config = {"k": [1, 2], "t": (1, "x")}
        self.device, self.dtype = torch.device("cpu"), torch.float16
        self.a.register_forward_hook(lambda *_: None)


class _Views(nn.Module):
    """Buffers that view one storage, the view registered before its base, and one tensor
    under two names."""

    def __init__(self) -> None:
        super().__init__()
        base = torch.arange(8.0)
        self.register_buffer("middle", base[2:5])
        self.register_buffer("base", base)
        self.register_buffer("twice", torch.ones(3))
        self.again = self.twice


class _OwnCopy(nn.Linear):
    copies = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Module:
        type(self).copies += 1
        new = nn.Linear(self.in_features, self.out_features)
        new.load_state_dict(self.state_dict())
        return new


def _parametrized() -> nn.Module:
    class _Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    parametrize.register_parametrization(net[0], "weight", _Double())
    return net


@pytest.mark.parametrize("model", [
    *[zoo.get(name) for name in zoo.ZOO], _Shared(), _Views(), _parametrized(),
    nn.Sequential(nn.GRU(3, 4), nn.LSTM(4, 4)), nn.Sequential(nn.Linear(2, 2)).train(),
], ids=[*zoo.ZOO, "shared", "views", "parametrized", "rnn", "training"])
def test_deep_copy_is_deepcopy(model: nn.Module) -> None:
    got, ref = deep_copy(model), copy.deepcopy(model)
    _same_copy(model, got, ref, {})
    assert repr(got) == repr(ref)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for t in [*got.parameters(), *got.buffers()]:
            t.add_(1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sharing_inside_the_model_is_kept_in_the_copy() -> None:
    got = deep_copy(_Shared())
    assert got.b.weight is got.a.weight and got.again is got.a and got.listed[0] is got.a
    assert got.w.untyped_storage().data_ptr() == got.v.untyped_storage().data_ptr()
    assert got._non_persistent_buffers_set == {"w"} and len(got.a._forward_hooks) == 1


def test_views_of_one_storage_view_one_storage_in_the_copy() -> None:
    got = deep_copy(_Views())
    assert got.middle.untyped_storage().data_ptr() == got.base.untyped_storage().data_ptr()
    assert got.middle.storage_offset() == 2 and got.again is got.twice
    got.base[3] = -1
    assert got.middle[1] == -1


def test_a_class_with_its_own_deepcopy_is_copied_by_it() -> None:
    _OwnCopy.copies = 0
    net = nn.Sequential(_OwnCopy(2, 2), nn.ReLU())
    got = deep_copy(net)
    assert _OwnCopy.copies == 1 and type(got[0]) is nn.Linear
