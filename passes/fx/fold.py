"""Fold inference-mode BatchNorm into the neighbouring conv/linear of a torch.fx graph.

Forward fold (layer -> [data movement] -> BN): ``BN(y) = s * y + t`` per channel with
``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``, so ``BN(W (*) x + b) =
(s * W) (*) x + (s * b + t)``. Exact for Conv1d/2d/3d, ConvTranspose1d/2d/3d (any groups) and
Linear, module or functional (``F.conv*``, ``F.linear`` and their aten forms, core ATen's
``addmm``/``mm`` of a transposed weight read as ``aten.linear``: :mod:`.lowered`), whenever the
BN's channel axis is the layer's output-channel axis. Between the layer and the BN only pure
data movement is allowed (transpose/permute, flatten/view/reshape that keep the channel axis
whole, see :mod:`bnfold.passes.fx.axes`), e.g. LeViT's ``Linear -> flatten(0, 1) -> BN1d`` or
``Linear -> transpose(1, 2) -> BN1d``. The channel axis is tracked exactly: with
``example_inputs`` (or shapes already recorded in ``node.meta``) from the real shapes;
without them from every rank the graph allows there (:mod:`bnfold.passes.fx.ranks`: layers,
BNs, activations and reshapes with written-out ranks constrain it). If every allowed rank puts
the BN's channel on the layer's channel axis, the BN folds; if none does, it is kept
(``Linear`` on ``[N, L, C]`` then ``BatchNorm1d`` normalizes ``L``); if only some do
(``Linear -> BatchNorm1d`` with nothing fixing the rank: rank 2 folds exactly, rank 3 would
not), it folds with a rank dispatch (:mod:`bnfold.passes.fx.dispatch`): the folded layer
runs at the proven ranks, the original layer and BN at any other, so every input the original
accepted gives the original's result (the report entry's ``rank_dispatch`` lists the ranks,
and a note says so); a fold that cannot be dispatched (functional BN, affine chain, BN module
called twice) is kept with the reason.

Backward fold (BN -> [eval no-ops] -> layer, every value reader a layer): ``W (*) (s * x + t)
+ b = (W * s) (*) x + (W (*) t + b)``, exact under :func:`bnfold.algebra.backward_fold_refusal`
(always for Linear; for Conv when unpadded, non-zero padding modes, or ``t == 0``); with
several readers, into each (planned for all first: one refusal keeps the BN). A flatten of
every axis after the batch axis may sit before a Linear (a VGG-style head, ``BN -> flatten
-> [dropout] -> Linear``): channel ``c`` is then the block of ``P = in_features / C`` features
from ``c * P``, so the BN is a per-feature affine map with its parameters repeated
(:func:`bnfold.algebra.spread_features`), exact at every input the model runs on.

BN spellings: BN modules (SyncBatchNorm included), ``F.batch_norm`` and its aten forms,
constant per-channel affine chains (:mod:`bnfold.passes.fx.affine`: FrozenBatchNorm2d,
``(x - mean) / std``), and BNs on constants (:mod:`bnfold.passes.fx.constant_bn`: weight
standardization, evaluated once). Eval no-ops (:mod:`bnfold.passes.fx.noops`) are looked
through in both directions. Hooks: :mod:`bnfold.passes.fx.hooks`.

All math is :mod:`bnfold.algebra`: float64, rounded once to each tensor's dtype (fp16/bf16
folds are correctly rounded, <= 0.5 ulp from the exact fold).

Kept, with a reason: BN in training mode or without running statistics (batch statistics
cannot be folded), layer output (or an intermediate reshape) with other value users, wrong or
unprovable channel axis, layer subclasses, weights computed in the graph, non-exact backward
folds, folds that would overflow the dtype.

Sharing: a layer module called at several places (module reuse), or a weight also read
elsewhere in the graph, is folded into a COPY for this call site (a new submodule named
``<layer>_<bn>`` or a new attribute), so every call site folds with its own BN and nothing
else sees the change. Folded tensors are always new ``Parameter`` objects: a Parameter shared
by two layers (``right.weight = left.weight``) is never written through, each layer gets its
own folded weight.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.algebra import (
    BFLOAT16,
    BNParams,
    Folded,
    backward_fold_refusal,
    fold_backward,
    fold_forward,
    spread_features,
)
from bnfold.arguments import check_callable, check_flags
from bnfold.errors import UnsafeFoldError
from bnfold.gc_pause import gc_paused
from bnfold.geometry import ConvGeometry
from bnfold.passes.fx import computed_weights
from bnfold.passes.fx.affine import affine_chains
from bnfold.passes.fx.axes import (
    chain_input,
    chain_op,
    flatten_dims,
    follow,
    shared_on_path,
    to_layer,
    value_users,
)
from bnfold.passes.fx.channelwise import (
    channelwise_op,
    channelwise_rank,
    channelwise_refusal,
    channelwise_span,
    pools_to_channels,
)
from bnfold.passes.fx.constant_bn import fold_constant_bns
from bnfold.passes.fx.constants import Constants, roots
from bnfold.passes.fx.dispatch import dispatch_fold, dispatch_refusal, originals
from bnfold.passes.fx.hooks import carry_model_hooks, forget_holdings
from bnfold.passes.fx.lowered import raise_lowered_linears
from bnfold.passes.fx.noops import IDENTITY_OPS, cast_refusal, dropout_training
from bnfold.passes.fx.ranks import possible_ranks
from bnfold.passes.fx.sites import (
    MAX_RANK,
    BatchNormSite,
    LayerSite,
    arg_slot,
    batchnorm_site,
    bn_label,
    fetch,
    is_batchnorm,
    is_layer,
    layer_site,
    module_calls,
    module_stack_path,
    nested_batchnorms,
    to_numpy,
    to_torch,
)
from bnfold.passes.fx.splits import is_split_point, plan_split
from bnfold.passes.fx.trace import (
    drop_pending_shapes,
    open_model,
    shape_of,
)
from bnfold.report import PassResult, Report
from bnfold.selection import Selection


def fold_fx(
    model: nn.Module, example_inputs: Any = None, *, inplace: bool = False,
    include: Any = None, exclude: Any = None,
    progress: Callable[[int, int], Any] | None = None,
) -> PassResult:
    """Fold every exactly-foldable BN of ``model`` (``nn.Module`` or ``fx.GraphModule``).

    ``example_inputs`` (a tensor or a tuple of inputs) gives shapes, so channel axes through
    reshapes and of rank-ambiguous layers (Linear, Conv1d) can be checked without run-time
    rank dispatch (see the module docstring), and enables the ``torch.export`` fallback for
    models ``symbolic_trace`` cannot trace. The model runs on them only once a fold needs a
    shape (a report note says when none did; then they are not checked either). Without
    ``inplace`` the input is deep-copied and
    never modified; ``inplace=True`` rewrites a ``GraphModule`` input itself (its submodules,
    shared with whatever it was traced from, get the folded weights) and is refused for any
    other module, whose Python forward would go on calling its BNs on folded weights.
    ``torch.compile`` wrappers are unwrapped (the result is not compiled); TorchScript modules
    and lazy modules not yet run are refused with a :class:`~bnfold.errors.BnfoldError`.
    ``include`` / ``exclude``: BN name globs (:mod:`bnfold.selection`; the module path,
    ``"layer1.*"``, or the node name); a BN they leave out is kept, "excluded by the user".
    Returns ``(GraphModule, Report)`` with one entry per BN: ``folded`` (``into`` the layer,
    ``direction`` forward/backward) or ``kept`` with the reason. ``progress(done, total)``,
    when given, is called after each BN's forward try and each backward try (``total``: the
    BNs plus the backward tries known so far); the pass itself prints nothing.
    """
    check_flags(inplace=inplace)
    check_callable(progress, "progress(done, total)")
    with gc_paused():  # (the trace and the fold make many small linked objects)
        return _fold_fx(model, example_inputs, inplace=inplace, include=include,
                        exclude=exclude, progress=progress)


def _fold_fx(model: nn.Module, example_inputs: Any, *, inplace: bool, include: Any,
             exclude: Any, progress: Callable[[int, int], Any] | None) -> PassResult:
    """:func:`fold_fx`'s work (the cyclic collector paused meanwhile)."""
    tick = progress or _no_progress
    select = Selection.of(include, exclude)
    gm, how, args = open_model(model, example_inputs, inplace=inplace, shapes_on_demand=True)
    forget_holdings(gm)
    report = Report("fold_fx")
    carry_model_hooks(model, gm, how, report.notes)
    if how.startswith("torch.export"):
        report.notes.append(f"traced with {how}")
    elif "torch.compile" in how:
        report.notes.append("the model was wrapped by torch.compile: folded the module it "
                            "wraps; the result is not compiled (compile it again if wanted)")
    raise_lowered_linears(gm)
    consts = Constants(gm)
    for label, path in fold_constant_bns(gm, consts):
        report.add(label, "folded", into=path, direction="constant",
                   kind="batch_norm on a constant")
    folder = _Folder(gm, consts)
    if args is None:
        _ = folder.possible_ranks  # read the ranks off the graph before any rewrite
    bns = [n for n in gm.graph.nodes if is_batchnorm(gm, n) or n in folder.affine]
    labels = {n: folder.affine[n].label if n in folder.affine else bn_label(gm, n)
              for n in bns}
    kinds = {n: folder.kind(n) for n in bns}
    outcomes: dict[fx.Node, _Outcome] = {}
    for i, n in enumerate(bns, 1):
        outcomes[n] = _excluded(select, n, labels[n]) or folder.forward(n, labels[n])
        tick(i, len(bns))
    later = [n for n in bns if outcomes[n].action == "kept" and not outcomes[n].final]
    for i, n in enumerate(later, len(bns) + 1):
        outcomes[n] = folder.backward(n, labels[n], outcomes[n].reason or "")
        tick(i, len(bns) + len(later))
    for n in bns:
        o = outcomes[n]
        at_rank = {"exact_at_rank": folder.example_rank[n]} if o.action == "folded" and \
            n in folder.example_rank else {}
        report.add(labels[n], o.action, into=o.into, reason=o.reason, **o.details, **at_rank,
                   kind=kinds[n])
    for label, kind, reason in nested_batchnorms(gm):
        report.add(label, "kept", reason=reason, kind=kind)
    for key, text in _RANK_NOTES:
        count = sum(key in e.details for e in report.entries)
        if count:
            report.notes.append(f"{count} fold(s) {text}")
    folder.cleanup()
    forget_holdings(gm)
    if drop_pending_shapes(gm):
        report.notes.append("example_inputs were not run: no fold needed a shape")
    return PassResult(gm, report)


#: The report notes on folds whose exactness depends on the input rank, by entry detail.
_RANK_NOTES = (
    ("rank_dispatch", "are exact only at the input ranks in their rank_dispatch (the graph "
     "alone does not fix the rank): the folded model runs the folded layer at those ranks "
     "and the original layer and BN at any other. Pass example_inputs to fold without "
     "dispatch"),
    ("exact_at_rank", "rest on the example inputs' rank (exact_at_rank): their layer and BN "
     "take other ranks too, where the BN would normalize another axis than the layer's "
     "channels; call the folded model at that rank (without example_inputs such a fold is "
     "rank-dispatched instead)"),
)


def _no_progress(done: int, total: int) -> None:
    """The default progress callback: nothing to report to."""


@dataclass
class _Outcome:
    action: str
    into: str | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    final: bool = False  # a kept BN that no direction can fold (training mode...)


def _kept(reason: str, *, final: bool = False) -> _Outcome:
    return _Outcome("kept", reason=reason, final=final)


def _excluded(select: Selection, node: fx.Node, label: str) -> _Outcome | None:
    """A final "kept" when the user's globs leave the BN out; its label is ``module``,
    ``module (node)`` or ``node``, so the globs see the module path and the node name."""
    why = select.refusal((label, node.name, label.split(" (")[0]))
    return None if why is None else _kept(why, final=True)


class _Folder:
    """The rules (forward, backward) and the graph edits they share."""

    def __init__(self, gm: fx.GraphModule, consts: Constants) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.consts = consts
        self.affine = affine_chains(gm, consts)
        self._sites: dict[fx.Node, BatchNormSite | str] = {}
        self.stale: set[str] = set()  # attribute paths whose get_attr nodes were erased
        self.removed_modules: set[str] = set()
        #: BN node -> the example inputs' rank its fold rests on (another rank the layer and
        #: BN take would not fit: the graph alone leaves it open)
        self.example_rank: dict[fx.Node, int] = {}

    def site(self, node: fx.Node) -> BatchNormSite | str:
        """The BN (or BN-like affine chain) at ``node``, or why it cannot fold; read once per
        BN (the backward try reuses the forward try's): no fold rewrites a BN's statistics,
        and its input is read off the graph when used."""
        if node not in self._sites:
            self._sites[node] = self.affine[node].site if node in self.affine else \
                batchnorm_site(self.gm, node, self.consts)
        return self._sites[node]

    def kind(self, node: fx.Node) -> str:
        """What the report calls the BN at ``node``: its class, ``F.batch_norm`` or the
        affine chain's ops (``affine mul+add``)."""
        if node in self.affine:
            return self.affine[node].kind
        if node.op == "call_module":
            return type(self.gm.get_submodule(str(node.target))).__name__
        return "F.batch_norm"

    # -- rules ------------------------------------------------------------------------------

    def forward(self, node: fx.Node, label: str) -> _Outcome:
        """Fold ``layer -> [data movement] -> BN`` into the layer."""
        site = self.site(node)
        if isinstance(site, str):
            return _kept(site, final=True)
        x, chain = to_layer(self.gm, site.input)
        if not is_layer(self.gm, x):
            if not chain and is_split_point(x):
                return self._split_bn(site, x, label)
            if dropout_training(self.gm, x):
                return _kept(f"its input comes from {x.name} ({_node_kind(self.gm, x)}), a "
                             "dropout in training mode: it zeroes random elements at each "
                             "call (in eval it is a no-op the fold looks through)")
            return _kept(f"its input comes from {x.name} ({_node_kind(self.gm, x)}), not from "
                         "a conv/linear")
        layer = layer_site(self.gm, x, self.consts)
        if isinstance(layer, str):
            return _kept(layer)
        why = shared_on_path(layer.label, [layer.node, *chain], site.node)
        if why:
            return _kept(why)
        why, guard = self._axis_check(layer, layer.node, chain, site)
        why = why or self._chain_refusal(site, layer, chain)
        if why:
            return _kept(why)
        try:
            folded = fold_forward(
                to_numpy(layer.weight), _np_or_none(layer.bias), site.params,
                out_axis=layer.weight_out_axis, groups=layer.groups,
            )
        except UnsafeFoldError as exc:
            return _kept(str(exc))
        why = self._dispatch_refusal(guard, [layer.node], site)
        if why:
            return _kept(why)
        original = originals(self.gm, [layer.node]) if guard else []
        into, copied = self._write(layer, folded, label)
        details: dict[str, Any] = {"direction": "forward", "layer": layer.kind, **copied}
        if chain:
            details["through"] = [str(chain_op(self.gm, c)) for c in chain]
        bn_ranks = tuple(end[0] for r in guard if isinstance(
            end := follow(self.gm, chain, r, layer.channel_axis(r) or 0), tuple))
        return self._folded(into, details, site, guard, bn_ranks, original)

    def _split_bn(self, site: BatchNormSite, point: fx.Node, label: str) -> _Outcome:
        """Fold a BN after a concat or sum of layer outputs into those layers
        (:mod:`bnfold.passes.fx.splits`); a concat input that is no layer keeps its slice."""
        shape = shape_of(point)
        ranks = {len(shape)} if shape is not None else set(
            self.possible_ranks.get(point, ()))

        def axis_check(layer: LayerSite, chain: list[fx.Node]) -> str | None:
            why, guard = self._axis_check(layer, layer.node, chain, site)
            if guard:
                why = f"{layer.label} fits the BN only at some input ranks (pass " \
                      "example_inputs)"
            return why or self._chain_refusal(site, layer, chain)

        try:
            plan = plan_split(self.gm, site, point, ranks, axis_check)
        except UnsafeFoldError as exc:
            return _kept(str(exc))
        if isinstance(plan, str):
            return _kept(plan)
        written = [self._write(layer, folded, label) for layer, folded in plan.folds]
        into = ", ".join(name for name, _ in written)
        details: dict[str, Any] = {"direction": "forward", "layer": plan.folds[0][0].kind,
                                   "split": plan.kind, **_copies(written)}
        if plan.kept is None:
            self._remove(site)
            return _Outcome("folded", into=into, details=details)
        node, part, start, stop, why = plan.kept
        self._slice_bn(point, node, part, label)
        self._remove(site)
        details["folded_into"] = into
        return _Outcome("kept", reason=(
            f"channels {start}:{stop} of {point.name} come from {node.name} ({why}): kept as a "
            f"BN over those {stop - start} channels only (the others folded into {into})"),
            details=details, final=True)

    def _slice_bn(self, cat: fx.Node, node: fx.Node, bn: BNParams, label: str) -> None:
        """Insert ``F.batch_norm`` with ``bn`` (a slice of the BN, same dtype) on ``node``
        where ``cat`` reads it."""
        attrs: list[fx.Node | None] = []
        for key, value in (("mean", bn.mean), ("var", bn.var), ("weight", bn.gamma),
                           ("bias", bn.beta)):
            if value is None:
                attrs.append(None)
                continue
            name = _free_name(self.gm, f"{_slug(label)}_slice_{key}")
            self.gm.register_buffer(name, _from_numpy(value))
            with self.graph.inserting_before(cat):
                attrs.append(self.graph.get_attr(name))
        with self.graph.inserting_before(cat):
            sliced = self.graph.call_function(
                F.batch_norm, (node, *attrs, False, 0.0, float(bn.eps)))
        tensors = [sliced if t is node else t for t in cat.args[0]]
        cat.args = (tensors, *cat.args[1:])

    def backward(self, node: fx.Node, label: str, forward_reason: str) -> _Outcome:
        """Fold ``BN -> [no-ops] -> layer`` into the layer when every value reader of the BN
        is a layer (each through its own eval no-ops): into each, as copies where a layer is
        shared. Planned for every reader first; one refusal keeps the BN whole."""
        site = self.site(node)
        assert not isinstance(site, str)
        readers = self._readers(site)
        if isinstance(readers, str):
            return _kept(f"{forward_reason}; backward fold: {readers}")
        plans: list[tuple[LayerSite, Folded]] = []
        guards: set[tuple[int, ...]] = set()
        through: list[str] = []
        for reader, flat in readers:
            layer = layer_site(self.gm, reader, self.consts)
            if isinstance(layer, str):
                return _kept(f"{forward_reason}; backward fold: {layer}")
            params: BNParams | str = site.params
            if flat is None:
                why, guard = self._axis_check(layer, site.input, [], site)
            else:  # the flatten fixes the rank question: channel c is a block of features
                params, guard = self._flattened(site, flat, layer), ()
                why = params if isinstance(params, str) else None
                through.append(flat.name)
            try:  # both the exactness check and the fold read the BN's statistics
                if why is None:
                    assert not isinstance(params, str)
                    why = backward_fold_refusal(
                        layer.kind, params, ConvGeometry.symmetric(
                            tuple(layer.weight.shape[2:]), layer.padding, stride=layer.stride,
                            dilation=layer.dilation, padding_mode=layer.padding_mode,
                            output_padding=layer.output_padding),
                    ) or self._dtype_refusal(site, layer)
                if not why:
                    assert not isinstance(params, str)
                    plans.append((layer, fold_backward(
                        to_numpy(layer.weight), _np_or_none(layer.bias), params,
                        in_axis=layer.weight_in_axis, groups=layer.groups,
                        out_axis=layer.weight_out_axis,
                    )))
            except UnsafeFoldError as exc:
                why = str(exc)
            if why:
                return _kept(f"{forward_reason}; backward fold into {layer.label}: {why}")
            guards.add(guard)
        guard = guards.pop()
        why = "its readers fold exactly at different input ranks" if guards else \
            self._dispatch_refusal(guard, [layer.node for layer, _ in plans], site)
        if why:
            return _kept(f"{forward_reason}; backward fold: {why}")
        original = originals(self.gm, [layer.node for layer, _ in plans]) if guard else []
        written = [self._write(layer, folded, label) for layer, folded in plans]
        details: dict[str, Any] = {"direction": "backward", "layer": plans[0][0].kind}
        if through:
            details["through"] = through
        if len(written) == 1:
            details.update(written[0][1])
        else:
            details.update(readers=len(written), **_copies(written))
        return self._folded(", ".join(into for into, _ in written), details, site, guard,
                            guard, original)

    def _readers(self, site: BatchNormSite) -> list[tuple[fx.Node, fx.Node | None]] | str:
        """The layers reading the BN's output (through eval no-ops, per-channel ops that pass
        its affine map, :mod:`.channelwise`, and at most one flatten of everything after the
        batch axis), each with that flatten or ``None``; or why not all readers are layers
        (the first reader that is not, or the op on the way the BN does not pass)."""
        layers = []
        for user in value_users(site.output):
            prev, cur, flat = site.output, user, None
            while not is_layer(self.gm, cur) and chain_input(cur) is prev and (
                    chain_op(self.gm, cur) in IDENTITY_OPS
                    or (flat is None and channelwise_op(self.gm, cur) is not None)
                    or (flat is None and chain_op(self.gm, cur) == "flatten")):
                if chain_op(self.gm, cur) == "flatten":
                    if flatten_dims(self.gm, cur) != (1, -1):
                        return f"{cur.name} (after the BN) flattens other dims than all " \
                               "after the batch axis"
                    flat = cur
                elif self._rank_drop(site, cur):
                    if not self._pools_to_channels(site, cur):
                        return f"{cur.name} ({chain_op(self.gm, cur)}) leaves more dims " \
                               "than (batch, channel) at a rank the BN takes"
                    flat = cur  # (a mean to (N, C): one feature per channel)
                why = cast_refusal(cur, None) or channelwise_refusal(
                    self.gm, cur, site.params) or self._channel_kept(site, cur)
                if why:
                    return why
                nxt = value_users(cur)
                if len(nxt) != 1:
                    return f"{cur.name} (after the BN) is read by {len(nxt)} nodes"
                prev, cur = cur, nxt[0]
            if not is_layer(self.gm, cur):
                return _reader_refusal(self.gm, cur, prev, site.output)
            if chain_input(cur) is not prev:
                return f"{cur.name} reads its output as a weight or bias, not as its input"
            layers.append((cur, flat))
        return layers if layers else "nothing reads its output"

    def _input_ranks(self, site: BatchNormSite) -> list[int]:
        """The ranks the BN's input can have: the recorded one, else each the BN takes."""
        shape = shape_of(site.input)
        return [len(shape)] if shape is not None else [
            r for r in range(1, MAX_RANK + 1) if site.channel_axis(r) is not None]

    def _rank_drop(self, site: BatchNormSite, node: fx.Node) -> bool:
        """True when the per-channel op at ``node`` (after the BN) can drop dims."""
        if channelwise_op(self.gm, node) is None:
            return False
        ranks = self._input_ranks(site)
        return any(channelwise_rank(self.gm, node, r) not in (None, r) for r in ranks)

    def _pools_to_channels(self, site: BatchNormSite, node: fx.Node) -> bool:
        """True when the mean at ``node`` (after the BN, and rank-keeping ops) gives
        ``(N, C)`` at every rank the BN's input can have where the mean runs (the BN's
        channel axis is 1 there)."""
        ranks = [r for r in self._input_ranks(site)
                 if channelwise_span(self.gm, node, r) <= r]
        return bool(ranks) and all(site.channel_axis(r) == 1 and pools_to_channels(
            self.gm, node, r) for r in ranks)

    def _channel_kept(self, site: BatchNormSite, node: fx.Node) -> str | None:
        """Why the per-channel op at ``node`` (after the BN) may work along the BN's channel
        axis, at a rank it can have (None: at each, the axis lies before its dims)."""
        if channelwise_op(self.gm, node) is None:
            return None

        def along(rank: int) -> bool:
            axis = site.channel_axis(rank)
            return axis is not None and axis >= rank - channelwise_span(self.gm, node, rank)
        if not any(map(along, range(1, MAX_RANK + 1))):
            return None  # (at no rank: no shape needed)
        shape = shape_of(chain_input(node))  # (none: at some rank it does, as just seen)
        if shape is None or along(len(shape)):
            return (f"{node.name} ({chain_op(self.gm, node)}) works along the BN's channel "
                    "axis or one before it")
        return None

    @staticmethod
    def _flattened(site: BatchNormSite, flat: fx.Node, layer: LayerSite) -> BNParams | str:
        """The per-feature BN that ``BN -> [per-channel ops] -> flat -> layer`` puts on the
        Linear ``layer``'s input (:func:`bnfold.algebra.spread_features`): ``flat`` flattens
        every axis after the batch axis, so channel ``c`` of ``C`` is features ``c*P ..
        (c+1)*P - 1`` with ``P = in_features / C`` positions, whatever spatial shape runs (any
        other would not fit the Linear; a global pool before it, or ``flat`` a mean over
        every dim after the channel axis, :func:`pools_to_channels`: ``P = 1``). Exact at
        every rank the model runs at."""
        if site.chain:
            return "an affine chain before a flatten is not folded backward"
        if layer.kind != "linear":
            return f"{flat.name} feeds {layer.label}, not a Linear"
        features, channels = layer.weight.shape[1], site.params.channels
        shape = shape_of(flat)
        if shape is not None and (len(shape) != 2 or shape[1] != features):
            return f"{flat.name}'s output {list(shape)} does not have {features} features"
        spread = spread_features(site.params, features, features // channels)
        if spread is None:  # (in_features not a multiple of C)
            return (f"{layer.label} has {features} input features, not a multiple of the "
                    f"BN's {channels} channels")
        return spread

    def _chain_refusal(self, site: BatchNormSite, layer: LayerSite,
                       chain: Sequence[fx.Node]) -> str | None:
        """Why the BN does not pass back through ``chain`` (from ``layer`` to it) exactly: a
        cast that is no no-op, a per-channel op the BN's affine does not commute with
        (:func:`channelwise_refusal`), or constants of another dtype. None: it does."""
        return self._dtype_refusal(site, layer) or next(
            (w for c in chain if (w := cast_refusal(c, layer.weight.dtype)
                                  or channelwise_refusal(self.gm, c, site.params))), None)

    @staticmethod
    def _dtype_refusal(site: BatchNormSite, layer: LayerSite) -> str | None:
        """An affine chain's constants must have the layer's dtype (else they promote it)."""
        if site.dtype is not None and site.dtype != layer.weight.dtype:
            return f"the affine's constants are {site.dtype} but {layer.label}'s weight is " \
                   f"{layer.weight.dtype} (the product would be promoted)"
        return None

    def _folded(self, into: str, details: dict[str, Any], site: BatchNormSite,
                ranks: tuple[int, ...], bn_ranks: tuple[int, ...],
                unfolded: list[tuple[fx.Node, nn.Module]]) -> _Outcome:
        """Remove the BN of a written fold; with ``ranks`` (the fold is exact only at those
        layer input ranks) rank-dispatch the layers and the BN instead (:mod:`.dispatch`):
        module calls in place, functions and affine chains cut out into modules."""
        if not ranks:
            self._remove(site)
            return _Outcome("folded", into=into, details=details)
        dispatch_fold(self.gm, self.consts, unfolded, ranks, _site_nodes(site), site.input,
                      bn_ranks)
        details["rank_dispatch"] = list(ranks)
        return _Outcome("folded", into=into, details=details)

    def _dispatch_refusal(self, ranks: tuple[int, ...], layers: list[fx.Node],
                          site: BatchNormSite) -> str | None:
        """Why a fold exact only at ``ranks`` cannot be rank-dispatched (None: it can, or
        ``ranks`` is empty: exact at every rank)."""
        why = dispatch_refusal(layers, _site_nodes(site), site.input, self.consts) \
            if ranks else None
        if why is None:
            return None
        return (f"the fold is exact only at input rank {' or '.join(map(str, ranks))} of the "
                f"ranks the graph allows, and {why}; pass example_inputs to fold it")

    # -- channel axis -----------------------------------------------------------------------

    def _axis_check(
        self, layer: LayerSite, start: fx.Node, chain: Sequence[fx.Node], site: BatchNormSite
    ) -> tuple[str | None, tuple[int, ...]]:
        """``(why the fold is refused, ranks to guard)`` for the BN's channel axis.

        The fold needs the BN's channel axis to be the layer's channel axis. ``start`` is the
        tensor at the layer's channel side: its output (forward fold, then ``chain``) or its
        input (backward fold, no chain). First every rank the layer accepts is checked: when
        each one fits or makes the layer or the BN raise, the fold is exact at whatever rank
        runs, and no shape is needed (no shape pass runs for it). A rank the chain cannot be
        followed at (:func:`follow` gives None: an op that raises there, or one it cannot
        read) counts as one that does not fit. Otherwise, with a recorded shape there is one
        rank to check. Without, every rank the graph allows at ``start``
        (:func:`possible_ranks`) is checked: none fits -> refused; all fit -> folded; some fit
        -> folded with a run-time guard that ``start`` has one of the fitting ranks (the
        returned ranks), so no input of another rank can run through a fold that is not exact
        for it.
        """
        good, problems = self._rank_fits(layer, chain, site, layer.ranks())
        if good and not problems:
            return None, ()
        shape = shape_of(start)
        if shape is not None:
            ranks = [len(shape)]
        else:
            ranks = sorted(self.possible_ranks[start] & set(layer.ranks()))
        good, problems = self._rank_fits(layer, chain, site, ranks)
        if problems and (shape is not None or not good):
            rank, text = problems[0]
            if shape is None and len(ranks) == 1:
                text = f"{text} (the graph allows only rank {rank} there)"
            elif shape is None:
                allowed = ", ".join(map(str, ranks))
                text = f"{text} (at rank {rank}, one of the ranks {allowed} the graph allows)"
            return text, ()
        if not good:
            return f"the BN's input rank does not fit {layer.label}'s output", ()
        if shape is not None:
            self.example_rank[site.node] = len(shape)
        return None, tuple(good) if problems else ()

    def _rank_fits(self, layer: LayerSite, chain: Sequence[fx.Node], site: BatchNormSite,
                   ranks: Iterable[int]) -> tuple[list[int], list[tuple[int, str]]]:
        """``(ranks where the BN's channel is the layer's, (rank, why not) where it is not)``;
        a rank where the layer or the BN raises is in neither."""
        good, problems = list[int](), list[tuple[int, str]]()
        for rank in ranks:
            axis = layer.channel_axis(rank)
            end = None if axis is None else follow(self.gm, chain, rank, axis)
            if isinstance(end, str):
                problems.append((rank, end))
                continue
            if axis is not None and end is None:
                names = ", ".join(c.name for c in chain)
                problems.append((rank, f"{layer.label}'s channels cannot be followed through "
                                       f"{names} at rank {rank}"))
                continue
            channel = None if end is None else site.channel_axis(end[0])
            if end is not None and channel is None and site.chain:
                problems.append((rank, f"the affine's constants have more dims than its "
                                       f"rank-{end[0]} input (they broadcast it up)"))
                continue
            if end is None or channel is None:
                continue  # the layer or the BN raises at this rank
            if channel == end[1]:
                good.append(rank)
                continue
            seen = shape_of(site.input)
            where = f"of its input {list(seen)}" if seen else "of its input"
            what = "the affine scales" if site.chain else "the BN normalizes"
            problems.append((rank, f"{what} dim {channel} {where} but "
                                   f"{layer.label}'s channels are on dim {end[1]}"))
        return good, problems

    @functools.cached_property
    def possible_ranks(self) -> dict[fx.Node, frozenset[int]]:
        """Ranks allowed by the graph at each node (computed once, before any rewrite)."""
        return possible_ranks(self.gm)

    # -- graph edits ------------------------------------------------------------------------

    @functools.cached_property
    def _shared(self) -> dict[int, list[Any]]:
        """``id -> [Parameter, slots]`` for each Parameter held in more than one slot of the
        graph module (``right.weight = left.weight``), counted once before the first write
        and kept current by :meth:`_release_slot` (a fold's new Parameters are never shared):
        one walk of the parameters instead of one per fold."""
        slots: dict[int, list[Any]] = {}
        for _, p in self.gm.named_parameters(remove_duplicate=False):
            slots.setdefault(id(p), [p, 0])[1] += 1
        return {k: held for k, held in slots.items() if held[1] > 1}

    def _slots(self, param: torch.Tensor) -> int:
        """How many slots of the graph module hold ``param`` (1 when not shared)."""
        held = self._shared.get(id(param))
        return 1 if held is None or held[0] is not param else held[1]

    def _release_slot(self, param: torch.Tensor | None) -> None:
        """A fold is about to replace one slot holding ``param``."""
        held = self._shared.get(id(param))
        if held is not None and held[0] is param:
            held[1] -= 1

    def _write(self, layer: LayerSite, folded: Folded, bn: str) -> tuple[str, dict[str, Any]]:
        """Give ``layer`` the folded tensors; return its name now and report details.

        Details say when the fold went into a copy: ``copy_of`` (a new submodule for a reused
        module, or new attributes for a functional weight read elsewhere) or
        ``untied_shared_weight`` (a new Parameter for a module whose weight others share).
        """
        weight = to_torch(folded.weight, layer.weight)
        bias = to_torch(folded.bias, layer.bias if layer.bias is not None else layer.weight)
        if layer.node.op == "call_module":
            return self._write_module(layer, weight, bias, bn)
        copied, materialized = False, []
        for key, value in (("weight", weight), ("bias", bias)):
            computed = self._computed_arg(layer.node, key)
            if computed is not None:
                self._write_computed(layer.node, key, computed, value, bn)
                materialized.append(f"{key} ({_op_name(computed)})")
            else:
                copied |= self._write_attr(layer, key, value, bn)
        details: dict[str, Any] = {"copy_of": layer.label} if copied else {}
        if materialized:
            details["materialized"] = materialized
        return layer.label, details

    @staticmethod
    def _computed_arg(node: fx.Node, key: str) -> fx.Node | None:
        """The node computing functional layer ``node``'s ``key``, when not a ``get_attr``."""
        slot = arg_slot(node, key)
        value = None if slot is None else (
            node.args[slot[1]] if slot[0] == "args" else node.kwargs[slot[1]])
        return value if isinstance(value, fx.Node) and value.op != "get_attr" else None

    def _write_computed(self, node: fx.Node, key: str, computed: fx.Node, value: torch.Tensor,
                        bn: str) -> None:
        """Replace the computation of functional layer ``node``'s ``key`` by a new attribute
        holding ``value`` (in the module whose forward made ``node`` when the graph module
        still has it, else beside the model tensor the computation read first; a parameter
        when that is one), and drop the computation once nothing else reads it."""
        root = roots(computed)[0]
        parent = self._module_path(node) or self._split(str(root.target))[0]
        attr = self._new_attr(parent, f"{key}_{_slug(bn)}", _like(value, fetch(self.gm, root)),
                              node)
        node.replace_input_with(computed, attr)
        self.consts.erase_unused(computed)

    def _new_attr(self, parent: str, name: str, value: torch.Tensor, user: fx.Node) -> fx.Node:
        """Register ``value`` in module ``parent`` under a free name like ``name`` (a
        parameter if it is one, else a buffer) and read it before ``user``."""
        owner = self.gm.get_submodule(parent) if parent else self.gm
        name = _free_name(owner, name)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(name, value)
        else:
            owner.register_buffer(name, value)
        with self.graph.inserting_before(user):
            return self.graph.get_attr(f"{parent}.{name}" if parent else name)

    def _write_module(
        self, layer: LayerSite, weight: torch.Tensor, bias: torch.Tensor, bn: str
    ) -> tuple[str, dict[str, Any]]:
        target = str(layer.node.target)
        module = self.gm.get_submodule(target)
        materialized = computed_weights.materialize(module)  # (deepcopy refuses weight_norm's)
        inside = [n for n in self.graph.find_nodes(op="get_attr")
                  if str(n.target).startswith(target + ".")]
        copied = len(module_calls(self.graph, target)) + len(inside) > 1
        if copied:
            module = copy.deepcopy(module)
            parent, _, leaf = target.rpartition(".")
            owner = self.gm.get_submodule(parent) if parent else self.gm
            name = _free_name(owner, f"{leaf}_{_slug(bn)}")
            owner.add_module(name, module)
            target = f"{parent}.{name}" if parent else name
            layer.node.target = target
        tied = self._slots(module.weight) > 1
        old_bias = module.bias if module.bias is not None else module.weight
        self._release_slot(module.weight)
        self._release_slot(module.bias)
        module.weight = _like(weight, module.weight)
        module.bias = _like(bias, old_bias)
        details: dict[str, Any] = {"copy_of": layer.label} if copied else (
            {"untied_shared_weight": True} if tied else {})
        if materialized:
            details["materialized"] = materialized
        return target, details

    def _module_path(self, node: fx.Node) -> str | None:
        """The module whose forward made ``node`` (``nn_module_stack``), if ``gm`` has it."""
        path = module_stack_path(node)
        try:
            self.gm.get_submodule(path)
        except AttributeError:
            return None
        return path or None

    def _write_attr(self, layer: LayerSite, key: str, value: torch.Tensor, bn: str) -> bool:
        """Store a functional layer's folded ``key``; True if a new attribute was needed."""
        node = layer.node
        slot = arg_slot(node, key)
        old = None if slot is None else (
            node.args[slot[1]] if slot[0] == "args" else node.kwargs[slot[1]])
        weight_node = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        assert isinstance(weight_node, fx.Node)
        like = fetch(self.gm, old) if isinstance(old, fx.Node) else fetch(self.gm, weight_node)
        if isinstance(old, fx.Node) and self._exclusive(old, node):
            owner, leaf = self._owner(str(old.target))
            self._release_slot(like)
            setattr(owner, leaf, _like(value, like))
            return False
        base = str(old.target) if isinstance(old, fx.Node) else f"{weight_node.target}_{key}"
        parent, leaf = self._split(base)
        attr = self._new_attr(parent, f"{leaf}_{_slug(bn)}", _like(value, like), node)
        if slot is not None and slot[0] == "args":
            new_args = list(node.args)
            new_args[int(slot[1])] = attr
            node.args = tuple(new_args)
        else:
            node.kwargs = {**node.kwargs, key: attr}
        if isinstance(old, fx.Node) and not old.users:
            self.stale.add(str(old.target))
            self.graph.erase_node(old)
        return isinstance(old, fx.Node)

    def _exclusive(self, attr: fx.Node, user: fx.Node) -> bool:
        """True when ``attr``'s tensor is read only by ``user`` anywhere in the graph."""
        target = str(attr.target)
        return set(attr.users) == {user} and not any(
            n is not attr for n in self.graph.find_nodes(op="get_attr", target=target)
        ) and not any(module_calls(self.graph, p) for p in _prefixes(target))

    def _remove(self, site: BatchNormSite) -> None:
        site.output.replace_all_uses_with(site.input)
        if site.chain:
            operands = [a for n in site.chain for a in n.all_input_nodes]
            for n in reversed(site.chain):
                self.graph.erase_node(n)
            for a in operands:
                self.consts.erase_unused(a)
            return
        self.graph.erase_node(site.output)
        if site.node is not site.output:
            self.graph.erase_node(site.node)
        if site.node.op == "call_module":
            self.removed_modules.add(str(site.node.target))
        for attr in site.attr_nodes:
            if not attr.users:
                self.stale.add(str(attr.target))
                self.graph.erase_node(attr)

    def cleanup(self) -> None:
        """Drop the BN modules and constants nothing reads any more, then regenerate code."""
        for node in self.graph.find_nodes(op="get_attr"):
            if not node.users:
                self.stale.add(str(node.target))
                self.graph.erase_node(node)
        refs = {str(n.target) for op in ("get_attr", "call_module")
                for n in self.graph.find_nodes(op=op)}
        inside = {p for r in refs for p in _prefixes(r)}  # modules holding something read

        def used(path: str) -> bool:  # read, holds what is read, or lies inside what is read
            return path in refs or path in inside or any(p in refs for p in _prefixes(path))

        owners = set()
        for path in sorted(self.stale):
            if not used(path):
                owner, leaf = self._owner(path)
                if hasattr(owner, leaf):
                    delattr(owner, leaf)
                owners.add(self._split(path)[0])
        for path in sorted(self.removed_modules | owners, key=len, reverse=True):
            if path and not used(path):
                self.gm.delete_submodule(path)
        self.graph.lint()
        self.gm.recompile()

    def _owner(self, path: str) -> tuple[nn.Module, str]:
        parent, leaf = self._split(path)
        return (self.gm.get_submodule(parent) if parent else self.gm), leaf

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        parent, _, leaf = path.rpartition(".")
        return parent, leaf


def _prefixes(path: str) -> list[str]:
    """The dotted paths enclosing ``path``: ``"a.b.c"`` -> ``["a", "a.b"]``."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _reader_refusal(gm: fx.GraphModule, reader: fx.Node, prev: fx.Node,
                    output: fx.Node) -> str:
    """Why the backward fold stops at ``reader`` (which reads ``prev``, the BN's output or
    the last op after it that the fold looks through): it is no conv/linear."""
    if reader.op == "output":
        what = "its output" if prev is output else f"{prev.name} (after the BN)"
        return f"{what} is a graph output"
    after = "" if prev is output else f" (through {prev.name})"
    return f"its output{after} feeds {reader.name} ({_node_kind(gm, reader)}), not a " \
           "conv/linear"


def _node_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """What ``node`` is, for a reason: ``a GELU module``, ``relu``, ``.chunk``, ``a graph
    input``, ``a model tensor``."""
    if node.op == "call_module":
        return f"a {type(gm.get_submodule(str(node.target))).__name__} module"
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_function":
        return _op_name(node)
    return "a graph input" if node.op == "placeholder" else "a model tensor"


def _op_name(node: fx.Node) -> str:
    """``node``'s op as the report names it: ``aten._weight_norm.default``, ``mul``."""
    op = node.target
    if isinstance(op, str | torch._ops.OpOverload):
        return str(op)
    return getattr(op, "__name__", str(op))


def _copies(written: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Report details for folds into several layers: which went into copies (``copy_of``:
    the layers copied, in order)."""
    copies = [c["copy_of"] for _, c in written if "copy_of" in c]
    return {"copy_of": copies} if copies else {}


def _site_nodes(site: BatchNormSite) -> list[fx.Node]:
    """The nodes a BN (or affine chain) is made of, input to output."""
    if site.chain:
        return list(site.chain)
    return [site.node] if site.node is site.output else [site.node, site.output]


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """A tensor of ``a`` (same dtype; ml_dtypes bfloat16 becomes torch.bfloat16)."""
    if a.dtype == BFLOAT16:
        return to_torch(a, torch.empty(0, dtype=torch.bfloat16))
    return torch.from_numpy(np.ascontiguousarray(a).copy())


def _np_or_none(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else to_numpy(t)


def _like(value: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """A new Parameter (same ``requires_grad``) when ``old`` is one, else the plain tensor."""
    if isinstance(old, nn.Parameter):
        return nn.Parameter(value, requires_grad=old.requires_grad)
    return value


def _slug(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_")


def _free_name(owner: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(owner, name):
        name, i = f"{base}_{i}", i + 1
    return name

