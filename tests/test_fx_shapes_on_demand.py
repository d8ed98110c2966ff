"""The FX fold runs its shape pass on the example inputs only once a rule needs a shape.

``bnfold.fold(model, example_inputs)`` first checks a BN's channel axis at every rank its layer
accepts (a ``Conv2d -> BatchNorm2d`` fits at each rank where neither raises: no shape needed);
only a fold the graph alone cannot settle (a ``Linear`` before a ``BatchNorm1d``, a reshape, a
concat) runs the model on the example inputs, then on a graph earlier folds may have
rewritten, whose remaining nodes keep their shapes. Checked here: every zoo, reach, rep and
architecture model folds to the same report as with the shapes recorded up front, a pass that
starts halfway through the folds gives the exact model, bad example inputs are reported
wherever a shape is needed (before any rewrite with ``inplace``), and a fold that never ran them
says so.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp

import bnfold
from bnfold.errors import BadInputError
from bnfold.models import arch, reach, rep, zoo
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.fx import fold as fx_fold
from bnfold.passes.fx import trace
from bnfold.passes.fx.model_copy import deep_copy

NOT_RUN = "example_inputs were not run: no fold needed a shape"

MODELS = [(zoo, n) for n in zoo.ZOO] + [(reach, n) for n in reach.REACH] + \
    [(rep, n) for n in rep.PATTERNS]


def _entries(report: bnfold.Report) -> list[tuple[object, ...]]:
    return [(e.bn, e.module, e.action, e.into, e.reason, sorted(e.details.items(), key=str))
            for e in report.entries]


def _fold_with_shapes_up_front(model: nn.Module, x: torch.Tensor,
                               monkeypatch: pytest.MonkeyPatch) -> bnfold.PassResult:
    eager = trace.open_model

    def open_eagerly(*args: object, **kwargs: object) -> object:
        kwargs["shapes_on_demand"] = False
        return eager(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(fx_fold, "open_model", open_eagerly)
        return bnfold.fold(model, x)


def _runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the shape passes (one entry per :func:`trace.annotate_shapes` call)."""
    calls: list[int] = []
    real = trace.annotate_shapes
    monkeypatch.setattr(trace, "annotate_shapes",
                        lambda gm, args: calls.append(1) or real(gm, args))
    return calls


@pytest.mark.parametrize("source,name", MODELS, ids=[f"{s.__name__.split('.')[-1]}-{n}"
                                                     for s, n in MODELS])
def test_same_report_as_shapes_up_front(source, name: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = source.get(name), source.example_input(name)
    want = _fold_with_shapes_up_front(model, x, monkeypatch)
    runs = _runs(monkeypatch)
    got = bnfold.fold(model, x)
    assert _entries(got.report) == _entries(want.report)
    assert (NOT_RUN in got.report.notes) == (not runs) and len(runs) <= 1
    assert NOT_RUN not in want.report.notes


@pytest.mark.parametrize("name", list(arch.ARCHS))
def test_architectures_same_report_and_only_concat_bns_need_shapes(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = arch.get(name, width=0.25), arch.example_input(name, small=True)
    want = _fold_with_shapes_up_front(model, x, monkeypatch)
    runs = _runs(monkeypatch)
    got = bnfold.fold(model, x)
    assert _entries(got.report) == _entries(want.report)
    # DenseNet's BNs read concats (how many channels each input brings: a shape); every
    # other family's BNs follow a conv whose rank the BN fixes
    assert runs == ([1] if name == "densenet121" else [])


class _ConvThenHead(nn.Module):
    """Conv2d -> BN2d (no shape needed), then flatten -> Linear -> BN1d: a Linear takes any
    rank >= 1 and a BatchNorm1d normalizes dim 1 at rank 2 or 3, so only the example input's
    rank says the BN's channels are the Linear's features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.bn1 = nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn1(self.fc(y.flatten(1)))


def _head() -> nn.Module:
    return randomize_bn_stats(_ConvThenHead(), seed=3).eval()


def test_a_pass_started_after_a_fold_gives_the_exact_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _head(), torch.randn(2, 3, 6, 6)
    folded_first: list[bool] = []
    real = trace.annotate_shapes

    def spy(gm: fx.GraphModule, args: tuple[object, ...]) -> None:
        # the conv's BN is gone by the time the head's BN asks for a shape
        folded_first.append(not any(n.target == "bn" for n in gm.graph.nodes))
        real(gm, args)
    monkeypatch.setattr(trace, "annotate_shapes", spy)
    gm, report = bnfold.fold(model, x)
    assert folded_first == [True]
    assert [e.action for e in report.entries] == ["folded", "folded"]
    assert "rank_dispatch" not in str(report.entries) and NOT_RUN not in report.notes
    fresh = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model.double()(fresh)
        got = gm(fresh.float()).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert trace._PENDING not in gm.meta  # the example inputs are not kept


def test_bad_example_inputs_are_reported_where_a_shape_is_needed() -> None:
    with pytest.raises(BadInputError) as info:
        bnfold.fold(_head(), torch.randn(2, 3, 5, 5))  # 4*5*5 features, the Linear takes 144
    assert str(info.value).startswith("example_inputs do not run through the model: at fc: ")
    assert "\n" not in str(info.value)


def test_inplace_runs_the_shapes_before_any_rewrite() -> None:
    gm = fx.symbolic_trace(_head())
    before = [(n.op, n.target) for n in gm.graph.nodes]
    weight = gm.conv.weight.detach().clone()
    with pytest.raises(BadInputError, match="do not run through the model"):
        bnfold.fold(gm, torch.randn(2, 3, 5, 5), inplace=True)
    assert [(n.op, n.target) for n in gm.graph.nodes] == before
    assert torch.equal(gm.conv.weight, weight)


def test_a_fold_that_needs_no_shape_says_its_inputs_were_not_run() -> None:
    model = randomize_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 1).eval()
    gm, report = bnfold.fold(model, torch.randn(2, 5, 6, 6))  # 5 channels: never run
    assert report.notes == [NOT_RUN] and [e.action for e in report.entries] == ["folded"]
    assert trace._PENDING not in gm.meta
    fresh = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model.double()(fresh)
        got = gm(fresh.float()).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    again, second = bnfold.fold(gm, torch.randn(2, 3, 6, 6))  # (nothing pending left over)
    assert second.entries == [] and again is not gm


def _rel_err_on(gm: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = deep_copy(model).double()(x.double())
        got = gm(x).double()
    return float((got - want).abs().max() / want.abs().max())


def test_shapes_recorded_before_are_not_taken_for_the_example_inputs() -> None:
    """A GraphModule whose nodes carry shapes of a rank-2 input (ShapeProp, an earlier fold)
    folded with a rank-3 example: ``[N, L, C]`` puts the BatchNorm1d on L, not on the
    Linear's features, so the BN is kept (the old shapes said it folds)."""
    model = randomize_bn_stats(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), 0).eval()
    gm0 = fx.symbolic_trace(model)
    ShapeProp(gm0).propagate(torch.randn(4, 6))
    x = torch.randn(4, 5, 6)
    gm, report = bnfold.fold(gm0, x)
    assert [e.action for e in report.entries] == ["kept"]
    assert "dim 1 of its input [4, 5, 5]" in (report.entries[0].reason or "")
    assert _rel_err_on(gm, model, x) < 1e-6


class _ResampledUnbatched(nn.Module):
    """Conv2d -> F.interpolate -> F.batch_norm: on an unbatched input ``[C, H, W]`` the
    interpolate takes the conv's channels for the batch and the BN normalizes H (here of the
    BN's size), so only the shape says the BN is not over the conv's channels."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 1)
        self.register_buffer("mean", torch.randn(c) * 0.5)
        self.register_buffer("var", torch.rand(c) * 2 + 0.3)
        self.gamma, self.beta = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(self.conv(x), scale_factor=2.0)
        return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)


def test_a_chain_op_refusing_a_rank_does_not_settle_the_axis_without_shapes() -> None:
    model, x = _ResampledUnbatched().eval(), torch.randn(3, 4, 5)
    gm, report = bnfold.fold(model, x)
    assert [e.action for e in report.entries] == ["kept"] and NOT_RUN not in report.notes
    assert _rel_err_on(gm, model, x) < 1e-6
    batched = torch.randn(2, 3, 4, 5)  # (batched: the BN is over the conv's channels)
    gm, report = bnfold.fold(model, batched)
    assert [e.action for e in report.entries] == ["folded"]
    assert _rel_err_on(gm, model, torch.randn(3, 3, 4, 5)) < 1e-5


def test_fake_tensor_shapes_of_another_input_are_dropped_too() -> None:
    """``meta["val"]`` (FakeTensorProp, a traced program) is read before the shape pass's
    records: when the placeholders' values disagree with the example inputs, it goes."""
    model = randomize_bn_stats(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), 0).eval()
    gm0 = fx.symbolic_trace(model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm0, mode).propagate(mode.from_tensor(torch.randn(4, 6)))
    x = torch.randn(4, 5, 6)
    gm, report = bnfold.fold(gm0, x)
    assert [e.action for e in report.entries] == ["kept"]
    assert _rel_err_on(gm, model, x) < 1e-6


def test_without_example_inputs_a_rank_the_chain_cannot_be_followed_at_is_dispatched() -> None:
    model = _ResampledUnbatched().eval()
    gm, report = bnfold.fold(model)
    assert report.entries[0].details.get("rank_dispatch") == [4]
    for x in (torch.randn(3, 4, 5), torch.randn(2, 3, 4, 5)):  # unbatched: the original runs
        assert _rel_err_on(gm, model, x) < 1e-5


def test_bad_example_inputs_found_past_the_first_layer_print_nothing() -> None:
    """The real run fails at the Linear, then the fake-tensor run (whose failure torch logs
    with a traceback): one line, nothing on stderr (in a process of its own, as a user runs
    it: pytest's log capture would hide torch's)."""
    code = (
        "import torch, bnfold\n"
        "from torch import nn\n"
        "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 4),"
        " nn.BatchNorm1d(4)).eval()\n"
        "try:\n"
        "    bnfold.fold(m, torch.randn(2, 3, 5, 5))\n"
        "except bnfold.BadInputError as e:\n"
        "    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.stdout.startswith("example_inputs do not run through the model: at 2: mat1 "
                                 "and mat2 shapes cannot be multiplied")
    assert run.stderr == ""


class _Noisy(nn.Module):
    """Linear -> BatchNorm1d plus noise drawn in the graph (``rand_like``): the shape pass
    draws it once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.fc(x))
        return y + 0.01 * torch.rand_like(y)


def test_the_shape_pass_leaves_the_random_state_as_it_was() -> None:
    model, x = randomize_bn_stats(_Noisy(), 0).eval(), torch.randn(4, 6)
    state = torch.random.get_rng_state()
    _, report = bnfold.fold(model, x)
    assert [e.action for e in report.entries] == ["folded"] and NOT_RUN not in report.notes
    assert torch.equal(torch.random.get_rng_state(), state)


class _ListInput(nn.Module):
    """Linear -> BatchNorm1d on the first tensor of a list."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.bn(self.fc(xs[0]))


class _SizedReshape(nn.Module):
    """Conv -> reshape(k, 4, -1) -> BatchNorm1d: at ``k`` = the batch the BN's channels are
    the conv's; at twice the batch the reshape mixes batch and channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.bn(self.conv(x).reshape(k, 4, -1))


def _fake_propagated(model: nn.Module, *args: object) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*args)
    return gm


def test_recorded_values_of_other_nested_or_number_inputs_are_dropped_too() -> None:
    """The placeholders' ``val`` compared leaf by leaf: a list of tensors of another rank, a
    Python number of another value (which sizes a reshape)."""
    model = randomize_bn_stats(_ListInput(), 0).eval()
    xs = [torch.randn(2, 5, 5)]
    gm, report = bnfold.fold(_fake_propagated(model, [torch.randn(2, 5)]), (xs,))
    assert [e.action for e in report.entries] == ["kept"]
    with torch.no_grad():
        want = deep_copy(model).double()([xs[0].double()])
        got = gm([xs[0]]).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-6
    model = randomize_bn_stats(_SizedReshape(), 0).eval()
    x = torch.randn(2, 3, 2, 2)
    gm, report = bnfold.fold(_fake_propagated(model, x, 2), (x, 4))
    assert [e.action for e in report.entries] == ["kept"]
    assert "reshape" in (report.entries[0].reason or "")
    with torch.no_grad():
        want = deep_copy(model).double()(x.double(), 4)
        got = gm(x, 4).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-6


class _OwnGenerator(_Noisy):
    """Noise from a generator the model holds: the shape pass must not advance it."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.fc(x))
        return y + torch.rand(y.shape, generator=self.generator)


def test_the_shape_pass_leaves_a_generator_the_model_holds_where_it_was() -> None:
    model, x = randomize_bn_stats(_OwnGenerator(), 0).eval(), torch.randn(4, 6)
    gm, report = bnfold.fold(model, x)
    assert [e.action for e in report.entries] == ["folded"] and NOT_RUN not in report.notes
    reference = deep_copy(model).double()  # (its generator copied where the model's is)
    with torch.no_grad():
        want, got = reference(x.double()), gm(x).double()  # (the same noise next)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_a_fold_resting_on_the_examples_rank_says_so() -> None:
    """Conv1d -> BatchNorm1d folded on a batched example: unbatched, the BN would normalize
    the length axis, so the fold is exact at rank 3 only, and the report says it (the entry's
    ``exact_at_rank``, a note). A Conv2d -> BatchNorm2d fold holds at every rank that runs."""
    model = randomize_bn_stats(nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8)), 0).eval()
    gm, report = bnfold.fold(model, torch.randn(2, 4, 10))
    assert report.entries[0].details["exact_at_rank"] == 3
    assert any(n.startswith("1 fold(s) rest on the example inputs' rank") for n in report.notes)
    assert _rel_err_on(gm, model, torch.randn(5, 4, 10)) < 1e-5
    plain = randomize_bn_stats(nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)), 0).eval()
    _, report = bnfold.fold(plain, torch.randn(2, 4, 10, 10))
    assert "exact_at_rank" not in report.entries[0].details and report.notes == [NOT_RUN]
