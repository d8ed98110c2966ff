"""Every zoo model exported to ONNX with its BNs kept, folded, and checked against float64.

Exporters: torch's dynamo exporter with ``optimize=False`` (its optimizer would fold Conv+BN
itself; without it the conv bias and affine-less BN parameters come from small constant
subgraphs, which fold_onnx must see through), and the TorchScript exporter with
``training=TrainingMode.PRESERVE`` (else it fuses Conv+BN itself) at opsets 9 to 17. The float64
reference is the unfolded torch model run in float64 on a fresh input.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx_cases import count, rel_err, run_ort

from bnfold.models import zoo
from bnfold.passes.onnx.fold import fold_onnx

FP32_TOL = 1e-5
#: TorchScript exports (model -> opset): older opsets as users have them. This exporter leaves
#: most intermediate values without value_info, so the MatMul rules need shape inference.
TORCHSCRIPT = {"plain_cnn": 17, "resnet_small": 17, "bn_before_conv": 11,
               "convtranspose_decoder": 17, "mlp_bn1d": 9, "conv1d_net": 11, "mlp_heads": 13,
               "levit_block": 17}


def _export(name: str, dynamo: bool) -> onnx.ModelProto:
    model, x = zoo.get(name), zoo.example_input(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, optimize=False,
                                     verbose=False).model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=TORCHSCRIPT[name],
                          training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="session")
def exports() -> dict[tuple[str, bool], onnx.ModelProto]:
    """Exports cached for the session (each export takes about a second)."""
    out = {(name, True): _export(name, True) for name in zoo.ZOO}
    out.update({(name, False): _export(name, False) for name in TORCHSCRIPT})
    return out


def _float64_reference(name: str, x: torch.Tensor) -> list[np.ndarray]:
    model = zoo.get(name).double()
    with torch.no_grad():
        y = model(x.double())
    return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]


@pytest.mark.parametrize(
    ("name", "dynamo"),
    [(n, True) for n in zoo.ZOO] + [(n, False) for n in TORCHSCRIPT])
def test_zoo_folds_to_bn_left(exports, name: str, dynamo: bool) -> None:
    proto = exports[(name, dynamo)]
    assert count(proto) == zoo.ZOO[name].bn_total, "exporter did not keep every BN"
    folded, report = fold_onnx(proto)
    onnx.checker.check_model(folded, full_check=True)
    assert count(folded) == zoo.ZOO[name].bn_left, report.table()
    assert len(report.kept) == zoo.ZOO[name].bn_left
    assert all(e.reason for e in report.kept)
    x = zoo.example_input(name, seed=7)  # a fresh input, not the one used to export
    feeds = {proto.graph.input[0].name: x.numpy()}
    want = _float64_reference(name, x)
    assert rel_err(run_ort(folded, feeds), want) < FP32_TOL
    assert rel_err(run_ort(proto, feeds), want) < FP32_TOL
    again, rep2 = fold_onnx(folded)
    assert not rep2.changed and again.SerializeToString() == folded.SerializeToString()
