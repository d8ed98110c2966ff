"""The public API is the implementations themselves, imported on first use."""

from __future__ import annotations

import importlib
import inspect
import pydoc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bnfold
from bnfold import api

ROOT = Path(__file__).resolve().parents[1]


def test_import_bnfold_is_light() -> None:
    code = textwrap.dedent("""
        import sys, bnfold
        print([m for m in ("torch", "onnxruntime", "onnxscript") if m in sys.modules])
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(api.HOMES))
def test_public_function_is_its_implementation(name: str) -> None:
    module, attr = api.HOMES[name]
    implementation = getattr(importlib.import_module(module), attr)
    public = getattr(bnfold, name)
    assert public is getattr(api, name)
    assert inspect.signature(public) == inspect.signature(implementation)
    assert public.__name__ in (name, attr)
    assert name in bnfold.__all__ and name in api.__all__


def test_api_lists_every_public_function_once() -> None:
    assert sorted(api.__all__) == sorted(api.HOMES)


def test_signatures_carry_real_types_and_every_argument() -> None:
    assert "samples" in inspect.signature(bnfold.export).parameters
    assert inspect.signature(bnfold.validate).return_annotation == "ValidationResult"
    assert inspect.signature(bnfold.recalibrate).return_annotation == "Recalibration"
    text = pydoc.render_doc(bnfold.fold, renderer=pydoc.plaintext)
    assert "fold(model" in text and "inplace" in text and "include" in text
    assert "ExportedProgram" in text


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such"):
        bnfold.no_such  # noqa: B018
    with pytest.raises(AttributeError, match="no_such"):
        api.no_such  # noqa: B018
