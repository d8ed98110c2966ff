"""Benchmarks: run as modules from the repository root, e.g. ``python -m benchmarks.bench_onnx_fold``."""
