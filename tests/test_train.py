"""Training runs end to end: the original scripts, files, statuses, determinism, bad input."""

import csv
import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharpness import cli, results, train
from sharpness.train import RunConfig

ROOT = Path(__file__).resolve().parents[1]
RUN = ["digits", "mlp_p=0", "32", "0.05"]
FILES = ["train_loss", "test_loss", "train_acc", "test_acc", "snapshot_final", "snapshot_0",
         "snapshot_most_recent", "leading_eigenvalues/leading_eigenvalue_final", "summary.json",
         "metrics.csv", "checkpoint"]


def run_script(script, args, env_extra=None, check=True):
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, str(ROOT / "src" / script), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def run_dir(root, *args, **kw):
    return Path(root) / results.run_relpath(RunConfig(*args, **kw))


def test_run_directory_layout():
    cfg = RunConfig("cifar10", "vgg11_no_dropout", 100, float("1e-1"))
    assert str(results.run_relpath(cfg)) == "cifar10/arch_vgg11_no_dropout/ce/sgd/no_change_lr/lr_0.1_bs_100_0"
    cfg = RunConfig("cifar10", "vgg11_no_dropout", 100, 1e-5, opt="sam", rho=0.05, network_seed=2)
    assert str(results.run_relpath(cfg)) == "cifar10/arch_vgg11_no_dropout/ce/sam_0.05/no_change_lr/lr_1e-05_bs_100_2"
    cfg = RunConfig("digits", "mlp_p=0", 32, 0.1, train_seed=3, max_epochs=5)
    assert results.run_relpath(cfg).name == "lr_0.1_bs_32_0_train_seed_3_max_epochs_5"


def test_original_scripts_train_then_eval(tmp_path):
    env = {"RESULTS": str(tmp_path)}
    proc = run_script("train.py", [*RUN, "--quiet"], env)
    assert "[final test accuracy = " in proc.stdout
    d = run_dir(tmp_path, "digits", "mlp_p=0", 32, 0.05)
    for name in FILES:
        assert (d / name).exists(), name
    for name in ("train_loss", "snapshot_final", "leading_eigenvalues/leading_eigenvalue_final"):
        torch.load(d / name, weights_only=True)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "done" and summary["final"]["train_acc"] >= 0.99
    assert summary["lambda_max"]["converged"] and summary["lambda_max"]["matvecs"] > 0
    assert summary["two_over_lr"] == 40.0
    rows = list(csv.DictReader((d / "metrics.csv").read_text().splitlines()))
    assert len(rows) == summary["epochs"] + 1 == len(torch.load(d / "train_acc", weights_only=True))
    ev = run_script("eval.py", RUN, env)
    line = ev.stdout.strip()
    assert ev.stdout.count("\n") == 1
    import re
    m = re.fullmatch(r"\[final test accuracy = (\d\.\d{4})\]\t\[max hessian eigenvalue = (-?\d+\.\d{4})\]", line)
    assert m, line
    assert float(m.group(1)) == pytest.approx(summary["final"]["test_acc"], abs=1e-4)
    lam = summary["lambda_max"]["value"]
    assert abs(float(m.group(2)) - lam) <= 1e-4 * abs(lam) + 5e-5
    # re-running a finished run shows the stored result without training
    again = run_script("train.py", [*RUN, "--quiet"], env)
    assert "already finished" not in again.stdout  # quiet
    assert json.loads((d / "summary.json").read_text())["finished_at"] == summary["finished_at"]


def test_boolean_and_equals_syntax():
    p = cli.build_parser()
    for argv, expected in ((["--disable_dropout"], True), (["--disable_dropout=True"], True),
                           (["--disable_dropout=False"], False), (["--disable_dropout", "False"], False),
                           ([], False)):
        assert p.parse_args(["train", *RUN, *argv]).disable_dropout is expected
    assert p.parse_args(["train", *RUN, "--opt=sam"]).opt == "sam"
    assert p.parse_args(["train", *RUN, "--opt", "sam", "--rho=0.1"]).rho == 0.1
    assert p.parse_args(["train", *RUN, "--between_iterates=true"]).between_iterates is True


def _summary(root, *args, **kw):
    return json.loads((run_dir(root, *args, **kw) / "summary.json").read_text())


def test_same_seeds_identical_results(tmp_path, monkeypatch):
    for sub in ("a", "b"):
        monkeypatch.setenv("RESULTS", str(tmp_path / sub))
        assert cli.main(["train", *RUN, "--quiet", "--opt=sam", "--max_epochs=3"]) == 0
    a = _summary(tmp_path / "a", "digits", "mlp_p=0", 32, 0.05, opt="sam", max_epochs=3)
    b = _summary(tmp_path / "b", "digits", "mlp_p=0", 32, 0.05, opt="sam", max_epochs=3)
    assert a["final"] == b["final"] and a["lambda_max"] == b["lambda_max"] and a["epochs"] == b["epochs"]
    ma = (run_dir(tmp_path / "a", "digits", "mlp_p=0", 32, 0.05, opt="sam", max_epochs=3) / "metrics.csv").read_text()
    mb = (run_dir(tmp_path / "b", "digits", "mlp_p=0", 32, 0.05, opt="sam", max_epochs=3) / "metrics.csv").read_text()
    strip = lambda text: [r.split(",")[:2] + r.split(",")[3:] for r in text.splitlines()]  # noqa: E731
    assert strip(ma) == strip(mb)  # everything but the wall-clock column


def test_max_epochs_status(workdirs, capsys):
    assert cli.main(["train", "digits", "mlp_p=0", "32", "0.001", "--quiet", "--max_epochs", "2"]) == 0
    s = _summary(workdirs, "digits", "mlp_p=0", 32, 0.001, max_epochs=2)
    assert s["status"] == "max_epochs" and s["reached_goal"] is False and s["epochs"] == 2
    assert s["lambda_max"]["value"] > 0
    assert (run_dir(workdirs, "digits", "mlp_p=0", 32, 0.001, max_epochs=2) / "snapshot_final").exists()


def test_diverged_status(workdirs, capsys):
    assert cli.main(["train", "digits", "mlp_p=0", "32", "1e4", "--max_epochs", "5"]) == 0
    out = capsys.readouterr().out
    assert "diverged" in out
    s = _summary(workdirs, "digits", "mlp_p=0", 32, 1e4, max_epochs=5)
    assert s["status"] == "diverged" and s["lambda_max"] is None and s["diverged_at"]["step"] >= 1
    d = run_dir(workdirs, "digits", "mlp_p=0", 32, 1e4, max_epochs=5)
    assert not (d / "snapshot_final").exists()
    assert cli.main(["eval", "digits", "mlp_p=0", "32", "1e4", "--max_epochs", "5"]) == 2


def test_diverging_run_with_eig_freq_ends_as_diverged(workdirs, capsys):
    """λmax every step while the weights blow up: the curvature overflows before the loss does."""
    assert cli.main(["train", "digits", "mlp_p=0", "32", "1e4", "--max_epochs", "2", "--eig_freq", "1",
                     "--quiet"]) == 0
    s = _summary(workdirs, "digits", "mlp_p=0", 32, 1e4, max_epochs=2, eig_freq=1)
    assert s["status"] == "diverged" and s["lambda_max"] is None
    d = run_dir(workdirs, "digits", "mlp_p=0", 32, 1e4, max_epochs=2, eig_freq=1)
    rows = list(csv.DictReader(open(d / "eigs.csv")))
    assert float(rows[0]["lambda_max"]) > 0 and len(rows) <= s["diverged_at"]["step"] + 1
    assert "Traceback" not in capsys.readouterr().err


def test_divergence_seen_every_20_steps_records_the_first_bad_step(workdirs, monkeypatch):
    """The GPU's way of checking (every 20 steps, first bad step tracked on the device) gives the same
    diverged_at as checking every step."""
    argv = ["train", "digits", "mlp_p=0", "32", "1e4", "--max_epochs", "2", "--quiet"]
    assert cli.main(argv) == 0
    every_step = _summary(workdirs, "digits", "mlp_p=0", 32, 1e4, max_epochs=2)["diverged_at"]
    monkeypatch.setattr(train, "_check_interval", lambda device: 20)
    assert cli.main([*argv, "--force"]) == 0
    s = _summary(workdirs, "digits", "mlp_p=0", 32, 1e4, max_epochs=2)
    assert s["diverged_at"] == every_step and s["status"] == "diverged"
    assert s["steps"] == 20 * math.ceil(every_step["step"] / 20)  # it noticed at the next look


def test_between_iterates(workdirs):
    args = ["digits", "mlp_p=0", "100", "0.05", "--quiet", "--between_iterates", "--max_epochs", "2"]
    assert cli.main(["train", *args]) == 0
    d = run_dir(workdirs, "digits", "mlp_p=0", 100, 0.05, max_epochs=2)
    s = json.loads((d / "summary.json").read_text())
    lam = s["lambda_max"]
    assert len(lam["between_values"]) == 8 and lam["value"] == max(lam["between_values"])
    assert len(set(lam["between_values"])) == 8  # eight different points, not one measured eight times
    assert (d / "snapshot_extra_iter").exists()
    vals = torch.load(d / "leading_eigenvalues" / "leading_eigenvalue_between_iterates", weights_only=True)
    assert vals.tolist() == lam["between_values"]
    # the final-iterate point equals a plain measurement at the final iterate
    assert cli.main(["train", *args[:-3], "--max_epochs", "2", "--between_iterates=False"]) == 0
    plain = json.loads((d / "summary.json").read_text())["lambda_max"]
    assert plain["between_iterates"] is False
    assert plain["value"] == pytest.approx(lam["between_values"][0], rel=1e-4)
    # the eight values of the earlier protocol do not stay next to the new λmax
    assert not (d / "leading_eigenvalues" / "leading_eigenvalue_between_iterates").exists()


def test_eval_between_iterates_of_a_read_only_run(workdirs, monkeypatch, capsys):
    """eval needs no writes: the extra step is recomputed and used when it cannot be kept."""
    args = ["digits", "mlp_p=0", "100", "0.05", "--quiet", "--between_iterates", "--max_epochs", "2"]
    assert cli.main(["train", *args]) == 0
    d = run_dir(workdirs, "digits", "mlp_p=0", 100, 0.05, max_epochs=2)
    stored = json.loads((d / "summary.json").read_text())["lambda_max"]["value"]
    (d / "snapshot_extra_iter").unlink()
    capsys.readouterr()
    real_open = results.os.open

    def read_only(path, flags, *a):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a)

    monkeypatch.setattr(results.os, "open", read_only)
    monkeypatch.setattr(results.tempfile, "mkstemp", lambda *a, **k: read_only("x", os.O_CREAT))
    assert cli.main(["eval", *args]) == 0
    out, err = capsys.readouterr()
    assert f"[max hessian eigenvalue = {stored:.4f}]" in out
    assert "Read-only file system" in err and "without being kept" in err and "Traceback" not in err
    assert not (d / "snapshot_extra_iter").exists()


def test_eval_mode_measurement_with_disable_dropout(workdirs):
    assert cli.main(["train", "digits", "mlp_p=5e-1", "64", "0.05", "--quiet", "--max_epochs", "1",
                     "--disable_dropout"]) == 0
    s = _summary(workdirs, "digits", "mlp_p=5e-1", 64, 0.05, max_epochs=1)
    assert s["lambda_max"]["mode"] == "eval" and s["lambda_max"]["dropout"] == "off"


def _err(capsys, code, argv):
    with pytest.raises(SystemExit) as exc:
        rc = cli.main(argv)
        raise SystemExit(rc)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, fragment", [
    (["train", "mnist", "mlp_p=0", "32", "0.1"], "valid datasets"),
    (["train", "digits", "resnet", "32", "0.1"], "valid architectures"),
    (["train", "digits", "mlp_p=0", "32", "0"], "lr must be"),
    (["train", "digits", "mlp_p=0", "32", "-0.1"], "lr must be"),
    (["train", "digits", "mlp_p=0", "32", "-1e-3"], "lr must be"),  # not "lr is required"
    (["train", "digits", "mlp_p=0", "32", "0.1", "--acc_goal", "-inf"], "acc_goal must be"),
    (["train", "digits", "mlp_p=0", "32", "nan"], "lr must be"),
    (["train", "digits", "mlp_p=0", "0", "0.1"], "positive integer"),
    (["train", "digits", "mlp_p=0", "5000", "0.1"], "larger than the training set"),
    (["train", "digits", "mlp_p=0", "1500", "0.1"], "not a multiple"),
    (["train", "digits", "mlp_p=0", "32", "0.1", "--opt", "adam"], "invalid choice"),
    (["train", "digits", "mlp_p=0", "32", "0.1", "--disable_dropout=maybe"], "True or False"),
    (["train", "digits", "vgg11_no_dropout", "32", "0.1", "--device", "cuda:7"], "device"),
    (["eval", "digits", "mlp_p=0", "32", "0.123"], "no run at"),
    (["train", "digits", "mlp_p=0", "32", "0.1", "--network_seed", "99999999999999999999"], "network_seed must be"),
    (["train", "digits", "mlp_p=0", "32", "0.1", "--train_seed", "-1"], "train_seed must be"),
])
def test_bad_input_one_line_exit_2(workdirs, capsys, argv, fragment):
    if "cuda" in " ".join(argv) and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert fragment in _err(capsys, 2, argv)


def test_incompatible_arch_dataset(workdirs, capsys, monkeypatch):
    from fakes import write_fashion_mnist

    ds = workdirs.parent / "fm"
    write_fashion_mnist(ds)
    monkeypatch.setenv("DATASETS", str(ds))
    assert "at least 32x32" in _err(capsys, 2, ["train", "fashion_mnist", "vgg11_no_dropout", "10", "0.1"])


def test_corrupt_snapshot_is_a_clear_error(workdirs, capsys):
    args = ["digits", "mlp_p=0", "100", "0.05", "--quiet", "--max_epochs", "1"]
    assert cli.main(["train", *args]) == 0
    d = run_dir(workdirs, "digits", "mlp_p=0", 100, 0.05, max_epochs=1)
    (d / "snapshot_final").write_bytes(b"\x00corrupt")
    capsys.readouterr()
    err = _err(capsys, 2, ["eval", *args])
    assert "snapshot_final" in err and "corrupt" in err


def test_scripts_report_errors_without_traceback(tmp_path):
    proc = run_script("train.py", ["digits", "mlp_p=0", "32", "-1"], {"RESULTS": str(tmp_path)}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: lr must be a positive finite number, got -1.0"
    proc = run_script("eval.py", ["digits", "mlp_p=0", "32", "0.5"], {"RESULTS": str(tmp_path)}, check=False)
    assert proc.returncode == 2 and "no run at" in proc.stderr


def test_unexpected_os_error_is_one_line(capsys, monkeypatch):
    """A folder this user may not read (root runs the tests, so the error is injected)."""
    def denied(args):
        raise PermissionError(13, "Permission denied", "/srv/results/run")

    args = cli.build_parser().parse_args(["train", "digits", "mlp_p=0", "32", "0.1"])
    args.func = denied
    assert cli.dispatch(args) == 2
    assert capsys.readouterr().err == "error: Permission denied: /srv/results/run\n"


def test_divergence_caught_by_the_evaluation_is_recorded(workdirs):
    """Full-batch GD whose update overflows between evaluations: diverged_at still says where."""
    args = ["digits", "mlp_p=0", "1500", "10", "--physical_batch_size", "500", "--max_epochs", "5", "--quiet"]
    assert cli.main(["train", *args]) == 0
    s = _summary(workdirs, "digits", "mlp_p=0", 1500, 10.0, physical_batch_size=500, max_epochs=5)
    assert s["status"] == "diverged" and s["diverged_at"] is not None
    loss = s["diverged_at"]["loss"]  # NaN or inf, which JSON stores as null
    assert s["diverged_at"]["step"] == s["steps"] and (loss is None or not math.isfinite(loss))


def test_gpu_style_check_never_checkpoints_past_a_non_finite_step(workdirs, monkeypatch):
    """A stop request between the 20-step looks: the run ends as diverged at its first bad step,
    instead of saving NaN parameters and losing that step."""
    argv = ["train", "digits", "mlp_p=0", "32", "1e6", "--max_epochs", "2", "--quiet"]
    assert cli.main(argv) == 0
    every_step = _summary(workdirs, "digits", "mlp_p=0", 32, 1e6, max_epochs=2)["diverged_at"]
    assert every_step["step"] < 10
    monkeypatch.setattr(train, "_check_interval", lambda device: 20)
    real, calls = train.sgd_step, []

    def step_then_sigterm(*a, **kw):
        calls.append(1)
        if len(calls) == every_step["step"] + 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(train, "sgd_step", step_then_sigterm)
    assert cli.main([*argv, "--force"]) == 0
    s = _summary(workdirs, "digits", "mlp_p=0", 32, 1e6, max_epochs=2)
    assert s["status"] == "diverged" and s["diverged_at"] == every_step


def test_eig_freq_values_keep_their_settings(workdirs, capsys):
    """eigs.csv cannot be measured again: a finished --eig_freq run refuses a new abridged_size."""
    argv = ["train", "digits", "mlp_p=0", "100", "0.05", "--max_epochs", "1", "--eig_freq", "10", "--quiet",
            "--abridged_size", "100"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main([*argv[:-1], "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert "eigs.csv" in err and "abridged_size=100" in err and len(err.splitlines()) == 1
    assert cli.main([*argv, "--between_iterates"]) == 0  # between iterates: final λmax only, allowed
