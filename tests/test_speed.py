"""What the speed work changed, checked for behaviour (times are in benchmarks/, never here).

* The fused float64 product + single rounding of ``fold_forward``/``fold_backward`` gives
  bit for bit ``round(float64(W) * s)`` on every layout (grouped, axis 1) and still refuses an
  overflow; the input weight is never written.
* Start-up: the CLI imports neither onnxruntime, onnxscript nor torch to inspect a model.
* FX shapes: the real-tensor pass (one forward, one thread, no grad) and the fake-tensor pass
  record the same shapes, the fold with either is exact, and neither changes the model's
  BN statistics or torch's thread count.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.algebra import BNParams, fold_backward, fold_forward
from bnfold.errors import UnsafeFoldError
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.fx import trace

ROOT = Path(__file__).resolve().parent.parent


def _bn(c: int, rng: np.random.Generator) -> BNParams:
    return BNParams(mean=rng.normal(0, .5, c), var=rng.uniform(.3, 3, c), eps=1e-5,
                    gamma=rng.uniform(.5, 1.5, c), beta=rng.normal(0, .5, c))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("direction", "shape", "axis", "groups"), [
    ("forward", (6, 4, 3, 3), 0, 1),   # Conv
    ("backward", (6, 2, 3, 3), 1, 3),  # Conv, grouped input channels
    ("forward", (6, 2, 3), 1, 3),      # ConvTranspose1d, grouped output channels
    ("forward", (5, 6), 1, 1),         # Gemm weight [in, out]
])
def test_weight_is_the_float64_product_rounded_once(dtype, direction, shape, axis, groups
                                                     ) -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, shape).astype(dtype)
    w.setflags(write=False)  # the fold must not write its input
    bn = _bn(shape[axis] * groups, rng)
    s, _ = bn.scale_shift()
    if groups == 1:
        vec = [1] * len(shape)
        vec[axis] = shape[axis]
        want = w.astype(np.float64) * s.reshape(vec)
    else:  # channel g * per + j: group g along axis 0, j along axis 1
        grouped = w.astype(np.float64).reshape(groups, shape[0] // groups, *shape[1:])
        vec = [groups, 1, shape[1]] + [1] * (len(shape) - 2)
        want = (grouped * s.reshape(vec)).reshape(shape)
    if direction == "forward":
        got = fold_forward(w, None, bn, out_axis=axis, groups=groups).weight
    else:
        got = fold_backward(w, None, bn, in_axis=axis, groups=groups).weight
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want.astype(dtype))


def test_overflowing_fp32_weight_is_refused() -> None:
    w = np.full((2, 1), 3e38, np.float32)
    bn = BNParams(mean=np.zeros(2), var=np.full(2, 0.01), eps=0.0)  # s = 10
    with pytest.raises(UnsafeFoldError, match="folded weight is not finite in float32"):
        fold_forward(w, None, bn)


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_inspect_imports_only_what_it_needs(tmp_path, conv_bn_proto) -> None:
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_proto(), path)
    out = _python(f"""
        import sys, types
        from bnfold import cli
        assert cli.main(["inspect", {str(path)!r}]) == 0
        heavy = ("onnxruntime", "onnxscript", "torch")
        print([m for m in heavy if isinstance(sys.modules.get(m), types.ModuleType)
               and type(sys.modules[m]) is types.ModuleType])
    """)
    assert out.splitlines()[-1] == "[]"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.lin = nn.Linear(6, 4)
        self.bn1 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn1(self.lin(y.mean((2, 3))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    randomize_bn_stats(net, seed=1)
    return net.eval()


def test_real_and_fake_shape_passes_record_the_same_shapes() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm_real, _ = trace.graph_module_of(_net(), (x,), inplace=False)
    gm_fake, _ = trace.graph_module_of(_net(), (x,), inplace=False)
    threads = torch.get_num_threads()
    trace.annotate_shapes(gm_real, (x,))
    assert torch.get_num_threads() == threads
    assert trace._fake_shapes(gm_fake, (x,))
    real = {n.name: trace.shape_of(n) for n in gm_real.graph.nodes if n.op != "output"}
    fake = {n.name: trace.shape_of(n) for n in gm_fake.graph.nodes if n.op != "output"}
    assert real == fake and real["conv"] == (2, 6, 8, 8)
    assert any("tensor_meta" in n.meta for n in gm_real.graph.nodes)


@pytest.mark.parametrize("way", ["real", "meta", "fake"])
def test_fold_with_each_shape_pass_is_exact(monkeypatch, way) -> None:
    if way == "fake":  # meta refused, every input large
        monkeypatch.setattr(trace, "_shapes_meta_when_large", lambda gm, args: False)
        monkeypatch.setattr(trace, "REAL_SHAPES_MAX_ELEMENTS", 0)
    monkeypatch.setattr(trace, "META_FROM_ELEMENTS", 0 if way == "meta" else 1 << 30)
    fake = mock.Mock(wraps=trace._fake_shapes)
    monkeypatch.setattr(trace, "_fake_shapes", fake)
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ref = _net().double()
    gm, report = bnfold.fold(net, torch.randn(2, 3, 8, 8))
    assert [e.action for e in report.entries] == ["folded", "folded"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got, want = gm(x).double(), ref(x.double())
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert fake.called == (way == "fake")


def _strided(sizes: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(64).as_strided(sizes, strides)


@pytest.mark.parametrize("t", [
    torch.empty(()), torch.empty(0, 3), torch.empty(2, 3, 4, 5),
    torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
    torch.empty(2, 3, 2, 4, 5).contiguous(memory_format=torch.channels_last_3d),
    torch.empty(2, 1, 1, 5).contiguous(memory_format=torch.channels_last),  # both formats
    torch.empty(3, 4).t(), torch.empty(1, 4).expand(3, 4), _strided((2, 3, 2, 2), (1, 2, 0, 6)),
    _strided((2, 1, 3), (3, 7, 1)), torch.empty(4, 6)[:, ::2], torch.ones(3, dtype=torch.int64),
    torch.ones(2, 3, requires_grad=True), nn.Parameter(torch.ones(2)),
    torch.quantize_per_tensor(torch.ones(2, 2), 0.1, 0, torch.quint8),
    torch.ones(2, 2).to_sparse(),
])
def test_shape_pass_metadata_is_torchs(t: torch.Tensor) -> None:
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    assert trace.tensor_metadata(t) == _extract_tensor_metadata(t)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("show_after", "shown"), [(60.0, False), (0.0, True)])
def test_progress_bar_appears_only_on_long_runs(monkeypatch, show_after, shown) -> None:
    from bnfold.cli import render

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(render, "SHOW_AFTER_S", show_after)
    with render.progress_bar("validating", 3) as update:
        for i in range(3):
            update(i + 1, 3)
    assert ("validating" in terminal.getvalue()) is shown
