"""The FX fold pass case by case, each against a float64 evaluation of the unfolded model."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

import bnfold
from bnfold.errors import BadInputError, UnsupportedError, UntraceableError
from bnfold.models import zoo
from bnfold.models.stats import randomize_bn_stats
from bnfold.modules import FeatureBatchNorm
from bnfold.passes.fx.ranks import possible_ranks


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return randomize_bn_stats(model, seed).eval()


def rel_err(candidate: nn.Module, reference: nn.Module, *xs: torch.Tensor) -> float:
    """Both models in float64 on ``xs``: max abs difference relative to the reference."""
    with torch.no_grad():
        ref = copy.deepcopy(reference).double()(*(x.double() for x in xs))
        out = copy.deepcopy(candidate).double()(*(x.double() for x in xs))
    return float((out - ref).abs().max() / ref.abs().max())


def fold_checked(model: nn.Module, x: torch.Tensor, *, shapes: bool = True, left: int = 0):
    """Fold, check exactness on a fresh input and the count of kept BNs; return the result."""
    gm, report = bnfold.fold(model, x if shapes else None)
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(99))
    assert rel_err(gm, model, fresh) < 1e-6, report
    assert len(report.kept) == left, report
    return gm, report


def entry(report: bnfold.Report, bn: str) -> bnfold.Entry:
    (found,) = [e for e in report.entries if e.bn == bn]
    return found


# ---------------------------------------------------------------------------------------------
# Sharing: module reuse, shared weights, multi-use outputs (and what torch's fuse does).
# ---------------------------------------------------------------------------------------------

class Reuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_b(self.conv(torch.relu(self.bn_a(self.conv(x)))))


class SharedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(4, 4, 1)
        self.right = nn.Conv2d(4, 4, 1, bias=False)
        self.right.weight = self.left.weight
        self.bn_l = nn.BatchNorm2d(4)
        self.bn_r = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_l(self.left(x)) + self.bn_r(self.right(x))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.bn(y) + y


X4 = torch.randn(2, 4, 6, 6)


def test_module_reuse_folds_into_a_copy_per_call() -> None:
    model = prepared(Reuse())
    gm, report = fold_checked(model, X4)
    a, b = entry(report, "bn_a"), entry(report, "bn_b")
    assert {a.into, b.into} == {"conv", "conv_bn_a"}
    assert a.details["copy_of"] == "conv"
    assert gm.conv_bn_a.weight is not gm.conv.weight


def test_torch_fuse_is_wrong_on_module_reuse() -> None:
    model = prepared(Reuse())
    assert rel_err(fuse(copy.deepcopy(model)), model, X4) > 0.1  # folds conv twice


def test_shared_weight_gets_one_folded_weight_per_layer() -> None:
    model = prepared(SharedWeight())
    gm, report = fold_checked(model, X4)
    assert [e.into for e in report.folded] == ["left", "right"]
    assert report.folded[0].details["untied_shared_weight"]
    assert gm.left.weight is not gm.right.weight
    assert model.left.weight is model.right.weight  # the input keeps its tie
    assert rel_err(fuse(copy.deepcopy(model)), model, X4) < 1e-6  # torch's fuse copies too


def test_layer_output_with_another_user_is_kept() -> None:
    model = prepared(Residual())
    _gm, report = fold_checked(model, torch.randn(5, 6), left=1)
    assert report.kept[0].reason == "fc output also feeds add; backward fold: its output " \
        "feeds add (add), not a conv/linear"
    assert rel_err(fuse(copy.deepcopy(model)), model, torch.randn(5, 6)) < 1e-6  # fuse skips it


# ---------------------------------------------------------------------------------------------
# Channel axis of Linear on [N, L, C].
# ---------------------------------------------------------------------------------------------

def test_linear_on_sequence_wrong_axis_is_kept_right_axis_folds() -> None:
    model = zoo.get("linear_seq_wrong_axis")
    x = zoo.example_input("linear_seq_wrong_axis")
    _gm, report = fold_checked(model, x, left=1)
    wrong = entry(report, "bn_wrong")
    assert wrong.action == "kept"
    assert "normalizes dim 1 of its input [2, 8, 8] but fc's channels are on dim 2" in wrong.reason
    right = entry(report, "bn_right")
    assert (right.action, right.into, right.details["through"]) == ("folded", "fc2", ["transpose"])
    # torch's fuse folds bn_wrong into fc although it normalizes L, not fc's features
    assert rel_err(fuse(copy.deepcopy(model)), model, x) > 0.1


def test_linear_on_sequence_without_shapes_is_refused_by_the_graph_ranks() -> None:
    """fc2's output goes through transpose(1, 2) (rank >= 3), so bn_wrong's input has rank 3:
    the graph alone proves that bn_wrong normalizes the sequence axis."""
    model = zoo.get("linear_seq_wrong_axis")
    _gm, report = fold_checked(model, zoo.example_input("linear_seq_wrong_axis"), shapes=False,
                              left=1)
    assert entry(report, "bn_wrong").reason.startswith(
        "the BN normalizes dim 1 of its input but fc's channels are on dim 2 (the graph allows "
        "only rank 3 there)")
    right = entry(report, "bn_right")
    assert right.action == "folded" and "rank_dispatch" not in right.details


def test_linear_bn1d_without_inputs_folds_with_a_rank_dispatch() -> None:
    """Linear -> BatchNorm1d with nothing fixing the rank: exact at rank 2, where BN1d
    normalizes the features; at rank 3 it normalizes dim 1. Folded at rank 2 and dispatched
    on the rank, so a rank-3 input (which the original normalizes over L when L == C) runs
    the original Linear and BN, with the original's result."""
    model = prepared(nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)))  # BN is the output
    gm, report = fold_checked(model, torch.randn(5, 16), shapes=False)
    assert report.folded[0].details["rank_dispatch"] == [2]
    assert "original layer and BN at any other" in report.notes[0]
    seq = torch.randn(2, 8, 16)  # L == C == 8: the original runs, normalizing L
    assert rel_err(gm, model, seq) < 1e-6
    gm2, report2 = bnfold.fold(gm)  # folding again changes nothing
    assert gm2.code == gm.code and not report2.entries


@pytest.mark.parametrize(("name", "guards"), [
    ("mlp_bn1d", {"net.1": [2], "net.4": [2]}),
    ("conv1d_net", {"b1": [3], "b2": [3], "b3": [3]}),
    ("levit_block", {"bn1": [3]}),  # flatten(0, 1) -> BN1d: rank 3 before the flatten
    ("bn_before_conv", {}),  # flatten(x, 1) fixes rank 2 for BN1d -> Linear
    ("plain_cnn", {}),
])
def test_rank_guards_only_where_the_graph_leaves_the_rank_open(name: str, guards: dict) -> None:
    _gm, report = bnfold.fold(zoo.get(name))
    assert {e.bn: e.details["rank_dispatch"] for e in report.folded
            if "rank_dispatch" in e.details} == guards


def test_possible_ranks_carry_a_constraint_back_through_a_deep_graph() -> None:
    """A transpose after 100 Linear -> BN1d -> ReLU blocks proves rank 3 for every block, so
    every BN is kept (it normalizes L); one forward and one backward sweep find it."""
    blocks = [m for _ in range(100) for m in (nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())]

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*blocks)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).transpose(1, 2)

    _, report = bnfold.fold(prepared(Deep()))
    assert len(report.kept) == 100
    assert all("the graph allows only rank 3 there" in e.reason for e in report.kept)


def test_possible_ranks_read_off_the_graph() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> tuple:
            a = self.fc(x).transpose(1, 2)  # rank >= 3
            b = self.bn(torch.relu(self.fc(y) * 2.0))  # 2 or 3
            c = self.conv(z).view(z.size(0), -1)  # conv: 3 or 4; view: 2
            return a, b, c, torch.flatten(c, 1).unsqueeze(0)

    gm = fx.symbolic_trace(Net())
    ranks = {n.name: sorted(r) for n, r in possible_ranks(gm).items()}
    assert ranks["x"] == list(range(3, 65))
    assert ranks["y"] == ranks["fc_1"] == ranks["bn"] == [2, 3]
    assert ranks["z"] == [3, 4] and ranks["view"] == [2] and ranks["unsqueeze"] == [3]


class LeViTFlatten(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(5, c)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.bn(h.flatten(0, 1)).reshape_as(h)


def test_levit_flatten_folds_with_shapes() -> None:
    _, report = fold_checked(prepared(LeViTFlatten(7)), torch.randn(2, 3, 5))
    assert report.folded[0].details["through"] == ["flatten"]


def test_flatten_that_merges_the_feature_axis_is_refused() -> None:
    class Merge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x).flatten(1))

    _, report = fold_checked(prepared(Merge()), torch.randn(4, 2, 5), left=1)
    assert "merges or splits the layer's feature axis" in report.kept[0].reason


def test_feature_batchnorm_folds_without_shapes() -> None:
    model = prepared(nn.Sequential(nn.Linear(5, 6), FeatureBatchNorm(6)))
    fold_checked(model, torch.randn(2, 3, 5), shapes=False)


# ---------------------------------------------------------------------------------------------
# Layer kinds and parameter variants.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_conv_transpose(dim: int, bias: bool) -> None:
    convt = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dim - 1]
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dim - 1]
    model = prepared(nn.Sequential(
        convt(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1, bias=bias),
        bn(6),
    ))
    _, report = fold_checked(model, torch.randn(2, 4, *([4] * dim)))
    # (1-D: unbatched, a BatchNorm1d would normalize the length: exact at the example's rank)
    assert report.folded[0].details == {"direction": "forward", "layer": "conv_transpose",
                                        "kind": bn.__name__,
                                        **({"exact_at_rank": 3} if dim == 1 else {})}


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_grouped_and_depthwise_conv(dim: int) -> None:
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim - 1]
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dim - 1]
    model = prepared(nn.Sequential(conv(4, 8, 3, groups=2, dilation=2, stride=2), bn(8),
                                   conv(8, 8, 3, groups=8, padding=1, bias=False), bn(8)))
    fold_checked(model, torch.randn(2, 4, *([9] * dim)))


def test_bn_without_affine_and_layers_without_bias() -> None:
    model = prepared(nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.Flatten(),
        nn.Linear(64, 5, bias=False), nn.BatchNorm1d(5), nn.Linear(5, 2, bias=False),
        nn.BatchNorm1d(2, affine=False),
    ))
    gm, _ = fold_checked(model, torch.randn(3, 3, 6, 6))
    assert gm.get_submodule("0").bias is not None
    assert gm.get_submodule("3").bias is not None


def test_training_mode_bn_is_kept() -> None:
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model[1].train()
    gm, report = bnfold.fold(model, torch.randn(2, 3, 6, 6))
    assert report.kept[0].reason.startswith("BN is in training mode")
    assert torch.equal(model[1].num_batches_tracked, torch.tensor(0))  # shapes ran in eval
    kept = gm.get_submodule("1")
    assert kept.training and torch.equal(kept.num_batches_tracked, torch.tensor(0))
    assert torch.equal(kept.running_mean, model[1].running_mean)


def test_bn_without_running_stats_is_kept() -> None:
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), bn))
    _, report = bnfold.fold(model, torch.randn(2, 3, 6, 6))
    assert "track_running_stats=False" in report.kept[0].reason


def test_conv_subclass_folds_when_its_weight_is_computed_from_the_models_tensors() -> None:
    class StdConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
            return self._conv_forward(x, w, self.bias)

    model = prepared(nn.Sequential(StdConv(3, 4, 3), nn.BatchNorm2d(4)))
    _, report = fold_checked(model, torch.randn(2, 3, 6, 6), left=0)
    assert report.entries[0].details["materialized"] == ["weight (sub)"]


def test_conv_subclass_whose_weight_reads_the_input_is_kept() -> None:
    class InputScaledConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight * x.mean(), self.bias)

    model = prepared(nn.Sequential(InputScaledConv(3, 4, 3), nn.BatchNorm2d(4)))
    _, report = fold_checked(model, torch.randn(2, 3, 6, 6), left=1)
    assert report.kept[0].reason == "conv2d's weight is computed in the graph, not from the " \
        "model's tensors alone by ops bnfold evaluates; backward fold: its output is a graph " \
        "output"  # traced through forward


# ---------------------------------------------------------------------------------------------
# Functional forms.
# ---------------------------------------------------------------------------------------------

class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3, generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(6, generator=g))
        self.w2 = nn.Parameter(torch.randn(6, 6, 3, 3, generator=g) * 0.3)
        self.fw = nn.Parameter(torch.randn(4, 6, generator=g) * 0.3)
        for name, c in (("bn1", 6), ("bn2", 6), ("bn3", 4)):
            self.register_buffer(f"{name}_mean", torch.randn(c, generator=g))
            self.register_buffer(f"{name}_var", torch.rand(c, generator=g) + 0.5)
            self.register_parameter(f"{name}_g", nn.Parameter(torch.randn(c, generator=g)))
            self.register_parameter(f"{name}_b", nn.Parameter(torch.randn(c, generator=g)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, self.b, padding=1)
        y = F.batch_norm(y, self.bn1_mean, self.bn1_var, self.bn1_g, self.bn1_b, False, 0.1, 1e-3)
        z = F.conv2d(torch.relu(y), self.w2 * 2.0, None, 1, 1)  # computed from w2: folds
        z = F.batch_norm(z, self.bn2_mean, self.bn2_var, self.bn2_g, self.bn2_b, eps=1e-4)
        h = F.linear(z.mean((2, 3)), self.fw)
        return F.batch_norm(h, self.bn3_mean, self.bn3_var, self.bn3_g, self.bn3_b)


def test_functional_forms_fold_when_params_are_constants() -> None:
    model = Functional().eval()
    gm, report = fold_checked(model, torch.randn(2, 3, 5, 5), left=0)
    assert [e.action for e in report.entries] == ["folded"] * 3
    assert report.entries[1].details["materialized"] == ["weight (mul)"]
    assert not any(k.startswith(("bn1", "bn2", "bn3", "w2")) for k in gm.state_dict())


def test_functional_weight_shared_by_two_calls_folds_into_copies() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
            self.bn_a = nn.BatchNorm2d(4)
            self.bn_b = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn_a(F.conv2d(x, self.w)) * self.bn_b(F.conv2d(x, self.w))

    model = prepared(Twice())
    gm, report = fold_checked(model, X4)
    assert [e.action for e in report.entries] == ["folded", "folded"]
    assert report.entries[0].details["copy_of"] == "conv2d"
    assert {"w", "w_bn_a"} <= set(dict(gm.named_parameters()))  # bn_a got a copy of w


# ---------------------------------------------------------------------------------------------
# Backward fold: BN before the layer.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [
    nn.Conv2d(3, 4, 3),  # no padding
    nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular", groups=1, dilation=2),
    nn.ConvTranspose2d(3, 4, 3, padding=2),  # stride 1, padding = k - 1: every output sees all
])
def test_backward_fold_exact_cases(layer: nn.Module) -> None:
    model = prepared(nn.Sequential(nn.BatchNorm2d(3), layer))
    _, report = fold_checked(model, torch.randn(2, 3, 7, 7))
    assert report.folded[0].details["direction"] == "backward"


def test_backward_fold_into_linear() -> None:
    model = prepared(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3, bias=False)))
    fold_checked(model, torch.randn(4, 5))


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3, padding=1),
                                   nn.ConvTranspose2d(3, 4, 3, stride=2)])
def test_backward_fold_refused_where_not_exact(layer: nn.Module) -> None:
    model = prepared(nn.Sequential(nn.BatchNorm2d(3), layer))
    _, report = fold_checked(model, torch.randn(2, 3, 7, 7), left=1)
    assert "not exact" in report.kept[0].reason
    assert "BN before a" in report.kept[0].reason


# ---------------------------------------------------------------------------------------------
# Low precision: one correct rounding of the float64 fold.
# ---------------------------------------------------------------------------------------------

def ulp_of(exact: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Spacing of ``dtype`` at each exact value (in its binade, subnormals included)."""
    mant, emin = {torch.float16: (10, -14), torch.bfloat16: (7, -126)}[dtype]
    e = np.maximum(np.floor(np.log2(np.abs(exact) + 1e-300)), emin)
    return 2.0 ** (e - mant)


def ulp_error(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    g, x = got.detach().double().numpy(), exact.detach().numpy()
    return float((np.abs(g - x) / ulp_of(x, dtype)).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fold_is_correctly_rounded(dtype: torch.dtype) -> None:
    model = prepared(nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32))).to(dtype)
    gm, report = bnfold.fold(model)
    assert report.folded
    conv, bn = model[0], model[1]
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    t = bn.bias.double() - bn.running_mean.double() * s
    w_exact = conv.weight.double() * s.view(-1, 1, 1, 1)
    b_exact = conv.bias.double() * s + t
    folded = gm.get_submodule("0")
    assert folded.weight.dtype == dtype
    assert ulp_error(folded.weight, w_exact, dtype) <= 0.5
    assert ulp_error(folded.bias, b_exact, dtype) <= 0.5
    # torch's own fusion computes in the low precision dtype and misses by more than 1 ulp
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(copy.deepcopy(conv), copy.deepcopy(bn))
    assert ulp_error(fused.weight, w_exact, dtype) > 1.0


# ---------------------------------------------------------------------------------------------
# Tracing: fallback to torch.export, untraceable models, bad input, inplace.
# ---------------------------------------------------------------------------------------------

class ShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:  # symbolic_trace cannot branch on a traced shape
            x = x[..., :4]
        return self.bn(self.conv(x))


class ValueBranch(ShapeBranch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.bn(self.conv(x))


def test_shape_control_flow_falls_back_to_torch_export() -> None:
    model = prepared(ShapeBranch())
    _gm, report = fold_checked(model, torch.randn(2, 3, 6, 6))
    assert (report.folded[0].bn, report.folded[0].into) == ("bn (batch_norm)", "conv (conv2d)")
    assert "torch.export" in report.notes[0]


class ChunkList(nn.Module):
    """YOLOv8's C2f spelling: ``list(x.chunk(2, 1))`` (symbolic_trace cannot iterate)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(torch.relu(self.bn(self.conv(x))).chunk(2, 1))
        y.append(self.bn2(self.conv2(y[-1])))
        return torch.cat(y, 1)


def test_export_fallback_keeps_the_dims_the_model_leaves_free() -> None:
    """The torch.export fallback exports with ``Dim.AUTO``: the folded module takes other
    batch sizes and image sizes (it took only the example's), and the note says which input
    dims are fixed."""
    model = prepared(ChunkList())
    gm, report = fold_checked(model, torch.randn(2, 3, 8, 8))
    note = next(n for n in report.notes if "torch.export" in n)
    assert re.search(r"input shapes the result takes: x \[s\d+, 3, s\d+, s\d+\] \(traced "
                     r"for s\d+ >= 2, s\d+ >= 2, s\d+ >= 2\)", note), note
    for shape in [(5, 3, 8, 8), (1, 3, 13, 6)]:
        assert rel_err(gm, model, torch.randn(shape)) < 1e-6
    _, report = bnfold.fold(model, torch.randn(1, 3, 8, 8))  # torch fixes a dim of size 1
    assert "x [1, 3, s" in next(n for n in report.notes if "torch.export" in n)


def test_bns_inside_torch_cond_branches_are_reported_kept() -> None:
    class Cond(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.b, self.bn_b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda t: self.bn_a(self.a(t)),
                              lambda t: self.bn_b(self.b(t)), (x,))

    model = prepared(Cond())
    _gm, report = fold_checked(model, torch.randn(2, 3, 5, 5), left=2)
    assert [(e.bn, e.action) for e in report.entries] == [
        ("true_graph_0.batch_norm", "kept"), ("false_graph_0.batch_norm", "kept")]
    assert report.kept[0].reason == "inside true_graph_0, a subgraph that cond runs: bnfold " \
        "folds the top-level graph only"


def test_untraceable_model_names_the_line(capfd: pytest.CaptureFixture) -> None:
    model = prepared(ValueBranch())
    with pytest.raises(UntraceableError) as info:
        bnfold.fold(model)
    msg = str(info.value)
    assert "\n" not in msg
    assert "test_fx_fold.py" in msg and "`if x.sum() > 0:`" in msg
    assert "pass example_inputs" in msg
    capfd.readouterr()
    with pytest.raises(UntraceableError, match=r"torch\.export also failed"):
        bnfold.fold(model, torch.randn(2, 3, 6, 6))
    assert capfd.readouterr() == ("", "")  # torch.export's graph dumps are held back


def test_not_a_module_is_bad_input() -> None:
    with pytest.raises(BadInputError):
        bnfold.fold(lambda x: x)  # type: ignore[arg-type]


def test_inplace_rewrites_the_given_graph_module() -> None:
    gm = fx.symbolic_trace(prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    reference = copy.deepcopy(gm)
    out, report = bnfold.fold(gm, inplace=True)
    assert out is gm and report.folded
    assert rel_err(gm, reference, torch.randn(2, 3, 6, 6)) < 1e-6


def test_inplace_refuses_a_plain_module_and_leaves_it_untouched() -> None:
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BadInputError, match=r"inplace=True rewrites a torch\.fx\.GraphModule"):
        bnfold.fold(model, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_example_inputs_name_the_layer_in_one_line(capfd: pytest.CaptureFixture) -> None:
    # (Linear -> BatchNorm1d needs the rank, so the fold runs the model on the example inputs)
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 4),
                                   nn.BatchNorm1d(4)))
    with pytest.raises(BadInputError) as info:
        bnfold.fold(model, torch.randn(2, 5, 6, 6))
    assert str(info.value).startswith("example_inputs do not run through the model: at 0: "
                                      "Given groups=1, weight of size [4, 3, 3, 3]")
    assert "\n" not in str(info.value)
    assert "Traceback" not in capfd.readouterr().err  # nothing printed behind the error


# ---------------------------------------------------------------------------------------------
# Module variants users bring: SyncBN, lazy, momentum/eps, 'same' padding, padding modes,
# nested names, dict outputs, TorchScript and torch.compile.
# ---------------------------------------------------------------------------------------------

X3 = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("shapes", [True, False])
def test_sync_batchnorm_folds(shapes: bool) -> None:
    """SyncBatchNorm accepts any rank >= 2; after Conv2d (rank 3 or 4) it is exact at 4."""
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)))
    _, report = fold_checked(model, X3, shapes=shapes)
    assert report.folded[0].details.get("rank_dispatch", [4]) == [4]


@pytest.mark.parametrize("bn", [
    nn.BatchNorm2d(4, momentum=None), nn.BatchNorm2d(4, eps=0.0), nn.BatchNorm2d(4, eps=1e-12),
    nn.BatchNorm2d(4, eps=0.5), nn.BatchNorm2d(4, eps=10.0),
], ids=["momentum_none", "eps0", "eps1e-12", "eps0.5", "eps10"])
def test_bn_momentum_and_eps_variants(bn: nn.Module) -> None:
    fold_checked(prepared(nn.Sequential(nn.Conv2d(3, 4, 3), bn)), X3)


def test_lazy_modules_fold_once_materialized_and_are_refused_before() -> None:
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(BadInputError, match=r"^0 \(LazyConv2d\) has uninitialized lazy"):
        bnfold.fold(model.eval())
    model(X3)
    fold_checked(prepared(model), X3)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, "same"])
def test_padding_modes_forward_and_backward(mode: str, padding: int | str) -> None:
    """Forward folds ignore padding; BN before a padded conv folds unless it pads zeros."""
    fwd = prepared(nn.Sequential(nn.Conv2d(3, 4, 4 if padding == "same" else 3,
                                           padding=padding, padding_mode=mode),
                                 nn.BatchNorm2d(4)))
    fold_checked(fwd, X3)
    bwd = prepared(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 4 if padding == "same"
                                                                else 3, padding=padding,
                                                                padding_mode=mode)))
    _, report = fold_checked(bwd, X3, left=int(mode == "zeros"))
    if mode == "zeros":
        assert "BN before a zero-padded conv" in report.kept[0].reason


def test_same_padding_with_a_1x1_kernel_pads_nothing() -> None:
    fold_checked(prepared(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1, padding="same"))),
                 X3)


def test_nested_sequential_names_and_dict_outputs() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
            self.head = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            y = self.body(x)
            return {"features": y, "logits": self.head(y.mean((2, 3)))}

    model = prepared(Net())
    gm, report = bnfold.fold(model)
    assert [(e.bn, e.into) for e in report.folded] == [("body.0.1", "body.0.0"),
                                                        ("head.1", "head.0")]
    with torch.no_grad():
        out, ref = gm(X3.double().float()), copy.deepcopy(model).double()(X3.double())
    for key in ("features", "logits"):
        assert float((out[key].double() - ref[key]).abs().max() / ref[key].abs().max()) < 1e-5


def test_torchscript_is_refused_clearly() -> None:
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    for scripted in (torch.jit.script(model), torch.jit.trace(model, X3)):
        with pytest.raises(UnsupportedError, match="is a TorchScript module"):
            bnfold.fold(scripted, X3)


def test_torch_compiled_module_folds_its_original() -> None:
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    gm, report = fold_checked(torch.compile(model), X3, shapes=False)
    assert (report.folded[0].bn, report.folded[0].into) == ("1", "0")
    assert "torch.compile" in report.notes[0]
    assert rel_err(gm, model, X3) < 1e-6


def test_export_fallback_names_a_bn_without_running_stats() -> None:
    model = prepared(ShapeBranch())
    model.bn = nn.BatchNorm2d(4, track_running_stats=False).eval()
    _, report = bnfold.fold(model, torch.randn(2, 3, 6, 6))
    assert report.kept[0].bn == "bn (batch_norm)"
    assert report.kept[0].reason.startswith("BN has no running statistics "
                                            "(track_running_stats=False)")


def test_rank_dispatch_on_a_graph_input_with_two_inputs() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(5)
            self.fc = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(x)) + y

    model = prepared(Two())
    gm, report = bnfold.fold(model)
    assert report.folded[0].details == {"direction": "backward", "layer": "linear",
                                        "rank_dispatch": [2], "kind": "BatchNorm1d"}
    ops = [n.op for n in gm.graph.nodes]
    assert ops[:2] == ["placeholder", "placeholder"]
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    assert rel_err(gm, model, x, y) < 1e-6
    x3, y3 = torch.randn(4, 5, 5), torch.randn(4, 5, 3)  # rank 3: the original path
    assert rel_err(gm, model, x3, y3) < 1e-6


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_bn_with_negative_variance_is_kept_not_raised(direction: str) -> None:
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)] if direction == "forward" \
        else [nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)]
    model = prepared(nn.Sequential(*layers))
    bn = next(m for m in model if isinstance(m, nn.BatchNorm2d))
    bn.running_var[0] = -1.0
    gm, report = bnfold.fold(model, torch.randn(2, 3, 6, 6))
    assert [e.action for e in report.entries] == ["kept"]
    assert "not positive" in report.entries[0].reason
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(torch.isnan(gm(x)), torch.isnan(model(x)))


class _BNThenUpsample(nn.Module):
    """BN -> ConvTranspose2d called with ``output_size``: the output padding is chosen at call
    time, so the backward fold must not assume one."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.bn(x), output_size=[x.shape[2] * 2, x.shape[3] * 2])


def test_bn_before_conv_transpose_with_call_time_output_size_stays_exact() -> None:
    model = prepared(_BNThenUpsample(stride=2))
    x = torch.randn(2, 4, 6, 6)
    _, report = fold_checked(model, x, left=1)
    assert entry(report, "bn").action == "kept"


_DIFFERENCES = {"a - b": lambda a, b, c: a - b, "(a - b) + c": lambda a, b, c: (a - b) + c,
                "a - (b + c)": lambda a, b, c: a - (b + c),
                "c + (a - b)": lambda a, b, c: c + (a - b)}


@pytest.mark.parametrize("expression", list(_DIFFERENCES))
def test_a_bn_after_a_difference_of_layers_splits(expression: str) -> None:
    """``s*(a - b) + t = (s*a + t) - s*b``: every layer scaled, the shift into the leftmost
    summand, which no subtraction negates; also in a torch.export program (aten.sub)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(3, 4, 3, padding=1) for _ in range(3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(_DIFFERENCES[expression](self.a(x), self.b(x), self.c(x)))

    model = prepared(Net())
    x = torch.randn(2, 3, 6, 6)
    for source in (model, torch.export.export(model, (x,))):
        folded, report = bnfold.fold(source, x)
        (entry,) = report.entries
        assert entry.action == "folded", entry.reason
        gm = folded.module() if source is not model else folded
        assert rel_err(gm, model, torch.randn(2, 3, 6, 6)) < 1e-6


def test_a_kept_reason_says_what_the_bn_input_comes_from() -> None:
    """The node name alone (``_1`` for a Sequential's second module) says little."""
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.BatchNorm2d(4)))
    _, report = fold_checked(model, torch.randn(1, 3, 6, 6), left=1)
    assert report.kept[0].reason.startswith(
        "its input comes from _1 (a GELU module), not from a conv/linear")
