"""Ordinary bad input reads as bad input, never as a bug (issue 8, items 7, 10 and 11).

The bad-input corpus (:mod:`corpus`, over 150 malformed or hostile models and argument sets)
runs through ``bnfold.cli.main`` in two worker processes (file descriptors caught per case,
so C++ library output counts) and a sample through the real console script. Every case must
give exit 0 with a correct model (same outputs as the input in ONNX Runtime), or exit 1/2
with exactly one ``bnfold: error:`` line (argparse's usage line above it for usage errors),
no traceback, no "internal error"; inputs byte-identical afterwards, no temp files left.
The other tests pin single items, each failing on the code before this change.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from corpus import Case, build, conv_bn, sample_files, sparsify
from corpus import graph_models as corpus_models

import bnfold
from bnfold import cli
from bnfold.errors import BadInputError, UnsupportedError
from bnfold.io.fileio import save_onnx
from bnfold.validation.inputs import INPUT_BUDGET_BYTES

CORPUS = Path(__file__).with_name("corpus.py")
#: Cases also run through the real console script: C++ noise, odd names, each kind of error.
SUBPROCESS_SAMPLE = {"fold:expand_bomb_bias", "fold:non_utf8_name", "fold:symlink_loop",
                     "inputs:npz_object", "args:validate_seed_negative", "fold:sparse_weight",
                     "fold:ext_symlinked_folder_out", "fold:bn_var_len1", "usage:0",
                     "fold:string_output-validated"}


def snapshot(folders: list[Path]) -> dict[str, tuple]:
    """Size, mtime and (for small regular files) content digest of every file, unfollowed."""
    seen = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in [*names, *dirs]:
                path = Path(root) / name
                info = path.lstat()
                digest = (hashlib.sha256(path.read_bytes()).hexdigest()
                          if stat.S_ISREG(info.st_mode) and info.st_size < 2**24 else None)
                seen[str(path)] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return seen


def run_workers(cases: list[Case], tmp: Path, workers: int = 2) -> list[dict]:
    """Results of ``cases`` run in-process by ``workers`` corpus processes, in order."""
    chunks = [cases[i::workers] for i in range(workers)]

    def work(i: int) -> list[dict]:
        todo, done = tmp / f"cases{i}.json", tmp / f"results{i}.json"
        todo.write_text(json.dumps([c.argv for c in chunks[i]]))
        proc = subprocess.run([sys.executable, str(CORPUS), str(todo), str(done)],
                              capture_output=True, text=True, timeout=240, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(done.read_text())

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(work, range(workers)))
    results: list[dict] = [{}] * len(cases)
    for i, part in enumerate(parts):
        for j, res in enumerate(part):
            results[i + j * workers] = res
    return results


def same_function(source: Path, folded: Path) -> str | None:
    """Why ``folded`` does not compute what ``source`` does in ONNX Runtime (None if it does,
    or if ONNX Runtime cannot run ``source`` at all)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    rng = np.random.default_rng(1)
    try:
        ref = ort.InferenceSession(onnx.load(str(source)).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
        feed = {i.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in i.shape]
                                            ).astype(np.float32) if "float" in i.type
                else np.array(True) for i in ref.get_inputs()}
        expected = ref.run(None, feed)
    except Exception:
        return None
    cand = ort.InferenceSession(onnx.load(str(folded)).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    for r, c in zip(expected, cand.run(None, feed), strict=True):
        r64, c64 = r.astype(np.float64), c.astype(np.float64)  # Cast-to-string: numbers
        finite = np.abs(r64[np.isfinite(r64)])
        scale = max(float(finite.max(initial=0.0)), 1.0)
        if r64.shape != c64.shape or not np.allclose(r64, c64, rtol=1e-4, atol=1e-5 * scale,
                                                     equal_nan=True):
            return "the folded model computes something else"
    return None


def judge(case: Case, res: dict) -> str | None:
    """What is wrong with ``res`` as the answer to ``case`` (None: nothing)."""
    rc, out, err = res["rc"], res["stdout"], res["stderr"]
    lines = err.strip().splitlines()
    if rc not in case.codes:
        return f"exit {rc}, expected {case.codes}: {err.strip()[-300:]}"
    if "Traceback" in err or "internal error" in err + out:
        return f"reads as a bug: {err.strip()[-300:]}"
    if rc == 0 or rc == 1 or case.folder:
        if err.strip():
            return f"exit {rc} with noise on stderr: {err.strip()[:300]}"
        if rc == 0 and case.output and Path(case.output).exists():
            return same_function(Path(case.source or ""), Path(case.output))
        return None
    if case.usage:
        ok = len(lines) >= 2 and lines[0].startswith("usage:") and ": error:" in lines[-1]
        return None if ok else f"not a usage error: {lines}"
    if len(lines) != 1 or not lines[0].startswith("bnfold: error: "):
        return f"not one error line: {lines}"
    if case.contains and case.contains.lower() not in lines[0].lower():
        return f"error does not say {case.contains!r}: {lines[0]}"
    if case.output and Path(case.output).exists():
        return "exit 2 but the output was written"
    return None


def test_bad_input_corpus(tmp_path, run_cli):
    corpus = build(tmp_path)
    cases = corpus.cases
    assert len(cases) >= 150 and len({c.name for c in cases}) == len(cases)
    before = snapshot(corpus.inputs)
    results = run_workers(cases, tmp_path)
    failures = {c.name: why for c, res in zip(cases, results, strict=True)
                if (why := judge(c, res))}
    assert not failures, json.dumps(failures, indent=1)
    assert snapshot(corpus.inputs) == before
    sample = [c for c in cases if c.name in SUBPROCESS_SAMPLE]
    assert len(sample) == len(SUBPROCESS_SAMPLE)
    for case, res in zip(sample, run_cli.many([c.argv for c in sample]), strict=True):
        if case.output:
            Path(case.output).unlink(missing_ok=True)
        answer = {"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr}
        assert judge(case, answer) is None, (case.name, judge(case, answer))
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]
    assert snapshot(corpus.inputs) == before


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("bnfold: error: ") and "internal error" not in lines[0]
    return lines[0]


def test_sparse_initializers_are_refused_by_the_api_and_the_cli(tmp_path, run_cli):
    model = conv_bn()
    sparsify(model, "W")
    for call in (bnfold.fold_onnx, bnfold.inspect_onnx, bnfold.insert_bn_onnx):
        with pytest.raises(UnsupportedError, match=r"sparse initializers \(W\)"):
            call(model)
    with pytest.raises(UnsupportedError, match="sparse"):
        save_onnx(model, tmp_path / "written.onnx")
    assert not list(tmp_path.iterdir())
    path = save(model, tmp_path / "sparse.onnx")
    with pytest.raises(UnsupportedError, match="sparse"):
        bnfold.fold_onnx(path)
    out = tmp_path / "out.onnx"
    res = run_cli("fold", path, "-o", out)
    assert f"{path}: sparse initializers (W) are not supported" in one_error_line(res)
    assert not out.exists()


def test_validation_sizes_and_files_are_bounded_before_anything_is_read(tmp_path, run_cli,
                                                                        monkeypatch):
    path = save(conv_bn(), tmp_path / "m.onnx")
    with pytest.raises(BadInputError, match="76800000000 bytes"):
        bnfold.validate(path, path, providers=("cpu",), dims={"N": 10**8}, samples=1)
    with pytest.raises(BadInputError, match="samples must be an integer from 1 to 10000"):
        bnfold.validate(path, path, providers=("cpu",), samples=10**6)
    dim, many = run_cli.many([
        ["validate", path, path, "--providers", "cpu", "--dim", "N=1000000000"],
        ["validate", path, path, "--providers", "cpu", "--samples", "9000", "--dim",
         "N=1000"]])
    assert "2304000000000 bytes" in one_error_line(dim) and "budget" in one_error_line(dim)
    assert "6912000000 bytes (9000 sample(s)" in one_error_line(many)
    huge_model, huge_npy = tmp_path / "huge.onnx", tmp_path / "huge.npy"
    for huge in (huge_model, huge_npy):
        with open(huge, "wb") as f:
            f.truncate(INPUT_BUDGET_BYTES + 1)  # holes: nothing to read, if it were read

    def never(*args, **kwargs):
        raise AssertionError("read a file that is too large")

    (tmp_path / "samples").mkdir()
    sample_files(tmp_path / "samples")  # writes bomb.npz: a small file whose arrays unpack to 3 GiB
    monkeypatch.setattr(onnx, "load", never)
    with pytest.raises(BadInputError, match="2147483649 bytes, more than ONNX models may have"):
        bnfold.fold_onnx(huge_model)
    monkeypatch.undo()
    monkeypatch.setattr(np, "load", never)
    with pytest.raises(BadInputError, match="more than input samples may have"):
        bnfold.validate(path, path, providers=("cpu",), inputs=huge_npy)
    with pytest.raises(BadInputError, match="unpack to 3221225472 bytes"):
        bnfold.validate(path, path, providers=("cpu",), inputs=tmp_path / "samples" / "bomb.npz")


def test_the_api_raises_bnfold_errors_for_bad_arguments(tmp_path):
    path = save(conv_bn(), tmp_path / "m.onnx")
    meta = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to("meta")
    with pytest.raises(BadInputError, match="meta device"):
        bnfold.fold(meta.eval())
    for kwargs, match in (({"samples": 2.5}, "samples"), ({"samples": True}, "samples"),
                          ({"providers": None}, "providers"), ({"require": None}, "require"),
                          ({"providers": ("cpu", 3)}, "providers"), ({"seed": -1}, "seed"),
                          ({"seed": "0"}, "seed"), ({"dims": {"N": 2.5}}, "dim")):
        with pytest.raises(BadInputError, match=match):
            bnfold.validate(path, path, **({"providers": ("cpu",)} | kwargs))


def _with_external_data(tmp_path: Path) -> Path:
    """The corpus's Conv -> BN model saved as ``m/m.onnx``, every tensor in ``m/m.data``."""
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "m.onnx"
    onnx.save_model(conv_bn(), path, save_as_external_data=True, location="m.data",
                    size_threshold=0)
    return path


def test_invalid_models_are_refused_not_repaired(tmp_path):
    var1 = conv_bn(inits={"var": np.ones(1, np.float32)})
    with pytest.raises(BadInputError, match="normalizes 4 channels but var has 1 value"):
        bnfold.fold_onnx(var1)
    with pytest.raises(BadInputError, match="invalid model"):
        bnfold.inspect_onnx(var1)
    path = _with_external_data(tmp_path)
    data = path.with_name("m.data")
    data.write_bytes(data.read_bytes()[:-8])  # the last tensor now runs past the end
    with pytest.raises(BadInputError, match=r"past the end of 'm\.data'"):
        bnfold.fold_onnx(path)
    scalar = conv_bn(inits={"W": np.float32(2.0)})
    with pytest.raises(BadInputError, match="weight of shape"):
        bnfold.fold_onnx(scalar)


def test_in_memory_models_get_the_checks_a_file_gets(tmp_path, run_cli):
    """An undefined input (the CLI's onnx.checker refuses it; onnx-ir only warns), a string BN
    parameter, a ``base_dir`` without the data file and a NUL byte in a location are each
    one ``BadInputError``, not a repaired model nor a ``ValueError``/``FileNotFoundError``."""
    dangling = conv_bn()
    dangling.graph.node[1].input[1] = "missing"
    for call in (bnfold.fold_onnx, bnfold.inspect_onnx):
        with pytest.raises(BadInputError, match="reads 'missing', which no node"):
            call(dangling)
    strings = conv_bn(inits={"gamma": np.array(["a"] * 4)})
    with pytest.raises(BadInputError, match="scale of type string"):
        bnfold.fold_onnx(strings)
    path = _with_external_data(tmp_path)
    in_memory = onnx.load(path, load_external_data=False)
    for call in (bnfold.fold_onnx, bnfold.inspect_onnx):
        with pytest.raises(BadInputError, match=r"cannot read 'm\.data'"):
            call(in_memory, base_dir=tmp_path)
    for tensor in in_memory.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "m.data\0x"
    onnx.save(in_memory, path)
    with pytest.raises(BadInputError, match="NUL byte"):
        bnfold.fold_onnx(path)
    res = run_cli("inspect", path)
    assert res.returncode == 2 and "NUL byte" in res.stderr and "internal" not in res.stderr


def test_unreadable_files_are_named_in_one_line(tmp_path, monkeypatch, capsys):
    locked = save(conv_bn(), tmp_path / "locked.onnx")
    samples = tmp_path / "x.npz"
    np.savez(samples, x=np.zeros((2, 3, 8, 8), np.float32))
    good = save(conv_bn(), tmp_path / "good.onnx")
    real_open = builtins.open

    def denied(file, *args, **kwargs):  # root reads any file, so refuse as a user is refused
        if str(file) in (str(locked), str(samples)):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    for argv, name in ((["fold", locked, "-o", tmp_path / "o.onnx"], locked),
                       (["inspect", locked], locked),
                       (["validate", good, good, "--providers", "cpu", "--inputs", samples],
                        samples)):
        assert cli.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(name) in err[0] and "Permission denied" in err[0], err
        assert "internal error" not in err[0]
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_through_the_console_script(tmp_path, run_cli):
    locked = save(conv_bn(), tmp_path / "locked.onnx")
    locked.chmod(0)
    assert "Permission denied" in one_error_line(run_cli("inspect", locked))


def test_folder_mode_reports_the_subfolders_it_could_not_read(tmp_path, monkeypatch, capsys):
    src = tmp_path / "models"
    for rel in ("a.onnx", "sub/b.onnx", "locked/c.onnx"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        save(conv_bn(), src / rel)
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert cli.main(["fold", str(src), "-o", str(out), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"] == {"files": 3, "ok": 2, "validation_failed": 0, "bad_input": 1}
    bad = next(r for r in doc["results"] if r["exit_code"] == 2)
    assert bad["error"] == f"{src / 'locked'}: could not read this folder (Permission denied)"
    assert (out / "a.onnx").exists() and (out / "sub" / "b.onnx").exists()


def test_odd_file_names_and_a_quiet_successful_run(tmp_path, run_cli):
    name = tmp_path / os.fsdecode(b"caf\xe9 \xff.onnx")  # Latin-1 bytes: not valid UTF-8
    save(conv_bn(), name)
    bomb = save(corpus_models()["expand_bomb_bias"][0], tmp_path / "bomb.onnx")
    dangling = save(corpus_models()["undefined_input"][0], tmp_path / "dangling.onnx")
    folded, report, quiet, warned = run_cli.many([
        ["fold", name, "-o", tmp_path / os.fsdecode(b"out\xff.onnx"), "--validate",
         "--providers", "cpu"],
        ["fold", name, "-o", tmp_path / "o.onnx", "--json"],
        ["fold", bomb, "-o", tmp_path / "bomb.folded.onnx"],
        ["inspect", dangling]])
    assert "cannot be found in any scope" not in warned.stderr  # onnx-ir's warning line
    assert "'nope'" in one_error_line(warned)
    assert folded.returncode == 0 and folded.stderr == "", folded.stderr
    assert "validation PASSED" in folded.stdout
    assert (tmp_path / os.fsdecode(b"out\xff.onnx")).exists()
    assert report.returncode == 0 and json.loads(report.stdout)["written"] is True
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr  # no "4.00 TiB" noise
