"""Run every benchmark in one go (``make bench``); each writes its table to benchmarks/out/."""

from __future__ import annotations

import importlib

BENCHMARKS = ("bench_fx_fold", "bench_onnx_fold", "bench_onnx_zoo", "bench_training",
              "bench_bn_left", "bench_reparam", "bench_arch")


def main() -> None:
    for name in BENCHMARKS:
        print(f"\n===== benchmarks.{name} =====", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()


if __name__ == "__main__":
    main()
