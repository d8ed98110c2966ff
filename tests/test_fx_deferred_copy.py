"""The FX fold's deferred copy (passes/fx/model_copy.Deferred): the layer and BN tensors only
their module reaches stay the model's while the fold runs, and none of them is left in the
result: nothing of the folded model shares memory with the input, and the input is
unchanged, whatever else reaches those tensors (an attribute read in the graph, an alias, a
hook, training mode, a torch.export fallback, a kept BN, a reused layer)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import bnfold
from bnfold.models import arch, reach, zoo
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.fx import model_copy
from bnfold.passes.fx.model_copy import Deferred, deep_copy
from bnfold.passes.fx.trace import graph_module_of


def _spans(model: nn.Module) -> list[tuple[int, int, str]]:
    """(start, end, name) of the memory of every tensor a module of ``model`` holds."""
    out = []
    for path, module in model.named_modules(remove_duplicate=False):
        held = {**module._parameters, **module._buffers,
                **{k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}}
        for key, t in held.items():
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(),
                            f"{path}.{key}"))
    return out


def _shared(a: nn.Module, b: nn.Module) -> list[tuple[str, str]]:
    """Pairs of tensor names of ``a`` and ``b`` whose memory overlaps."""
    return [(x, y) for s, e, x in _spans(a) for s2, e2, y in _spans(b) if s < e2 and s2 < e]


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Each tensor's values and version counter (bumped by any in-place write, even one
    that leaves the values as they were)."""
    return {k: (v.detach().clone(), v._version)
            for k, v in model.state_dict(keep_vars=True).items()}


def _check(model: nn.Module, x: torch.Tensor) -> int:
    """Fold ``model``: the result shares no memory with it, nothing wrote into it, and the
    folded model matches the unfolded one in float64 on a fresh input. Returns how many of
    its parameters the fold's copy deferred."""
    probe = Deferred()
    deep_copy(model, probe)
    deferred = len(probe.stand_ins)
    del probe  # (it holds the parameters it would defer)
    before = _snapshot(model)
    ref = deep_copy(model).double()
    result = bnfold.fold(model, x)
    assert _shared(model, result.model) == []
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) and after[k]._version == version
               for k, (v, version) in before.items())
    fresh = torch.randn_like(x)
    with torch.no_grad():
        got, want = result.model(fresh), ref(fresh.double())
    for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want)), strict=True):
        assert float((g.double() - w).abs().max() / w.abs().max()) < 1e-5
    return deferred


@pytest.mark.parametrize("name", [*zoo.ZOO, *reach.REACH])
def test_no_folded_model_shares_memory_with_its_input(name: str) -> None:
    source = zoo if name in zoo.ZOO else reach
    assert _check(source.get(name), source.example_input(name, seed=3)) > 0


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "repvgg_a0"])
def test_full_size_architectures_share_nothing_either(name: str) -> None:
    model = arch.get(name, width=0.25)
    assert _check(model, arch.example_input(name, small=True)) > 0


def test_the_copy_defers_the_layer_parameters_only_their_module_reaches() -> None:
    model = zoo.get("plain_cnn")
    deferred = Deferred()
    copy = deep_copy(model, deferred)
    layers = [m for m in model.modules() if type(m) in model_copy.DEFERRABLE]
    assert layers and len(deferred.stand_ins) == sum(
        p is not None for m in layers for p in m._parameters.values())
    assert all(p.is_meta for p, _ in deferred.stand_ins.values())
    assert _shared(model, copy) == []  # (stand-ins while the model's forward is traced)
    deferred.restore(copy)
    assert len(_shared(model, copy)) == len(list(model.parameters()))
    deferred.finish(copy)
    assert _shared(model, copy) == []


def test_an_unfinished_copy_gets_copies_for_its_stand_ins() -> None:
    model = zoo.get("plain_cnn")
    deferred = Deferred()
    copy = deep_copy(model, deferred)
    deferred.finish(copy)
    assert _shared(model, copy) == [] and not any(p.is_meta for p in copy.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 copy.state_dict().values(), strict=True))


class _ReadsWeight(nn.Module):
    """A conv called as a module, its weight also read by attribute (a functional conv, in
    the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        z = nn.functional.conv2d(x, self.conv.weight, padding=1)
        return y + self.bn2(z)


class _WritesAtTrace(nn.Module):
    """A forward that writes parameters it reaches without the tracer's proxies: the write
    runs once, on the copy being traced (a stand-in), never on the model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(1.0)
        return self.bn(self.conv(x))


class _Aliased(nn.Module):
    """A conv weight also held in a plain attribute (read by forward in Python)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.alias = self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * 1.0


class _Untraceable(nn.Module):
    """Python control flow on a shape: symbolic_trace fails, torch.export runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if x.shape[-1] > 1 else -y


def _stats(model: nn.Module) -> nn.Module:
    return randomize_bn_stats(model.eval(), seed=0)


def _sequential(*, channels: int = 3, reuse: bool = False) -> nn.Sequential:
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    second = conv if reuse else nn.Conv2d(channels, channels, 3, padding=1)
    return _stats(nn.Sequential(conv, nn.BatchNorm2d(channels), second,
                                nn.BatchNorm2d(channels)))


def _hooked() -> nn.Module:
    model = _sequential()
    model[0].register_forward_hook(lambda m, i, o: None)
    return model


@pytest.mark.parametrize("make", [
    lambda: _stats(_ReadsWeight()), lambda: _stats(_Aliased()), _hooked,
    lambda: _sequential().train(), lambda: _sequential(reuse=True),
    lambda: _stats(_Untraceable()), lambda: _stats(_WritesAtTrace()),
], ids=["read-by-attribute", "aliased", "hooked", "training", "reused", "export-fallback",
        "writes-at-trace"])
def test_other_ways_to_reach_a_layer_tensor_share_nothing(make: Callable[[], nn.Module],
                                                          request: pytest.FixtureRequest
                                                          ) -> None:
    deferred = _check(make(), torch.randn(2, 3, 8, 8))
    assert (deferred > 0) == ("training" not in request.node.name)  # (training: all copied)


def test_a_tensor_reached_elsewhere_is_not_deferred() -> None:
    model = _Aliased().eval()
    deferred = Deferred()
    deep_copy(model, deferred)
    originals = [original for _, original in deferred.stand_ins.values()]
    assert all(p is not model.conv.weight for p in originals)
    assert len(originals) == 3  # conv bias, BN weight and bias


def test_inplace_folds_have_nothing_deferred() -> None:
    gm = torch.fx.symbolic_trace(zoo.get("plain_cnn"))
    result = bnfold.fold(gm, zoo.example_input("plain_cnn"), inplace=True)
    assert result.model is gm


def test_tensors_the_graph_reads_by_attribute_are_copied_before_it_runs() -> None:
    model = _stats(_ReadsWeight())
    deferred = Deferred()
    gm, how = graph_module_of(model, None, inplace=False, deferred=deferred)
    assert how == "symbolic_trace"
    shared = {a for a, _ in _shared(model, gm)}
    assert shared == {"conv.bias", "bn.weight", "bn.bias", "bn2.weight", "bn2.bias"}
    deferred.finish(gm)
    assert _shared(model, gm) == []
