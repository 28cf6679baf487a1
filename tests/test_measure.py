"""`sharpness measure` on a finished run, and λmax during training (--eig_freq)."""

import csv
import json
from pathlib import Path

import pytest
import torch

from sharpness import cli, hessian, results
from sharpness.data import load_dataset
from sharpness.measure import abridged
from sharpness.train import RunConfig, load_final_model

ARGS = ["digits", "mlp_p=0", "100", "0.05", "--quiet", "--max_epochs", "2", "--abridged_size", "300"]


def _dir(root, **kw):
    return Path(root) / results.run_relpath(RunConfig("digits", "mlp_p=0", 100, 0.05, max_epochs=2, **kw))


@pytest.fixture
def finished(workdirs):
    assert cli.main(["train", *ARGS]) == 0
    return _dir(workdirs)


def test_measure_everything(finished, capsys):
    assert cli.main(["measure", str(finished), "--what", "lambda_max,lambda_min,topk,trace,density",
                     "--k", "3", "--repeats", "2", "--abridged_size", "200", "--samples", "10",
                     "--lanczos_steps", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lambda_max = " in out and "top 3:" in out and "spectral_density.png" in out
    recs = {r["what"]: r for r in json.loads((finished / "measurements.json").read_text())["measurements"]}
    assert set(recs) == {"lambda_max", "lambda_min", "topk", "trace", "density"}
    lam = recs["lambda_max"]
    assert lam["repeats"] == 2 and lam["offsets"] == [0, 1] and len(lam["values"]) == 2
    assert lam["value"] == pytest.approx(sum(lam["values"]) / 2) and lam["stderr"] > 0
    assert lam["residual"] < 1e-3 and lam["mode"] == "train" and lam["chunk_size"] == 100
    assert recs["lambda_min"]["value"] < lam["value"]
    assert recs["topk"]["value"] == sorted(recs["topk"]["value"], reverse=True)
    assert recs["topk"]["value"][0] == pytest.approx(lam["value"], rel=1e-3)
    assert (finished / "spectral_density.png").stat().st_size > 5000
    # each subset's value is λmax of that strided subset
    cfg = RunConfig("digits", "mlp_p=0", 100, 0.05, max_epochs=2)
    data = load_dataset("digits")
    model = load_final_model(finished, cfg, data, torch.device("cpu"))
    X, y = abridged(data, 200, 1)
    direct = hessian.lambda_max(model, X, y, batch_size=100, tol=1e-6, dtype=torch.float64)
    assert lam["values"][1] == pytest.approx(direct, rel=1e-3)
    # a second call appends
    assert cli.main(["measure", str(finished), "--quiet"]) == 0
    assert len(json.loads((finished / "measurements.json").read_text())["measurements"]) == 6


@pytest.mark.parametrize("extra, fragment", [
    (["--what", "bogus"], "unknown --what"),
    (["--k", "0"], "--k must be"),
    (["--tol", "0"], "--tol must be"),
    (["--tol", "inf"], "--tol must be"),
    (["--tol", "1"], "--tol must be"),
    (["--seed", "-3"], "--seed must be"),
    (["--repeats", "6"], "--abridged_size"),
])
def test_measure_bad_input(finished, capsys, extra, fragment):
    assert cli.main(["measure", str(finished), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_measure_needs_a_finished_run(workdirs, capsys):
    assert cli.main(["measure", str(workdirs / "nowhere")]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_eig_freq_leaves_training_bit_identical(workdirs):
    assert cli.main(["train", *ARGS]) == 0
    assert cli.main(["train", *ARGS, "--eig_freq", "7"]) == 0
    plain, eigs = _dir(workdirs), _dir(workdirs, eig_freq=7)
    a = torch.load(plain / "snapshot_final", weights_only=True)
    b = torch.load(eigs / "snapshot_final", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((plain / "summary.json").read_text())
    sb = json.loads((eigs / "summary.json").read_text())
    assert sa["final"] == sb["final"] and sa["lambda_max"] == sb["lambda_max"]
    rows = list(csv.DictReader((eigs / "eigs.csv").read_text().splitlines()))
    steps = sb["steps"]
    assert [int(r["step"]) for r in rows] == list(range(0, steps, 7))
    assert all(float(r["lambda_max"]) > 0 and float(r["residual"]) < 1e-3 for r in rows)
    assert sb["two_over_lr"] == pytest.approx(40.0)
    assert not (plain / "eigs.csv").exists()


@pytest.mark.parametrize("content", ["{}", "[]", '{"measurements": null}', "{not json"])
def test_malformed_measurements_file_is_refused_before_measuring(finished, capsys, monkeypatch, content):
    (finished / "measurements.json").write_text(content)
    monkeypatch.setattr(hessian, "top_eigenvalues", lambda *a, **k: pytest.fail("measured anyway"))
    assert cli.main(["measure", str(finished), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "measurements.json" in err
    assert (finished / "measurements.json").read_text() == content  # left as it was


def test_each_quantity_is_kept_when_a_later_one_fails(finished, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("density exploded")

    monkeypatch.setattr(hessian, "spectral_density", broken)
    with pytest.raises(RuntimeError, match="exploded"):  # an unexpected crash (say, out of memory)
        cli.main(["measure", str(finished), "--what", "lambda_max,density", "--quiet"])
    recs = json.loads((finished / "measurements.json").read_text())["measurements"]
    assert [r["what"] for r in recs] == ["lambda_max"]


def test_trace_repeats_use_independent_probes(finished):
    assert cli.main(["measure", str(finished), "--what", "trace", "--repeats", "2", "--abridged_size", "200",
                     "--samples", "4", "--seed", "7", "--quiet"]) == 0
    rec = json.loads((finished / "measurements.json").read_text())["measurements"][-1]
    assert rec["probe_seeds"] == [7, 8]
    cfg = RunConfig("digits", "mlp_p=0", 100, 0.05, max_epochs=2)
    data = load_dataset("digits")
    model = load_final_model(finished, cfg, data, torch.device("cpu"))
    for offset, seed in enumerate(rec["probe_seeds"]):
        X, y = abridged(data, 200, offset)
        est, _ = hessian.hessian_trace(model, X, y, samples=4, seed=seed, batch_size=100)
        assert rec["values"][offset] == pytest.approx(est, rel=1e-5)
    # the standard error is never below the probes' own error of the mean (two subsets can agree by luck)
    probes = (rec["probe_stderr"][0] ** 2 + rec["probe_stderr"][1] ** 2) ** 0.5 / 2
    assert rec["stderr_probes"] == pytest.approx(probes)
    assert rec["stderr"] == max(rec["stderr_subsets"], rec["stderr_probes"])


def test_measure_k_above_parameter_count_is_one_line(finished, capsys):
    assert cli.main(["measure", str(finished), "--what", "topk", "--k", "10000000", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exceeds the network's" in err and len(err.splitlines()) == 1
