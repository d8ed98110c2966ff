"""bnfold.reparameterize on torch.export programs, and ``bnfold fold X.pt2 --merge-branches``.

The merged program is run on fresh inputs (another batch size than the example, through the
dynamic dim) and compared with a float64 evaluation of the unmerged model (BNs with
non-trivial statistics), before and after a ``torch.export.save`` round trip."""

from __future__ import annotations

import copy
import json

import torch
from torch.export import Dim, ExportedProgram

import bnfold
from bnfold.models import rep
from bnfold.programs import load_program, save_program

NAME = "repvgg_stage"


def program() -> tuple[torch.nn.Module, ExportedProgram]:
    model = rep.get(NAME, seed=2)
    exported = torch.export.export(model, (rep.example_input(NAME),),
                                   dynamic_shapes=({0: Dim("batch", min=1, max=16)},))
    return model, exported


def ops(program: ExportedProgram, name: str) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function"
               and name in getattr(n.target, "__name__", ""))


def float64_error(program: ExportedProgram, model: torch.nn.Module, batch: int) -> float:
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(10 + batch))
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        got = program.module()(x).double()
    return float((got - want).abs().max() / want.abs().max())


def test_reparameterize_returns_a_merged_program_that_runs_like_the_input(tmp_path) -> None:
    model, exported = program()
    before = {k: v.clone() for k, v in exported.state_dict.items()}
    merged, report = bnfold.reparameterize(exported)
    assert isinstance(merged, ExportedProgram)
    assert len(report.merged) == 3 and not report.kept
    assert ops(exported, "batch_norm") > 0 and ops(merged, "batch_norm") == 0
    assert ops(merged, "conv") == 3 < ops(exported, "conv")
    assert ops(merged, "add") == 0
    assert merged.call_spec.in_spec == exported.call_spec.in_spec
    assert all(torch.equal(exported.state_dict[k], v) for k, v in before.items())
    assert any("ExportedProgram in" in note for note in report.notes)
    for batch in (5, 1):
        assert float64_error(merged, model, batch) < 1e-6
    save_program(merged, tmp_path / "m.pt2")
    assert float64_error(load_program(tmp_path / "m.pt2"), model, 3) < 1e-6


def test_cli_fold_pt2_merge_branches(tmp_path, run_cli) -> None:
    model, exported = program()
    src, out = tmp_path / "m.pt2", tmp_path / "merged.pt2"
    torch.export.save(exported, src)
    merge, plain, mixed = run_cli.many([
        ["fold", src, "-o", out, "--merge-branches", "--json"],
        ["fold", src, "-o", tmp_path / "plain.pt2", "--json"],
        ["fold", src, "-o", tmp_path / "x.pt2", "--merge-branches", "--exclude", "x*"],
    ])
    assert merge.returncode == 0, merge.stderr
    doc = json.loads(merge.stdout)
    assert doc["written"] and doc["fold"]["counts"]["merged"] == 3
    loaded = torch.export.load(out)
    assert ops(loaded, "conv") == 3 and ops(loaded, "batch_norm") == 0
    assert float64_error(loaded, model, 2) < 1e-6
    assert plain.returncode == 0 and "merged" not in json.loads(plain.stdout)["fold"]["counts"]
    assert ops(torch.export.load(tmp_path / "plain.pt2"), "conv") > 3
    assert mixed.returncode == 2 and "Traceback" not in mixed.stderr
    assert len(mixed.stderr.strip().splitlines()) == 1 and "--merge-branches" in mixed.stderr
    assert not (tmp_path / "x.pt2").exists()
