"""The same ONNX graph computed in float32: a reference for float16 / bfloat16 models.

ONNX Runtime's CPU provider computes many float16 ops in float32 internally, so a 16-bit model
compared only against itself on the CPU looks more accurate than it is on a device that
computes in 16 bits. :func:`upcast_to_float32` returns a copy whose every float16/bfloat16
tensor (initializers, Constant and other tensor attributes), value type and ``Cast`` /
``dtype`` target is float32; the graph inputs and outputs keep their 16-bit types, through a
``Cast`` to float32 after each input and a ``Cast`` back before each output. So it takes the
same feeds, returns the same dtypes, and its outputs are the graph's float32 result rounded
once to 16 bits (the weights are the 16-bit values, exactly representable in float32).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

_LOW = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_DTYPE_ATTRS = ("to", "dtype")


def is_low_precision(dtype_name: str | None) -> bool:
    """True for the compute dtypes whose reference is upcast (``float16``, ``bfloat16``)."""
    return dtype_name in ("float16", "bfloat16")


def upcast_to_float32(proto: onnx.ModelProto, base_dir: str | None = None) -> onnx.ModelProto:
    """A copy of ``proto`` that computes in float32 with the same inputs and outputs
    (``base_dir``: the folder its external data files are in, else the current one)."""
    model = ir.serde.deserialize_model(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    main = model.graph
    output_types = [v.dtype for v in main.outputs]
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype in _LOW:
                value.const_value = _float32(value.const_value, value.name)
                value.dtype = ir.DataType.FLOAT
        if graph is not main:  # subgraph inputs (Loop/Scan bodies) carry the upcast values
            for value in graph.inputs:
                _upcast_type(value)
        for node in graph:
            _upcast_attributes(node)
            for value in node.outputs:
                _upcast_type(value)
    _cast_inputs(main)
    _cast_outputs(main, output_types)
    return ir.serde.serialize_model(model)


def _float32(tensor: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    return ir.tensor(np.asarray(tensor.numpy(), dtype=np.float32), name=name)


def _upcast_type(value: ir.Value) -> None:
    if value.dtype in _LOW:
        value.dtype = ir.DataType.FLOAT


def _upcast_attributes(node: ir.Node) -> None:
    for name, attr in list(node.attributes.items()):
        if attr.type == ir.AttributeType.TENSOR and attr.value.dtype in _LOW:
            node.attributes[name] = ir.AttrTensor(name, _float32(attr.value, attr.value.name))
        elif name in _DTYPE_ATTRS and attr.type == ir.AttributeType.INT and \
                ir.DataType(attr.value) in _LOW:
            node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT)


def _cast(value: ir.Value, dtype: ir.DataType, name: str) -> ir.Node:
    node = ir.node("Cast", [value], {"to": dtype})
    out = node.outputs[0]
    out.name, out.dtype, out.shape = name, dtype, value.shape
    return node


def _cast_inputs(graph: ir.Graph) -> None:
    """Each 16-bit graph input is read through a Cast to float32."""
    for value in graph.inputs:
        uses = list(value.uses())
        if value.dtype not in _LOW or not uses:
            continue
        cast = _cast(value, ir.DataType.FLOAT, f"{value.name}__bnfold_float32")
        for use in uses:
            use.node.replace_input_with(use.idx, cast.outputs[0])
        if len(graph):
            graph.insert_before(graph[0], cast)
        else:
            graph.append(cast)


def _cast_outputs(graph: ir.Graph, types: list[ir.DataType | None]) -> None:
    """Each output that was 16-bit and is now float32 is cast back, keeping its name."""
    for i, (value, dtype) in enumerate(zip(list(graph.outputs), types, strict=True)):
        if dtype not in _LOW or value.dtype != ir.DataType.FLOAT or value.is_graph_input():
            continue
        name = value.name
        value.name = f"{name}__bnfold_float32"
        cast = _cast(value, dtype, name)
        graph.append(cast)
        graph.outputs[i] = cast.outputs[0]


def float64_torch_outputs(module: object, feeds: list[dict[str, np.ndarray]],
                          dtypes: list[np.dtype]) -> list[list[np.ndarray]]:
    """A torch reference for a 16-bit candidate: ``module`` (a copy) run in float64 on the
    feeds (float inputs upcast), each output rounded once to the candidate's ``dtypes``."""
    import copy

    import torch

    from bnfold.validation.session import torch_outputs

    reference = copy.deepcopy(module).double()
    outputs = []
    for feed in feeds:
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in feed.values()]
        leaves = torch_outputs(reference, [a.double() if a.is_floating_point() else a
                                           for a in args])
        outputs.append([leaf.astype(d) if leaf.dtype.kind == "f" else leaf
                        for leaf, d in zip(leaves, dtypes, strict=False)])
    return outputs
