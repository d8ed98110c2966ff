"""Insert BatchNorm after the dense and conv layers of a torch model: a torch.fx graph rewrite.

The mirror image of the fold pass. Each candidate layer goes through one rule:
match (Linear / Conv / ConvTranspose, as a module or a functional call) -> check (include /
exclude, already normalized, produces the model output, channel count known) -> rewrite (a new
BN module after the layer, or after its activation) -> record (a report entry).

Which BN:

* ``nn.Linear`` / ``F.linear`` whose output is ``[N, C]`` -> ``nn.BatchNorm1d(C)``; whose output
  is ``[N, ..., C]`` (sequence models) -> :class:`bnfold.modules.FeatureBatchNorm` (BN over the
  last dim, which the fold pass folds). Without ``example_inputs`` the rank is unknown and a
  Linear gets ``FeatureBatchNorm``, which computes exactly ``BatchNorm1d`` on ``[N, C]``.
* ``Conv{d}d`` / ``ConvTranspose{d}d`` (module or functional) -> ``BatchNorm{d}d(out_channels)``.

A fresh BN is the identity up to ``1/sqrt(1 + eps)`` in eval mode (mean 0, var 1, gamma 1,
beta 0); in train mode it normalizes with batch statistics, which is the point. Use
:func:`bnfold.recalibrate` to give it statistics from data (``preserve_function=True`` makes
the eval-mode model compute what it computed before insertion).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from bnfold.arguments import check_flags
from bnfold.errors import BadInputError
from bnfold.modules import FeatureBatchNorm
from bnfold.passes.fx.hooks import carry_model_hooks
from bnfold.passes.fx.layers import (
    Layer,
    is_activation,
    is_dropout,
    is_shape_op,
    match_layer,
    norm_description,
)
from bnfold.passes.fx.lowered import raise_lowered_linears
from bnfold.passes.fx.sites import get_attr_value
from bnfold.passes.fx.trace import open_model, shape_of
from bnfold.passes.insert_policy import (
    check_options,
    following_norm,
    last_layers,
    selector_list,
    skip_reason,
)
from bnfold.report import Entry, PassResult, Report

#: Attribute set to ``True`` on every BN module this pass creates (read by ``recalibrate``).
INSERTED_ATTR = "bnfold_inserted"
#: Non-persistent buffer on an inserted BN holding the bias ``drop_bias=True`` removed.
DROPPED_BIAS_ATTR = "bnfold_dropped_bias"



def insert_bn_fx(
    model: nn.Module,
    *,
    position: str = "before_activation",
    skip_last: bool = True,
    include: Any = None,
    exclude: Any = None,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    drop_bias: bool = False,
    example_inputs: Any = None,
) -> PassResult:
    """Return ``(GraphModule, Report)``: ``model`` with a BN after each selected layer.

    ``model`` (an ``nn.Module`` or ``fx.GraphModule``) is not modified. Options:

    * ``position``: ``"before_activation"`` (layer -> BN -> activation) or
      ``"after_activation"`` (layer -> activation -> BN; a layer with no activation as its only
      user gets its BN right after it, and the report says so).
    * ``skip_last``: leave alone each layer with a path to a model output that crosses no other
      layer (the head).
    * ``include`` / ``exclude``: a module-name glob (``"features.*"``, or ``"features"``:
      a glob that matches a module selects every layer inside it; a functional call is
      named by its node name, e.g. ``"linear_1"``, or its weight attribute), a layer type
      (``nn.Conv2d`` also selects ``F.conv2d``), a function (``F.linear``), or a list of those.
      ``exclude`` wins over ``include``.
    * ``eps``, ``momentum``, ``affine``: passed to the new BN modules. Each new BN starts in
      the train/eval mode of its layer's module (a frozen, eval-mode block stays frozen).
    * ``drop_bias``: remove the bias of a layer whose BN follows it directly at every call
      site. In train mode this is exact (BN subtracts the batch mean, so a per-channel
      constant cancels); in eval mode the running mean must then be learned or recalibrated.
      The removed values stay on the BN (buffer ``bnfold_dropped_bias``, not saved in the
      state dict) so that ``recalibrate(preserve_function=True)`` can put them into beta.
    * ``example_inputs``: a tensor or tuple of tensors; shape propagation on them gives output
      ranks (BatchNorm1d vs FeatureBatchNorm) and channel counts of functional calls whose
      weight is not an attribute.

    Idempotent: a layer already followed by a normalization (BatchNorm, SyncBatchNorm,
    LayerNorm, GroupNorm, InstanceNorm, RMSNorm; module or functional; directly, after its
    activation, or through dropouts and reshapes) gets none, so inserting twice equals
    inserting once.
    """
    check_options(position, eps, momentum)
    check_flags(skip_last=skip_last, affine=affine, drop_bias=drop_bias)
    gm, how, _ = open_model(model, example_inputs)
    if eps == 0 and model.training:
        raise BadInputError("eps=0: torch's batch_norm refuses it in training mode, and the "
                            "BNs inserted into a model in training mode start in it; give "
                            "eps > 0, or call model.eval() first")
    report = Report("insert_bn")
    carry_model_hooks(model, gm, how, report.notes)
    gm.training = model.training
    raise_lowered_linears(gm)  # (a lowered program's addmm/mm Linears: aten.linear calls)
    layers = [layer for node in gm.graph.nodes if (layer := match_layer(gm, node)) is not None]
    if not layers:
        aten = any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
        raise BadInputError(
            f"{type(model).__name__} has no Linear, Conv or ConvTranspose layer (module or "
            "F.linear / F.conv* call) to insert BatchNorm after" + (
                "; its graph holds ATen ops (a torch.export graph?): pass the original "
                "nn.Module" if aten else "")
        )
    include_specs = _selectors(include, "include")
    exclude_specs = _selectors(exclude, "exclude")
    last = last_layers((n for n in gm.graph.nodes if n.op == "output"),
                       lambda n: n.all_input_nodes,
                       {layer.node for layer in layers}) if skip_last else set()
    if how.startswith("torch.export"):
        report.notes.append(f"traced with {how}")
    direct: dict[str, list[tuple[Layer, Entry]]] = {}
    unknown_rank, unknown_conv_rank = False, False
    for layer in layers:
        reason = _skip_reason(gm, layer, include_specs, exclude_specs, last)
        plan = None if reason else _plan_bn(gm, layer)
        if isinstance(plan, str):
            reason = plan
        if reason or plan is None:
            report.add(layer.name, "skipped", reason=reason)
            continue
        bn_cls, channels, rank = plan
        unknown_rank |= rank is None and layer.kind == "linear"
        unknown_conv_rank |= rank is None and layer.kind != "linear"
        entry = _insert(gm, layer, bn_cls, channels, position,
                        dict(eps=eps, momentum=momentum, affine=affine), report=report)
        if entry.details["after"] == layer.node.name:
            direct.setdefault(layer.name, []).append((layer, entry))
        elif drop_bias:
            entry.details["bias"] = "kept: an activation sits between the layer and its BN"
    if drop_bias:
        _drop_biases(gm, direct)
    if unknown_rank:
        report.notes.append(
            "no example_inputs: Linear layers got FeatureBatchNorm (BN over the last dim, the "
            "same as BatchNorm1d on [N, C]); pass example_inputs to get BatchNorm1d"
        )
    if unknown_conv_rank:
        report.notes.append(
            "no example_inputs: each conv's output was taken as batched ([N, C, ...]); a "
            "model called on unbatched inputs needs example_inputs (such a conv is then "
            "skipped, as its BatchNorm would not take the rank)"
        )
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, report)


# ---------------------------------------------------------------------------------------------
# Input handling.
# ---------------------------------------------------------------------------------------------

Selector = Any  # str glob | nn.Module subclass | function


def _selectors(value: Any, what: str) -> list[Selector]:
    return selector_list(value, what, lambda item: isinstance(item, str) or (
        isinstance(item, type) and issubclass(item, nn.Module)) or callable(item),
        "module-name globs, layer types or functions")


def _selected_by(layer: Layer, specs: Iterable[Selector]) -> str | None:
    """The first selector that matches ``layer``, as text, or ``None``.

    A glob matches the layer's name or the name of a module that contains it (``"backbone"``
    selects ``backbone.0``); a functional call is also named by its weight attribute
    (``"fc.weight"``, so ``"fc"`` selects the ``F.linear`` inside a traced ``fc`` module).
    """
    names = [layer.name]
    weight = layer.arg("weight") if layer.module is None else None
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        names.append(str(weight.target))
    paths = {".".join(parts[:i]) for name in names
             for parts in [name.split(".")] for i in range(1, len(parts) + 1)}
    for spec in specs:
        if isinstance(spec, str):
            if any(fnmatch.fnmatchcase(path, spec) for path in paths):
                return repr(spec)
        elif isinstance(spec, type):
            if issubclass(layer.module_type, spec):
                return spec.__name__
        elif spec is layer.function:
            return getattr(spec, "__name__", repr(spec))
    return None


# ---------------------------------------------------------------------------------------------
# Check: why a candidate gets no BN.
# ---------------------------------------------------------------------------------------------

def _skip_reason(gm: fx.GraphModule, layer: Layer, include: list[Selector],
                 exclude: list[Selector], last: set[fx.Node]) -> str | None:
    return skip_reason(lambda specs: _selected_by(layer, specs), include, exclude,
                       lambda: _following_norm(gm, layer.node), layer.node in last,
                       "the model output")


def _following_norm(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The normalization that ``node`` feeds directly or through activations / dropouts /
    reshapes that take it as their data input (``bn(h.flatten(0, 1))``, ``relu -> bn``,
    ``dropout -> bn``)."""
    def passes_through(user: fx.Node, value: fx.Node) -> fx.Node | None:
        keeps = is_activation(gm, user) or is_dropout(gm, user) or is_shape_op(gm, user)
        return user if keeps and user.args and user.args[0] is value else None

    return following_norm(node, lambda n: n.users, lambda user: norm_description(gm, user),
                          passes_through)


def _plan_bn(gm: fx.GraphModule, layer: Layer
             ) -> tuple[type[nn.Module], int, int | None] | str:
    """``(BN class, channels, output rank or None)``, or the reason no BN fits."""
    shape = shape_of(layer.node)
    rank = len(shape) if shape is not None else None
    channels = _channels(gm, layer, shape)
    if channels is None:
        return ("channel count unknown: the weight is computed at run time; "
                "pass example_inputs")
    if layer.kind == "linear":
        if rank is not None and rank < 2:
            return "unbatched output (rank 1): BatchNorm needs a batch dim"
        return (layer.row.batchnorm if rank == 2 else FeatureBatchNorm), channels, rank
    if rank is not None and rank != layer.dims + 2:
        return f"output has rank {rank}, not [N, C, ...] with {layer.dims} spatial dims"
    return layer.row.batchnorm, channels, rank


def _channels(gm: fx.GraphModule, layer: Layer, shape: tuple[int | None, ...] | None
              ) -> int | None:
    """Output channels, from the layer's weight (its table row says which axis) or else from
    the output shape."""
    weight = _layer_weight(gm, layer)
    if weight is not None:
        return layer.row.out_channels(weight.shape, layer.groups())
    if shape is not None and len(shape) >= 2:
        return shape[-1] if layer.kind == "linear" else shape[1]
    return None


# ---------------------------------------------------------------------------------------------
# Rewrite and record.
# ---------------------------------------------------------------------------------------------

def _insert(gm: fx.GraphModule, layer: Layer, bn_cls: type[nn.Module], channels: int,
            position: str, bn_options: dict[str, Any], *, report: Report) -> Entry:
    """Add the BN module next to its layer (``features.0`` -> ``features.0_bn``), in the
    layer module's train/eval mode (a layer of a frozen, eval-mode block gets an eval-mode BN),
    and route the layer's (or its activation's) readers through it."""
    anchor = layer.node
    if position == "after_activation" and len(anchor.users) == 1:
        (user,) = anchor.users
        if is_activation(gm, user):
            anchor = user
    weight = _layer_weight(gm, layer)
    bn = bn_cls(channels, **bn_options,
                device=weight.device if weight is not None else None,
                dtype=weight.dtype if weight is not None and weight.is_floating_point() else None)
    setattr(bn, INSERTED_ATTR, True)
    name = _free_name(gm, f"{layer.name}_bn")
    bn.train((layer.module or gm).training)
    gm.add_submodule(name, bn)
    with gm.graph.inserting_after(anchor):
        bn_node = gm.graph.call_module(name, (anchor,))
    anchor.replace_all_uses_with(bn_node, delete_user_cb=lambda user: user is not bn_node)
    placed = "after the layer" if anchor is layer.node else f"after activation {anchor.name}"
    if position == "after_activation" and anchor is layer.node:
        placed = "after the layer (no activation is its only user)"
    return report.add(name, "inserted", into=layer.name, after=anchor.name, layer=layer.name,
                      kind=bn_cls.__name__, channels=channels, position=placed)


def _layer_weight(gm: fx.GraphModule, layer: Layer) -> torch.Tensor | None:
    if layer.module is not None:
        return layer.module.weight
    return get_attr_value(gm, layer.arg("weight"))


def _free_name(gm: fx.GraphModule, base: str) -> str:
    taken = {n for n, _ in gm.named_modules()} | {n for n, _ in gm.named_parameters()} | {
        n for n, _ in gm.named_buffers()}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _drop_biases(gm: fx.GraphModule, direct: dict[str, list[tuple[Layer, Entry]]]) -> None:
    """Remove the bias of each layer whose every call site now feeds its own BN directly, and
    keep the removed values on each such BN as the non-persistent buffer
    ``bnfold_dropped_bias`` (``recalibrate(preserve_function=True)`` adds them back to beta)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for name, sites in direct.items():
        layer = sites[0][0]
        if layer.module is not None:
            outcome = _drop_module_bias(gm, layer.module, calls[name], len(sites))
        else:
            outcome = _drop_functional_bias(gm, layer)
        for _, entry in sites:
            if isinstance(outcome, str):
                entry.details["bias"] = outcome
                continue
            entry.details["bias"] = "dropped (BN's beta takes its role)"
            gm.get_submodule(entry.bn).register_buffer(DROPPED_BIAS_ATTR, outcome.clone(),
                                                       persistent=False)


def _drop_module_bias(gm: fx.GraphModule, module: nn.Module, calls: int,
                      with_bn: int) -> torch.Tensor | str:
    """The removed bias, or why it stays."""
    bias = module.bias
    if bias is None:
        return "none (the layer has no bias)"
    if parametrize.is_parametrized(module, "bias"):
        return "kept: a parametrization computes it"
    if with_bn != calls:
        return "kept: the module is also called where no BN follows"
    if sum(1 for m in gm.modules() if getattr(m, "bias", None) is bias) > 1:
        return "kept: the bias Parameter is shared with another layer"
    if any(n.op == "get_attr" and get_attr_value(gm, n) is bias for n in gm.graph.nodes):
        return "kept: the graph reads the bias Parameter elsewhere too"
    module.bias = None
    return bias.detach()


def _drop_functional_bias(gm: fx.GraphModule, layer: Layer) -> torch.Tensor | str:
    """The removed bias, or why it stays."""
    node = layer.node
    bias = layer.arg("bias")
    if bias is None:
        return "none (the call has no bias)"
    value = get_attr_value(gm, bias)
    if value is None:
        return "kept: the bias is computed at run time"
    if len(node.args) > 2:
        node.args = (*node.args[:2], None, *node.args[3:])
    else:
        node.kwargs = {**node.kwargs, "bias": None}
    assert isinstance(bias, fx.Node)
    if not bias.users:
        target = str(bias.target)
        gm.graph.erase_node(bias)
        owner, _, attr = target.rpartition(".")
        read = {(n.op, n.target) for n in gm.graph.nodes}
        if ("get_attr", target) not in read and ("call_module", owner) not in read:
            # (a module called in the graph reads its own parameter)
            delattr(gm.get_submodule(owner), attr)
    return value.detach()
