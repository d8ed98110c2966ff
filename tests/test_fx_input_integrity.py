"""The FX fold never writes into its input and the folded model shares no memory with it,
whatever reaches the model's tensors (an attribute read in the graph, an alias, a hook object
holding a layer, the parameters' device read while traced, training mode, a torch.export
fallback, a kept BN, a reused layer): checked by every tensor's values, its version counter
(bumped by any in-place write) and the memory of every tensor of the result."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.models import arch, reach, zoo
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.fx.model_copy import deep_copy


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


def _check(model: nn.Module, x: torch.Tensor) -> None:
    """Fold ``model``: the result shares no memory with it, nothing wrote into it, and the
    folded model matches the unfolded one in float64 on a fresh input."""
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
    assert not any(t.is_meta for t in result.model.state_dict().values())


@pytest.mark.parametrize("name", [*zoo.ZOO, *reach.REACH])
def test_no_folded_model_shares_memory_with_its_input(name: str) -> None:
    source = zoo if name in zoo.ZOO else reach
    _check(source.get(name), source.example_input(name, seed=3))


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "repvgg_a0"])
def test_full_size_architectures_share_nothing_either(name: str) -> None:
    model = arch.get(name, width=0.25)
    _check(model, arch.example_input(name, small=True))


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
    """A forward that writes parameters it reaches without the tracer's proxies (the trace
    writes the copy it traces, never the model; then torch.export, which keeps the write)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(1.0)
        return self.bn(self.conv(x))


class _ToParameterDevice(nn.Module):
    """The input moved to the parameters' device, read while traced."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(next(self.parameters()).device)
        return self.bn(nn.functional.conv2d(x, self.conv._parameters["weight"].detach())
                       + self.conv.bias[:, None, None])


def _hook_object() -> nn.Module:
    """A hook object on a ReLU holding the conv before it: it writes the conv's weight (by
    1.0) each time the ReLU runs."""
    model = _sequential()
    model.insert(2, nn.ReLU())

    def write(conv: nn.Module, *_: object) -> None:
        with torch.no_grad():
            conv.weight.mul_(1.0)
    model[2].register_forward_hook(functools.partial(write, model[0]))
    return model


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
    lambda: _stats(_ToParameterDevice()), _hook_object,
], ids=["read-by-attribute", "aliased", "hooked", "training", "reused", "export-fallback",
        "writes-at-trace", "parameter-device", "hook-object"])
def test_other_ways_to_reach_a_layer_tensor_share_nothing(make: Callable[[], nn.Module]
                                                          ) -> None:
    _check(make(), torch.randn(2, 3, 8, 8))




class _Reader:
    """A hook object holding a layer: it adds that layer's bias to the output it hooks."""

    def __init__(self, conv: nn.Module) -> None:
        self.conv = conv

    def __call__(self, module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        return out + self.conv.bias.sum()


class _PairReader:
    """A hook object holding ``[(name, layer)]`` pairs (a feature extractor's idiom)."""

    def __init__(self, pairs: list[tuple[str, nn.Module]]) -> None:
        self.pairs = pairs

    def __call__(self, module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        return out + sum(layer.bias.sum() for _, layer in self.pairs)


def _reader_model(hook: Callable[[nn.Module], object]) -> nn.Sequential:
    model = _sequential()
    model.insert(2, nn.ReLU())
    model[2].register_forward_hook(hook(model))
    return model


@pytest.mark.parametrize("hook", [
    lambda m: _Reader(m[3]), lambda m: functools.partial(_Reader.__call__, _Reader(m[3])),
    lambda m: _Reader(m[3]).__call__, lambda m: _PairReader([("conv", m[3])]),
], ids=["object", "partial-of-an-object", "bound-method", "list-of-pairs"])
def test_a_layer_a_hook_object_holds_is_kept(hook: Callable[[nn.Module], object]) -> None:
    model = _reader_model(hook)
    x = torch.randn(2, 3, 8, 8)
    _check(model, x)
    report = bnfold.fold(model, x).report
    assert [e.bn for e in report.folded] == ["1"]
    kept = report.kept[0]
    assert kept.bn == "4" and "3 is held by a forward hook of 2" in kept.reason


class _WritesItsInput(nn.Module):
    """``x.mul_(2)`` on the input, then Linear -> BatchNorm1d (a fold that needs a shape, so
    the example inputs run)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.bn(self.fc(x))


def test_the_shape_pass_leaves_the_callers_example_inputs_as_they_were() -> None:
    x = torch.randn(4, 6)
    before = x.clone()
    _, report = bnfold.fold(randomize_bn_stats(_WritesItsInput(), 0).eval(), x)
    assert [e.action for e in report.entries] == ["folded"]
    assert torch.equal(x, before) and x._version == 0


class _FunctionalTrainingBN(nn.Module):
    """``F.batch_norm(training=True)`` on the model's buffers (updates them when run), then
    Linear -> BatchNorm1d (a fold that needs a shape, so the graph runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.conv, self.fc, self.bn = nn.Conv2d(3, 4, 1), nn.Linear(4, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.batch_norm(self.conv(x), self.rm, self.rv, None, None, True,
                                           0.5, 1e-5)
        return self.bn(self.fc(y.mean((2, 3))))


def test_the_shape_pass_leaves_running_statistics_a_functional_bn_updates() -> None:
    model = randomize_bn_stats(_FunctionalTrainingBN(), 0).eval()
    gm, report = bnfold.fold(model, torch.randn(4, 3, 4, 4))
    assert [e.action for e in report.entries] == ["kept", "folded"]
    assert torch.equal(gm.rm, model.rm) and torch.equal(gm.rv, model.rv)


class _InstanceNormStats(nn.Module):
    """``F.instance_norm`` updating the model's buffer ``rm`` (use_input_stats), then Linear
    scaled by it: not a constant, so no affine folds into the Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rm", torch.ones(4))
        self.register_buffer("rv", torch.ones(4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.nn.functional.instance_norm(torch.stack([x, 2 * x], -1), running_mean=self.rm,
                                          running_var=self.rv, use_input_stats=True,
                                          momentum=0.5)
        return self.fc(x) * self.rm + 1


def _positional_inplace() -> nn.Module:
    """``F.leaky_relu(buf, 0.5, True)`` writes the buffer (``inplace`` given in its place),
    then Linear scaled by it; built by hand, as ``symbolic_trace`` refuses the write."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(torch.nn.functional.leaky_relu, (graph.get_attr("buf"), 0.5, True))
    y = graph.call_function(torch.mul, (graph.call_module("fc", (x,)), graph.get_attr("buf")))
    graph.output(graph.call_function(torch.add, (y, 1.0)))
    root = nn.Module()
    root.fc = nn.Linear(4, 4)
    root.register_buffer("buf", torch.tensor([-1.0, 2.0, -3.0, 4.0]))
    return torch.fx.GraphModule(root, graph)


@pytest.mark.parametrize("make", [_InstanceNormStats, _positional_inplace])
def test_a_buffer_a_functional_op_writes_is_no_constant(make: Callable[[], nn.Module]) -> None:
    model, x = make().eval(), torch.randn(2, 4)
    gm, report = bnfold.fold(model)
    assert report.folded == []
    reference = deep_copy(model).double()
    for _ in range(3):  # (the buffer moves at every call, in both)
        with torch.no_grad():
            want, got = reference(x.double()), gm(x).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


class _SharedStatistics(nn.Module):
    """An eval BN whose running statistics are those of a BN module left in training mode
    (or of an ``F.batch_norm(training=True)``): each call moves them, so neither folds."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn_eval, self.bn_train = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.bn_train.running_mean = self.bn_eval.running_mean
        self.bn_train.running_var = self.bn_eval.running_var
        randomize_bn_stats(self, seed=3)
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(self.bn_eval(self.c1(x)))
        if self.functional:
            return F.batch_norm(y, self.bn_eval.running_mean, self.bn_eval.running_var,
                                training=True)
        return self.bn_train(y)


@pytest.mark.parametrize("program", [False, True], ids=["module", "program"])
@pytest.mark.parametrize("functional", [False, True], ids=["bn_module", "F.batch_norm"])
def test_statistics_a_training_norm_moves_are_no_constants(functional: bool,
                                                           program: bool) -> None:
    model = _SharedStatistics(functional).eval()
    model.bn_train.train()
    x = torch.randn(2, 3, 6, 6)
    source = torch.export.export(deep_copy(model), (x,)) if program else deep_copy(model)
    folded, report = bnfold.fold(source, (x,))
    assert report.folded == [] and "written in place" in report.kept[0].reason
    run = folded.module() if program else folded
    reference = deep_copy(model)  # (fp32: .double() would give each BN tensors of its own)
    with torch.no_grad():
        for _ in range(3):  # (the statistics move at every call, in both)
            want, got = reference(x), run(x)
            assert float((got - want).abs().max() / want.abs().max()) < 1e-5
