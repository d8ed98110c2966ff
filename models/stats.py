"""Give every BatchNorm trained-looking, non-trivial statistics (never identity, never zeros)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set random running mean/var and gamma/beta on every BN of ``model`` (in place).

    mean ~ N(0, 0.5), var ~ U(0.3, 3), gamma ~ ±U(0.5, 1.5) (about one channel in five
    negative), beta ~ N(0, 0.5). Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, _BatchNorm) or module.running_mean is None:
            if isinstance(module, _BatchNorm) and module.affine:
                _randomize_affine(module, gen)
            continue
        c = module.num_features
        dtype = module.running_mean.dtype
        module.running_mean.copy_((torch.randn(c, generator=gen) * 0.5).to(dtype))
        module.running_var.copy_((torch.rand(c, generator=gen) * 2.7 + 0.3).to(dtype))
        if module.affine:
            _randomize_affine(module, gen)
    return model


def _randomize_affine(module: _BatchNorm, gen: torch.Generator) -> None:
    c = module.num_features
    sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
    gamma = (torch.rand(c, generator=gen) + 0.5) * sign
    module.weight.copy_(gamma.to(module.weight.dtype))
    module.bias.copy_((torch.randn(c, generator=gen) * 0.5).to(module.bias.dtype))


def random_input(shape: tuple[int, ...], seed: int = 1, batch: int | None = None
                 ) -> torch.Tensor:
    """A fresh N(0, 1) float32 tensor of ``shape`` from its own generator (``batch``
    overrides dim 0): the zoos' example inputs."""
    dims = list(shape)
    if batch is not None:
        dims[0] = batch
    return torch.randn(*dims, generator=torch.Generator().manual_seed(seed))
