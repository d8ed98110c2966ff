"""Branch merging (structural re-parameterization): IR-neutral, numpy, float64, rounded once.

A block ``y = sum_b branch_b(x)`` whose branches all read the same tensor ``x`` and are each

* a conv (with or without bias), optionally followed by an inference BatchNorm:
  ``BN(W_b (*) x + c_b) = (s_b W_b) (*) x + (s_b c_b + t_b)`` (:mod:`bnfold.algebra`);
* a per-channel affine map of ``x`` itself: a BN alone (``s x + t``), the plain identity
  (``s = 1, t = 0``) or a constant per-channel scale (``s x``),

is one convolution, because convolution is linear in its kernel: ``sum_b W_b (*) x =
(sum_b W_b) (*) x`` once every kernel is written on the same tap grid. A conv branch reads the
input coordinates ``o * stride + j * dilation - pad_begin`` (``j`` = tap index, per spatial
axis). Writing the merged conv with ``pad_begin = P`` and dilation ``D``, branch ``b``'s tap
``j`` lands at merged tap ``j + (P - pad_begin_b) / D``; the merge is **exact** when, on every
spatial axis:

1. all branches have the same stride, groups and output channels (and input channels);
2. all branches whose kernel is larger than 1 there have the same dilation ``D``;
3. ``(P - pad_begin_b)`` is a non-negative multiple of ``D`` for every branch
   (``P = max pad_begin_b``): the kernels' taps line up, e.g. a k x k and a 1 x 1 branch with
   centred padding ``(k - 1) / 2 * D`` and ``0``;
4. ``pad_begin_b + pad_end_b - D (k_b - 1)`` is the same for every branch (same output size);
   an affine branch is a 1-tap kernel with no padding, so with one of those the convs must keep
   the spatial size at stride 1, and input channels must equal output channels;
5. every branch that pads uses the same padding mode: a tap that never reads the border does
   not care (a 1 x 1 branch without padding next to a reflect-padded 3 x 3 is exact), and
   reflect/replicate/circular padding is a function of the input coordinate alone, so two
   branches padding with the same mode agree on every tap.

An affine branch becomes a kernel with ``s_c`` at the centre tap (the tap reading coordinate
``o``) of output channel ``c`` and input channel ``c`` within its group (``c mod C/groups``;
depthwise: the only one). A constant summand ``k`` with one value per output channel (or one
in all) is a bias: it adds ``k_c`` to every output of channel ``c`` (:func:`constant_branch`).
The merged bias is ``sum_b (s_b c_b + t_b) + sum_affine t + sum_constant k``. Every sum is
float64; the weight and bias are rounded once to the convs' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold.algebra import BNParams, round_to
from bnfold.errors import UnsafeFoldError

Pads = tuple[tuple[int, int], ...]  # (begin, end) per spatial axis


@dataclass(frozen=True)
class ConvBranch:
    """``BN(W (*) x + bias)`` (``bn`` optional) with ``W[Cout, Cin/groups, *kernel]``."""

    name: str
    weight: np.ndarray
    bias: np.ndarray | None
    stride: tuple[int, ...]
    pads: Pads
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    bn: BNParams | None = None

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    def affine_weight(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 ``(s W, s bias + t)`` (``s = 1, t = 0`` without a BN)."""
        w = np.asarray(self.weight).astype(np.float64)
        cout = w.shape[0]
        b = np.zeros(cout) if self.bias is None else np.asarray(self.bias, np.float64).reshape(-1)
        if self.bn is None:
            return w, b
        s, t = self.bn.scale_shift()
        if s.size != cout:
            raise UnsafeFoldError(f"{self.name}: BN has {s.size} channels, the conv {cout}")
        return w * s.reshape(-1, *([1] * (w.ndim - 1))), s * b + t


@dataclass(frozen=True)
class AffineBranch:
    """``scale * x + shift`` per channel of ``x``: identity, BN alone, or a constant scale.

    ``scale``/``shift`` are ``None`` (1 / 0), a scalar, or one value per channel; with ``bn``
    they come from the BN's statistics instead.
    """

    name: str
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    bn: BNParams | None = None

    def scale_shift(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """float64 ``(s, t)``, one value per channel."""
        if self.bn is not None:
            s, t = self.bn.scale_shift()
        else:
            s = np.ones(1) if self.scale is None else np.asarray(self.scale, np.float64)
            t = np.zeros(1) if self.shift is None else np.asarray(self.shift, np.float64)
        s, t = s.reshape(-1), t.reshape(-1)
        if s.size not in (1, channels) or t.size not in (1, channels):
            raise UnsafeFoldError(f"{self.name}: {max(s.size, t.size)} values per channel, "
                                  f"the block has {channels} channels")
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
            raise UnsafeFoldError(f"{self.name}: non-finite scale or shift")
        return np.broadcast_to(s, (channels,)).copy(), np.broadcast_to(t, (channels,)).copy()


@dataclass(frozen=True)
class ConstantBranch:
    """A constant summand: ``value`` (one value in all, or one per output channel) added to
    every output of its channel, i.e. to the merged conv's bias."""

    name: str
    value: np.ndarray

    def shift(self, channels: int) -> np.ndarray:
        """float64, one value per channel."""
        v = np.asarray(self.value, np.float64).reshape(-1)
        if v.size not in (1, channels):
            raise UnsafeFoldError(f"{self.name}: {v.size} values, the block has {channels} "
                                  "channels")
        return np.broadcast_to(v, (channels,)).copy()


Branch = ConvBranch | AffineBranch | ConstantBranch


@dataclass(frozen=True)
class MergedConv:
    """The one conv that replaces a block; ``weight``/``bias`` rounded to the convs' dtype."""

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, ...]
    pads: Pads
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    base: str  # the conv branch with the largest kernel (first of equals): the merged conv's name

    @property
    def symmetric(self) -> bool:
        return all(b == e for b, e in self.pads)


def merge_refusal(branches: Sequence[Branch]) -> str | None:
    """Why ``sum(branches)`` is not exactly one conv (conditions 1-5 above), or ``None``."""
    convs = [b for b in branches if isinstance(b, ConvBranch)]
    if not convs:
        return "no conv branch"
    first = convs[0]
    n = first.weight.ndim - 2
    for b in convs[1:]:
        for what, mine, theirs in (
            ("spatial dims", b.weight.ndim - 2, n), ("strides", b.stride, first.stride),
            ("groups", b.groups, first.groups),
            ("output channels", b.weight.shape[0], first.weight.shape[0]),
            ("input channels", b.weight.shape[1], first.weight.shape[1]),
            ("dtypes", b.weight.dtype, first.weight.dtype),
        ):
            if mine != theirs:
                return (f"branches have different {what}: {first.name} {_show(theirs)}, "
                        f"{b.name} {_show(mine)}")
    affines = [b for b in branches if isinstance(b, AffineBranch)]
    cin, cout = first.weight.shape[1] * first.groups, first.weight.shape[0]
    if affines and (cin != cout or any(s != 1 for s in first.stride)):
        return (f"an identity-like branch ({affines[0].name}) needs a stride-1 conv with as many "
                f"output as input channels; {first.name} has stride {_show(first.stride)}, "
                f"{cin} -> {cout} channels")
    padded_modes = {b.padding_mode for b in convs if any(p for pair in b.pads for p in pair)}
    if len(padded_modes) > 1:
        padded = [b.name for b in convs if any(p for pair in b.pads for p in pair)]
        return (f"padded branches use different padding modes ({', '.join(sorted(padded_modes))}"
                f": {', '.join(padded)}): their border taps read different values")
    for axis in range(n):
        why = _axis_refusal(convs, bool(affines), axis)
        if why:
            return why
    return None


def merge(branches: Sequence[Branch]) -> MergedConv:
    """The conv equal to ``sum(branches)``; raises :class:`UnsafeFoldError` when
    :func:`merge_refusal` refuses or the merged tensors are not finite in the dtype."""
    why = merge_refusal(branches)
    if why:
        raise UnsafeFoldError(why)
    convs = [b for b in branches if isinstance(b, ConvBranch)]
    first = convs[0]
    n = first.weight.ndim - 2
    dil = tuple(_dilation(convs, a) for a in range(n))
    begin = tuple(max(b.pads[a][0] for b in convs) for a in range(n))
    shifts = {id(b): tuple((begin[a] - b.pads[a][0]) // dil[a] for a in range(n)) for b in convs}
    size = tuple(max(shifts[id(b)][a] + b.kernel[a] for b in convs) for a in range(n))
    extent = tuple(_extent(first, a, dil[a]) for a in range(n))
    pads = tuple((begin[a], extent[a] + dil[a] * (size[a] - 1) - begin[a]) for a in range(n))
    cout, per_group = first.weight.shape[:2]
    weight = np.zeros((cout, per_group, *size))
    bias = np.zeros(cout)
    for b in convs:
        w, c = b.affine_weight()
        at = tuple(slice(s, s + k) for s, k in zip(shifts[id(b)], b.kernel, strict=True))
        weight[(slice(None), slice(None), *at)] += w
        bias += c
    centre = tuple(begin[a] // dil[a] for a in range(n))
    channels = np.arange(cout)
    for b in branches:
        if isinstance(b, AffineBranch):
            s, t = b.scale_shift(cout)
            weight[(channels, channels % per_group, *centre)] += s
            bias += t
        elif isinstance(b, ConstantBranch):
            bias += b.shift(cout)
    mode = next((b.padding_mode for b in convs if any(p for pair in b.pads for p in pair)),
                "zeros")
    order = {id(b): i for i, b in enumerate(convs)}  # (by identity: == compares arrays)
    base = max(convs, key=lambda b: (int(np.prod(b.kernel)), -order[id(b)]))
    dtype = first.weight.dtype
    return MergedConv(_rounded(weight, dtype, "weight"), _rounded(bias, dtype, "bias"),
                      first.stride, pads, dil, first.groups, mode, base.name)


def _axis_refusal(convs: Sequence[ConvBranch], identity: bool, axis: int) -> str | None:
    """Conditions 2-4 on one spatial axis."""
    wide = [b for b in convs if b.kernel[axis] > 1]
    dils = {b.dilation[axis] for b in wide}
    if len(dils) > 1:
        names = ", ".join(f"{b.name} {b.dilation[axis]}" for b in wide)
        return f"branches have different dilations on spatial axis {axis} ({names})"
    d = _dilation(convs, axis)
    begin = max(b.pads[axis][0] for b in convs)
    largest = max(convs, key=lambda b: b.kernel[axis])
    ref = _extent(largest, axis, d)
    for b in convs:
        if (begin - b.pads[axis][0]) % d or _extent(b, axis, d) != ref:
            k, need = b.kernel[axis], largest.pads[axis][0] - (largest.kernel[axis] - b.kernel[
                axis]) * d / 2
            return (f"{b.name} pads spatial axis {axis} by {list(b.pads[axis])}, but with kernel "
                    f"{k} next to {largest.name}'s {largest.kernel[axis]} (padding "
                    f"{list(largest.pads[axis])}) its taps line up only with padding "
                    f"{_num(need)} (= (kernel - 1) / 2 x dilation relative to the largest): "
                    "the kernels' centres do not align")
    if identity and (ref != 0 or begin % d):
        return (f"{largest.name} changes the size of spatial axis {axis} or shifts it (padding "
                f"{list(largest.pads[axis])}, kernel {largest.kernel[axis]}, dilation {d}), so "
                "an identity-like branch does not line up with its centre tap")
    return None


def _dilation(convs: Sequence[ConvBranch], axis: int) -> int:
    """The common dilation of the kernels wider than 1 on ``axis`` (1 if none is)."""
    return next((b.dilation[axis] for b in convs if b.kernel[axis] > 1), 1)


def _extent(b: ConvBranch, axis: int, d: int) -> int:
    """``pad_begin + pad_end - d (k - 1)``: the output size is ``(L + extent - 1) // s + 1``."""
    return b.pads[axis][0] + b.pads[axis][1] - d * (b.kernel[axis] - 1)


def _rounded(x64: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    out = round_to(x64, dtype)
    if not np.all(np.isfinite(out.astype(np.float64))):
        raise UnsafeFoldError(f"merged {what} is not finite in {dtype}; not written")
    return out


def _show(value: object) -> str:
    if isinstance(value, tuple) and len(set(value)) == 1:
        return str(value[0])
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ---------------------------------------------------------------------------------------------
# Matching a sum: which tensor the block shares, and why a block cannot merge (IR-free).
# ---------------------------------------------------------------------------------------------

@dataclass
class Summand:
    """One summand of a sum, as a graph pass sees it.

    ``options`` maps each tensor the summand could be a branch of (a graph value) to that
    branch, or to why it cannot be one; ``erase`` to the nodes a merge removes, ``absorbed`` to
    the BN nodes a merge absorbs. ``others`` names readers of the summand outside the sum.
    """

    name: str
    options: dict[Any, Branch | str]
    erase: dict[Any, list[Any]] = field(default_factory=dict)
    absorbed: dict[Any, list[Any]] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)

    def add(self, x: Any, branch: Branch | str, erase: Sequence[Any] = (),
            absorbed: Sequence[Any] = ()) -> None:
        self.options[x], self.erase[x], self.absorbed[x] = branch, list(erase), list(absorbed)


def shared_input(summands: Sequence[Summand]) -> Any:
    """The tensor most summands read (at least two, one through a conv, or through a conv or
    BN that cannot be a branch, which :func:`block_refusal` then says), or ``None``: a sum with
    no such tensor (a residual ``conv(h) + x``) is not a branch block."""
    best, rank = None, (0, 0)
    for x in dict.fromkeys(x for s in summands for x in s.options):  # (in summand order)
        options = [s.options[x] for s in summands if x in s.options]
        conv = any(isinstance(option, (ConvBranch, str)) for option in options)
        here = (len(options), sum(not isinstance(option, str) for option in options))
        if conv and len(options) > 1 and here > rank:  # (more readers, then real branches)
            best, rank = x, here
    return best


def block_refusal(summands: Sequence[Summand], shared: Any, shared_name: str) -> str | None:
    """Why the summands are not all branches of ``shared`` that a merge may remove."""
    for s in summands:
        option = s.options.get(shared)
        if option is None:
            return f"branches read different tensors: {s.name} does not come from {shared_name}"
        if isinstance(option, str):
            return option
        if s.others and s.erase[shared]:
            return f"branch {option.name} output also feeds {', '.join(s.others)}"
    return None


def branches_of(summands: Sequence[Summand], shared: Any) -> list[Branch]:
    """The branches of ``shared`` (after :func:`block_refusal` passed: all of them)."""
    return [b for s in summands if not isinstance(b := s.options.get(shared, ""), str)]


def absorbed(summands: Sequence[Summand], shared: Any) -> list[Any]:
    """The BN nodes a merge of the block on ``shared`` absorbs, each once (a summand the sum
    reads twice, ``b + b``, names its BN twice)."""
    return list(dict.fromkeys(bn for s in summands for bn in s.absorbed[shared]))


def constant_branch(name: str, value: np.ndarray, shape: Sequence[int | None] | None,
                    channels: int) -> ConstantBranch | str | None:
    """A constant summand ``value`` of a block whose branches sum to ``shape`` (channels on
    axis 1, ``channels`` of them; ``None`` for a dim not known, or for the whole shape when
    its rank is not known), as what it adds: a :class:`ConstantBranch` when it holds one value
    per channel (or one in all), ``None`` when it is zero (it adds nothing), or why it cannot
    merge. Either way only when adding it keeps the sum's shape: broadcasting is exact only
    where each of its dims is 1 or the sum's (else the sum widens, and one conv would give a
    smaller output than the Add did)."""
    dims = tuple(np.shape(value))
    if shape is None and dims:
        return (f"constant summand {name} has shape {list(dims)} and the rank of the sum is "
                "not known")
    full = list(shape or ())
    if len(full) > 1:
        full[1] = channels
    if len(dims) > len(full):
        return (f"constant summand {name} has shape {list(dims)}: adding it broadcasts the "
                f"sum of rank {len(full)} to rank {len(dims)}")
    aligned = range(len(full) - len(dims), len(full))
    for axis, d in zip(aligned, dims, strict=True):
        if d != 1 and d != full[axis]:
            size = "a size not known" if full[axis] is None else f"size {full[axis]}"
            return (f"constant summand {name} has shape {list(dims)}: adding it broadcasts dim "
                    f"{axis} of the sum ({size}) to {d}")
    varying = [axis for axis, d in zip(aligned, dims, strict=True) if d != 1]
    if set(varying) <= {1}:
        return ConstantBranch(name, np.asarray(value))
    if not np.any(value):
        return None
    return (f"constant summand {name} varies along dim(s) {varying} of the sum, not one value "
            "per channel (no bias of one conv adds it)")


def plan_block(summands: Sequence[Summand], shared: Any, shared_name: str,
               check: Callable[[list[Branch]], str | None],
               constants: Sequence[tuple[str, np.ndarray]] = (),
               shape: Sequence[int | None] | None = None) -> MergedConv | str:
    """The merged conv for a block, or why not: :func:`block_refusal`, then the pass's own
    ``check`` of the branches (channel axes), then each of the sum's ``constants`` (name,
    array) as :func:`constant_branch` (``shape``: the branches' sum's dims, channels on axis
    1, as far as known), then :func:`merge`."""
    why = block_refusal(summands, shared, shared_name)
    branches = branches_of(summands, shared)
    if why is None:
        why = check(branches)
    if why is not None:
        return why
    channels = next(b.weight.shape[0] for b in branches if isinstance(b, ConvBranch))
    for name, value in constants:
        added = constant_branch(name, value, shape, channels)
        if isinstance(added, str):
            return added
        if added is not None:
            branches.append(added)
    try:
        return merge(branches)
    except UnsafeFoldError as exc:
        return str(exc)
