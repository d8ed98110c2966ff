"""Arguments of the wrong type get a one-line BadInputError naming the argument from every
public function, never a raw TypeError / ValueError / AttributeError / RuntimeError."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfold
from bnfold import api
from bnfold.errors import BadInputError
from bnfold.io.fileio import save_onnx

X = torch.randn(2, 3, 8, 8)


def _module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).eval()


@pytest.fixture
def onnx_file(conv_bn_proto: Callable[..., onnx.ModelProto], tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_proto(), path)
    return path


def _refused(call: Callable[[], Any], match: str) -> BadInputError:
    """``call()`` raises a one-line BadInputError matching ``match``."""
    with pytest.raises(BadInputError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return caught.value


def _call(name: str, flag: str, value: Any, onnx_file: Path) -> Any:
    """Public function ``name`` on a small model of its kind, with ``flag=value``."""
    if name in ("fold", "reparameterize", "insert_bn", "recalibrate"):
        model = _module()
        if name == "recalibrate":
            return bnfold.recalibrate(model, [X], **{flag: value})
        return getattr(bnfold, name)(model, **{flag: value})
    if name == "validate":
        return bnfold.validate(onnx_file, onnx_file, providers=("cpu",), **{flag: value})
    if name == "export":
        return bnfold.export(_module(), (X,), onnx_file.with_name("out.onnx"),
                             validate=None, **{flag: value})
    return getattr(bnfold, name)(onnx_file, **{flag: value})


FLAGS = [
    ("fold", "inplace"), ("reparameterize", "inplace"), ("insert_bn", "skip_last"),
    ("insert_bn", "affine"), ("insert_bn", "drop_bias"), ("recalibrate", "preserve_function"),
    ("recalibrate", "progress"), ("fold_onnx", "inplace"), ("fold_onnx", "backward"),
    ("fold_onnx", "freeze_initializer_inputs"), ("inspect_onnx", "freeze_initializer_inputs"),
    ("insert_bn_onnx", "skip_last"), ("insert_bn_onnx", "drop_bias"),
    ("insert_bn_onnx", "training_mode"), ("reparameterize_onnx", "inplace"),
    ("validate", "optimize"), ("validate", "upcast_reference"), ("export", "fold"),
]


def test_every_public_boolean_argument_is_checked() -> None:
    flags = {(name, p.name) for name in api.HOMES
             for p in inspect.signature(getattr(bnfold, name)).parameters.values()
             if p.annotation == "bool"}
    assert flags == set(FLAGS)


@pytest.mark.parametrize(("name", "flag"), FLAGS)
@pytest.mark.parametrize("value", ["no", 2, None])
def test_a_flag_that_is_not_a_bool_is_refused(name: str, flag: str, value: Any,
                                              onnx_file: Path) -> None:
    _refused(lambda: _call(name, flag, value, onnx_file),
             f"^{flag} must be True or False, got {re.escape(repr(value))}$")


@pytest.mark.parametrize("value", [np.False_, np.True_, 0, 1])
def test_numpy_bools_and_0_or_1_are_flags(value: Any, onnx_file: Path) -> None:
    """What Python reads as a bool without doubt passes (configs give 0/1, numpy np.bool_)."""
    model = torch.fx.symbolic_trace(_module())
    folded, _ = bnfold.fold(model, (X,), inplace=value)
    assert (folded is model) == bool(value)
    report = bnfold.inspect_onnx(onnx_file, freeze_initializer_inputs=value)
    assert [e.action for e in report.entries] == ["folded"]


def test_flags_refused_on_a_program_too() -> None:
    program = torch.export.export(_module(), (X,))
    _refused(lambda: bnfold.fold(program, inplace="no"), "inplace must be True or False")


@pytest.mark.parametrize("name", ["fold", "fold_onnx", "validate"])
def test_progress_must_be_none_or_callable(name: str, onnx_file: Path) -> None:
    _refused(lambda: _call(name, "progress", 3, onnx_file),
             r"^progress must be None or a callable progress\(done, total\), got 3$")


def test_recalibrate_forward_must_be_none_or_callable() -> None:
    _refused(lambda: bnfold.recalibrate(_module(), [X], forward="model"),
             r"forward must be None or a callable forward\(model, batch\), got 'model'")


@pytest.mark.parametrize("name", ["fold_onnx", "inspect_onnx", "insert_bn_onnx",
                                  "reparameterize_onnx", "validate"])
@pytest.mark.parametrize("base_dir", [3, []])
def test_base_dir_must_be_a_path(name: str, base_dir: Any, onnx_file: Path) -> None:
    proto = onnx.load(onnx_file)
    call = ((lambda: bnfold.validate(proto, proto, providers=("cpu",), base_dir=base_dir))
            if name == "validate" else lambda: getattr(bnfold, name)(proto, base_dir=base_dir))
    _refused(call, r"^base_dir takes a path \(str or os.PathLike\) or None, got "
             + re.escape(repr(base_dir)) + "$")


def test_save_onnx_needs_a_path(conv_bn_proto: Callable[..., onnx.ModelProto],
                                tmp_path: Path) -> None:
    _refused(lambda: save_onnx(conv_bn_proto(), None),
             r"^path takes a path \(str or os.PathLike\), got None$")
    _refused(lambda: save_onnx(conv_bn_proto(), tmp_path / "o.onnx", base_dir=3),
             "base_dir takes a path")


def test_export_checks_model_and_path_first(onnx_file: Path) -> None:
    _refused(lambda: bnfold.export(str(onnx_file), (X,), onnx_file.with_name("o.onnx")),
             "^expected a torch.nn.Module, got str$")
    _refused(lambda: bnfold.export(_module(), (X,), None, validate=None),
             r"^path takes a path \(str or os.PathLike\), got None$")


def test_insert_bn_with_eps_0_refuses_a_non_module() -> None:
    _refused(lambda: bnfold.insert_bn("m.onnx", eps=0), "^expected a torch.nn.Module, got str$")


@pytest.mark.parametrize(("dims", "match"), [
    (3, "^dims must be a mapping of dynamic dim names to sizes, e.g. {'batch': 4}, got int$"),
    ({3: 4}, "^dims takes dim names \\(str\\) as keys, got 3$"),
    ({"batch": 0}, "^dim sizes must be integers >= 1"),
])
def test_validate_dims(dims: Any, match: str, onnx_file: Path) -> None:
    _refused(lambda: bnfold.validate(onnx_file, onnx_file, providers=("cpu",), dims=dims), match)


@pytest.mark.parametrize("labels", [["a"], ("a", "b", "c"), ("a", 1), "ab"])
def test_validate_labels_are_two_strings(labels: Any, onnx_file: Path) -> None:
    _refused(lambda: bnfold.validate(onnx_file, onnx_file, providers=("cpu",), labels=labels),
             r"^labels takes two strings, \(reference, candidate\), got ")


def test_validate_labels_name_the_models(onnx_file: Path) -> None:
    result = bnfold.validate(onnx_file, onnx_file, providers=("cpu",), labels=("R", "C"))
    assert (result.reference, result.candidate) == ("R", "C")


def test_validate_torch_example_inputs_not_tensors(tmp_path: Path) -> None:
    path = tmp_path / "t.onnx"
    bnfold.export(_module(), (X,), path, validate=None)
    _refused(lambda: bnfold.validate(_module(), path, 3, providers=("cpu",)),
             r"^example_inputs must be 1 tensor\(s\), one per ONNX input$")


def test_validate_torch_samples_that_do_not_fit_the_model(tmp_path: Path) -> None:
    path = tmp_path / "t.onnx"
    bnfold.export(_module(), (X,), path, validate=None)
    _refused(lambda: bnfold.validate(_module(), path, torch.randn(2, 5, 8, 8),
                                     providers=("cpu",)),
             r"^the input samples do not fit the torch model \(.*expected input\[2, 5, 8, 8\]")


def test_validate_16_bit_torch_samples_that_do_not_fit_the_model(tmp_path: Path) -> None:
    path = tmp_path / "t16.onnx"
    bnfold.export(_module().half(), (X.half(),), path, validate=None)
    _refused(lambda: bnfold.validate(_module().half(), path, torch.randn(2, 5, 8, 8).half(),
                                     providers=("cpu",)),
             "^the input samples do not fit the torch model")


def test_recalibrate_batches_must_be_iterable() -> None:
    _refused(lambda: bnfold.recalibrate(_module(), None),
             "^batches must be an iterable of batches .*, got NoneType$")


def test_recalibrate_layers_must_be_names() -> None:
    _refused(lambda: bnfold.recalibrate(_module(), [X], layers=3),
             "^layers takes BN module names or the report of insert_bn, got int$")
    _refused(lambda: bnfold.recalibrate(_module(), [X], layers=[3]),
             "^not a BatchNorm with running statistics: 3$")


def test_recalibrate_batch_that_does_not_fit_restores_the_model() -> None:
    model = _module()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _refused(lambda: bnfold.recalibrate(model, [X, torch.randn(4, 5, 8, 8)]),
             r"^batch 2 does not run through the model \(.*expected input\[4, 5, 8, 8\]")
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_samples_file_that_is_not_numpy_is_named_so(onnx_file: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    for path in (notes, onnx_file):
        _refused(lambda p=path: bnfold.validate(onnx_file, onnx_file, providers=("cpu",),
                                                inputs=p),
                 rf"{path.name}: not an .npy/.npz file \(it does not start with the .npy ")


def test_recalibrate_batch_of_other_channels_at_a_bn_input() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    _refused(lambda: bnfold.recalibrate(model, [torch.randn(4)], progress=False),
             r"^a batch gives BN '0' input \[4\], not its 4 channels on dim 1$")
