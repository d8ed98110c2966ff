"""The FX fold looks parameters up once per model, not once per BN, with the same report."""

from __future__ import annotations

import torch
from test_fx_fold import SharedWeight, fold_checked, prepared, rel_err
from torch import nn

import bnfold

X4 = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))


def test_shared_weight_is_untied_once_then_no_longer_shared() -> None:
    """``right.weight = left.weight``: the first fold unties the pair; by the second, the
    right conv alone holds the old weight (the count follows each write)."""
    model = prepared(SharedWeight())
    gm, report = fold_checked(model, X4)
    left, right = report.folded
    assert left.details.get("untied_shared_weight") is True
    assert "untied_shared_weight" not in right.details
    assert gm.left.weight is not gm.right.weight


def _chain(blocks: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    return prepared(nn.Sequential(*layers))


def test_parameter_walks_do_not_grow_with_the_bn_count(monkeypatch) -> None:
    walks: list[int] = []
    real = nn.Module.named_parameters

    def counted(self, *args, **kwargs):
        walks.append(1)
        return real(self, *args, **kwargs)

    counts = []
    for blocks in (2, 12):
        model = _chain(blocks)
        walks.clear()
        with monkeypatch.context() as patch:
            patch.setattr(nn.Module, "named_parameters", counted)
            gm, report = bnfold.fold(model, X4)
        counts.append(len(walks))
        assert len(report.folded) == blocks
        assert rel_err(gm, model, torch.randn(2, 4, 6, 6)) < 1e-6
    assert counts[0] == counts[1]
