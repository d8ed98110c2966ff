"""The short training story: insert BN into a BN-free CNN, train a few epochs on scikit-learn's
digits next to the same net without BN, recalibrate, fold, and check the folded net.

Needs scikit-learn (the ``bench`` / ``test`` extras) for its bundled digits (no download).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnfold
from bnfold.errors import BnfoldError
from bnfold.models import plain


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 digits as ``[N, 1, 8, 8]`` floats in [0, 1], a fixed split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(test_fraction: float = 0.2) -> Digits:
    """The digits with a fixed 80/20 split (1437 / 360 images)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise BnfoldError("the digits data needs scikit-learn: pip install 'bnfold[bench]'") \
            from exc
    data = sk_load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (net(x).argmax(1) == y).float().mean().item()


def _train(net: nn.Module, data: Digits, epochs: int, lr: float, seed: int,
           batch: int = 64) -> float:
    """SGD (momentum 0.9), shuffled by ``seed``; returns the mean loss of the last epoch."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        for idx in torch.randperm(len(data.x_train), generator=gen).split(batch):
            loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    net.eval()
    return sum(losses) / len(losses)


def _count_bn(net: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in net.modules())


def run_training_demo(console: Any = None, epochs: int = 3, seed: int = 0,
                      lr: float = 0.01) -> dict[str, Any]:
    """insert -> train (next to the plain net) -> recalibrate -> fold -> compare.

    Returns plain numbers (accuracies, losses, BN counts, the folded net's max relative error
    against the unfolded trained net evaluated in float64, seconds) plus the two reports under
    ``"insert_report"`` and ``"fold_report"``. With a rich ``console``, prints a summary.
    """
    start = time.perf_counter()
    data = load_digits()
    example = data.x_train[:4]
    plain_net = plain.get("digits_cnn", seed=seed)
    inserted, insert_report = bnfold.insert_bn(plain_net, example_inputs=example)
    plain_loss = _train(plain_net, data, epochs, lr, seed)
    inserted_loss = _train(inserted, data, epochs, lr, seed)
    out: dict[str, Any] = {
        "epochs": epochs, "lr": lr, "seed": seed,
        "inserted_bn": [(e.bn, e.details["after"], e.details["kind"], e.details["channels"])
                        for e in insert_report.inserted],
        "plain_train_loss": plain_loss, "inserted_train_loss": inserted_loss,
        "plain_test_acc": _accuracy(plain_net, data.x_test, data.y_test),
        "inserted_test_acc": _accuracy(inserted, data.x_test, data.y_test),
    }
    # Exact pooled statistics over the whole training set instead of the running averages.
    bnfold.recalibrate(inserted, data.x_train.split(256), progress=False)
    out["recalibrated_test_acc"] = _accuracy(inserted, data.x_test, data.y_test)
    folded, fold_report = bnfold.fold(inserted, example)
    with torch.no_grad():
        ref = copy.deepcopy(inserted).double()(data.x_test.double())
        got = folded(data.x_test)
    out.update({
        "bn_before_fold": _count_bn(inserted), "bn_after_fold": _count_bn(folded),
        "folded_test_acc": _accuracy(folded, data.x_test, data.y_test),
        "folded_max_rel_err_vs_float64": float((got.double() - ref).abs().max()
                                               / ref.abs().max()),
        "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).double().mean()),
        "seconds": time.perf_counter() - start,
        "insert_report": insert_report, "fold_report": fold_report,
    })
    if console is not None:
        _print(console, out)
    return out


def _print(console: Any, r: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"digits CNN, {r['epochs']} epochs, SGD lr {r['lr']:g}")
    for col in ("", "train loss", "test accuracy"):
        table.add_column(col)
    table.add_row("without BN", f"{r['plain_train_loss']:.3f}", f"{r['plain_test_acc']:.3f}")
    table.add_row("bnfold.insert_bn", f"{r['inserted_train_loss']:.3f}",
                  f"{r['inserted_test_acc']:.3f}")
    table.add_row("  + recalibrate", "", f"{r['recalibrated_test_acc']:.3f}")
    table.add_row("  + fold", "", f"{r['folded_test_acc']:.3f}")
    console.print(table)
    console.print(
        f"BN layers {r['bn_before_fold']} -> {r['bn_after_fold']} after folding; folded vs "
        f"unfolded (float64): max relative error {r['folded_max_rel_err_vs_float64']:.1e}, "
        f"same prediction on {r['argmax_agreement']:.1%} of test images "
        f"({r['seconds']:.1f} s)"
    )
