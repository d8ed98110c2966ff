"""Recognizing BatchNorms and conv/linear layers in an FX graph, module calls and functional.

A :class:`BatchNormSite` or :class:`LayerSite` describes one call site: its tensors (read from
the module or from ``get_attr`` constants), its hyper-parameters, and which input ranks it
accepts with the channel axis at each rank. Recognizers return a string instead of a site when
the node is a BN/layer that cannot take part in a fold, saying why.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.algebra import BFLOAT16, BNParams
from bnfold.modules import FeatureBatchNorm
from bnfold.passes.fx import computed_weights
from bnfold.passes.fx.hooks import held_reason, hook_reason
from bnfold.passes.fx.layer_table import (
    LAYER_FUNCTIONS,
    LAYER_MODULES,
    LayerKind,
    convolution_kind,
    layer_kind,
)

if TYPE_CHECKING:
    from bnfold.passes.fx.constants import Constants

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# Channel axis as a function of rank.
# ---------------------------------------------------------------------------------------------

ChannelRule = Callable[[int], "int | None"]
MAX_RANK = 64  # torch tensors have at most 64 dimensions


def _dim1(ranks: range) -> ChannelRule:
    return lambda rank: 1 if rank in ranks else None


def _last(rank: int) -> int | None:
    return rank - 1 if rank >= 1 else None


def _batched_or_not(spatial: int) -> ChannelRule:
    """Axis 1 of a batched input of ``spatial`` dims after the channels, 0 of an unbatched one."""
    return {spatial + 2: 1, spatial + 1: 0}.get


# ---------------------------------------------------------------------------------------------
# BatchNorm.
# ---------------------------------------------------------------------------------------------

_BN_MODULES: dict[type, ChannelRule] = {
    nn.BatchNorm1d: _dim1(range(2, 4)),
    nn.BatchNorm2d: _dim1(range(4, 5)),
    nn.BatchNorm3d: _dim1(range(5, 6)),
    nn.SyncBatchNorm: _dim1(range(2, MAX_RANK + 1)),
    FeatureBatchNorm: _last,
    # Instance norms that track running statistics normalize with them in eval: a BN there
    # (y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel).
    nn.InstanceNorm1d: _batched_or_not(1),
    nn.InstanceNorm2d: _batched_or_not(2),
    nn.InstanceNorm3d: _batched_or_not(3),
}
# Positional parameter names of the functional BN forms (the tensor input is index 0).
_BN_FUNCTIONS: dict[Any, tuple[str, ...]] = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training",
                   "momentum", "eps"),
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training",
                       "momentum", "eps", "cudnn_enabled"),
    aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var",
                              "training", "momentum", "eps", "cudnn_enabled"),
    aten._native_batch_norm_legit_no_training.default: (
        "input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
    # (the forms a program lowered with run_decompositions() holds; training, or eval)
    aten._native_batch_norm_legit_functional.default: (
        "input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
        "eps"),
    aten._native_batch_norm_legit.default: (
        "input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
        "eps"),
    aten.native_batch_norm.default: (
        "input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
        "eps"),
}
#: ATen BN forms whose result is a tuple: the normalized tensor is its item 0.
_TUPLE_BNS = frozenset(name for name in _BN_FUNCTIONS if isinstance(name, torch._ops.OpOverload)
                       and name is not aten.batch_norm.default)
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
#: Instance norms: with ``use_input_stats`` they normalize each sample and update the running
#: statistics given; without, they normalize with those, a BN (:func:`norm_args`).
_INSTANCE_NORMS: dict[Any, tuple[str, ...]] = {
    F.instance_norm: ("input", "running_mean", "running_var", "weight", "bias",
                      "use_input_stats", "momentum", "eps"),
    torch.instance_norm: ("input", "weight", "bias", "running_mean", "running_var",
                          "use_input_stats", "momentum", "eps", "cudnn_enabled"),
    aten.instance_norm.default: ("input", "weight", "bias", "running_mean", "running_var",
                                 "use_input_stats", "momentum", "eps", "cudnn_enabled"),
}
_INSTANCE_DEFAULTS = {"use_input_stats": True, "momentum": 0.1, "eps": 1e-5}


@dataclass
class BatchNormSite:
    """One BN call: ``output`` is the node whose uses the fold redirects to ``input``.

    A BN-like affine chain (:mod:`bnfold.passes.fx.affine`) sets ``source`` (which argument of
    its first node is its tensor input: read off the graph when used, as an earlier fold may
    have rewired it), ``chain`` (its nodes, in graph order) and ``dtype`` (of its constants,
    which the layer it folds into must share: a constant of another dtype would promote the
    result)."""

    node: fx.Node
    output: fx.Node
    channel_axis: ChannelRule
    params: BNParams
    attr_nodes: list[fx.Node]
    source: int | None = None
    chain: tuple[fx.Node, ...] = ()
    dtype: torch.dtype | None = None

    @property
    def input(self) -> fx.Node:
        if self.source is not None:
            first = self.chain[0].args[self.source]
        else:
            first = self.node.args[0] if self.node.args else self.node.kwargs["input"]
        assert isinstance(first, fx.Node)
        return first


def is_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for any BN call the pass knows or refuses (module of a BN class or functional),
    and for an instance norm module that tracks running statistics (a BN in eval)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return isinstance(module, nn.modules.batchnorm._BatchNorm) or (isinstance(
            module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats)
    return node.op == "call_function" and (node.target in _BN_FUNCTIONS or (
        node.target in _INSTANCE_NORMS and None not in bn_statistics(node)))


def nested_batchnorms(gm: fx.GraphModule, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(label, kind, reason)`` for each BN call inside a subgraph that an op of ``gm`` runs
    (the branches of ``torch.cond``, the body of ``while_loop`` or ``map`` in a
    ``torch.export`` graph), at any depth: the fold rewrites the top-level graph only, and
    says so for each of them."""
    found = []
    for attr in gm.graph.find_nodes(op="get_attr"):
        owner, _, leaf = str(attr.target).rpartition(".")
        sub = getattr(gm.get_submodule(owner) if owner else gm, leaf, None)
        if not isinstance(sub, fx.GraphModule):
            continue
        path = f"{prefix}{attr.target}"
        ops = ", ".join(sorted({str(u.target).removeprefix("higher_order.") for u in attr.users
                                if u.op == "call_function"})) or "an op"
        reason = f"inside {path}, a subgraph that {ops} runs: bnfold folds the top-level " \
                 "graph only"
        for node in sub.graph.nodes:
            if is_batchnorm(sub, node):
                kind = type(sub.get_submodule(str(node.target))).__name__ \
                    if node.op == "call_module" else "F.batch_norm"
                found.append((f"{path}.{node.name}", kind, reason))
        found.extend(nested_batchnorms(sub, f"{path}."))
    return found


def batchnorm_rule(gm: fx.GraphModule, node: fx.Node) -> ChannelRule | None:
    """The channel axis of the BN at ``node`` as a function of its input rank (None: unknown)."""
    if node.op == "call_module":
        return _BN_MODULES.get(type(gm.get_submodule(str(node.target))))
    return _dim1(range(2, MAX_RANK + 1))


def batchnorm_site(gm: fx.GraphModule, node: fx.Node, consts: Constants | None = None
                   ) -> BatchNormSite | str:
    """Describe the BN at ``node``, or say why it cannot be folded (training, no statistics,
    given ``consts``: a statistic or parameter the graph writes in place...)."""
    rule = batchnorm_rule(gm, node)
    if node.op == "call_module":
        bn = gm.get_submodule(str(node.target))
        written = None if bn.training else _written_reason(  # (training: said below)
            consts, str(node.target), ("running_mean", "running_var", "weight", "bias"))
        if written:
            return written
        if rule is None:
            return f"{type(bn).__name__} is not a BatchNorm class bnfold knows how to fold"
        hooked = hook_reason(str(node.target), bn) or held_reason(gm, str(node.target), bn)
        if hooked:
            return hooked
        if bn.training and isinstance(bn, nn.modules.instancenorm._InstanceNorm):
            return f"{type(bn).__name__} is in training mode: it normalizes with each " \
                   "sample's statistics (in eval, with its running ones: a BN; call " \
                   "model.eval() first)"
        if bn.training:
            return "BN is in training mode: it normalizes with batch statistics, which no " \
                   "fold can reproduce (call model.eval() first)"
        if bn.running_mean is None or bn.running_var is None:
            return "BN has track_running_stats=False: it normalizes with batch statistics " \
                   "even in eval mode"
        params = BNParams(
            mean=to_numpy(bn.running_mean), var=to_numpy(bn.running_var), eps=float(bn.eps),
            gamma=None if bn.weight is None else to_numpy(bn.weight),
            beta=None if bn.bias is None else to_numpy(bn.bias),
        )
        return BatchNormSite(node, node, rule, params, [])
    args = norm_args(node)
    if args.get("running_mean") is None or args.get("running_var") is None:
        return "BN has no running statistics (track_running_stats=False): it normalizes with " \
               "batch statistics"
    if node.target in _INSTANCE_NORMS and args["training"] is not False:
        return "instance norm with use_input_stats: it normalizes with each sample's " \
               "statistics (with use_input_stats=False it normalizes with the running ones, " \
               "a BN)"
    if args.get("training", False) is not False:  # absent: _no_training
        return "BN is in training mode: it normalizes with batch statistics, which no fold " \
               "can reproduce"
    tensors: dict[str, np.ndarray | None] = {}
    attr_nodes = []
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = args.get(key)
        if value is None:
            tensors[key] = None
            continue
        if not (isinstance(value, fx.Node) and value.op == "get_attr"):
            return f"BN {key} is computed in the graph, not a constant attribute"
        written = _written_reason(consts, str(value.target), ("",))
        if written:
            return written
        tensors[key] = to_numpy(fetch(gm, value))
        attr_nodes.append(value)
    output = node
    if node.target in _TUPLE_BNS:
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            return "BN's mean/invstd outputs are used in the graph"
        output = users[0]
    params = BNParams(mean=tensors["running_mean"], var=tensors["running_var"],
                      eps=float(args["eps"]), gamma=tensors["weight"], beta=tensors["bias"])
    assert rule is not None
    return BatchNormSite(node, output, rule, params, attr_nodes)


def bn_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """The BN's module name, made unique by the node name when the module is called twice.

    Functional BNs are named by their node, prefixed by the module owning their statistics
    when there is one (graphs from ``torch.export``: ``"bn (batch_norm)"``).
    """
    if node.op != "call_module":
        return _functional_label(node, norm_args(node).get("running_mean"))
    calls = module_calls(node.graph, str(node.target))
    return str(node.target) if len(calls) == 1 else f"{node.target} ({node.name})"


def module_calls(graph: fx.Graph, target: str) -> list[fx.Node]:
    """The nodes calling the module ``target`` (from the graph's per-op node index)."""
    return graph.find_nodes(op="call_module", target=target)


# ---------------------------------------------------------------------------------------------
# Conv / ConvTranspose / Linear.
# ---------------------------------------------------------------------------------------------

_LAYER_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                   "output_padding": 0}


@dataclass
class LayerSite:
    """One conv/linear call with its constant weight and bias."""

    node: fx.Node
    kind: str  # "conv" | "conv_transpose" | "linear"
    spatial: int  # 1/2/3 for convolutions, 0 for linear
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...] | None  # None: output_size given at call time
    padding_mode: str
    label: str

    def ranks(self) -> list[int]:
        """Input/output ranks the layer accepts (conv: unbatched or batched)."""
        if self.kind == "linear":
            return list(range(1, MAX_RANK + 1))
        return [self.spatial + 1, self.spatial + 2]

    def channel_axis(self, rank: int) -> int | None:
        """Channel axis of the layer's input or output at ``rank`` (None: rank not accepted)."""
        if rank not in self.ranks():
            return None
        if self.kind == "linear":
            return rank - 1
        return 0 if rank == self.spatial + 1 else 1

    @property
    def row(self) -> LayerKind:
        """This layer's row of the FX layer table (weight axes, channel counts)."""
        return layer_kind(self.kind, self.spatial)

    @property
    def weight_out_axis(self) -> int:
        """Weight axis of output channels: Conv/Linear 0, ConvTranspose 1 (grouped)."""
        return self.row.weight_out_axis

    @property
    def weight_in_axis(self) -> int:
        """Weight axis of input channels: Conv/Linear 1, ConvTranspose 0."""
        return self.row.weight_in_axis

    @property
    def out_channels(self) -> int:
        """Output channels of the layer's weight."""
        return self.row.out_channels(self.weight.shape, self.groups)


def is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for a conv/linear call (module of a layer class or functional)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), tuple(LAYER_MODULES))
    return node.op == "call_function" and node.target in LAYER_FUNCTIONS


def layer_site(gm: fx.GraphModule, node: fx.Node, consts: Constants | None = None
               ) -> LayerSite | str:
    """Describe the layer at ``node``, or say why its weights cannot be rewritten.

    A functional layer's weight or bias is a ``get_attr`` tensor or, given ``consts``, a
    node computed only from the model's tensors (``torch.export``'s ``aten._weight_norm``, a
    spectral norm's ``div``): its float64 value rounded once to the model's dtype, the weight
    the layer computes at each call (the fold's write then replaces the computation)."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        found = LAYER_MODULES.get(computed_weights.plain_class(m))
        if found is None:
            return f"{node.target} is a {type(m).__name__}, a subclass whose forward may " \
                   "transform its weight"
        hooked = hook_reason(str(node.target), m, computed_weights.PRE_HOOKS) or \
            held_reason(gm, str(node.target), m) or computed_weights.refusal(
                str(node.target), m) or _written_reason(consts, str(node.target),
                                                        ("weight", "bias"))
        if hooked:
            return hooked
        kind, spatial = found.kind, found.spatial
        weight, bias = (computed_weights.effective(m, key) for key in ("weight", "bias"))
        if kind == "linear":
            return LayerSite(node, kind, 0, weight, bias, 1, (), (), (), (), "zeros",
                             str(node.target))
        n = spatial
        padding = _conv_padding(m.padding, m.dilation, m.kernel_size, n)
        output_padding: tuple[int, ...] | None = _tup(getattr(m, "output_padding", 0), n)
        if kind == "conv_transpose" and len(node.args) + len(node.kwargs) > 1:
            output_padding = None  # output_size given at call time: output padding varies
        return LayerSite(node, kind, n, weight, bias, m.groups, _tup(m.stride, n), padding,
                         _tup(m.dilation, n), output_padding, m.padding_mode, str(node.target))
    call = LAYER_FUNCTIONS[node.target]
    args = _named_args(node, call.args, _LAYER_DEFAULTS)
    tensors: dict[str, torch.Tensor | None] = {}
    for key in ("weight", "bias"):
        value = args.get(key)
        if value is None:
            tensors[key] = None
        elif isinstance(value, fx.Node) and value.op == "get_attr":
            written = _written_reason(consts, str(value.target), ("",))
            if written:
                return written
            tensors[key] = fetch(gm, value)
        elif isinstance(value, fx.Node) and consts is not None \
                and (computed := consts.rounded(value)) is not None:
            tensors[key] = computed
        else:
            return f"{node.name}'s {key} is computed in the graph, not from the model's " \
                   "tensors alone by ops bnfold evaluates" if consts is not None else \
                   f"{node.name}'s {key} is computed in the graph, not a constant attribute"
    weight = tensors["weight"]
    assert weight is not None
    row = call.row or convolution_kind(args["transposed"], weight.dim())
    if row is None:
        return f"{node.name}'s weight has rank {weight.dim()}, not a convolution's"
    kind, spatial = row.kind, row.spatial
    if kind == "linear":
        return LayerSite(node, kind, 0, weight, tensors["bias"], 1, (), (), (), (), "zeros",
                         _functional_label(node, args["weight"]))
    n = spatial
    kernel = tuple(weight.shape[2:])
    return LayerSite(
        node, kind, n, weight, tensors["bias"], int(args["groups"]), _tup(args["stride"], n),
        _conv_padding(args["padding"], args["dilation"], kernel, n), _tup(args["dilation"], n),
        _tup(args.get("output_padding", 0), n), "zeros", _functional_label(node, args["weight"]),
    )


def _written_reason(consts: Constants | None, owner: str, keys: tuple[str, ...]) -> str | None:
    """Why a fold cannot rewrite the tensors ``owner.key`` (``owner`` itself for ``""``): an
    op of the graph writes into one in place, so the next call would undo or redo the fold."""
    for key in keys if consts is not None else ():
        path = f"{owner}.{key}" if key else owner
        if consts.written(path):  # type: ignore[union-attr]
            return f"{path} is written in place by the graph (each call changes it)"
    return None


def module_stack_path(node: fx.Node) -> str:
    """The path of the innermost module whose forward made ``node``, as ``torch.export``
    records it (``nn_module_stack``); ``""`` when not recorded."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _functional_label(node: fx.Node, attr: Any) -> str:
    """``"<module> (<node>)"``: the module owning ``attr``, else the module that made ``node``
    (``nn_module_stack``, recorded by ``torch.export``), else just the node name."""
    owner = str(attr.target).rpartition(".")[0] if isinstance(attr, fx.Node) \
        and attr.op == "get_attr" else ""
    owner = owner or module_stack_path(node)
    return f"{owner} ({node.name})" if owner else node.name


def _tup(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    return values * n if len(values) == 1 else values


def _conv_padding(padding: Any, dilation: Any, kernel: Any, n: int) -> tuple[int, ...]:
    """Per-axis padding; ``'same'`` as ``dilation * (kernel - 1)`` (only zero-ness matters)."""
    if padding == "valid":
        return (0,) * n
    if padding == "same":
        return tuple(d * (k - 1) for d, k in zip(_tup(dilation, n), _tup(kernel, n), strict=True))
    return _tup(padding, n)


# ---------------------------------------------------------------------------------------------
# Arguments and tensors.
# ---------------------------------------------------------------------------------------------

def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (counting the tensor as 0) or keyword ``name`` of ``node``."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def updated_statistics(node: fx.Node) -> tuple[Any, ...] | None:
    """The running statistics (``running_mean``, ``running_var`` arguments) a functional norm
    call updates in place: a BN of :data:`_BN_FUNCTIONS` with ``training`` not False, an
    instance norm with ``use_input_stats`` not False (ATen forms too: ``aten.batch_norm``'s
    schema does not mark the write); ``()`` for such a call that updates none, None for any
    other node."""
    if node.op != "call_function" or (
            node.target not in _INSTANCE_NORMS and node.target not in _BN_FUNCTIONS):
        return None
    args = norm_args(node)
    training = args.get("training", False)  # (absent: _native_batch_norm_legit_no_training)
    return (args["running_mean"], args["running_var"]) if training is not False else ()


def norm_args(node: fx.Node) -> dict[str, Any]:
    """The named arguments of a functional BN or instance norm call, defaults filled in; an
    instance norm's ``use_input_stats`` is read as ``training`` (both say: normalize with the
    input's own statistics, and update the running ones given)."""
    if node.target in _INSTANCE_NORMS:
        args = _named_args(node, _INSTANCE_NORMS[node.target], _INSTANCE_DEFAULTS)
        args["training"] = args.pop("use_input_stats")
        return args
    return _named_args(node, _BN_FUNCTIONS[node.target], _BN_DEFAULTS)


def _named_args(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    out = {name: defaults.get(name) for name in names}
    out.update(zip(names, node.args, strict=False))
    out.update(node.kwargs)
    return out


def bn_statistics(node: fx.Node) -> tuple[Any, Any]:
    """``(running_mean, running_var)`` arguments of a functional BN call (``None`` when not
    given)."""
    args = norm_args(node)
    return args.get("running_mean"), args.get("running_var")


def arg_slot(node: fx.Node, name: str) -> tuple[str, int | str] | None:
    """Where argument ``name`` of a functional layer/BN call lives: ("args", i) or ("kwargs", k)."""
    if name in node.kwargs:
        return ("kwargs", name)
    call = LAYER_FUNCTIONS.get(node.target)
    names = call.args if call is not None else _BN_FUNCTIONS.get(node.target, ())
    index = names.index(name)
    return ("args", index) if index < len(node.args) else None


def fetch(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a ``get_attr`` node reads."""
    value = get_attr_value(gm, node)
    assert value is not None
    return value


def get_attr_value(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or ``None`` for anything else."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, leaf = str(node.target).rpartition(".")
    value = getattr(gm.get_submodule(owner) if owner else gm, leaf)
    return value if isinstance(value, torch.Tensor) else None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t``'s values as a read-only numpy array: a view of a CPU tensor's memory (a fold only
    reads its inputs; a write raises instead of changing the tensor), a copy of another
    device's; bfloat16 becomes ``ml_dtypes.bfloat16`` bit for bit."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        out = t.contiguous().view(torch.int16).numpy().view(BFLOAT16)
    else:
        out = t.numpy().view()
    out.flags.writeable = False
    return out


def to_torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``a`` as a tensor on ``like``'s device; a numpy bfloat16 array keeps its exact bits.
    The tensor takes over ``a``'s memory when ``a`` owns it (a fold's fresh result, which
    nothing else reads), else it gets a copy (a view may share another tensor's memory)."""
    if not (a.flags.owndata and a.flags.writeable and a.flags.c_contiguous):
        a = np.ascontiguousarray(a).copy()
    if like.dtype == torch.bfloat16:
        out = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        out = torch.from_numpy(a)
    return out.to(like.device)
