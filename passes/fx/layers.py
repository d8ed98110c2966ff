"""What a torch.fx node is, for the insert pass: a dense/conv layer, an activation, a
normalization, a dropout, or a shape-only op that passes channels through unchanged.

Layers are the rows of the FX layer table (:mod:`bnfold.passes.fx.layer_table`), the same
ones the fold pass knows: modules (``nn.Linear``, ``nn.Conv{1,2,3}d``,
``nn.ConvTranspose{1,2,3}d``), functional calls (``F.linear``, ``F.conv*``,
``F.conv_transpose*``, which are the same objects as ``torch.conv2d`` etc.) and the ATen ops of
``torch.export`` graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _NormBase

from bnfold.passes.fx.computed_weights import plain_class
from bnfold.passes.fx.layer_table import (
    LAYER_FUNCTIONS,
    LAYER_MODULES,
    LayerKind,
    convolution_kind,
)
from bnfold.passes.fx.sites import get_attr_value, module_stack_path

_ATEN = torch.ops.aten

_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.PReLU,
    nn.LogSigmoid, nn.Softsign,
)
_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.leaky_relu,
    F.leaky_relu_, F.tanh, torch.tanh, F.sigmoid, torch.sigmoid, F.elu, F.elu_, F.selu,
    torch.selu, F.celu, torch.celu, F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_,
    F.mish, F.softplus, F.prelu, torch.prelu, F.logsigmoid, F.softsign,
}
_ACTIVATION_FUNCTIONS |= {
    _ATEN.relu.default, _ATEN.relu_.default, _ATEN.hardtanh.default, _ATEN.hardtanh_.default,
    _ATEN.gelu.default, _ATEN.silu.default, _ATEN.silu_.default, _ATEN.sigmoid.default,
    _ATEN.tanh.default, _ATEN.leaky_relu.default, _ATEN.hardswish.default, _ATEN.elu.default,
}
_ACTIVATION_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}

_NORM_MODULES: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_NORM_FUNCTIONS = {
    F.batch_norm, torch.batch_norm, F.layer_norm, torch.layer_norm, F.group_norm,
    torch.group_norm, F.instance_norm, torch.instance_norm, F.rms_norm,
}
_NORM_FUNCTIONS |= {
    _ATEN.batch_norm.default, _ATEN._native_batch_norm_legit_no_training.default,
    _ATEN._native_batch_norm_legit_functional.default, _ATEN._native_batch_norm_legit.default,
    _ATEN.native_batch_norm.default,
    _ATEN.layer_norm.default, _ATEN.group_norm.default, _ATEN.instance_norm.default,
}

_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Identity,
)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout, torch.dropout}

_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute,
                    torch.squeeze, torch.unsqueeze}
_DROPOUT_FUNCTIONS |= {_ATEN.dropout.default}
_SHAPE_FUNCTIONS |= {_ATEN.flatten.using_ints, _ATEN.reshape.default, _ATEN.view.default,
                     _ATEN.transpose.int, _ATEN.permute.default}
_SHAPE_METHODS = {"flatten", "reshape", "view", "transpose", "permute", "contiguous",
                  "reshape_as", "view_as", "squeeze", "unsqueeze"}


@dataclass(frozen=True)
class Layer:
    """A dense or conv layer found in the graph.

    ``name`` is the module path for module calls and the node name for functional calls;
    ``module_type`` is the module class (for functionals, the class they stand for, so that
    ``include=[nn.Linear]`` also selects ``F.linear``); ``dims`` is the number of spatial dims.
    """

    node: fx.Node
    name: str
    row: LayerKind
    module: nn.Module | None

    @property
    def kind(self) -> str:
        return self.row.kind

    @property
    def dims(self) -> int:
        return self.row.spatial

    @property
    def module_type(self) -> type[nn.Module]:
        return self.row.module

    @property
    def function(self) -> Any:
        return self.node.target if self.node.op == "call_function" else None

    def arg(self, name: str) -> Any:
        """Argument ``name`` of a functional call (``None`` if absent)."""
        return LAYER_FUNCTIONS[self.node.target].arg(self.node.args, self.node.kwargs, name)

    def groups(self) -> int:
        """``groups`` of the layer (1 when absent or not a constant)."""
        groups = getattr(self.module, "groups", 1) if self.module is not None \
            else self.arg("groups")
        return groups if isinstance(groups, int) else 1


def match_layer(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    """Return the :class:`Layer` that ``node`` calls, or ``None`` if it is not one."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        row = LAYER_MODULES.get(plain_class(module))  # (a parametrized layer is its class)
        return None if row is None else Layer(node, str(node.target), row, module)
    if node.op != "call_function" or node.target not in LAYER_FUNCTIONS:
        return None
    call = LAYER_FUNCTIONS[node.target]
    row = call.row
    if row is None:  # aten.convolution: the weight's rank says how many spatial dims
        weight = get_attr_value(gm, call.arg(node.args, node.kwargs, "weight"))
        transposed = call.arg(node.args, node.kwargs, "transposed")
        row = None if weight is None else convolution_kind(transposed, weight.dim())
        if row is None:
            return None
    return Layer(node, _aten_module_path(node) or node.name, row, None)


def _aten_module_path(node: fx.Node) -> str | None:
    """For an ATen layer op of a torch.export graph, the module that made it (``conv1``, from
    the ``nn_module_stack`` export records), so inserted BNs get module-like names."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    return module_stack_path(node) or None


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for an elementwise activation called as a module, a function or a method."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def norm_description(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"BatchNorm2d 'bn1'"`` if ``node`` is a normalization layer, else ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _NORM_MODULES):
            return f"{type(module).__name__} {node.target!r}"
    if node.op == "call_function" and node.target in _NORM_FUNCTIONS:
        return f"{node.target.__name__} {node.name!r}"
    return None


def is_shape_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for reshapes/transposes that keep every value (a BN may be reached through them):
    functions, methods and the ``nn.Flatten`` / ``nn.Unflatten`` modules."""
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (nn.Flatten, nn.Unflatten))
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def is_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for dropout (module or function) and ``nn.Identity``: a normalization after them
    still normalizes the layer's output (``conv -> Dropout -> BatchNorm``)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _DROPOUT_MODULES)
    return node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS
