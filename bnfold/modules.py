"""Small torch modules that bnfold inserts and folds."""

from __future__ import annotations

import torch
from torch import nn


class FeatureBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the *last* dimension of an input of any rank (``[N, ..., C]``).

    ``nn.BatchNorm1d`` on ``[N, L, C]`` normalizes dim 1 (``L``), which is the wrong axis after a
    Linear on a sequence. This module normalizes the features ``C``, with statistics pooled over
    every other position: ``y = BatchNorm1d(x.reshape(-1, C)).reshape(x.shape)``. It has the
    same parameters and buffers as ``BatchNorm1d(C)``, so the fold pass folds it like one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)
