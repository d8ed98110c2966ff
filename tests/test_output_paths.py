"""The files a command writes besides its model get the checks ``-o``/``--report`` get:
``inspect --html``, ``validate --save-inputs/--save-outputs`` and ``fold X.pt2 -o`` never
name a folder, a model or an external data file of one (exit 2, one line, nothing written),
and are written through special files; a folder run whose output would be another input's
external data file is refused before anything is written. Through the CLI, in subprocesses;
every model that must survive is checked numerically against a float64 reference."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
import torch
from onnx_cases import feeds
from test_integrity_io import assert_computes, conv_bn, digest, one_line_error, save_external

import bnfold
from bnfold.errors import BadInputError
from bnfold.io.external_data import files_named_by
from bnfold.io.fileio import save_onnx
from bnfold.models import plain
from bnfold.models.stats import randomize_bn_stats


def test_html_and_golden_files_naming_a_data_file_or_a_model_are_refused(run_cli, tmp_path):
    model = conv_bn(5)
    src = save_external(model, tmp_path / "m.onnx", "m.onnx.data")
    data = tmp_path / "m.onnx.data"
    out = tmp_path / "out.onnx"
    assert run_cli("fold", src, "-o", out).returncode == 0
    (out_data,) = files_named_by(out)
    before = {p: digest(p) for p in (src, data, out, out_data)}
    same = tmp_path / "same.npz"
    cases = {
        "external data file": [["inspect", src, "--html", data],
                               ["validate", src, out, "--save-inputs", out_data],
                               ["validate", src, out, "--save-outputs", data]],
        "model file": [["inspect", src, "--html", src],
                       ["validate", src, out, "--save-inputs", out]],
        "directory": [["inspect", src, "--html", tmp_path],
                      ["validate", src, out, "--save-outputs", tmp_path]],
        "also the": [["inspect", src, "--html", same, "--report", same],
                     ["validate", src, out, "--save-inputs", same, "--save-outputs", same]],
    }
    runs = [(why, args) for why, many in cases.items() for args in many]
    for (why, args), res in zip(runs, run_cli.many([a for _, a in runs]), strict=True):
        assert why in one_line_error(res), args
    assert {p: digest(p) for p in before} == before
    assert not same.exists()
    assert_computes(src, model, bn_left=1)
    assert_computes(out, model)


def test_html_and_golden_files_are_written_through_special_files(run_cli, conv_bn_proto,
                                                                 tmp_path):
    import onnx

    src = tmp_path / "plain.onnx"
    onnx.save(conv_bn_proto(), src)
    link = tmp_path / "null_link"
    link.symlink_to(os.devnull)
    html = run_cli("inspect", src, "--html", link, "--report", os.devnull)
    assert html.returncode == 0, html.stderr
    res = run_cli("validate", src, src, "--save-inputs", link, "--save-outputs", os.devnull)
    assert res.returncode == 0, res.stderr
    assert link.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_fold_pt2_output_path_checks(run_cli, tmp_path):
    model = randomize_bn_stats(plain.get("digits_cnn"), seed=1).eval()
    x = torch.randn(4, 1, 8, 8)
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), src)
    link = tmp_path / "null_link"
    link.symlink_to(os.devnull)
    report = tmp_path / "r.json"
    refused = {"directory": ["fold", src, "-o", tmp_path],
               "standard output": ["fold", src, "-o", "-"],
               "model file": ["fold", src, "-o", report, "--report", report],
               "is the input": ["fold", src, "-o", src]}
    runs = run_cli.many([*refused.values(), ["fold", src, "-o", link, "--report", os.devnull]])
    for (why, args), res in zip(refused.items(), runs, strict=False):
        assert why in one_line_error(res), args
    assert runs[-1].returncode == 0, runs[-1].stderr
    assert link.is_symlink() and not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "null_link"]


def test_folder_output_that_is_another_inputs_data_file_is_refused(run_cli, tmp_path):
    """``src/m.onnx`` keeps its tensors in ``src/out/x.onnx``; folding ``src`` into
    ``src/out`` would write the folded ``src/x.onnx`` over that data file."""
    src, out = tmp_path / "src", tmp_path / "src" / "out"
    out.mkdir(parents=True)
    models = {"m": conv_bn(6), "x": conv_bn(7)}
    save_external(models["m"], src / "m.onnx", "out/x.onnx")
    save_external(models["x"], src / "x.onnx", "x.onnx.data")
    before = {p: digest(p) for p in (src / "m.onnx", out / "x.onnx", src / "x.onnx.data")}
    report = tmp_path / "r.json"
    res = run_cli("fold", src, "-o", out, "--report", report)
    assert "external data file of the input" in one_line_error(res)
    assert {p: digest(p) for p in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["x.onnx"] and not report.exists()
    for name, model in models.items():
        assert_computes(src / f"{name}.onnx", model, bn_left=1)


def test_files_named_by_reads_only_what_names_data(tmp_path):
    """A model's data files are found; an inline model, an empty file, a folder, a FIFO (not
    opened: it would wait for a writer) and a non-ONNX file holding the key name none."""
    model = conv_bn(5)
    src = save_external(model, tmp_path / "m.onnx", "m.onnx.data")
    assert files_named_by(src) == {(tmp_path / "m.onnx.data").resolve()}
    inline = tmp_path / "inline.onnx"
    inline.write_bytes(model.SerializeToString())
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"\x00location\xff" * 100)
    os.mkfifo(tmp_path / "fifo.onnx")
    for name in ("inline.onnx", "empty.onnx", "junk.onnx", "fifo.onnx", "missing.onnx"):
        assert files_named_by(tmp_path / name) == set(), name
    assert files_named_by(tmp_path) == set()



def test_no_written_file_may_be_a_sample_file_the_command_reads(run_cli, tmp_path):
    """``--inputs`` / ``--load-inputs`` name files the command reads: ``-o``, ``--report``,
    ``--save-inputs`` and ``--save-outputs`` may not replace them."""
    model = conv_bn(5)
    src, folded = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    assert run_cli("fold", src, "-o", folded).returncode == 0
    samples = tmp_path / "in.npz"
    np.savez(samples, **feeds(model, seed=3))
    before = digest(samples)
    check = ["--providers", "cpu"]
    runs = [["fold", src, "-o", samples, "--validate", *check, "--inputs", samples],
            ["fold", src, "-o", tmp_path / "o.onnx", "--validate", *check, "--inputs",
             samples, "--report", samples],
            *(["validate", src, folded, *check, "--inputs", samples, flag, samples]
              for flag in ("--report", "--save-inputs", "--save-outputs")),
            ["validate", src, folded, *check, "--load-inputs", samples, "--save-outputs",
             samples]]
    for args, res in zip(runs, run_cli.many(runs), strict=True):
        assert "is a sample file this command reads" in one_line_error(res), args
    assert digest(samples) == before and not (tmp_path / "o.onnx").exists()


def test_save_onnx_refuses_a_data_file_the_model_reads(tmp_path):
    """The API's save: writing a model over an external data file it still reads (here the
    MatMul weight no fold touches) would destroy its own weights, and the input file's."""
    model = conv_bn(6)
    src = save_external(model, tmp_path / "m.onnx", "m.onnx.data")
    data = tmp_path / "m.onnx.data"
    before = digest(data)
    folded, _ = bnfold.fold_onnx(src)
    with pytest.raises(BadInputError, match="external data file the model reads"):
        save_onnx(folded, data)
    assert digest(data) == before
    assert_computes(src, model, bn_left=1)


def test_exit_2_leaves_nothing_written(run_cli, tmp_path):
    """A report that cannot be written leaves no golden file, no HTML page, no model and no
    folder made for one; a standard output that cannot be written leaves no model."""
    import subprocess
    import sys

    model = conv_bn(7)
    src, folded = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    assert run_cli("fold", src, "-o", folded).returncode == 0
    (tmp_path / "afile").write_text("not a folder")
    report = tmp_path / "afile" / "r.json"
    runs = [["validate", src, folded, "--providers", "cpu", "--save-inputs",
             tmp_path / "g.npz", "--save-outputs", tmp_path / "new" / "o.npz", "--report",
             report],
            ["inspect", src, "--html", tmp_path / "r.html", "--report", report],
            ["fold", src, "-o", tmp_path / "newdir" / "sub" / "o.onnx", "--report", report]]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, res in zip(runs, run_cli.many(runs), strict=True):
        assert "Not a directory: " in one_line_error(res), args
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with open(os.devnull if not os.path.exists("/dev/full") else "/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "bnfold.cli", "fold", str(src), "-o",
                               str(tmp_path / "o.onnx"), "--json"], stdout=full,
                              stderr=subprocess.PIPE, text=True, check=False)
    if os.path.exists("/dev/full"):
        assert done.returncode == 2 and "No space left" in done.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before
