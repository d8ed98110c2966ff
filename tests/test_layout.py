"""The package layout: subpackages installed, module names apart from the public functions,
the command reachable as ``bnfold`` and as ``python -m bnfold.cli``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bnfold import api

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def test_every_subpackage_is_installed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(("bnfold", *p.parent.relative_to(ROOT / "bnfold").parts)).rstrip(".")
             for p in (ROOT / "bnfold").rglob("__init__.py")}
    assert found <= listed


@pytest.mark.parametrize("name", sorted(api.HOMES))
def test_no_module_shadows_a_public_function(name: str) -> None:
    assert not (ROOT / "bnfold" / f"{name}.py").exists()
    assert not (ROOT / "bnfold" / name).is_dir()


def test_python_m_bnfold_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "bnfold.cli", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("bnfold "), done.stderr
    bad = subprocess.run([sys.executable, "-m", "bnfold.cli", "fold"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
