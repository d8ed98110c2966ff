"""IR-neutral geometry the folds share: where an axis lands through a reshape, and the spatial
geometry of a (transposed) convolution as the backward fold's exactness needs it.

No graph code: the FX and ONNX passes read shapes and attributes off their graphs and ask here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def reshape_axis(dims_in: Sequence[int | None], axis: int,
                 dims_out: Sequence[int | None]) -> int | None:
    """The output axis holding input ``axis`` whole through a row-major reshape, or ``None``.

    Element ``(pre, c, post)`` of ``dims_in`` (``c`` on ``axis``) keeps its indices exactly when
    some output axis ``b`` has ``dims_out[b] == dims_in[axis]`` and
    ``prod(dims_out[b+1:]) == prod(dims_in[axis+1:])`` (row-major linear indices are preserved,
    so the prefixes agree too). Dims before the axis may be unknown (``None``: a dynamic batch);
    those from it on must be known. A size-1 axis can sit on several output axes: the first
    one is returned.
    """
    tail = dims_in[axis:]
    if any(d is None for d in tail):
        return None
    inner, size = math.prod(tail[1:]), tail[0]  # type: ignore[arg-type]
    prod = 1
    for j in range(len(dims_out) - 1, -1, -1):
        d = dims_out[j]
        if d is None:
            return None
        if prod == inner and d == size:
            while j > 0 and size == 1 and dims_out[j - 1] == 1:
                j -= 1
            return j
        if prod > inner:
            return None
        prod *= d
    return None


@dataclass(frozen=True)
class ConvGeometry:
    """The spatial geometry of a convolution or transposed convolution, per spatial axis.

    ``pads_begin`` / ``pads_end``: the zero (or copied) rows added on each side; ``None`` when
    the runtime picks them (ONNX ``auto_pad=SAME_*`` with a kernel > 1), then they are not
    known to be zero. ``output_padding``: a transposed conv's extra rows at the end; ``None``
    when the output size is given at call time (ONNX ``output_shape``, torch ``output_size``),
    so it varies. ``padding_mode``: ``"zeros"``, or ``"reflect"``/``"replicate"``/
    ``"circular"``, whose borders copy the input (``pad(s*x+t) = s*pad(x)+t``).
    """

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads_begin: tuple[int, ...] | None
    pads_end: tuple[int, ...] | None
    output_padding: tuple[int, ...] | None = None
    padding_mode: str = "zeros"

    @classmethod
    def symmetric(cls, kernel: Sequence[int], padding: Sequence[int], *,
                  stride: Sequence[int] = (), dilation: Sequence[int] = (),
                  output_padding: Sequence[int] | None = (),
                  padding_mode: str = "zeros") -> ConvGeometry:
        """``padding`` on both sides of each axis (torch's layout); empty stride / dilation /
        output padding mean 1 / 1 / 0 on every axis."""
        n = len(kernel)
        pads = tuple(int(p) for p in padding)
        return cls(tuple(int(k) for k in kernel), tuple(stride) or (1,) * n,
                   tuple(dilation) or (1,) * n, pads, pads,
                   None if output_padding is None else tuple(output_padding) or (0,) * n,
                   padding_mode)

    def copies_border(self) -> bool:
        """The padding, if any, copies input values instead of adding zeros."""
        return self.padding_mode in ("reflect", "replicate", "circular")

    def unpadded(self) -> bool:
        """No padding on any side (known to be zero)."""
        return self.pads_begin is not None and self.pads_end is not None \
            and not any(self.pads_begin) and not any(self.pads_end)

    def every_output_sees_every_tap(self) -> bool:
        """A transposed conv whose every output position reads every kernel tap: stride 1, no
        output padding, and ``pads == dilation * (kernel - 1)`` on both sides of every axis."""
        full = tuple(d * (k - 1) for d, k in zip(self.dilation, self.kernel, strict=True))
        return (all(s == 1 for s in self.stride) and self.output_padding is not None
                and not any(self.output_padding)
                and self.pads_begin == full and self.pads_end == full)
