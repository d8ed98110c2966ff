"""The FX shape pass on the ``meta`` device records what a real forward pass records.

:func:`bnfold.passes.fx.trace.annotate_shapes` runs a graph for real while its tensors are
small and on meta once they are not, with shortcuts for ops whose output is a tensor like their
input; an op meta cannot run sends the graph to a real (or fake) pass. Every zoo, reach, rep
and architecture model is run both ways and must record the same shape, dtype and
``requires_grad`` on every node (what the fold reads), and on contiguous inputs without
transposes the same strides and memory format (a meta kernel may lay out the output of a
permuted or channels-last input otherwise than the CPU kernel, as fake tensors do).
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import bnfold
from bnfold.models import arch, reach, rep, zoo
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.fx import trace

MODELS = [(zoo, n) for n in zoo.ZOO] + [(reach, n) for n in reach.REACH] + \
    [(rep, n) for n in rep.PATTERNS]


def _metadata(gm: fx.GraphModule, x: torch.Tensor, meta_from: int | None) -> dict[str, object]:
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    shapes = trace._Shapes(gm, meta_from=meta_from)
    with torch.no_grad():
        shapes.run(x)
    assert shapes.on_meta == (meta_from == 0)
    return {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}


def _check_alike(model: nn.Module, x: torch.Tensor, *, strides: bool = True) -> None:
    gm, _ = trace.graph_module_of(model, (x,), inplace=False)
    gm.eval()
    real = _metadata(gm, x, None)
    on_meta = _metadata(gm, x, 0)
    assert sum(v is not None for v in real.values()) > 3
    if strides:
        assert on_meta == real
    key = {k: v and (v.shape, v.dtype, v.requires_grad) for k, v in real.items()}
    assert {k: v and (v.shape, v.dtype, v.requires_grad) for k, v in on_meta.items()} == key


@pytest.mark.parametrize(("source", "name"), MODELS, ids=[n for _, n in MODELS])
def test_meta_pass_records_what_the_real_pass_records(source, name) -> None:
    _check_alike(source.get(name), source.example_input(name),
                 strides=name not in ("levit_block", "linear_bn1d_tokens",
                                      "linear_seq_wrong_axis"))  # (transposes)


@pytest.mark.parametrize("name", list(arch.ARCHS))
def test_meta_pass_on_architectures(name) -> None:
    _check_alike(arch.get(name, width=0.125), arch.example_input(name, small=True))


def test_meta_pass_keeps_layouts_and_dtypes() -> None:
    """channels_last inputs, double tensors, a residual add, an in-place add, a scalar
    product, products that broadcast either operand and a functional BN, whose outputs the
    shortcuts make without running."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.conv(x)))
            y = y + x
            y += 1.5
            z = torch.nn.functional.batch_norm(y * 2, self.bn.running_mean, self.bn.running_var)
            z = y.mean((2, 3), keepdim=True) * z - z * y.amax(1, keepdim=True)  # broadcasts
            return z.sigmoid() - y.flatten(1).mean()

    for dtype in (torch.float32, torch.float64):
        net = randomize_bn_stats(Net()).eval().to(dtype)
        x = torch.randn(2, 4, 6, 6, dtype=dtype)
        _check_alike(net, x)
        _check_alike(net, x.contiguous(memory_format=torch.channels_last), strides=False)
        _check_alike(net, x[:, :, ::2], strides=False)  # not dense: ops run on meta


class _DataDependent(nn.Module):
    """Conv -> BN, then ops meta cannot run: ``nonzero`` (data-dependent shape) and a tensor
    made on the CPU inside ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.cat([y, torch.zeros(y.shape)]) + torch.nonzero(y > 0).shape[0] * 0


def test_an_op_meta_cannot_run_falls_back_to_real_shapes() -> None:
    model = randomize_bn_stats(_DataDependent()).eval()
    x = torch.randn(1, 3, 160, 160)  # 76800 elements: the placeholder already goes to meta
    assert x.numel() > trace.META_FROM_ELEMENTS
    with pytest.raises(Exception):  # noqa: B017 (whatever meta raises)
        _metadata(trace.graph_module_of(model, (x,), inplace=False)[0], x, 0)
    gm, report = bnfold.fold(model, x)
    assert [e.action for e in report.entries] == ["folded"]
    ref = model.double()
    fresh = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = gm(fresh).double(), ref(fresh.double())
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


class _ConvBNThen(nn.Module):
    """Conv -> BN -> ``tail``, traced with ``tail`` as a leaf module (:func:`_traced`)."""

    def __init__(self, tail: nn.Module, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.bn(self.conv(x)))


def _traced(net: _ConvBNThen) -> fx.GraphModule:
    class Leaf(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return m is net.tail or super().is_leaf_module(m, name)

    return fx.GraphModule(net, Leaf().trace(net))


def test_large_inputs_run_on_meta_and_small_ones_for_real() -> None:
    seen: list[torch.device] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.device)
            return x * 2

    gm = _traced(randomize_bn_stats(_ConvBNThen(Probe(), 8)).eval())
    for side, device in ((8, "cpu"), (128, "meta")):
        seen.clear()
        trace.annotate_shapes(gm, (torch.randn(1, 3, side, side),))
        assert seen == [torch.device(device)]
        assert trace.shape_of(next(n for n in gm.graph.nodes if n.name == "tail")) == \
            (1, 8, side, side)


class _SlicingReLU(nn.ReLU):
    """A ReLU subclass whose own ``forward`` changes the shape: no shortcut may skip it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, :2]


def test_modules_that_may_change_the_shape_run_on_meta() -> None:
    """A subclass with a ``forward`` of its own, and a BN whose forward hook changes its
    output, record their real shapes."""
    net = randomize_bn_stats(_ConvBNThen(_SlicingReLU(), 4)).eval()
    net.bn.register_forward_hook(lambda m, args, out: out[..., :3])
    gm = _traced(net)
    x = torch.randn(1, 3, 5, 5)
    real = _metadata(gm, x, None)
    assert _metadata(gm, x, 0) == real
    assert real["bn"].shape == (1, 4, 5, 3) and real["tail"].shape == (1, 2, 5, 3)
