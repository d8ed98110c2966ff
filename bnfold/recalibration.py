"""Re-estimate BatchNorm running statistics from data, pooled exactly over every sample.

For each BN layer, over all ``n`` values per channel that reach it (batch x spatial / sequence
positions, over all batches)::

    running_mean = (1/n) * sum(x)
    running_var  = (1/(n-1)) * sum((x - running_mean)^2)        (unbiased)

Not an average of per-batch variances and not an exponential average: each batch's count,
mean and centred sum of squares are computed in float64 and merged with Chan et al.'s pairwise
update (algebraically the pooled formula above, without the cancellation of sum-of-squares).

Why unbiased: PyTorch's BN normalizes a training batch with its *biased* variance but stores
the *unbiased* one in ``running_var``, and eval mode divides by ``sqrt(running_var + eps)``.
Recalibration keeps that convention, so its result is what PyTorch itself would store after
one training-mode pass over all the data as a single batch with ``momentum=1``. (The two
differ by the factor ``n/(n-1)``; ``n`` is the number of values per channel.)

During the pass only the BN layers being recalibrated are in training mode (dropout and
everything else in eval mode), so each BN sees its input as training computes it: upstream BNs
normalize with batch statistics. Every module's mode is restored afterwards.

``preserve_function=True`` recalibrates the BNs that ``bnfold.insert_bn`` created, measuring
their inputs while each of them is bypassed (so every one sees the activations of the model as
it was before insertion), then sets ``gamma = sqrt(running_var + eps)`` and
``beta = running_mean + b``: in eval mode each inserted BN then computes ``x + b``, up to fp32
rounding, and the model computes what it did before insertion, while training-mode
normalization starts from the data's statistics. A channel constant over every batch (a dead
ReLU unit) measures variance 0; with ``eps=0`` it gets running variance 1 instead (weight 1:
``x - mean + mean``), where 0 would divide 0 by 0. ``b`` is the layer bias that
``insert_bn(drop_bias=True)`` removed (kept on the BN as ``bnfold_dropped_bias``), else 0; the
bypass adds it too.

Which BNs: every BN with running statistics by default, whatever its current train/eval mode
(a BN of a frozen, eval-mode block is recalibrated too, and left in eval mode); pass ``layers``
to choose. Every batch must give each BN at least 2 values per channel (training-mode
normalization of one value is undefined): use ``DataLoader(..., drop_last=True)`` when the
last batch may hold a single sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.progress import track
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.arguments import check_callable, check_flags, check_module
from bnfold.errors import BadInputError, BnfoldError, first_line
from bnfold.modules import FeatureBatchNorm
from bnfold.passes.fx.insert import DROPPED_BIAS_ATTR, INSERTED_ATTR
from bnfold.report import Report

_STATE = ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")


@dataclass
class Recalibration:
    """What :func:`recalibrate` did, and how to take it back.

    ``layers``: BN module names whose statistics were re-estimated; ``values``: per layer,
    how many values per channel were pooled; ``preserved``: layers whose gamma/beta
    ``preserve_function`` set; ``unreached``: selected layers no batch reached (left as they
    were); ``num_batches``: batches run. ``undo()`` restores every touched tensor.
    """

    layers: list[str]
    values: dict[str, int]
    num_batches: int
    preserved: list[str] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    _saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def undo(self) -> None:
        """Put back the statistics and affine parameters as they were before recalibration."""
        _restore(self._modules, self._saved)


class _Pooled:
    """Per-channel count, mean and centred sum of squares, merged batch by batch in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.calls = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor, channel_last: bool) -> None:
        x = x.detach().to(torch.float64)
        c = x.shape[-1] if channel_last else x.shape[1]
        values = x.reshape(-1, c) if channel_last else x.movedim(1, -1).reshape(-1, c)
        nb = values.shape[0]
        mean_b = values.mean(0)
        m2_b = ((values - mean_b) ** 2).sum(0)
        self.calls += 1
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * nb / n)
        self.n = n


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    preserve_function: bool = False,
    progress: bool = True,
    layers: Iterable[str] | Report | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Recalibration:
    """Reset and re-estimate the running statistics of ``model``'s BNs from ``batches``.

    ``model`` is changed in place; the returned :class:`Recalibration` can ``undo()`` it.
    ``batches``: an iterable (a DataLoader, a list of tensors...); ``num_batches`` stops early.
    Each batch goes through ``forward(model, batch)``; the default calls ``model(batch)`` for
    a tensor, ``model(batch[0])`` for a tuple/list (``(inputs, labels)`` pairs) and
    ``model(**batch)`` for a mapping. ``layers``: BN module names, or the report of
    ``bnfold.insert_bn`` (its inserted BNs); default every BN with running statistics.
    ``progress`` shows a progress bar (rich). See the module docstring for the math and for
    ``preserve_function``. A batch the model (or ``forward``) fails on is a one-line
    :class:`BadInputError`; the statistics and modes are then restored.
    """
    check_module(model)
    check_flags(preserve_function=preserve_function, progress=progress)
    check_callable(forward, "forward(model, batch)")
    if not isinstance(batches, Iterable):
        raise BadInputError("batches must be an iterable of batches (a DataLoader, a list of "
                            f"tensors...), got {type(batches).__name__}")
    if num_batches is not None and (not isinstance(num_batches, int)
                                    or isinstance(num_batches, bool) or num_batches < 1):
        raise BadInputError(f"num_batches must be a positive integer, got {num_batches!r}")
    targets = _targets(model, layers, preserve_function)
    saved = _save(targets)
    modes = {m: m.training for m in model.modules()}
    pooled = {name: _Pooled() for name in targets}
    handles = []
    for name, bn in targets.items():
        handles.append(bn.register_forward_pre_hook(_collector(pooled[name], bn, name)))
        if preserve_function:  # bypass: downstream layers see the pre-insertion activations
            handles.append(bn.register_forward_hook(_bypass(bn)))
    model.eval()
    if not preserve_function:
        for bn in targets.values():
            bn.train()
    done = False
    try:
        seen = _feed(model, batches, num_batches, progress, forward or _default_forward)
        if seen == 0:
            raise BadInputError("recalibrate got no batches")
        result = _write(targets, pooled, preserve_function, seen)
        done = True
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
        if not done:
            _restore(targets, saved)
    result._saved, result._modules = saved, targets
    return result


@torch.no_grad()
def _feed(model: nn.Module, batches: Iterable[Any], num_batches: int | None, progress: bool,
          run: Callable[[nn.Module, Any], Any]) -> int:
    """Run ``run(model, batch)`` on each batch, at most ``num_batches``; return how many ran.
    A batch that ``run`` fails on is a one-line :class:`BadInputError` with the error's first
    line (bnfold's own errors, from the collectors, pass as they are)."""
    total = num_batches if num_batches is not None else _length(batches)
    seen = 0
    for batch in track(batches, description="recalibrating BN", total=total, transient=True,
                       disable=not progress):
        try:
            run(model, batch)
        except BnfoldError:
            raise
        except Exception as exc:
            raise BadInputError(f"batch {seen + 1} does not run through the model "
                                f"({first_line(exc)})") from exc
        seen += 1
        if num_batches is not None and seen >= num_batches:
            break
    return seen


def _targets(model: nn.Module, layers: Iterable[str] | Report | None,
             preserve_function: bool) -> dict[str, _BatchNorm]:
    bns = {name: m for name, m in model.named_modules()
           if isinstance(m, _BatchNorm) and m.running_mean is not None}
    lazy = [name for name, m in bns.items() if nn.parameter.is_lazy(m.running_mean)]
    if lazy:
        raise BadInputError(f"lazy BatchNorm {', '.join(lazy)} is not initialized yet; run "
                            "one batch through the model first")
    if not bns:
        raise BadInputError(f"{type(model).__name__} has no BatchNorm with running statistics")
    if layers is not None:
        if not isinstance(layers, (Report, Iterable)):
            raise BadInputError("layers takes BN module names or the report of insert_bn, got "
                                f"{type(layers).__name__}")
        names = ([e.bn for e in layers.inserted] if isinstance(layers, Report)
                 else [layers] if isinstance(layers, str) else list(layers))
        unknown = [str(n) for n in names if not isinstance(n, str) or n not in bns]
        if unknown:
            raise BadInputError(f"not a BatchNorm with running statistics: {', '.join(unknown)}")
        bns = {n: bns[n] for n in names}
    if preserve_function:
        bns = {n: m for n, m in bns.items() if getattr(m, INSERTED_ATTR, False)}
        if not bns:
            raise BadInputError("preserve_function=True needs BNs inserted by bnfold.insert_bn")
        plain = [n for n, m in bns.items() if not m.affine]
        if plain:
            raise BadInputError(
                f"preserve_function=True needs affine BNs; {', '.join(plain)} has none"
            )
    return bns


def _collector(pool: _Pooled, bn: _BatchNorm,
               name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    channel_last = isinstance(bn, FeatureBatchNorm)

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        c = (x.shape[-1] if channel_last else x.shape[1]) if x.dim() > 1 else None
        if c != bn.num_features:
            raise BadInputError(
                f"a batch gives BN {name!r} input {list(x.shape)}, not its {bn.num_features} "
                f"channels on {'the last dim' if channel_last else 'dim 1'}")
        if module.training and x.numel() <= c:
            raise BadInputError(
                f"a batch gives BN {name!r} one value per channel (input "
                f"{list(x.shape)}); training-mode BN needs at least 2: use batches of 2+ "
                "samples (DataLoader(..., drop_last=True))"
            )
        pool.add(x, channel_last)

    return hook


def _bypass(bn: _BatchNorm) -> Callable[[nn.Module, tuple[Any, ...], Any], torch.Tensor]:
    """Forward hook: the BN returns its input plus the bias ``drop_bias`` removed (if any)."""
    bias = getattr(bn, DROPPED_BIAS_ATTR, None)
    channel_last = isinstance(bn, FeatureBatchNorm)

    def hook(_module: nn.Module, args: tuple[Any, ...], _out: Any) -> torch.Tensor:
        x = args[0]
        if bias is None:
            return x
        shape = [1] * x.dim()
        shape[-1 if channel_last else 1] = -1
        return x + bias.reshape(shape).to(x.dtype)

    return hook


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _save(targets: Mapping[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: t.detach().clone() for k in _STATE
                   if isinstance(t := getattr(bn, k, None), torch.Tensor)}
            for name, bn in targets.items()}


@torch.no_grad()
def _restore(targets: Mapping[str, nn.Module],
             saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for name, state in saved.items():
        for key, value in state.items():
            getattr(targets[name], key).copy_(value)


@torch.no_grad()
def _write(targets: Mapping[str, _BatchNorm], pooled: Mapping[str, _Pooled],
           preserve_function: bool, seen: int) -> Recalibration:
    result = Recalibration(layers=[], values={}, num_batches=seen)
    for name, bn in targets.items():
        pool = pooled[name]
        if pool.mean is None or pool.m2 is None:
            result.unreached.append(name)
            continue
        if pool.n < 2:
            raise BadInputError(f"BN {name!r} saw {pool.n} value per channel; need at least 2")
        bn.running_mean.copy_(pool.mean)
        bn.running_var.copy_(pool.m2 / (pool.n - 1))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(pool.calls)
        if preserve_function:
            # A channel constant over every batch (a dead ReLU) with eps=0 would divide by 0:
            # give it variance 1 (its weight is then 1, its output x - mean + mean).
            bn.running_var.masked_fill_(bn.running_var.to(torch.float64) + bn.eps <= 0, 1.0)
            var = bn.running_var.to(torch.float64)  # as stored: eval mode divides by this
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            dropped = getattr(bn, DROPPED_BIAS_ATTR, None)
            shift = 0.0 if dropped is None else dropped.to(torch.float64)
            bn.bias.copy_(bn.running_mean.to(torch.float64) + shift)
            result.preserved.append(name)
        result.layers.append(name)
        result.values[name] = pool.n
    return result
