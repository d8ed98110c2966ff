"""The fold algebra: IR-neutral, on numpy arrays, float64 inside, rounded once on the way out.

Inference-mode BatchNorm is a per-channel affine map::

    BN(y)_c = gamma_c * (y_c - mean_c) / sqrt(var_c + eps) + beta_c = s_c * y_c + t_c
    s = gamma / sqrt(var + eps)          t = beta - mean * s

(gamma = 1 and beta = 0 when the BN has no affine parameters).

Forward fold (layer -> BN). A layer ``y = W (*) x + b`` that is linear in ``x`` and whose output
channel ``c`` depends only on the slice of ``W`` that holds output channel ``c`` gives::

    BN(y) = (s * W) (*) x + (s * b + t)

which is exact for every input: ``W' = s * W`` along the weight's output-channel axis and
``b' = s * b + t``.  The only rounding is the final cast of ``W'`` and ``b'`` to the tensor's
dtype (one rounding, correctly rounded: at most 0.5 ulp from the exact float64 fold).

Backward fold (BN -> layer). ``z = W (*) (s * x + t) + b = (W * s) (*) x + (W (*) t + b)``
where ``W * s`` scales the weight's *input*-channel axis.  The second term is a constant
per output channel only when every output position sees the full kernel over the BN output:

* Linear / Gemm / MatMul: always exact.
* Conv with padding 0 (any stride, dilation, groups): exact.
* Conv with padding > 0 and ``padding_mode`` ``reflect``, ``replicate`` or ``circular``: exact,
  because those modes pad with copies of the BN output, ``pad(s*x+t) = s*pad(x)+t``.
* Conv with padding > 0 and zero padding: exact only if ``t == 0`` for every channel;
  otherwise the border outputs would receive a shift that the original never added. Refused.
* ConvTranspose: exact only if ``t == 0``, or stride 1, no output padding and
  ``padding == dilation * (kernel - 1)`` on every spatial axis (every output sees every tap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter

import ml_dtypes
import numpy as np

from bnfold.errors import UnsafeFoldError
from bnfold.geometry import ConvGeometry
from bnfold.workers import WORKERS, pool

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class BNParams:
    """Inference statistics and affine parameters of one BatchNorm, one value per channel.

    ``gamma``/``beta`` may be ``None`` (no affine parameters). Arrays may have any float dtype;
    every computation converts them to float64 first.
    """

    mean: np.ndarray
    var: np.ndarray
    eps: float
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(np.asarray(self.mean).size)

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(s, t)`` in float64 such that ``BN(y) = s * y + t`` per channel."""
        return _scale_shift(*(None if a is None else _f64(a).reshape(-1) for a in (
            self.mean, self.var, self.gamma, self.beta)), self.eps)


def _scale_shift(mean: np.ndarray, var: np.ndarray, gamma: np.ndarray | None,
                 beta: np.ndarray | None, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` of float64 parameters whose
    last axis is the channel (one BN, or BNs stacked on a leading axis: every step is
    elementwise, so a stacked BN's values are its own); missing ``gamma``/``beta`` are 1/0.
    :class:`UnsafeFoldError` (the first failing check, :func:`_refuse`) unless every
    ``var + eps`` is positive and finite and every parameter finite, of ``mean``'s shape."""
    denom = var + float(eps)
    gamma = np.ones(mean.shape) if gamma is None else gamma
    beta = np.zeros(mean.shape) if beta is None else beta
    if not (gamma.shape == beta.shape == mean.shape  # every check at once; which failed:
            and np.isfinite(np.concatenate((denom, gamma, beta, mean))).all()
            and (denom > 0).all()):
        _refuse(denom, {"gamma": gamma, "beta": beta, "mean": mean})
    s = gamma * (1.0 / np.sqrt(denom))
    return s, beta - mean * s


def _refuse(denom: np.ndarray, named: dict[str, np.ndarray]) -> None:
    """Raise :class:`UnsafeFoldError` for the first BN parameter check that fails: ``var + eps``
    positive and finite, then each of ``named`` one value per channel (``mean``'s) and finite."""
    if not np.isfinite(denom).all() or (denom <= 0).any():
        raise UnsafeFoldError("BN running_var + eps is not positive and finite")
    mean = named["mean"]
    for name, arr in named.items():
        if arr.shape != mean.shape:
            raise UnsafeFoldError(f"BN {name} has {arr.size} values, expected {mean.size}")
        if not np.isfinite(arr).all():
            raise UnsafeFoldError(f"BN {name} holds non-finite values")


def _f64(a: np.ndarray) -> np.ndarray:
    """``a`` as float64: a view when it already is, else one conversion."""
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Rounding float64 results back to the tensor's dtype, once.
# ---------------------------------------------------------------------------------------------

def _round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd: truncate toward zero, set the last bit if inexact.

    Rounding to odd at a precision at least two bits finer than the target makes a following
    round-to-nearest-even exactly equal to a direct correct rounding (no double-rounding error).
    """
    f32 = x.astype(np.float32)
    back = f32.astype(np.float64)
    overshoot = np.abs(back) > np.abs(x)
    f32 = np.where(overshoot, np.nextafter(f32, np.float32(0)), f32)
    inexact = f32.astype(np.float64) != x
    bits = f32.view(np.uint32) | inexact.astype(np.uint32)
    return np.where(np.isfinite(f32), bits.view(np.float32), f32)


def round_to(x: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Correctly round float64 ``x`` to ``dtype`` (float64/32/16 or ml_dtypes bfloat16).

    float16 and bfloat16 go through float32 rounded-to-odd, so the result is the nearest
    representable value (ties to even), never a double rounding.
    """
    dtype = np.dtype(dtype)
    x = _f64(x)
    if dtype in (np.float64, np.float32):  # IEEE cast: round to nearest, ties to even
        return x.astype(dtype)
    if dtype in (np.dtype(np.float16), BFLOAT16):
        with np.errstate(over="ignore"):  # overflow to inf is reported by the caller
            return _round_to_odd_f32(x).astype(dtype)
    raise UnsafeFoldError(f"cannot fold into a tensor of dtype {dtype}")


def _checked(x64: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    out = round_to(x64, dtype)
    _require_finite(out, what)
    return out


def _require_finite(out: np.ndarray, what: str) -> None:
    """Raise :class:`UnsafeFoldError` if rounding ``out`` to its dtype overflowed."""
    dtype = out.dtype
    if not np.isfinite(out).all():
        limit = float(ml_dtypes.finfo(dtype).max)
        raise UnsafeFoldError(
            f"folded {what} is not finite in {dtype} (a value exceeds {limit:g}); not written"
        )


# ---------------------------------------------------------------------------------------------
# Broadcasting a per-channel vector onto a weight axis.
# ---------------------------------------------------------------------------------------------

def _channel_view(
    shape: tuple[int, ...], channels: int, axis: int, groups: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes that put a per-channel vector onto weight ``axis``: ``(weight view, vector)``.

    Only a channel axis at 1 is grouped: there the channel index is ``g * per_group + j``,
    ``g`` indexing groups along axis 0 (ConvTranspose forward, Conv backward) and ``j`` running
    along axis 1. On axis 0 (Conv forward, ConvTranspose backward) ``groups`` does not matter.
    The weight is reshaped to the view (no copy), the vector to a shape that broadcasts on it.
    """
    ndim = len(shape)
    axis %= ndim
    if axis != 1:
        groups = 1
    per = shape[axis]
    if channels != per * groups:
        raise UnsafeFoldError(
            f"BN has {channels} channels but the layer has {per * groups} on the folded axis"
        )
    vec = [1] * ndim
    vec[axis] = per
    if groups == 1:
        return shape, tuple(vec)
    lead = shape[0]
    if lead % groups:
        raise UnsafeFoldError(f"weight dim 0 ({lead}) is not divisible by groups={groups}")
    return (groups, lead // groups, *shape[1:]), (groups, 1, per, *vec[2:])


def _scale_axis(
    weight: np.ndarray, vec: np.ndarray, axis: int, groups: int
) -> np.ndarray:
    """float64 ``weight * vec`` with ``vec`` indexing the channels on weight ``axis``
    (grouping as in :func:`_channel_view`)."""
    w = np.asarray(weight)
    view, vshape = _channel_view(w.shape, vec.size, axis, groups)
    return np.multiply(w.reshape(view), vec.reshape(vshape), dtype=np.float64).reshape(w.shape)


def _scaled_rounded(
    weight: np.ndarray, vec: np.ndarray, axis: int, groups: int, what: str
) -> np.ndarray:
    """``weight * vec`` as :func:`_scale_axis`, rounded once to the weight's dtype, checked.

    float32/float64: each product is formed in float64 and cast (IEEE round to nearest even)
    straight into the result, chunk by chunk, with no float64 copy of the whole weight: bit
    for bit the value of rounding a float64 copy ``float64(W) * s`` once, in less memory and
    time. Half types go through :func:`round_to` (rounding to odd first, no double rounding).
    """
    w = np.asarray(weight)
    return _scaled_view(w, vec, *_channel_view(w.shape, vec.size, axis, groups), what)


#: Elements numpy casts, multiplies and rounds back per chunk in :func:`_scaled_view` (a 512
#: KiB float64 buffer): a ResNet-50's weights fold about a fifth faster than with numpy's
#: default of 8192. Only the chunking changes, never a value (each element is one product).
CAST_BUFFER = 1 << 16


@contextlib.contextmanager
def _buffer_size(size: int) -> Iterator[None]:
    """numpy's ufunc buffer size set to ``size`` elements inside the block (numpy keeps it
    per thread or context), restored after."""
    old = np.setbufsize(size)
    try:
        yield
    finally:
        np.setbufsize(old)


#: Elements from which :func:`_scaled_view` splits one weight's product over
#: :data:`WORKERS` threads (row blocks of the view; each element is still one product).
SPLIT_MIN = 1 << 20


def _scaled_view(w: np.ndarray, vec: np.ndarray, view: tuple[int, ...],
                 vshape: tuple[int, ...], what: str, out: np.ndarray | None = None,
                 split: bool = True) -> np.ndarray:
    """``w.reshape(view) * vec.reshape(vshape)`` rounded and checked as
    :func:`_scaled_rounded` says, returned in ``w``'s shape (written into ``out``, an array
    of ``w``'s shape and dtype, when given). A float32/float64 weight of at least
    :data:`SPLIT_MIN` elements is scaled in row blocks on :data:`WORKERS` threads unless
    ``split`` is false (a caller already on a thread per weight)."""
    dtype = w.dtype
    if out is None:
        out = np.empty(w.shape, dtype)
    if dtype not in (np.float32, np.float64):
        product = np.multiply(w.reshape(view), vec.reshape(vshape), dtype=np.float64)
        out[...] = _checked(product, dtype, what).reshape(w.shape)
        return out
    w_v, vec_v, out_v = w.reshape(view), vec.reshape(vshape), out.reshape(view)

    def scale(rows: slice) -> None:
        with np.errstate(over="ignore"), _buffer_size(CAST_BUFFER):  # inf: refused below
            np.multiply(w_v[rows], vec_v[rows] if vec_v.shape[0] > 1 else vec_v,
                        out=out_v[rows], dtype=np.float64, casting="same_kind")
    n = len(w_v)
    workers = min(WORKERS, n) if split and w.size >= SPLIT_MIN else 1
    if workers > 1:
        step = -(-n // workers)
        pool().map(scale, [slice(i, i + step) for i in range(0, n, step)])
    else:
        scale(slice(None))
    _require_finite(out, what)
    return out


# ---------------------------------------------------------------------------------------------
# Forward fold: layer -> BN.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Folded:
    """Folded weight and bias, already rounded to the tensors' dtypes."""

    weight: np.ndarray
    bias: np.ndarray


def fold_forward(
    weight: np.ndarray,
    bias: np.ndarray | None,
    bn: BNParams,
    *,
    out_axis: int = 0,
    groups: int = 1,
    bias_scale: float = 1.0,
    bias_dtype: np.dtype | None = None,
) -> Folded:
    """Fold ``BN(layer(x))`` into the layer: ``W' = s * W`` on ``out_axis``, ``b' = s*k*b + t``.

    ``out_axis`` is the weight axis that holds output channels: 0 for Conv ``[Cout, Cin/g, k..]``
    and Linear ``[out, in]``; 1 for ConvTranspose ``[Cin, Cout/g, k..]`` (pass ``groups``: the
    output channel is ``g * Cout/g + j``) and for a transposed Gemm/MatMul weight ``[in, out]``.
    ``bias`` may be absent (zero) or any shape whose last axis broadcasts against the channels
    (Gemm's ``C``: ``[]``, ``[1]``, ``[C]``, ``[M, C]``); ``bias_scale`` is a scalar the layer
    multiplies its bias by (Gemm's ``beta``), folded in so the new bias is used with scale 1.
    The result is cast to the weight's dtype (bias: ``bias_dtype``, else the bias's, else the
    weight's), rounded once; a non-finite result raises :class:`UnsafeFoldError`.
    """
    s, t = bn.scale_shift()
    w = _scaled_rounded(weight, s, out_axis, groups, "weight")
    b64 = np.zeros(s.shape) if bias is None else _f64(bias) * float(bias_scale)
    try:
        b_new = s * b64 + t
    except ValueError as exc:
        raise UnsafeFoldError(
            f"bias of shape {np.shape(bias)} does not broadcast against {s.size} channels"
        ) from exc
    b_dtype = np.dtype(bias_dtype) if bias_dtype is not None else (
        np.asarray(bias).dtype if bias is not None else w.dtype
    )
    return Folded(w, _checked(b_new, b_dtype, "bias"))


#: Largest weight (in elements) :func:`fold_forward_many` stacks: above it the per-BN
#: overhead is small beside the arithmetic, and stacking would copy the weights, so larger
#: alike weights are folded one by one, each into its slice of one output array.
BATCH_MAX_WEIGHT = 1 << 16


def fold_forward_many(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray | None],
    bns: Sequence[BNParams],
    *,
    out_axis: int = 0,
    groups: int = 1,
    bias_scale: float = 1.0,
) -> list[Folded]:
    """``[fold_forward(w, b, bn, ...) for ...]`` bit for bit, in a few stacked numpy calls.

    Exact: every step of :func:`fold_forward` (float64 conversion, ``var + eps``, ``sqrt``,
    ``1 /``, products, sums, the final rounding) is an elementwise IEEE operation, correctly
    rounded per element, so stacking the BNs along a new leading axis computes the same value
    for every element. Stacked only when the folds are alike (weights of one shape and dtype;
    biases all absent or all ``[C]`` of one dtype; one ``eps``; the same affine parameters
    present; every parameter ``C`` values) and none refuses; otherwise each fold runs through
    :func:`fold_forward`, which then refuses (raises the first refusal in order) exactly as
    calling it per BN would. Weights of more than :data:`BATCH_MAX_WEIGHT` elements are not
    stacked (copied) but scaled one by one into one output array, whose slices are the
    results: one allocation, large enough to be backed by huge pages, costs far fewer page
    faults than one per weight.
    """
    def each() -> list[Folded]:
        return [fold_forward(w, b, bn, out_axis=out_axis, groups=groups, bias_scale=bias_scale)
                for w, b, bn in zip(weights, biases, bns, strict=True)]

    if len(bns) < 2 or not _alike(weights, biases, bns):
        return each()
    stacked = [None if getattr(bns[0], name) is None else _stack_f64(
        [a if a.ndim == 1 else a.reshape(-1) for a in map(np.asarray, map(attrgetter(name), bns))])
        for name in ("mean", "var", "gamma", "beta")]
    try:
        s, t = _scale_shift(*stacked, bns[0].eps)
    except UnsafeFoldError:
        return each()
    w0 = np.asarray(weights[0])
    b64 = np.zeros_like(s) if biases[0] is None else _stack_f64(
        [np.asarray(b) for b in biases]) * float(bias_scale)
    b_dtype = w0.dtype if biases[0] is None else np.asarray(biases[0]).dtype
    try:
        w_new = _scaled_many(weights, s, out_axis, groups)
        b_new = _checked(s * b64 + t, b_dtype, "bias")
    except UnsafeFoldError:
        return each()
    return [Folded(wi, bi) for wi, bi in zip(w_new, b_new, strict=True)]


def _stack_f64(arrays: list[np.ndarray]) -> np.ndarray:
    """``np.stack([_f64(a) for a in arrays])`` (arrays of one shape) in one call: the stack
    is cast to float64 as it is written, by the cast :func:`_f64` applies to each array (an
    elementwise conversion), without an intermediate float64 array per row."""
    return np.stack(arrays, dtype=np.float64, casting="unsafe")


def _scaled_many(weights: Sequence[np.ndarray], s: np.ndarray, axis: int,
                 groups: int) -> np.ndarray:
    """Each alike weight times its row of ``s`` (:func:`_scaled_rounded`), stacked: in one
    call on the stacked weights when they are small, else one by one into one array, on up to
    :data:`WORKERS` threads."""
    w0 = np.asarray(weights[0])
    view, vshape = _channel_view(w0.shape, s.shape[1], axis, groups)
    n = len(weights)
    if w0.size <= BATCH_MAX_WEIGHT:
        w = np.stack([np.asarray(x) for x in weights])
        return _scaled_view(w, s, (n, *view), (n, *vshape), "weight")
    out = np.empty((n, *w0.shape), w0.dtype)
    jobs = [(np.asarray(w), vec, dest) for w, vec, dest in zip(weights, s, out, strict=True)]
    pool().map(lambda job: _scaled_view(*job[:2], view, vshape, "weight", job[2], split=False),
               jobs)  # (a refusal is raised here, the first in order)
    return out


def _alike(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray | None],
           bns: Sequence[BNParams]) -> bool:
    """Whether :func:`fold_forward_many` may stack these folds (see there)."""
    w0, b0, bn0 = np.asarray(weights[0]), biases[0], bns[0]
    channels, shape, dtype, eps = np.asarray(bn0.mean).size, w0.shape, w0.dtype, bn0.eps
    if not all(w.shape == shape and w.dtype == dtype for w in map(np.asarray, weights)) \
            or not all(bn.eps == eps for bn in bns):
        return False
    if b0 is None:
        if not all(b is None for b in biases):
            return False
    else:
        b_key = np.asarray(b0).dtype
        if not all(b is not None and np.shape(b) == (channels,) and np.asarray(b).dtype == b_key
                   for b in biases):
            return False
    gamma, beta = bn0.gamma is None, bn0.beta is None
    return all((bn.gamma is None) == gamma and (bn.beta is None) == beta for bn in bns) \
        and all(a is None or np.asarray(a).size == channels
                for bn in bns for a in (bn.mean, bn.var, bn.gamma, bn.beta))


# ---------------------------------------------------------------------------------------------
# Backward fold: BN -> layer.
# ---------------------------------------------------------------------------------------------

def backward_fold_refusal(
    kind: str, bn: BNParams, geometry: ConvGeometry | None = None
) -> str | None:
    """Return why folding ``layer(BN(x))`` into the layer is not exact, or ``None`` if it is.

    ``kind`` is ``"linear"``, ``"conv"`` or ``"conv_transpose"``; the conditions are those in
    the module docstring, read off ``geometry`` (required for the conv kinds).
    """
    _, t = bn.scale_shift()
    shift_zero = bool(np.all(t == 0))
    if kind == "linear" or shift_zero:
        return None
    if geometry is None:
        raise ValueError(f"backward_fold_refusal({kind!r}) needs the conv geometry")
    if kind == "conv":
        if geometry.unpadded() or geometry.copies_border():
            return None
        return (
            "BN before a zero-padded conv: the BN shift would reach the padded border, "
            "which the original graph pads with zeros (not exact)"
        )
    if kind == "conv_transpose":
        if geometry.every_output_sees_every_tap():
            return None
        return (
            "BN before a ConvTranspose: border outputs see fewer taps, so the BN shift does "
            "not fold into a per-channel bias (not exact)"
        )
    return f"no backward fold rule for layer kind {kind!r}"


def fold_backward(
    weight: np.ndarray,
    bias: np.ndarray | None,
    bn: BNParams,
    *,
    in_axis: int = 1,
    groups: int = 1,
    out_axis: int = 0,
) -> Folded:
    """Fold ``layer(BN(x))`` into the layer: ``W' = W * s`` on ``in_axis``, ``b' = b + W (*) t``.

    ``in_axis`` is the weight axis that holds input channels: 1 for Conv ``[Cout, Cin/g, k..]``
    (pass ``groups``: input channel ``g * Cin/g + j`` feeds output channels of group ``g``, which
    lie along axis 0) and for Linear ``[out, in]``; 0 for ConvTranspose ``[Cin, Cout/g, k..]``
    and for a Gemm/MatMul weight ``[in, out]``. ``out_axis`` is where output channels are (for
    ConvTranspose with groups, output channel ``g * Cout/g + j`` along axis 1).
    The caller must first check :func:`backward_fold_refusal`. Result cast as in
    :func:`fold_forward`.
    """
    s, t = bn.scale_shift()
    ndim = np.ndim(weight)
    in_axis %= ndim
    out_axis %= ndim
    w_new = _scaled_rounded(weight, s, in_axis, groups, "weight")
    tw = _scale_axis(weight, t, in_axis, groups)
    # Sum W*t over everything except the output-channel axis (and the group axis).
    if out_axis == 0:
        shift = tw.reshape(tw.shape[0], -1).sum(axis=1)
    else:  # ConvTranspose [Cin, Cout/g, k..] or [in, out]: output channel g*Cout/g + j.
        cin, per = tw.shape[0], tw.shape[1]
        grouped = tw.reshape(groups, cin // groups, per, -1)
        shift = grouped.sum(axis=(1, 3)).reshape(-1)
    b64 = np.zeros_like(shift) if bias is None else _f64(bias).reshape(-1)
    b_new = b64 + shift
    b_dtype = np.asarray(bias).dtype if bias is not None else w_new.dtype
    return Folded(w_new, _checked(b_new, b_dtype, "bias"))


def per_channel(values: np.ndarray, channel_axis: int = 0) -> np.ndarray | None:
    """Reduce per-activation BN parameters (ONNX ``spatial=0``) to one value per channel.

    Returns the ``[C]`` vector when every channel's values are identical across the other
    axes (then the per-channel fold is exact), else ``None``.
    """
    arr = np.asarray(values)
    if arr.ndim <= 1:
        return arr.reshape(-1)
    moved = np.moveaxis(arr, channel_axis, 0).reshape(arr.shape[channel_axis], -1)
    if np.all(moved == moved[:, :1]):
        return moved[:, 0].copy()
    return None


# ---------------------------------------------------------------------------------------------
# Reach (issue 9): affine chains as BNs, BN slices over a concat, BN over a sum.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Broadcast:
    """Where a constant operand of ``x * a`` / ``x + b`` lies: ``channels`` values on the axis
    ``from_end`` places before the end of ``x`` (``-1``: the last axis), read off the
    constant's shape by right-aligned broadcasting; ``rank`` is the constant's own rank (an
    ``x`` of lower rank would be broadcast up, which no fold reproduces)."""

    from_end: int | None  # None: a scalar (one value for every element)
    channels: int
    rank: int


def broadcast_of(shape: Sequence[int]) -> Broadcast | None:
    """The :class:`Broadcast` of a constant of ``shape``; None if it varies on several axes
    (then ``x * a`` is not a per-channel affine, e.g. a positional embedding)."""
    varying = [i for i, d in enumerate(shape) if d != 1]
    if not varying:
        return Broadcast(None, 1, len(shape))
    if len(varying) > 1:
        return None
    return Broadcast(varying[0] - len(shape), int(shape[varying[0]]), len(shape))


def compose_affine(
    steps: Sequence[tuple[str, np.ndarray | float, bool]], channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Compose a chain of ``x op c`` steps into ``x * a + b`` per channel, in float64.

    Each step is ``(op, c, c_first)`` with ``op`` in ``add``/``sub``/``mul``/``div``, ``c`` one
    value per channel (size ``channels``) or one value in all, ``c_first`` for ``c op x``
    (``c - x``: ``a, b -> -a, c - b``; ``c + x``, ``c * x`` commute; ``c / x`` is not affine
    and raises). The result is exact in float64 up to the rounding of each step.
    """
    a = np.ones(channels)
    b = np.zeros(channels)
    for op, c, c_first in steps:
        v = _f64(c).reshape(-1)
        if v.size not in (1, channels):
            raise UnsafeFoldError(f"affine constant has {v.size} values, expected {channels}")
        if op == "mul":
            a, b = a * v, b * v
        elif op == "div" and not c_first:
            a, b = a / v, b / v
        elif op == "add":
            b = b + v
        elif op == "sub":
            a, b = (-a, v - b) if c_first else (a, b - v)
        else:
            raise UnsafeFoldError(f"{op} with the constant first is not an affine map of x")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise UnsafeFoldError("the affine chain has non-finite scale or shift")
    return a, b


def affine_bn(scale: np.ndarray, shift: np.ndarray) -> BNParams:
    """The BN that computes ``x * scale + shift`` exactly: mean 0, var 1, eps 0, so
    ``s = scale / sqrt(1) = scale`` and ``t = shift - 0 * s = shift`` bit for bit."""
    scale = _f64(scale).reshape(-1)
    return BNParams(np.zeros_like(scale), np.ones_like(scale), 0.0, scale,
                    _f64(shift).reshape(-1))


def slice_bn(bn: BNParams, start: int, stop: int) -> BNParams:
    """The BN over channels ``start:stop`` of ``bn`` (a BN after a channel concat acts on each
    input's slice independently: ``BN(cat(y1, y2)) = cat(BN[:c1](y1), BN[c1:](y2))``)."""
    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.asarray(a).reshape(-1)[start:stop].copy()

    mean, var = cut(bn.mean), cut(bn.var)
    assert mean is not None and var is not None
    return BNParams(mean, var, bn.eps, cut(bn.gamma), cut(bn.beta))


def spread_features(bn: BNParams, features: int, positions: int) -> BNParams | None:
    """The per-feature BN after ``[N, C, *spatial]`` is flattened into rows of ``features``.

    With ``positions = prod(spatial)`` values per channel, row-major flattening puts channel
    ``(f // positions) % C`` at feature ``f``, so the BN is the per-feature affine map with its
    parameters repeated that way. ``None`` when ``features`` is not a multiple of
    ``C * positions`` (a row would mix channels at different offsets).
    """
    channels = bn.channels
    if positions < 1 or features % (channels * positions):
        return None
    channel = (np.arange(features) // positions) % channels

    def spread(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.asarray(a).reshape(-1)[channel]

    mean, var = spread(bn.mean), spread(bn.var)
    assert mean is not None and var is not None
    return BNParams(mean, var, bn.eps, spread(bn.gamma), spread(bn.beta))


def split_sum(bn: BNParams, summands: int) -> list[BNParams]:
    """BNs for each summand of ``BN(y1 + ... + yn) = (s*y1 + t) + s*y2 + ... + s*yn``:
    the first carries the shift, the others scale only (exact, as affine BNs)."""
    s, t = bn.scale_shift()
    return [affine_bn(s, t if i == 0 else np.zeros_like(t)) for i in range(summands)]


# ---------------------------------------------------------------------------------------------
# Reach, ONNX side (issue 9): BN on a constant, BN over a concat of several layers.
# ---------------------------------------------------------------------------------------------

def evaluate_bn(x: np.ndarray, bn: BNParams, *, training: bool, axis: int = 1) -> np.ndarray:
    """``BN(x)`` in float64 for a constant ``x`` with channels on ``axis``.

    ``training=True`` uses the batch statistics of ``x`` (mean and biased variance over every
    axis but ``axis``, as ONNX and torch normalize in training mode) instead of ``bn``'s
    running ones. The caller rounds the result once to its dtype (:func:`round_to`).
    """
    x64 = _f64(x)
    axis %= x64.ndim
    if training:
        others = tuple(i for i in range(x64.ndim) if i != axis)
        bn = BNParams(x64.mean(axis=others), x64.var(axis=others), bn.eps, bn.gamma, bn.beta)
    s, t = bn.scale_shift()
    shape = [1] * x64.ndim
    shape[axis] = -1
    return x64 * s.reshape(shape) + t.reshape(shape)
