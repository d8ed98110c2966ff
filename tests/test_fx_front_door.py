"""The FX passes share one front door (passes/fx/trace.open_model): the same error types for
the same bad inputs, whichever pass is called."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import UnsupportedError, UntraceableError
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.fx.reparam import reparameterize_fx

PASSES = {"fold": bnfold.fold, "insert_bn": bnfold.insert_bn, "reparameterize": reparameterize_fx}


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_fx_pass_refuses_torchscript_and_untraceable_models_alike(name: str) -> None:
    run = PASSES[name]
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2).eval()))
    with pytest.raises(UnsupportedError, match=r"TorchScript module.*original nn\.Module"):
        run(scripted)
    with pytest.raises(UntraceableError, match="cannot trace _DataDependent") as info:
        run(_DataDependent().eval())
    assert "\n" not in str(info.value)


class _ShapeBranch(nn.Module):
    """symbolic_trace cannot branch on a shape; torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).relu()
        if h.shape[-1] > 1:
            h = h.mean((2, 3))
        return self.fc(h)


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
def test_insert_takes_the_torch_export_fallback_like_fold() -> None:
    """A BN lands after the ATen conv of the exported graph; in eval mode a fresh BN divides by
    sqrt(1 + eps), checked against the float64 model with that scale put into the conv."""
    torch.manual_seed(0)
    model, eps = _ShapeBranch(), 0.25
    x = torch.randn(4, 1, 8, 8)
    gm, report = bnfold.insert_bn(model, example_inputs=x, eps=eps)
    assert any(note.startswith("traced with torch.export") for note in report.notes)
    assert [(e.bn, e.action) for e in report.entries] == [("conv_bn", "inserted"),
                                                          ("fc", "skipped")]
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        reference.conv.weight /= (1 + eps) ** 0.5
        reference.conv.bias /= (1 + eps) ** 0.5
    x = torch.randn(4, 1, 8, 8)  # fresh inputs, the exported batch size
    gm.get_submodule("conv_bn").eval()  # an exported module refuses gm.eval()
    out = gm(x)
    torch.testing.assert_close(out.double(), reference(x.double()), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, model(x), rtol=1e-3, atol=1e-3)  # the BN is really there


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_fx_pass_returns_the_code_of_its_final_graph(name: str) -> None:
    """The traced graph module is built without code (trace.without_code); each pass must
    generate it once, after its rewrites, and leave GraphModule's own recompile in place."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(12, 2)).eval()
    x = torch.randn(2, 2, 4, 4)
    gm, _ = PASSES[name](net, example_inputs=x)
    assert type(gm).recompile is torch.fx.GraphModule.recompile
    assert gm.code == gm.graph.python_code("self").src
    with torch.no_grad():
        assert gm(x).shape == (2, 2)


class _Counter(nn.Module):
    """A forward that advances a buffer in place: the write reaches the buffer past the
    tracer's proxies, so symbolic_trace would run it once and record a graph without it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.bn(self.conv(x)) + self.calls


@pytest.mark.parametrize("name", sorted(PASSES))
def test_a_forward_that_writes_past_the_tracer_is_not_traced(name: str) -> None:
    model = randomize_bn_stats(_Counter().eval())
    with pytest.raises(UntraceableError, match=r"cannot trace _Counter: its forward writes "
                       r"calls outside the traced graph \(once, at trace time\)"):
        PASSES[name](model)
    assert float(model.calls) == 0.0


def test_such_a_model_folds_through_torch_export_with_its_writes() -> None:
    model = randomize_bn_stats(_Counter().eval())
    x = torch.randn(2, 3, 8, 8)
    gm, report = bnfold.fold(model, x)
    assert "torch.export (symbolic_trace failed: its forward writes calls" in report.notes[0]
    assert float(model.calls) == 0.0 and model.calls._version == 0  # (the input: not run)
    assert report.folded and not report.kept
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for _ in range(3):  # the folded module advances its counter as the model does
            got, want = gm(x).double(), ref(x.double())
            assert float((got - want).abs().max() / want.abs().max()) < 1e-5


class _Noisy(nn.Module):
    """Noise drawn in ``forward`` from a shape alone: symbolic_trace would draw it once and
    make it a constant of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + 0.1 * torch.randn(4, 1, 1)


def test_a_forward_that_draws_random_numbers_at_trace_time_is_not_traced() -> None:
    model = randomize_bn_stats(_Noisy().eval())
    with pytest.raises(UntraceableError, match="draws random numbers outside the traced graph"):
        bnfold.fold(model)
    gm, report = bnfold.fold(model, torch.randn(2, 3, 8, 8))
    assert "torch.export (symbolic_trace failed: its forward draws random" in report.notes[0]
    assert report.folded and not report.kept
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.manual_seed(5)
        got = gm(x)
        torch.manual_seed(5)
        want = model(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5  # the same draws


@pytest.mark.parametrize("name", sorted(PASSES))
def test_a_model_torch_cannot_copy_gets_one_line(name: str) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).eval()
    model[0].weight = nn.Parameter(model[0].weight.detach().to_sparse())
    with pytest.raises(UnsupportedError, match=r"cannot copy Sequential \(.*\): bnfold "
                       r"rewrites a copy") as info:
        PASSES[name](model, example_inputs=torch.randn(4, 8))
    assert "\n" not in str(info.value)


class _DataCounter(_Counter):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.data.add_(1)  # (another version counter than the buffer's own)
        return self.bn(self.conv(x)) + self.calls


class _Rebound(_Counter):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1  # (a new tensor in the buffer's place)
        return self.bn(self.conv(x)) + self.calls


class _CountedBranch(_Counter):
    """A write, then a branch on a shape: symbolic_trace fails after the write ran."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        y = self.bn(self.conv(x))
        return y * self.calls if x.shape[0] > 1 else y


def test_a_write_through_data_is_refused_where_torch_export_refuses_it_too() -> None:
    model = randomize_bn_stats(_DataCounter().eval())
    with pytest.raises(UntraceableError, match=r"its forward writes calls outside the traced "
                       r"graph .*; torch.export also failed") as info:
        bnfold.fold(model, torch.randn(2, 3, 8, 8))
    assert "\n" not in str(info.value) and float(model.calls) == 0.0


@pytest.mark.parametrize("kind", [_Rebound, _CountedBranch])
def test_every_way_a_forward_changes_its_state_goes_to_torch_export(kind: type) -> None:
    model = randomize_bn_stats(kind().eval())
    x = torch.randn(2, 3, 8, 8)
    gm, report = bnfold.fold(model, x)
    assert "traced with torch.export" in report.notes[0] and report.folded
    assert float(model.calls) == 0.0
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for _ in range(3):  # (a copy the trace had written would run one call ahead)
            got, want = gm(x).double(), ref(x.double())
            assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_a_refused_draw_leaves_the_callers_random_state_as_it_was() -> None:
    model = randomize_bn_stats(_Noisy().eval())
    state = torch.random.get_rng_state()
    with pytest.raises(UntraceableError):
        bnfold.fold(model)
    assert torch.equal(state, torch.random.get_rng_state())


def test_a_global_module_hook_keeps_every_bn() -> None:
    model = randomize_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: o * m.weight.abs().mean() if isinstance(m, nn.Conv2d) else None)
    try:
        x = torch.randn(2, 3, 8, 8)
        gm, report = bnfold.fold(model, x)
        assert not report.folded
        assert "global forward hook (registered for every module)" in report.kept[0].reason
        ref = copy.deepcopy(model).double()
        with torch.no_grad():
            got, want = gm(x).double(), ref(x.double())
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    finally:
        handle.remove()


class _BranchOnShape(nn.Module):
    """Conv -> BN, then a branch on a shape: folded through the torch.export fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y * 2 if y.shape[2] > 3 else y


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
def test_the_result_of_an_export_fallback_folds_again_and_runs() -> None:
    """torch.export's module checks its inputs in a pre-hook reading ``validate_inputs``,
    which ``copy.deepcopy`` of a GraphModule drops: the second fold's copy keeps it."""
    model, x = randomize_bn_stats(_BranchOnShape(), 0).eval(), torch.randn(2, 3, 5, 5)
    first, report = bnfold.fold(model, x)
    assert report.notes[0].startswith("traced with torch.export")
    again, report = bnfold.fold(first, x)
    assert report.entries == [] and again is not first
    fresh = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(fresh.double())
        got = again(fresh).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


class _Seeded(nn.Module):
    """A forward that seeds torch's generator: neither tracer keeps the call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)
        return self.bn(self.fc(x)) + torch.rand(x.shape)


def test_a_forward_that_seeds_the_generator_is_refused_and_the_callers_stream_kept() -> None:
    model, x = _Seeded().eval(), torch.randn(2, 4)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with pytest.raises(UntraceableError, match="seeds torch's random generator"):
        bnfold.fold(model, x)
    assert torch.equal(torch.random.get_rng_state(), state) and torch.initial_seed() == 123


def test_refolding_a_torch_export_result_warns_nothing() -> None:
    import warnings
    model, x = randomize_bn_stats(_BranchOnShape(), 0).eval(), torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, _ = bnfold.fold(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnfold.fold(first, x)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_fx_pass_carries_the_models_own_hook_over(name: str) -> None:
    """A forward hook on the model itself runs on the result of every pass (``fold`` carried
    it before; ``reparameterize`` and ``insert_bn`` dropped it)."""
    model = randomize_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 0).eval()
    model.register_forward_hook(lambda m, i, o: o - 1)
    gm, report = PASSES[name](model)
    assert any("carried over" in note for note in report.notes)
    assert len(gm._forward_hooks) == 1
    x = torch.randn(2, 3, 8, 8)  # (insert_bn: the conv has its BN already, none is added)
    with torch.no_grad():
        got, want = gm(x).double(), copy.deepcopy(model).double()(x.double())
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_an_export_fallback_result_takes_the_mode_it_has_and_exports_to_onnx() -> None:
    """torch.export's module refuses every ``eval()``; the fold's accepts the mode it was
    traced in (so ``torch.onnx.export`` runs) and refuses a change with the reason."""
    import io

    torch.manual_seed(1)
    model = randomize_bn_stats(nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1)), seed=2)
    model = nn.Sequential(model, _ShapeBranch()).eval()
    x = torch.randn(4, 1, 10, 10)
    gm, report = bnfold.fold(model, x)
    assert any("torch.export" in note for note in report.notes) and report.folded
    assert gm.eval() is gm and not gm.training
    with pytest.raises(NotImplementedError, match=r"traced by torch\.export in eval mode"):
        gm.train()
    torch.onnx.export(gm, (x,), io.BytesIO(), dynamo=False)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        assert float((gm(x).double() - want).abs().max() / want.abs().max()) < 1e-5
