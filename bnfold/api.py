"""The public API: thin functions that pick a pass and return ``(model, report)``.

Every function here is re-exported from ``bnfold``. The work happens in ``bnfold.passes``
(graph rewrites, one module per pass and IR) and in ``bnfold.algebra`` (the fold math).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnfold.report import PassResult, Report

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    import torch


def fold(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    include: Any = None,
    exclude: Any = None,
    progress: Any = None,
) -> PassResult:
    """Fold every exactly-foldable BN of a torch model into its neighbouring conv/linear.

    ``model`` is an ``nn.Module``, ``torch.fx.GraphModule`` or ``torch.export.ExportedProgram``
    (then an ``ExportedProgram`` is returned, see :mod:`bnfold.programs`), in eval mode; it is never
    modified, except a ``GraphModule`` given with ``inplace=True`` (a plain module cannot be
    folded in place: its ``forward`` would still call the BNs). ``example_inputs`` gives shapes
    (channel axes through reshapes, no run-time rank checks) and enables the ``torch.export``
    fallback. Returns ``(GraphModule, Report)``; the report lists each BN folded (and into
    what) and each BN kept, with the reason. ``include`` / ``exclude``: BN name globs
    (module paths like ``"layer1.*"``, or node names); BNs left out are kept, "excluded by
    the user" (:mod:`bnfold.selection`). ``progress(done, total)``, when given, is called as
    each BN is settled (the CLI draws a bar with it).
    """
    from bnfold.passes.fx.fold import fold_fx
    from bnfold.programs import is_program, on_program

    if is_program(model):  # torch.export.ExportedProgram in, ExportedProgram out
        return on_program(fold_fx, model, example_inputs, inplace=inplace, include=include,
                          exclude=exclude, progress=progress)
    return fold_fx(model, example_inputs, inplace=inplace, include=include, exclude=exclude,
                   progress=progress)


def reparameterize(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
) -> PassResult:
    """Merge parallel Conv(+BN) branches summed by an Add (RepVGG, MobileOne, RepViT...) into
    one conv each, exactly, then fold the remaining BNs; ``(GraphModule, Report)``. Arguments
    as :func:`fold`. See :mod:`bnfold.passes.fx.reparam` and :mod:`bnfold.branches`. A
    ``torch.export.ExportedProgram`` gives an ``ExportedProgram`` (:mod:`bnfold.programs`)."""
    from bnfold.passes.fx.reparam import reparameterize_fx
    from bnfold.programs import is_program, on_program

    if is_program(model):
        return on_program(reparameterize_fx, model, example_inputs, inplace=inplace)
    return reparameterize_fx(model, example_inputs, inplace=inplace)


def insert_bn(
    model: torch.nn.Module,
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
    """Insert BatchNorm after the dense and conv layers of a torch model; ``(GraphModule,
    Report)``. See :func:`bnfold.passes.fx.insert.insert_bn_fx` for the options. A
    ``torch.export.ExportedProgram`` gives an ``ExportedProgram`` (:mod:`bnfold.programs`)."""
    from bnfold.passes.fx.insert import insert_bn_fx
    from bnfold.programs import is_program, on_program

    options = dict(position=position, skip_last=skip_last, include=include, exclude=exclude,
                   eps=eps, momentum=momentum, affine=affine, drop_bias=drop_bias)
    if is_program(model):
        return on_program(insert_bn_fx, model, example_inputs, **options)
    return insert_bn_fx(model, example_inputs=example_inputs, **options)


def recalibrate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    preserve_function: bool = False,
    progress: bool = True,
    layers: Any = None,
    forward: Any = None,
) -> Any:
    """Re-estimate BN running statistics from data, pooled exactly over all samples.

    Returns a :class:`bnfold.recalibration.Recalibration`; its ``undo()`` reverts the change
    (see :func:`bnfold.recalibration.recalibrate` for the options).
    """
    from bnfold.recalibration import recalibrate as _recalibrate

    return _recalibrate(model, batches, num_batches, preserve_function=preserve_function,
                        progress=progress, layers=layers, forward=forward)


def fold_onnx(model: Any, *, inplace: bool = False, backward: bool = True,
              base_dir: Any = None, max_const_elements: int | None = None,
              include: Any = None, exclude: Any = None,
              progress: Any = None) -> PassResult:
    """Fold BatchNormalization nodes of an ONNX model (ModelProto, onnx_ir.Model or path);
    ``backward=False`` folds only layer -> BN; ``base_dir``: the folder of an in-memory
    model's external data; ``max_const_elements``: the size budget of tensors computed from
    constants; ``include`` / ``exclude``: BN name globs, as for :func:`fold`;
    ``progress(done, total)``: called per BN settled. See
    :func:`bnfold.passes.onnx.fold.fold_onnx`."""
    from bnfold.passes.onnx.fold import fold_onnx as _fold_onnx

    return _fold_onnx(model, inplace=inplace, backward=backward, base_dir=base_dir,
                      max_const_elements=max_const_elements, include=include, exclude=exclude,
                      progress=progress)


def inspect_onnx(model: Any, *, base_dir: Any = None,
                 max_const_elements: int | None = None) -> Report:
    """Report, without changing anything, what each BN of an ONNX model would fold into."""
    from bnfold.passes.onnx.fold import inspect_onnx as _inspect_onnx

    return _inspect_onnx(model, base_dir=base_dir, max_const_elements=max_const_elements)


def insert_bn_onnx(
    model: Any,
    *,
    position: str = "before_activation",
    skip_last: bool = True,
    include: Any = None,
    exclude: Any = None,
    eps: float = 1e-5,
    momentum: float = 0.1,
    drop_bias: bool = False,
    training_mode: bool = False,
    base_dir: Any = None,
) -> PassResult:
    """Insert BatchNormalization after Conv/ConvTranspose/Gemm/MatMul in an ONNX graph (see
    :func:`bnfold.passes.onnx.insert.insert_bn_onnx` for the options)."""
    from bnfold.passes.onnx.insert import insert_bn_onnx as _insert

    return _insert(
        model, position=position, skip_last=skip_last, include=include, exclude=exclude,
        eps=eps, momentum=momentum, drop_bias=drop_bias, training_mode=training_mode,
        base_dir=base_dir,
    )


def validate(
    reference: Any,
    candidate: Any,
    example_inputs: Any = None,
    *,
    providers: Sequence[str] = ("cpu", "cuda"),
    require: Sequence[str] = (),
    inputs: Any = None,
    dims: Mapping[str, int] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    samples: int = 3,
    optimize: bool = False,
    progress: Any = None,
    labels: Sequence[str] | None = None,
    base_dir: Any = None,
    upcast_reference: bool = True,
) -> Any:
    """Run two models (ONNX vs ONNX, or torch module vs ONNX with ``example_inputs``) in ONNX
    Runtime on each provider and compare every output; returns a ``ValidationResult`` with
    ``.passed``; a float16/bfloat16 model is checked against its reference computed in float32
    unless ``upcast_reference=False``. See :func:`bnfold.validation.validate`."""
    from bnfold.validation import validate as _validate

    return _validate(reference, candidate, example_inputs, providers=providers, require=require,
                     inputs=inputs, dims=dims, atol=atol, rtol=rtol, seed=seed, samples=samples,
                     optimize=optimize, progress=progress, labels=labels, base_dir=base_dir,
                     upcast_reference=upcast_reference)


def export(model: torch.nn.Module, example_inputs: Any, path: Any, *,
           fold: bool = True, validate: Sequence[str] | None = ("cpu", "cuda"),
           opset: int | None = None, dynamic_shapes: Any = None) -> Report:
    """Fold at the FX level, export to ONNX, fold what export left, validate, write atomically."""
    from bnfold.exporter import export as _export

    return _export(model, example_inputs, path, fold=fold, validate=validate, opset=opset,
                   dynamic_shapes=dynamic_shapes)


def reparameterize_onnx(model: Any, *, inplace: bool = False) -> PassResult:
    """Merge parallel Conv(+BN) branches of an ONNX model (ModelProto, onnx_ir.Model or path)
    into one Conv each, then fold the remaining BNs. See
    :func:`bnfold.passes.onnx.reparam.reparameterize_onnx`."""
    from bnfold.passes.onnx.reparam import reparameterize_onnx as _reparameterize_onnx

    return _reparameterize_onnx(model, inplace=inplace)
