"""The FX passes share one front door (passes/fx/trace.open_model): the same error types for
the same bad inputs, whichever pass is called."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import UnsupportedError, UntraceableError
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
