"""BNs whose input is a constant: weight standardization, evaluated once.

timm's ``StdConv2d`` (BiT, NFNet) standardizes its weight at every call with
``F.batch_norm(weight.reshape(1, out, -1), None, None, training=True, eps=eps)``: a
training-mode BN, but over a constant, so its value never changes. The whole constant
expression up to where it meets the activations (here ``.reshape_as(weight)``) is evaluated
once in float64 (:class:`~bnfold.passes.fx.constants.Constants`) and rounded once to the
weight's dtype into a new tensor the layer reads; the layer then takes part in folds like any
other (a BN after a StdConv2d folds into the standardized weight). Exact: the BN computes the
same value on every call. A BN that also updates running statistics (``running_mean`` given
with ``training=True``) has a side effect and is left alone.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from bnfold.algebra import round_to
from bnfold.passes.fx.constants import Constants, NotConstant, owner_label, roots
from bnfold.passes.fx.sites import bn_statistics, fetch, is_batchnorm, to_numpy, to_torch


def fold_constant_bns(gm: fx.GraphModule, consts: Constants) -> list[tuple[str, str]]:
    """Replace every BN on a constant by its value; return ``(BN label, new tensor path)``."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not is_batchnorm(gm, node) \
                or not consts.is_constant(node) or bn_statistics(node) != (None, None):
            continue
        end = node
        while len(end.users) == 1 and consts.is_constant(next(iter(end.users))):
            end = next(iter(end.users))
        tensors = roots(node)
        try:
            exact = consts.value(end)
        except NotConstant:
            continue
        if not tensors or not isinstance(exact, torch.Tensor):
            continue
        like = fetch(gm, tensors[0])
        value = round_to(exact.numpy(), to_numpy(like[:0]).dtype)
        path = _register(gm, tensors[0], node.name, to_torch(value, like))
        with gm.graph.inserting_after(end):
            attr = gm.graph.get_attr(path)
        end.replace_all_uses_with(attr)
        label = owner_label(node, [node])
        consts.erase_unused(end)
        done.append((label, path))
    return done


def _register(gm: fx.GraphModule, root: fx.Node, name: str, value: torch.Tensor) -> str:
    """Store ``value`` next to ``root``'s tensor as ``<leaf>_<name>`` (a Parameter when that
    tensor is one); return its path."""
    parent, _, leaf = str(root.target).rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    new, i = f"{leaf}_{name}", 1
    while hasattr(owner, f"{new}_{i}" if i > 1 else new):
        i += 1
    new = f"{new}_{i}" if i > 1 else new
    old = fetch(gm, root)
    if isinstance(old, nn.Parameter):
        owner.register_parameter(new, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(new, value)
    return f"{parent}.{new}" if parent else new
