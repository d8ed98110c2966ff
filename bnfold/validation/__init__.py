"""Validation: run a reference and a candidate in ONNX Runtime and compare every output.

:mod:`~bnfold.validation.session` (``validate``: sessions, the provider that really ran),
:mod:`~bnfold.validation.inputs` (input signature and samples), :mod:`~bnfold.validation.metrics`
(errors and dtype-aware tolerances), :mod:`~bnfold.validation.error_stats`,
:mod:`~bnfold.validation.upcast` (float32 reference for 16-bit models),
:mod:`~bnfold.validation.result` (the result and its JSON document),
:mod:`~bnfold.validation.golden` (``.npz`` inputs/outputs). Nothing is imported here, so reading a
result does not import onnxruntime.
"""
