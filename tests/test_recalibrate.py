"""bnfold.recalibrate: exact pooled statistics (against numpy float64 over all the data), only BN
layers in train mode, modes restored, undo, preserve_function to fp32 rounding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import BadInputError
from bnfold.models import plain
from bnfold.modules import FeatureBatchNorm

SIZES = (7, 16, 3, 11)  # unequal batches: an average of per-batch variances would differ


def _batches(shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=gen) * 2 + 0.7 for n in SIZES]


def _assert_pooled(bn: nn.Module, values: np.ndarray) -> None:
    """running_mean/var equal numpy's pooled mean / unbiased var, rounded to float32."""
    mean = values.mean(0)
    var = values.var(0, ddof=1)
    np.testing.assert_array_max_ulp(bn.running_mean.numpy(), mean.astype(np.float32), 1)
    np.testing.assert_array_max_ulp(bn.running_var.numpy(), var.astype(np.float32), 1)


def test_conv_bn_pooled_over_all_samples_and_positions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 2, 1))
    batches = _batches((3, 6, 6))
    handle = bnfold.recalibrate(model, batches, progress=False)
    with torch.no_grad():
        conv_out = [model[0](b).double().numpy() for b in batches]
    values = np.concatenate([np.moveaxis(o, 1, -1).reshape(-1, 5) for o in conv_out])
    _assert_pooled(model[1], values)
    assert handle.values == {"1": values.shape[0]} and handle.num_batches == len(SIZES)
    assert model[1].num_batches_tracked.item() == len(SIZES)
    # The test can fail: the mean of per-batch variances is measurably different.
    per_batch = np.mean([np.moveaxis(o, 1, -1).reshape(-1, 5).var(0, ddof=1) for o in conv_out],
                        axis=0)
    assert np.abs(per_batch - values.var(0, ddof=1)).max() > 1e-3


def test_first_layer_bn_against_concatenated_data() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    batches = _batches((4,))
    bnfold.recalibrate(model, batches, progress=False)
    _assert_pooled(model[0], torch.cat(batches).double().numpy())


def test_feature_bn_pools_over_batch_and_sequence() -> None:
    model = nn.Sequential(FeatureBatchNorm(6), nn.Linear(6, 2))
    batches = _batches((5, 6))
    bnfold.recalibrate(model, batches, progress=False)
    _assert_pooled(model[0], torch.cat(batches).double().reshape(-1, 6).numpy())


class Spy(nn.Module):
    """Records the training flag of dropout and BN at each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.bn.training, self.drop.training))
        return self.head(self.drop(self.bn(self.fc(x))))


def test_only_bn_trains_and_modes_are_restored() -> None:
    model = Spy().train()
    model.head.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    batches = _batches((4,))
    bnfold.recalibrate(model, batches, progress=False)
    assert model.seen == [(True, False)] * len(SIZES)
    assert {name: m.training for name, m in model.named_modules()} == modes
    first = model.bn.running_var.clone()
    bnfold.recalibrate(model, batches, progress=False)  # dropout off: deterministic
    assert torch.equal(model.bn.running_var, first)


def test_undo_restores_everything() -> None:
    model = plain.get("digits_cnn", twin=True)
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.weight.uniform_(0.5, 2)
    before = copy.deepcopy(model.state_dict())
    handle = bnfold.recalibrate(model, _batches((1, 8, 8)), progress=False)
    assert not torch.equal(model.bn1.running_mean, before["bn1.running_mean"])
    handle.undo()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_batches_as_pairs_num_batches_and_generators() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    batches = _batches((4,))
    pairs = ((b, torch.zeros(len(b))) for b in batches)  # a generator of (inputs, labels)
    handle = bnfold.recalibrate(model, pairs, num_batches=2, progress=False)
    assert handle.num_batches == 2
    _assert_pooled(model[0], torch.cat(batches[:2]).double().numpy())


def test_progress_bar_runs() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    bnfold.recalibrate(model, _batches((4,)), progress=True)


def _pretrained_inserted(seed: int = 0) -> tuple[nn.Module, nn.Module, bnfold.Report]:
    model = plain.get("digits_cnn", seed=seed).eval()
    x = plain.example_input("digits_cnn", batch=4)
    gm, report = bnfold.insert_bn(model, example_inputs=x)
    return model, gm, report


def test_preserve_function_keeps_eval_output_to_fp32_rounding() -> None:
    model, gm, report = _pretrained_inserted()
    batches = _batches((1, 8, 8), seed=3)
    handle = bnfold.recalibrate(gm, batches, preserve_function=True, progress=False)
    assert sorted(handle.preserved) == sorted(e.bn for e in report.inserted)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    gm.eval()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        out = gm(x)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5
    # Without the function-preserving parameters the output is different (the test can fail).
    handle.undo()
    bnfold.recalibrate(gm, batches, progress=False)
    with torch.no_grad():
        assert (gm(x).double() - ref).abs().max() / ref.abs().max() > 1e-2


def test_preserve_function_with_eps_0_and_a_dead_channel_stays_finite() -> None:
    """A ReLU unit dead on every batch measures variance 0; with eps=0 its BN would compute
    0 * (0 / 0): it gets variance 1 instead, and the model still computes what it did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[3] = -100.0  # unit 3: ReLU output 0 for every input below
    model.eval()
    batches = _batches((4,), seed=5)
    gm, _ = bnfold.insert_bn(model, example_inputs=batches[0], eps=0.0,
                             position="after_activation")
    bnfold.recalibrate(gm, batches, preserve_function=True, progress=False)
    assert gm.get_submodule("0_bn").running_var[3] == 1.0
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(9))
    gm.eval()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        out = gm(x)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_preserve_function_measures_the_pre_insertion_activations() -> None:
    model, gm, _ = _pretrained_inserted()
    batches = _batches((1, 8, 8), seed=3)
    bnfold.recalibrate(gm, batches, preserve_function=True, progress=False)
    seen = []
    hook = model.conv2.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    values = torch.cat(seen).double().movedim(1, -1).reshape(-1, 32).numpy()
    _assert_pooled(gm.conv2_bn, values)
    assert torch.allclose(gm.conv2_bn.bias, gm.conv2_bn.running_mean)


def test_layers_from_a_report_or_names() -> None:
    _, gm, report = _pretrained_inserted()
    handle = bnfold.recalibrate(gm, _batches((1, 8, 8)), layers=report, progress=False)
    assert handle.layers == ["conv1_bn", "conv2_bn", "fc1_bn"]
    handle = bnfold.recalibrate(gm, _batches((1, 8, 8)), layers=["fc1_bn"], progress=False)
    assert handle.layers == ["fc1_bn"]


def test_bad_input() -> None:
    with pytest.raises(BadInputError, match="no BatchNorm"):
        bnfold.recalibrate(nn.Linear(3, 3), _batches((3,)), progress=False)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(BadInputError, match="no batches"):
        bnfold.recalibrate(model, [], progress=False)
    with pytest.raises(BadInputError, match=r"needs BNs inserted by bnfold\.insert_bn"):
        bnfold.recalibrate(model, _batches((4,)), preserve_function=True, progress=False)
    with pytest.raises(BadInputError, match="not a BatchNorm"):
        bnfold.recalibrate(model, _batches((4,)), layers=["1"], progress=False)
    with pytest.raises(BadInputError, match="num_batches"):
        bnfold.recalibrate(model, _batches((4,)), num_batches=0, progress=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BadInputError, match=r"^a batch gives BN '0' input \[4, 5\], not its 4 "
                       "channels on dim 1$"):  # a failing batch leaves the model as it was
        bnfold.recalibrate(model, [torch.randn(4, 4), torch.randn(4, 5)], progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --------------------------------------------------------------------------------------------
# Audit: drop_bias + preserve_function, single-sample batches, momentum=None, frozen blocks.
# --------------------------------------------------------------------------------------------

def test_preserve_function_with_dropped_biases() -> None:
    model = plain.get("digits_cnn").eval()
    gm, report = bnfold.insert_bn(model, drop_bias=True,
                                  example_inputs=plain.example_input("digits_cnn", batch=4))
    assert all(d["bias"].startswith("dropped") for d in (e.details for e in report.inserted))
    bnfold.recalibrate(gm, _batches((1, 8, 8), seed=3), preserve_function=True, progress=False)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    gm.eval()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        out = gm(x)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_a_single_sample_batch_is_refused_and_undone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    before = copy.deepcopy(model.state_dict())
    batches = [*_batches((4,)), torch.randn(1, 4)]  # a DataLoader's last batch without drop_last
    with pytest.raises(BadInputError, match=r"one value per channel.*drop_last=True"):
        bnfold.recalibrate(model, batches, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.training and model[1].training


def test_momentum_none_and_frozen_blocks() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None)),
                          nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model[0].eval()  # a frozen block: its BN is recalibrated too, and stays in eval mode
    batches = _batches((4,))
    handle = bnfold.recalibrate(model, batches, progress=False)
    assert handle.layers == ["0.1", "3"]
    with torch.no_grad():
        first = torch.cat([model[0][0](b) for b in batches]).double().numpy()
    _assert_pooled(model[0][1], first)  # pooled, not a cumulative average of batch variances
    assert not model[0].training and not model[0][1].training and model[3].training


def test_lazy_and_bool_arguments() -> None:
    lazy = nn.Sequential(nn.Linear(4, 4), nn.LazyBatchNorm1d())
    with pytest.raises(BadInputError, match="not initialized yet"):
        bnfold.recalibrate(lazy, _batches((4,)), progress=False)
    with pytest.raises(BadInputError, match="num_batches"):
        bnfold.recalibrate(nn.BatchNorm1d(4), _batches((4,)), num_batches=True, progress=False)
