"""Reach of the FX fold (issue 9) and hooks (issue 8 item 6): every reach-zoo model folded vs
its float64 unfolded reference on fresh inputs with random statistics, the BN-left counts,
and the report's words for each case."""

from __future__ import annotations

import copy

import onnx_cases
import pytest
import torch
import torch.nn.functional as F
from test_fx_zoo import bn_nodes, rel_err
from torch import nn

import bnfold
from bnfold.errors import UnsupportedError
from bnfold.models import reach, zoo
from bnfold.models.stats import randomize_bn_stats

# ---------------------------------------------------------------------------------------------
# Hooks: a BN or layer with hooks is kept; other hooks are carried over or the fold refused.
# ---------------------------------------------------------------------------------------------


def _double(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * 2


def _triple_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0] * 3,)


@pytest.mark.parametrize("where", ["features.1", "features.0"])
@pytest.mark.parametrize("kind", ["forward", "pre", "backward"])
def test_bn_or_layer_with_a_hook_is_kept(where: str, kind: str) -> None:
    model = zoo.get("plain_cnn")
    module = model.get_submodule(where)
    if kind == "forward":
        module.register_forward_hook(_double)
    elif kind == "pre":
        module.register_forward_pre_hook(_triple_input)
    else:
        module.register_full_backward_hook(lambda *_: None)
    x = zoo.example_input("plain_cnn")
    gm, report = bnfold.fold(model, x)
    kept = {e.bn: e.reason for e in report.kept}
    assert list(kept) == ["features.1"]
    assert where in kept["features.1"] and "hook" in kept["features.1"]
    assert len(report.folded) == 1  # the other BN still folds
    assert rel_err(gm, model, zoo.example_input("plain_cnn", seed=5), double=True) < 1e-6


def test_a_bn_with_a_patched_forward_is_kept() -> None:
    model = zoo.get("plain_cnn")
    bn = model.features[1]
    bn.forward = lambda x: nn.BatchNorm2d.forward(bn, x) * 2
    x = zoo.example_input("plain_cnn")
    gm, report = bnfold.fold(model, x)
    assert "forward replaced on the instance" in report.kept[0].reason
    with torch.no_grad():  # the patched forward closes over the model's own BN: fp32 only
        want = model(x)
        assert float((gm(x) - want).abs().max() / want.abs().max()) < 1e-5


def test_root_hooks_are_carried_over() -> None:
    model = zoo.get("plain_cnn")
    model.register_forward_pre_hook(_triple_input)
    model.register_forward_hook(lambda _m, _a, out: out + 100)
    gm, report = bnfold.fold(model)
    assert len(report.folded) == 2
    assert any("carried over" in n for n in report.notes)
    gm2, report2 = bnfold.fold(gm)  # a GraphModule's own hooks are carried over too
    assert any("carried over" in n for n in report2.notes)
    x = zoo.example_input("plain_cnn", seed=5)
    with torch.no_grad():  # copy.deepcopy of a GraphModule rebuilds it without hooks
        ref = model.double()(x.double())
        for folded in (gm, gm2):
            out = folded.double()(x.double())
            assert float((out - ref).abs().max() / ref.abs().max()) < 1e-6


def test_hooks_under_torch_export_are_traced_into_the_graph() -> None:
    """A model only torch.export can trace runs its hooks while exporting: the hook's ops are
    in the graph, so the BN folds and the result still includes what the hooks do."""
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.shape[2] > 3 else x

    from bnfold.models.stats import randomize_bn_stats
    model = randomize_bn_stats(Branchy()).eval()
    model.bn.register_forward_hook(_double)
    model.register_forward_hook(lambda _m, _a, out: out + 100)
    x = torch.randn(2, 3, 8, 8)
    gm, report = bnfold.fold(model, x)
    assert "torch.export" in report.notes[0] and len(report.folded) == 1
    with torch.no_grad():
        ref = model.double()(x.double())
        assert float((gm(x).double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_hook_on_an_inlined_module_refuses_the_fold() -> None:
    model = zoo.get("resnet_small")
    model.layer1.register_forward_hook(_double)
    with pytest.raises(UnsupportedError, match=r"layer1 .*inlines"):
        bnfold.fold(model)


# ---------------------------------------------------------------------------------------------
# The reach zoo: exact against float64, with the BN-left count each net declares.
# ---------------------------------------------------------------------------------------------

REACH = list(reach.REACH)


@pytest.mark.parametrize("shapes", [True, False], ids=["example_inputs", "no_shapes"])
@pytest.mark.parametrize("name", REACH)
def test_reach_zoo_folds_exactly_to_its_bn_left(name: str, shapes: bool) -> None:
    model = reach.get(name)
    spec = reach.REACH[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = reach.example_input(name) if shapes else None
    gm, report = bnfold.fold(model, example)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    gm2, report2 = bnfold.fold(gm, example)  # idempotent: nothing more to fold
    assert gm2.code == gm.code and not report2.folded
    assert len(report.entries) == spec.bn_total, report.table()
    if shapes:
        assert len(report.kept) == spec.bn_left, report.table()
    else:  # a BN kept at the example's rank may fold, rank-dispatched, at another
        dispatched = [e for e in report.folded if "rank_dispatch" in e.details]
        assert len(report.kept) <= spec.bn_left <= len(report.kept) + len(dispatched)
    assert all(e.reason and e.details["kind"] for e in report.kept)
    x = reach.example_input(name, seed=123, batch=3)  # fresh input, another batch size
    assert rel_err(gm, model, x, double=False) < 1e-5
    assert rel_err(gm, model, x, double=True) < 1e-6


@pytest.mark.parametrize(("source", "name"), [("reach", n) for n in REACH] + [
    ("zoo", n) for n in zoo.ZOO])
def test_a_torch_export_program_folds_as_the_module_does(source: str, name: str) -> None:
    """The same nets as ``torch.export`` programs, whose graphs spell everything in ATen
    (``aten.add``/``aten.cat`` under a BN, ``aten.mul`` affine chains, ``aten.dropout``,
    ``aten.pad``, ``aten.reshape_as``, a ``batch_norm`` on a constant weight): each leaves the
    BNs the module's fold leaves, with every BN reported, exact against float64."""
    models = reach if source == "reach" else zoo
    spec = (reach.REACH if source == "reach" else zoo.ZOO)[name]
    model, x = models.get(name), models.example_input(name)
    folded, report = bnfold.fold(torch.export.export(model, (x,)), x)
    assert len(report.entries) == spec.bn_total, report.table()
    assert len(report.kept) == spec.bn_left, report.table()
    fresh = models.example_input(name, seed=123)
    assert rel_err(folded.module(), model, fresh, double=True) < 1e-6


@pytest.mark.parametrize(("name", "kinds"), [
    ("frozen_bn_backbone", {"affine mul+add"}),
    ("bn_act_timm", {"F.batch_norm", "affine mul+add"}),
    ("sync_bn_eval", {"SyncBatchNorm"}),
    ("affine_chain", {"affine sub+div", "affine mul+add", "affine sub+mul+mul+add"}),
    ("weight_standardization", {"batch_norm on a constant", "BatchNorm2d"}),
])
def test_report_says_what_was_folded(name: str, kinds: set[str]) -> None:
    _, report = bnfold.fold(reach.get(name), reach.example_input(name))
    assert {e.details["kind"] for e in report.folded} == kinds
    assert not report.kept


def test_off_channel_and_scalar_affines_are_kept_with_the_reason() -> None:
    model = reach.get("affine_off_channel")
    gm, report = bnfold.fold(model, reach.example_input("affine_off_channel"))
    reasons = [e.reason for e in report.kept]
    assert "dim 3" in reasons[0] and "conv1's channels are on dim 1" in reasons[0]
    assert "scalar affine" in reasons[1]
    assert gm.code == bnfold.fold(gm)[0].code


def test_constant_bn_is_evaluated_once_into_the_weight() -> None:
    """Weight standardization: no batch_norm left on the weight path, the standardized weight
    is a new Parameter, and the BN after the conv folds into it."""
    model = reach.get("weight_standardization")
    gm, report = bnfold.fold(model, reach.example_input("weight_standardization"))
    assert not bn_nodes(gm)
    constant = [e for e in report.folded if e.details["direction"] == "constant"]
    assert [e.bn for e in constant] == ["conv1 (batch_norm)", "conv2 (batch_norm_1)"]
    assert all(isinstance(gm.get_parameter(e.into), nn.Parameter) for e in constant)


# ---------------------------------------------------------------------------------------------
# Eval no-ops, several readers.
# ---------------------------------------------------------------------------------------------


class _Chain(nn.Module):
    """conv -> <between> -> BN, and BN -> <between> -> linear."""

    def __init__(self, between) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)
        self.between = between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.between(self.conv(x))))
        h = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1)
        return self.fc(self.between(self.bn2(h)))


def _prepared(model: nn.Module) -> nn.Module:
    from bnfold.models.stats import randomize_bn_stats
    return randomize_bn_stats(model).eval()


@pytest.mark.parametrize(("between", "folded"), [
    (lambda t: torch.nn.functional.dropout(t, 0.3, training=False), 2),
    (lambda t: t.to(torch.float64).double(), 2),
    (lambda t: torch.nn.functional.dropout(t, 0.3), 0),  # training=True: not a no-op
    (lambda t: t.float().double(), 0),  # a round trip through float32 is not a no-op
])
def test_functional_noops_and_casts(between, folded: int) -> None:
    """On a float64 model (the reference itself): casts to float64 are no-ops."""
    model = _prepared(_Chain(between)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm, report = bnfold.fold(model, x)
    assert len(report.folded) == folded, report.table()
    assert all(e.reason for e in report.kept)
    if folded:
        assert rel_err(gm, model, x, double=True) < 1e-6


@pytest.mark.parametrize("spelling", ["module", "function", "program"])
def test_dropout_in_training_mode_is_not_a_noop(spelling: str) -> None:
    """The BN after it is kept, and the reason names the training-mode dropout."""
    between = nn.Dropout(0.5) if spelling != "function" else (
        lambda t: torch.nn.functional.dropout(t, 0.5, training=True))
    model = _prepared(_Chain(between))
    if spelling != "function":
        model.between.train()
    x = torch.randn(2, 3, 6, 6)
    _, report = bnfold.fold(torch.export.export(model, (x,)) if spelling == "program"
                            else model, x if spelling != "program" else None)
    assert not report.folded
    assert "a dropout in training mode" in report.kept[0].reason, report.table()


def test_a_zero_padded_reader_keeps_the_bn_whole() -> None:
    """Plan-then-apply: one reader that cannot take the shift leaves every reader unchanged."""
    model = reach.get("bn_multi_reader")
    model.c = nn.Conv2d(4, 5, 3, stride=2, padding=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, report = bnfold.fold(model, reach.example_input("bn_multi_reader"))
    assert len(report.kept) == 1 and "zero-padded conv" in report.kept[0].reason
    assert all(torch.equal(gm.get_parameter(f"{m}.weight"), before[f"{m}.weight"])
               for m in "abc")


def test_several_readers_fold_into_copies_of_a_shared_layer() -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(x)) + self.fc(x)  # fc also reads the raw input

    model = _prepared(Reuse())
    x = torch.randn(5, 4)
    gm, report = bnfold.fold(model, x)
    assert report.folded[0].details.get("copy_of") == "fc"
    assert rel_err(gm, model, x, double=True) < 1e-6


# ---------------------------------------------------------------------------------------------
# Every input rank the original accepts still runs, with the same result.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "module", "shapes"), [
    ("linear_bn1d_tokens", reach, [(4, 16), (2, 8, 16), (3, 2, 8, 16)]),
    ("mlp_bn1d", zoo, [(4, 32), (2, 64, 32)]),
    ("frozen_bn_backbone", reach, [(2, 3, 12, 12), (3, 12, 12)]),  # unbatched: broadcast up
])
def test_every_rank_the_original_accepts_runs_the_same(name: str, module, shapes) -> None:
    """Without example_inputs a fold exact only at some ranks is rank-dispatched: at every
    input rank the original runs on, the folded model gives the original's float64 result."""
    model = module.get(name)
    gm, report = bnfold.fold(model)
    assert any("rank_dispatch" in e.details for e in report.folded)
    assert any("rank_dispatch" in n for n in report.notes)
    ran = 0
    for shape in shapes:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
        try:
            with torch.no_grad():
                model(x)
        except (RuntimeError, ValueError, AssertionError):
            continue
        ran += 1
        assert rel_err(gm, model, x, double=True) < 1e-6, shape
    assert ran >= 2


def test_functional_linear_and_bn_are_both_cut_out_into_dispatches() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            fc, bn = self.fc, self.bn
            y = torch.nn.functional.linear(x, fc.weight, fc.bias)
            return torch.nn.functional.batch_norm(y, bn.running_mean, bn.running_var,
                                                  bn.weight, bn.bias, False)

    from bnfold.models.stats import randomize_bn_stats
    model = randomize_bn_stats(Functional()).eval()
    gm, report = bnfold.fold(model)
    assert report.folded[0].details["rank_dispatch"] == [2]
    for x in (torch.randn(4, 8), torch.randn(2, 8, 8)):
        assert rel_err(gm, model, x, double=True) < 1e-6


def test_rank_dispatch_that_cannot_be_installed_keeps_the_bn() -> None:
    """A BN module called at two places cannot be switched off for one of them: kept, the
    reason names the ranks; a functional BN is cut out into a dispatch of its own."""
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)
            self.fc2 = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bn = self.bn
            y = self.bn(self.fc(x)) + self.bn(x)
            return torch.nn.functional.batch_norm(self.fc2(y), bn.running_mean, bn.running_var,
                                                  bn.weight, bn.bias, False)

    from bnfold.models.stats import randomize_bn_stats
    model = randomize_bn_stats(Twice()).eval()
    gm, report = bnfold.fold(model)
    kept = {e.bn: e.reason for e in report.kept}
    assert "exact only at input rank 2" in kept["bn (bn)"]
    assert "called 2 times" in kept["bn (bn)"]
    assert report.folded[0].details["rank_dispatch"] == [2]
    for x in (torch.randn(4, 8), torch.randn(2, 8, 8)):
        assert rel_err(gm, model, x, double=True) < 1e-6


# ---------------------------------------------------------------------------------------------
# Concat and sum splits.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shapes", [True, False])
def test_concat_and_sum_splits_say_where_each_share_went(shapes: bool) -> None:
    entries = {}
    for name in ("mixnet_concat", "concat_passthrough", "add_of_layers"):
        x = reach.example_input(name) if shapes else None
        gm, report = bnfold.fold(reach.get(name), x)
        entries.update({f"{name}:{e.bn}": e for e in report.entries})
        if name == "concat_passthrough":
            sliced = [n for n in bn_nodes(gm) if n.args[0].name == "x"]
            assert len(sliced) == 1 and gm.get_buffer(sliced[0].args[1].target).numel() == 3
            gm2, report2 = bnfold.fold(gm)
            assert gm2.code == gm.code and len(report2.kept) == 2
    mix = entries["mixnet_concat:bn"]
    assert (mix.action, mix.into, mix.details["split"]) == ("folded", "dw.0, dw.1, dw.2",
                                                              "concat")
    part = entries["concat_passthrough:bn1"]
    assert part.action == "kept" and part.details["folded_into"] == "conv1"
    assert part.reason.startswith("channels 5:8 of cat come from x (x is not a conv/linear): "
                                  "kept as a BN over those 3 channels only")
    assert "2 of its inputs are not foldable" in entries["concat_passthrough:bn2"].reason
    add = entries["add_of_layers:bn"]
    assert (add.into, add.details["split"]) == ("conv3, conv1", "add")
    assert entries["add_of_layers:bn_fc"].into == "fc_a, fc_b"
    assert "summand relu is not a conv/linear" in entries["add_of_layers:bn_r"].reason


def test_a_layer_read_elsewhere_keeps_its_concat_slice() -> None:
    class Tapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = self.a(x)
            return self.bn(torch.cat([a, self.b(x)], 1)), a

    from bnfold.models.stats import randomize_bn_stats
    model = randomize_bn_stats(Tapped()).eval()
    x = torch.randn(2, 3, 5, 5)
    gm, report = bnfold.fold(model, x)
    assert len(report.kept) == 1 and report.kept[0].details["folded_into"] == "b"
    assert "come from a (a output also feeds output)" in report.kept[0].reason
    assert rel_err(gm, model, x, double=True) < 1e-6


def test_a_concat_of_one_module_called_twice_folds_into_copies() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.cat([self.conv(x), self.conv(x * 2)], 1)) + self.conv(x)[:, :1]

    from bnfold.models.stats import randomize_bn_stats
    model = randomize_bn_stats(Twice()).eval()
    x = torch.randn(2, 3, 5, 5)
    gm, report = bnfold.fold(model, x)
    (entry,) = report.folded
    assert entry.details["copy_of"] == ["conv", "conv"] and entry.details["split"] == "concat"
    assert rel_err(gm, model, x, double=True) < 1e-6


def test_bit_views_stay_as_written_and_indexed_constants_fold() -> None:
    """A bit-level view of a parameter is not evaluated in float64 (it would reinterpret other
    bits): that product stays as written; an indexed parameter is a constant and folds."""
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bits = nn.Parameter(torch.rand(4, 1, 1) + 0.5)  # traced, not precomputed
            self.register_buffer("idx", torch.tensor([0, 1, 2, 3]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x) * self.bits.view(torch.int32).view(torch.float32)
            return self.conv2(y) * self.bits[self.idx]  # an indexed constant still folds

    model = Odd().eval()
    x = torch.randn(2, 3, 4, 4)
    gm, report = bnfold.fold(model, x)
    assert [e.into for e in report.folded] == ["conv2"]
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_rank_dispatched_model_exports_its_folded_branch(tmp_path) -> None:
    """torch.onnx sees a static rank: the export holds the folded Gemms and no BN."""
    import onnx
    import onnxruntime as ort

    model = zoo.get("mlp_bn1d")
    gm, report = bnfold.fold(model)
    assert all("rank_dispatch" in e.details for e in report.folded)
    x = zoo.example_input("mlp_bn1d")
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(gm, (x,), dynamo=True, optimize=False).save(str(path))
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model.double()(x.double())
    assert float((torch.from_numpy(out).double() - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("passthrough", [False, True])
def test_a_frozen_bn_after_a_concat(passthrough: bool) -> None:
    """An affine chain splits over a concat of layers like a BN; a slice of it over an input
    that is not a layer is not written (kept whole, with the reason)."""
    class CatFrozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 5, 3, padding=1)
            self.b = nn.Conv2d(3, 3, 1)
            self.bn = reach.FrozenBatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.cat([self.a(x), x if passthrough else self.b(x)], 1))

    model = reach.randomize_frozen_stats(CatFrozen()).eval()
    x = torch.randn(2, 3, 6, 6)
    gm, report = bnfold.fold(model, x)
    (entry,) = report.entries
    if passthrough:
        assert entry.action == "kept" and "slice of this affine chain" in entry.reason
    else:
        assert (entry.action, entry.into, entry.details["kind"]) == ("folded", "a, b",
                                                                     "affine mul+add")
    assert rel_err(gm, model, x, double=True) < 1e-6


class _FlattenHead(nn.Module):
    """``conv -> relu -> BN -> flatten -> [dropout] -> Linear``: a BN only a backward fold
    through the flatten reaches (a VGG-style head)."""

    def __init__(self, flatten, dropout: bool = False, bn1d: bool = False) -> None:
        super().__init__()
        self.flatten, self.bn1d = flatten, bn1d
        self.c = nn.Conv1d(3, 4, 3) if bn1d else nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4) if bn1d else nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2) if dropout else nn.Identity()
        self.fc = nn.Linear(4 * (4 if bn1d else 16), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.flatten(self.bn(torch.relu(self.c(x))))))


_FLATTENS = {"torch.flatten": lambda t: torch.flatten(t, 1), "method": lambda t: t.flatten(1),
             "nn.Flatten": nn.Flatten(), "flatten(1, -1)": lambda t: t.flatten(1, -1)}


@pytest.mark.parametrize("flatten", list(_FLATTENS))
@pytest.mark.parametrize(("dropout", "bn1d"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shapes", [True, False])
def test_bn_before_a_flatten_folds_backward_into_the_linear(flatten: str, dropout: bool,
                                                          bn1d: bool, shapes: bool) -> None:
    torch.manual_seed(0)
    model = _prepared(_FlattenHead(_FLATTENS[flatten], dropout, bn1d))
    x = torch.randn(3, 3, 6) if bn1d else torch.randn(3, 3, 6, 6)
    gm, report = bnfold.fold(model, x if shapes else None)
    (entry,) = report.entries
    assert (entry.action, entry.into, entry.details["direction"]) == ("folded", "fc", "backward")
    assert entry.details["through"] and not bn_nodes(gm)
    assert rel_err(gm, model, torch.randn_like(x), double=False) < 1e-5


@pytest.mark.parametrize(("flatten", "features"), [
    (lambda t: torch.flatten(t, 2).sum(2), 4),  # keeps the spatial axes apart, then sums
    (lambda t: torch.flatten(t, 0, 1).reshape(3, -1), 64),  # flattens the batch axis in
])
def test_a_flatten_of_other_axes_keeps_the_bn(flatten, features: int) -> None:
    model = _FlattenHead(flatten)
    model.fc = nn.Linear(features, 5)
    _, report = bnfold.fold(_prepared(model), torch.randn(3, 3, 6, 6))
    assert [e.action for e in report.entries] == ["kept"]


@pytest.mark.parametrize("export", ["TorchScript", "dynamo"])
@pytest.mark.parametrize(("dropout", "bn1d"), [(True, False), (False, True)])
def test_the_onnx_fold_of_a_flatten_head_folds_what_fx_folds(export: str, dropout: bool,
                                                            bn1d: bool) -> None:
    from test_onnx_reach import dynamo_export, torchscript_export

    torch.manual_seed(0)
    model = _prepared(_FlattenHead(_FLATTENS["torch.flatten"], dropout, bn1d))
    x = torch.randn(3, 3, 6) if bn1d else torch.randn(3, 3, 6, 6)
    proto = (torchscript_export if export == "TorchScript" else dynamo_export)(model, x)
    out, report = bnfold.fold_onnx(proto)
    assert [e.action for e in report.entries] == ["folded"]
    feed = onnx_cases.feeds(proto)
    assert onnx_cases.rel_err(onnx_cases.run_ort(out, feed),
                              onnx_cases.reference(proto, feed)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Instance norms that track running statistics: a BN in eval.
# ---------------------------------------------------------------------------------------------

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_INSTANCE_NORMS = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class _ConvInstanceNorm(nn.Module):
    def __init__(self, spatial: int, affine: bool, track: bool = True) -> None:
        super().__init__()
        self.conv = _CONVS[spatial](3, 5, 3)
        self.norm = _INSTANCE_NORMS[spatial](5, affine=affine, track_running_stats=track)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


def _tracking(spatial: int, affine: bool) -> nn.Module:
    torch.manual_seed(spatial)
    model = _ConvInstanceNorm(spatial, affine)
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.2, 3.0)
        if affine:
            model.norm.weight.normal_()
            model.norm.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("shapes", [True, False], ids=["example_inputs", "no_shapes"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_an_instance_norm_with_running_statistics_folds_in_eval(spatial: int, affine: bool,
                                                                 shapes: bool) -> None:
    model = _tracking(spatial, affine)
    x = torch.randn(2, 3, *[7] * spatial)
    gm, report = bnfold.fold(model, x) if shapes else bnfold.fold(model)
    assert [(e.bn, e.action, e.into) for e in report.entries] == [("norm", "folded", "conv")]
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in gm.modules())
    fresh = torch.randn(4, 3, *[9] * spatial)
    assert rel_err(gm, model, fresh, double=True) < 1e-6
    assert rel_err(gm, model, fresh, double=False) < 1e-5
    if not shapes:  # rank-dispatched: an unbatched call normalizes the channels too
        assert rel_err(gm, model, fresh[0], double=True) < 1e-6


def test_instance_norms_that_normalize_each_sample_are_reported_or_not_bn_like() -> None:
    training = _tracking(2, True).train()
    _, report = bnfold.fold(training)
    assert [e.action for e in report.entries] == ["kept"]
    assert "InstanceNorm2d is in training mode" in report.entries[0].reason
    _, report = bnfold.fold(_ConvInstanceNorm(2, True, track=False).eval())
    assert report.entries == []  # (normalizes each sample: nothing BN-like)


class _FunctionalInstanceNorm(nn.Module):
    def __init__(self, call: str, use_input_stats: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 5, 3)
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.2)
        self.weight, self.bias = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
        self.call, self.use_input_stats = call, use_input_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.call == "F.instance_norm":
            y = nn.functional.instance_norm(y, self.mean, self.var, self.weight, self.bias,
                                            use_input_stats=self.use_input_stats)
        else:
            y = torch.instance_norm(y, self.weight, self.bias, self.mean, self.var,
                                    self.use_input_stats, 0.1, 1e-5, False)
        return torch.relu(y)


@pytest.mark.parametrize("call", ["F.instance_norm", "torch.instance_norm"])
def test_a_functional_instance_norm_on_running_statistics_folds(call: str) -> None:
    model = _FunctionalInstanceNorm(call, use_input_stats=False).eval()
    x = torch.randn(2, 3, 8, 8)
    gm, report = bnfold.fold(model, x)
    assert [(e.action, e.into) for e in report.entries] == [("folded", "conv")]
    assert rel_err(gm, model, torch.randn(3, 3, 9, 9), double=True) < 1e-6
    kept = _FunctionalInstanceNorm(call, use_input_stats=True).eval()
    _, report = bnfold.fold(kept, x)
    assert [e.action for e in report.entries] == ["kept"]
    assert "normalizes with each sample's statistics" in report.entries[0].reason


def test_a_program_of_an_instance_norm_with_running_statistics_folds() -> None:
    model = _tracking(2, True)
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    folded, report = bnfold.fold(program, (x,))
    assert [e.action for e in report.entries] == ["folded"]
    assert rel_err(folded.module(), model, torch.randn(2, 3, 8, 8), double=False) < 1e-5


class _MixedAxesAffine(nn.Module):
    """A conv, then a constant product and sum along two different axes (channels, width)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.kind, self.conv = kind, nn.Conv2d(4, 6, 3, padding=1)
        self.register_buffer("along_w", torch.randn(1, 1, 1, 6))
        self.register_buffer("along_c", torch.randn(6, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.kind == "channels then width":
            return y * self.along_c + self.along_w
        return y * self.along_w + self.along_c


@pytest.mark.parametrize("kind", ["channels then width", "width then channels"])
def test_an_affine_chain_along_two_axes_is_one_chain_per_axis(kind: str) -> None:
    """Each part is reported (before, the chain had no entry at all); the per-channel product
    straight after the conv folds."""
    model = _MixedAxesAffine(kind).eval()
    gm, report = bnfold.fold(model, torch.randn(2, 4, 6, 6))
    actions = [(e.bn.split(" ")[0], e.action) for e in report.entries]
    assert actions == ([("mul", "folded"), ("add", "kept")] if kind.startswith("channels")
                       else [("mul", "kept"), ("add", "kept")])
    if kind.startswith("channels"):  # (read off the graph the mul's fold left, not before it)
        assert "dim 3" in report.entries[1].reason, report.entries[1].reason
    assert rel_err(gm, model, torch.randn(3, 4, 6, 6), double=True) < 1e-6


class _Chomped(nn.Module):
    """A TCN block: a causally padded conv, its tail chomped (``x[:, :, :-p]``), BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 6, 3, padding=2), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)[:, :, :-2]))


def test_a_program_with_a_dynamic_batch_folds_through_a_chomp() -> None:
    """torch.export writes ``[:, :, :-2]`` on a dynamic batch as a slice of the whole batch
    dim (end 2**63 - 1), then the chomp: a plain copy, which the BN now folds through (it was
    kept: "works along the BN's channel axis")."""
    torch.manual_seed(5)
    model = randomize_bn_stats(_Chomped(), seed=5).eval()
    x = torch.randn(2, 4, 20)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    folded, report = bnfold.fold(program, x)
    assert [e.action for e in report.entries] == ["folded"], report.table()
    assert rel_err(folded.module(), model, torch.randn(5, 4, 20), double=True) < 1e-6


class _InPlaceSum(nn.Module):
    """timm's ``y += branch``, which torch.export writes as ``aten.add_``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y += self.b(x)
        return torch.relu(self.bn(y))


def test_a_bn_after_an_in_place_sum_of_a_program_splits() -> None:
    torch.manual_seed(6)
    model = randomize_bn_stats(_InPlaceSum(), seed=6).eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    assert any(n.target is torch.ops.aten.add_.Tensor for n in program.graph.nodes)
    folded, report = bnfold.fold(program, x)
    assert [e.action for e in report.entries] == ["folded"], report.table()
    assert rel_err(folded.module(), model, torch.randn(2, 3, 8, 8), double=True) < 1e-6


# ---------------------------------------------------------------------------------------------
# In-place affine chains: x.mul_(scale).add_(shift).
# ---------------------------------------------------------------------------------------------


class _InplaceFrozenBN(nn.Module):
    """A FrozenBatchNorm2d written in place, ``x.mul_(scale).add_(shift)`` (non-trivial
    statistics)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(n)
        for key in ("weight", "bias", "running_mean"):
            self.register_buffer(key, torch.randn(n, generator=g))
        self.register_buffer("running_var", torch.rand(n, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x.mul_(scale.reshape(1, -1, 1, 1)).add_(shift.reshape(1, -1, 1, 1))


class _InplaceAround(nn.Module):
    """The in-place FrozenBN after a conv (``after``), after a conv whose output is read again
    (``also_read``: directly; ``view_read``: the write goes through a view of it;
    ``identity_read``: through an ``nn.Identity``, which returns its input itself), before a
    conv (``before``, on a ReLU's output) or on the graph input (``input``)."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.conv = nn.Conv2d(3, 4, 3)
        self.idn = nn.Identity()
        self.frozen = _InplaceFrozenBN(3 if where in ("before", "input") else 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "before":
            return self.conv(self.frozen(torch.relu(x)))
        if self.where == "input":
            return self.conv(self.frozen(x))
        y = self.conv(x)
        if self.where == "after":
            return self.frozen(y)
        z = self.frozen(y if self.where == "also_read" else self.idn(y)
                        if self.where == "identity_read" else y[:, :])
        return z + y


@pytest.mark.parametrize(("where", "exported", "reason"), [
    ("after", False, None), ("after", True, None),
    ("before", False, "writes in place into relu, which is no conv/linear output"),
    ("before", True, None),  # (aten.relu returns a new tensor)
    ("identity_read", False, "writes in place into idn, which is no conv/linear output"),
    ("identity_read", True, None),  # (export drops the Identity and reads add_ twice)
    ("also_read", False, "writes in place into conv, which add also read"),
    ("also_read", True, None),  # (torch.export reads add_ twice: the write is seen)
    ("view_read", False, "writes in place into conv, which add also read"),
    ("view_read", True, "writes in place into conv2d, which add_1 also read"),
    ("input", False, "writes in place into x (a graph input)"),
    ("input", True, "writes in place into x (a graph input)"),
])
def test_an_inplace_affine_folds_or_is_kept_with_the_reason(where: str, exported: bool,
                                                             reason: str | None) -> None:
    """``x.mul_(a).add_(b)`` (``aten.mul_``/``aten.add_`` in a program) is ``x * a + b`` when
    nothing else sees the write: it folds like the out-of-place chain. When the written tensor
    (or the one it is a view of) has another reader, or is the graph input, it is kept with
    the reason."""
    model = _InplaceAround(where).eval()
    x = torch.randn(2, 3, 8, 8)
    if exported:
        folded, report = bnfold.fold(torch.export.export(model, (x.clone(),)))
        run = folded.module()
    else:
        run, report = bnfold.fold(model, x.clone())
    assert [(e.bn, e.action) for e in report.entries] == [
        ("frozen (mul_)", "kept" if reason else "folded")]
    assert reason is None or reason in report.entries[0].reason
    if not reason:
        assert report.entries[0].details["kind"] == "affine mul+add"
    fresh = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = copy.deepcopy(model).double()(fresh.double())
        got = run(fresh.clone()).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-6


# ---------------------------------------------------------------------------------------------
# Reach through per-channel ops: splits over resampled / pooled summands, spatial means,
# flips (every fold against the float64 unfolded model on fresh inputs).
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _random_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    """running_mean ~ N(0, 1), running_var ~ U(0.2, 3), weight and bias ~ N(0, 1); eval."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 2.8 + 0.2)
            m.weight.copy_(torch.randn(c, generator=gen))
            m.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()


def _fold_both(model: nn.Module, x: torch.Tensor) -> list:
    """Fold ``model`` in plain FX and as a torch.export program; each folded model is checked
    against the float64 unfolded model on a fresh input. Returns both reports."""
    reports = []
    fresh = torch.randn_like(x)
    gm, report = bnfold.fold(model, example_inputs=(x,))
    assert rel_err(gm, model, fresh, double=True) < 1e-6
    reports.append(report)
    program, report = bnfold.fold(torch.export.export(model.eval(), (x,)))
    assert rel_err(program.module(), model, fresh, double=True) < 1e-6
    return [*reports, report]


class _Neck(nn.Module):
    """FPN / HRNet necks: ``BN(lat(x) + up(top(x)))`` and ``BN(cat([a(x), pool(b(x))]))``."""

    def __init__(self, up, pool) -> None:
        super().__init__()
        self.lat, self.top = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1, stride=2)
        self.a, self.b = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 3, 3, padding=1)
        self.bn, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(5)
        self.up, self.pool = up, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.bn(self.lat(x) + self.up(self.top(x)))
        c = self.bn2(torch.cat([self.a(x), self.pool(self.b(x))], 1))
        return s.sum(1, keepdim=True) + c


_UPS = {"interpolate": lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest"),
        "bilinear": lambda t: F.interpolate(t, size=(8, 8), mode="bilinear"),
        "nn.Upsample": nn.Upsample(scale_factor=2)}
_POOLS = {"avg_pool2d": lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False),
          "adaptive": lambda t: F.interpolate(F.adaptive_avg_pool2d(t, 4), scale_factor=2.0),
          "nn.AvgPool2d": nn.AvgPool2d(3, 1, 1, count_include_pad=False),
          "flip": lambda t: torch.flip(t, (2, 3))}


@pytest.mark.parametrize("up", list(_UPS))
@pytest.mark.parametrize("pool", list(_POOLS))
def test_a_split_looks_through_resamples_and_pools_to_its_layers(up: str, pool: str) -> None:
    model = _random_bns(_Neck(_UPS[up], _POOLS[pool]))
    for report in _fold_both(model, torch.randn(2, 4, 8, 8)):
        assert not report.kept, report.table()
        assert [e.details.get("split") for e in report.entries] == ["add", "concat"]


def test_a_split_names_the_op_past_the_resample_that_keeps_it() -> None:
    model = _random_bns(_Neck(lambda t: F.interpolate(torch.relu(t), scale_factor=2.0),
                              lambda t: F.avg_pool2d(torch.relu(t), 3, 1, 1)))
    for report in _fold_both(model, torch.randn(2, 4, 8, 8)):
        kept = {e.bn.split(" ")[0]: e.reason for e in report.kept}
        assert "relu is not a conv/linear (before " in kept["bn"], report.table()
        assert "relu_1 is not a conv/linear (before avg_pool2d)" in kept["bn2"], report.table()


class _Means(nn.Module):
    """conv -> mean over spatial dims -> BN (1d or 2d), and BN -> mean -> Linear."""

    def __init__(self, mean, bn1d: bool, after) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(6) if bn1d else nn.BatchNorm2d(6)
        self.bn2, self.fc = nn.BatchNorm2d(3), nn.Linear(3, 4)
        self.mean, self.after = mean, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn1(self.mean(self.conv(x))).flatten(1)
        b = self.fc(self.after(self.bn2(torch.relu(x))))
        return a[:, :4] + b


_MEANS = {"method": (lambda t: t.mean((2, 3)), True),
          "keepdim": (lambda t: t.mean((2, 3), keepdim=True), False),
          "torch.mean": (lambda t: torch.mean(t, dim=[-1, -2]), True),
          "positional": (lambda t: t.mean([3, 2], True), False)}


@pytest.mark.parametrize("mean", list(_MEANS))
def test_a_mean_over_spatial_dims_is_looked_through_both_ways(mean: str) -> None:
    fn, bn1d = _MEANS[mean]
    model = _random_bns(_Means(fn, bn1d, _MEANS["torch.mean" if bn1d else "method"][0]))
    for report in _fold_both(model, torch.randn(2, 3, 6, 6)):
        assert not report.kept, report.table()
        assert [e.details["direction"] for e in report.entries] == ["forward", "backward"]


def test_a_mean_over_the_channel_axis_keeps_the_bn() -> None:
    model = _random_bns(_Means(lambda t: t.mean((1, 2)), True, lambda t: t.mean((2, 3))))
    for report in _fold_both(model, torch.randn(2, 3, 6, 6)):
        assert [e.action for e in report.entries] == ["kept", "folded"], report.table()
        assert "(mean) works along the layer's feature axis" in report.entries[0].reason


def test_a_mean_that_casts_keeps_the_bn() -> None:
    model = _random_bns(_Means(lambda t: t.mean((2, 3), keepdim=True, dtype=torch.float32),
                               False, lambda t: t.mean((2, 3))))
    x = torch.randn(2, 3, 6, 6)
    for folded in (bnfold.fold(model, example_inputs=(x,))[1],
                   bnfold.fold(torch.export.export(model, (x,)))[1]):
        assert [e.action for e in folded.entries] == ["kept", "folded"], folded.table()
        assert "computes in torch.float32" in folded.entries[0].reason


def test_a_flip_of_the_channel_axis_keeps_the_bn() -> None:
    model = _random_bns(nn.Sequential(nn.Conv2d(3, 4, 1), _Lambda(lambda t: t.flip(1)),
                                      nn.BatchNorm2d(4)))
    _, report = bnfold.fold(model, example_inputs=(torch.randn(2, 3, 5, 5),))
    assert "works along the layer's feature axis" in report.kept[0].reason


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _UnknownReaders(nn.Module):
    """BNs after a gelu (no forward fold) whose readers the backward fold does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.bn2, self.conv = nn.BatchNorm2d(8), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.gelu(x)
        a = self.fc(self.bn(y).permute(0, 2, 3, 1))
        return a, self.conv(F.pixel_unshuffle(self.bn2(y), 2))


def test_a_kept_bn_says_why_each_direction_failed() -> None:
    model = _random_bns(_UnknownReaders())
    for report in _fold_both(model, torch.randn(2, 8, 4, 4)):
        for entry, op in zip(report.entries, ("permute", "pixel_unshuffle"), strict=True):
            forward, _, backward = entry.reason.partition("; backward fold: ")
            assert "gelu" in forward and "not from a conv/linear" in forward, entry.reason
            assert backward.startswith(f"its output feeds {op}"), entry.reason
            assert backward.endswith("not a conv/linear"), entry.reason


class _BackwardThrough(nn.Module):
    """BN -> keepdim mean -> 1x1 conv, BN -> flip of W -> unpadded conv (backward folds)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.c = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)
        self.bn2, self.c2 = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(x)
        return self.c(self.bn(y).mean((2, 3), keepdim=True)), self.c2(torch.flip(self.bn2(y), (3,)))


def test_a_keepdim_mean_and_a_flip_pass_a_bn_backward_into_convs() -> None:
    model = _random_bns(_BackwardThrough())
    for report in _fold_both(model, torch.randn(2, 3, 6, 6)):
        assert not report.kept, report.table()
        assert [e.into.split(" ")[0] for e in report.folded] == ["c", "c2"]
        assert {e.details["direction"] for e in report.folded} == {"backward"}


class _BroadcastSum(nn.Module):
    """``BN1d(conv1d(x) + z)`` with ``z`` of rank 2 (``Linear``, or a conv's spatial mean):
    broadcasting lines ``z`` up as ``(1, C, L)``, so its channels sit on the sum's dim 2, not
    on the BN's dim 1."""

    def __init__(self, via_mean: bool) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.via_mean = via_mean
        self.a = nn.Conv1d(3, 6, 3)
        self.b = nn.Conv2d(3, 6, 3) if via_mean else nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        z = self.b(x2).mean((2, 3)) if self.via_mean else self.b(x2)
        return self.bn(self.a(x) + z)


@pytest.mark.parametrize("via_mean", [False, True])
@pytest.mark.parametrize("exported", [False, True])
def test_a_summand_of_another_rank_keeps_the_bn(via_mean: bool, exported: bool) -> None:
    model = randomize_bn_stats(_BroadcastSum(via_mean)).eval()
    xs = (torch.randn(4, 3, 8), torch.randn(6, 3, 8, 8) if via_mean else torch.randn(6, 5))
    if exported:
        folded, report = bnfold.fold(torch.export.export(model, xs))
        run = folded.module()
    else:
        run, report = bnfold.fold(model, xs)
    (entry,) = report.entries
    assert entry.action == "kept" and "has rank 2 and the sum rank 3: broadcast" in entry.reason
    fresh = (torch.randn(4, 3, 8), torch.randn(6, 3, 8, 8) if via_mean else torch.randn(6, 5))
    with torch.no_grad():
        want = copy.deepcopy(model).double()(*(t.double() for t in fresh))
        got = run(*fresh).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-6
