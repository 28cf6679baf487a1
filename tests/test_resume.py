"""Nothing lost: kills, signals, locks, corrupt and malicious files, unwritable results."""

import csv
import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sharpness import cli, optim, results, train
from sharpness.train import RunConfig

# a dropout net with SAM: the resume must restore the shuffle order, the dropout RNG and SAM's steps
ARGS = ["digits", "mlp_p=2e-1", "50", "0.02", "--opt=sam", "--max_epochs", "6", "--abridged_size", "300",
        "--quiet"]
CFG = dict(opt="sam", max_epochs=6, abridged_size=300)


def run_dir(root):
    return Path(root) / results.run_relpath(RunConfig("digits", "mlp_p=2e-1", 50, 0.02, **CFG))


def comparable(root):
    """What must be identical between an interrupted and an uninterrupted run."""
    d = run_dir(root)
    s = json.loads((d / "summary.json").read_text())
    rows = list(csv.DictReader((d / "metrics.csv").read_text().splitlines()))
    for r in rows:
        r.pop("elapsed_s")
    return {"final": s["final"], "epochs": s["epochs"], "steps": s["steps"], "status": s["status"],
            "lambda_max": s["lambda_max"], "metrics": rows,
            "snapshot": {k: v.tolist() for k, v in torch.load(d / "snapshot_final", weights_only=True).items()}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    old = os.environ.get("RESULTS")
    os.environ["RESULTS"] = str(root)
    try:
        assert cli.main(["train", *ARGS]) == 0
    finally:
        if old is None:
            os.environ.pop("RESULTS")
        else:
            os.environ["RESULTS"] = old
    return comparable(root)


def signal_at_step(monkeypatch, step: int, signum: int):
    """Make the training process receive `signum` from itself right after optimisation step `step`."""
    calls = {"n": 0}
    real = optim.sam_step

    def stepping(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(train, "sam_step", stepping)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_is_identical(workdirs, monkeypatch, capsys, reference, signum, code):
    signal_at_step(monkeypatch, 47, signum)  # mid-epoch (30 steps per epoch)
    assert cli.main(["train", *ARGS]) == code
    err = capsys.readouterr().err
    assert "checkpoint saved" in err and "resume" in err and "Traceback" not in err
    state = torch.load(run_dir(workdirs) / "checkpoint", weights_only=True)
    assert state["step"] == 47 and state["batch"] == 17 and state["epoch"] == 1
    assert not (run_dir(workdirs) / "summary.json").exists()
    monkeypatch.setattr(train, "sam_step", optim.sam_step)
    assert cli.main(["train", *ARGS]) == 0
    assert comparable(workdirs) == reference
    assert json.loads((run_dir(workdirs) / "summary.json").read_text())["resumed"] is True


def test_finished_run_is_not_trained_again(workdirs, capsys):
    assert cli.main(["train", *ARGS]) == 0
    first = json.loads((run_dir(workdirs) / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main(["train", *ARGS[:-1]]) == 0  # not quiet: says why
    out = capsys.readouterr().out
    assert "already finished" in out and "[final test accuracy" in out
    assert json.loads((run_dir(workdirs) / "summary.json").read_text()) == first
    assert cli.main(["train", *ARGS, "--force"]) == 0
    again = json.loads((run_dir(workdirs) / "summary.json").read_text())
    assert again["finished_at"] >= first["finished_at"] and again["final"] == first["final"]


def test_corrupt_latest_checkpoint_falls_back(workdirs, monkeypatch, capsys, reference):
    signal_at_step(monkeypatch, 75, signal.SIGTERM)  # epoch 2: checkpoint and checkpoint.prev exist
    assert cli.main(["train", *ARGS]) == 143
    d = run_dir(workdirs)
    assert (d / "checkpoint.prev").exists()
    (d / "checkpoint").write_bytes(b"PK\x03\x04 garbage from a failing disk")
    monkeypatch.setattr(train, "sam_step", optim.sam_step)
    capsys.readouterr()
    assert cli.main(["train", *ARGS]) == 0  # reported even when quiet
    err = capsys.readouterr().err
    assert str(d / "checkpoint") in err and "previous checkpoint" in err
    assert comparable(workdirs) == reference


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_not_executed(workdirs, capsys, tmp_path):
    marker = tmp_path / "pwned"
    d = run_dir(workdirs)
    d.mkdir(parents=True)
    with open(d / "checkpoint", "wb") as f:
        pickle.dump({"model": _Exploit(marker)}, f)
    torch.save({"model": _Exploit(marker)}, d / "snapshot_final", _use_new_zipfile_serialization=True)
    assert cli.main(["train", *ARGS]) == 0  # reported, then a fresh start
    assert "cannot read" in capsys.readouterr().err
    assert not marker.exists()
    # eval of a crafted snapshot_final: refused with a clear error
    torch.save({"model": _Exploit(marker)}, d / "snapshot_final")
    assert cli.main(["eval", *ARGS]) == 2
    assert "weights-only" in capsys.readouterr().err
    assert not marker.exists()


def test_second_process_is_locked_out(workdirs, capsys):
    d = run_dir(workdirs)
    d.mkdir(parents=True)
    with results.RunLock(d):
        assert cli.main(["train", *ARGS]) == 2
        err = capsys.readouterr().err
        assert "in use by another process" in err and f"pid {os.getpid()}" in err
    assert cli.main(["train", *ARGS]) == 0  # released on exit


def test_lock_of_a_dead_process_is_free(workdirs, tmp_path):
    d = run_dir(workdirs)
    d.mkdir(parents=True)
    code = ("import sys, time; from sharpness.results import RunLock; "
            f"l = RunLock({str(d)!r}).__enter__(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match="in use"):
        results.RunLock(d).__enter__()
    proc.kill()
    proc.wait()
    with results.RunLock(d):
        pass


def test_unwritable_results_root(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("RESULTS", str(blocker / "results"))
    assert cli.main(["train", *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker) in err and "cannot create" in err


def test_disk_full_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    results.atomic_write_json(target, {"old": True})

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen = os.fdopen
    monkeypatch.setattr(results.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(results.SharpnessError, match="disk full") as err:
        results.atomic_write_json(target, {"new": True})
    assert str(target) in str(err.value)
    monkeypatch.setattr(results.os, "fdopen", real_fdopen)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind


def _all_files_loadable(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_dir() or any(part.startswith(".") for part in p.relative_to(d).parts):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            list(csv.reader(p.read_text().splitlines()))
        elif p.suffix not in (".png", ".npz"):
            torch.load(p, weights_only=True)


def _epochs_logged(d: Path) -> int:
    try:
        return len((d / "metrics.csv").read_text().splitlines()) - 1
    except OSError:
        return 0


def test_sigkill_at_random_moments(tmp_path, reference):
    """SIGKILL the training process at random moments; every file stays loadable; the end is identical."""
    env = {**os.environ, "RESULTS": str(tmp_path)}
    cmd = [sys.executable, "-m", "sharpness.cli", "train", *ARGS]
    d = run_dir(tmp_path)
    rng = random.Random(1234)
    # moments: once while starting up, then a little after random epochs were logged (mid-epoch,
    # mid-write, mid-checkpoint), then after the final snapshot (while λmax is measured)
    plan = [("startup", rng.uniform(0.2, 1.5))] + [("epoch", e) for e in sorted(rng.sample(range(1, 6), 3))]
    plan.append(("final", 0))
    kills = 0
    for kind, value in plan:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kind == "startup":
            time.sleep(value)
        else:
            done = (lambda: (d / "snapshot_final").exists()) if kind == "final" else \
                (lambda: _epochs_logged(d) >= value)
            while proc.poll() is None and not done():
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(timeout=300)
        if d.exists():
            _all_files_loadable(d)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert kills >= 3, "the kills should land while the run is alive"
    assert comparable(tmp_path) == reference


def test_file_system_without_flock_is_a_clear_error(workdirs, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert cli.main(["train", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "does not support flock" in err and "in use" not in err and len(err.strip().splitlines()) == 1


def test_newest_checkpoint_stays_in_place_while_the_next_one_is_swapped_in(tmp_path, monkeypatch):
    """A crash between keeping the previous checkpoint and renaming the new one in must leave a
    complete `checkpoint` under its own name (the temporary is deleted on restart)."""
    trainer = train.Trainer.__new__(train.Trainer)  # only what save_checkpoint uses
    trainer.run_dir = tmp_path
    trainer.checkpoint_state = lambda: {"format": 1, "epoch": 1}
    train.Trainer.save_checkpoint(trainer)
    first = (tmp_path / results.CHECKPOINT).read_bytes()
    trainer.checkpoint_state = lambda: {"format": 1, "epoch": 2}
    real_replace = Path.replace

    def crash_on_swap(self, target):
        if self.name.startswith(".checkpoint.next"):
            raise OSError(errno.EIO, "simulated crash")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", crash_on_swap)
    with pytest.raises(Exception, match="simulated crash"):
        train.Trainer.save_checkpoint(trainer)
    assert (tmp_path / results.CHECKPOINT).read_bytes() == first
    assert (tmp_path / results.CHECKPOINT_PREV).read_bytes() == first
    monkeypatch.setattr(Path, "replace", real_replace)
    train.Trainer.save_checkpoint(trainer)  # the next save goes through: newest and previous
    assert results.safe_torch_load(tmp_path / results.CHECKPOINT)["epoch"] == 2
    assert results.safe_torch_load(tmp_path / results.CHECKPOINT_PREV)["epoch"] == 1


@pytest.mark.parametrize("damage, fragment", [
    (lambda s: [], "is damaged (no config object)"),
    (lambda s: {**s, "final": {**s["final"], "test_acc": "0.9"}}, "test_acc = '0.9' is not a number"),
    (lambda s: {**s, "lambda_max": 4.2}, "lambda_max is not an object"),
    (lambda s: {**s, "config": {**s["config"], "batch_size": 16}}, "belongs to a different configuration"),
])
def test_damaged_or_foreign_summary_is_one_line(workdirs, capsys, damage, fragment):
    """A summary.json is trusted only when it is well-formed and this run's."""
    small = ["digits", "mlp_p=0", "100", "0.05", "--max_epochs", "1", "--abridged_size", "100", "--quiet"]
    assert cli.main(["train", *small]) == 0
    path = Path(workdirs) / results.run_relpath(RunConfig("digits", "mlp_p=0", 100, 0.05, max_epochs=1,
                                                          abridged_size=100)) / "summary.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    capsys.readouterr()
    assert cli.main(["train", *small]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_lambda_file_is_healed_from_the_summary(workdirs, capsys):
    """A kill between writing leading_eigenvalue_final and summary.json: the next visit makes them agree."""
    small = ["digits", "mlp_p=0", "100", "0.05", "--max_epochs", "1", "--abridged_size", "100", "--quiet"]
    assert cli.main(["train", *small]) == 0
    d = Path(workdirs) / results.run_relpath(RunConfig("digits", "mlp_p=0", 100, 0.05, max_epochs=1,
                                                       abridged_size=100))
    lam = json.loads((d / "summary.json").read_text())["lambda_max"]["value"]
    results.atomic_torch_save(torch.tensor([lam + 1.0], dtype=torch.float64),
                              d / "leading_eigenvalues" / "leading_eigenvalue_final")
    assert cli.main(["train", *small]) == 0
    assert float(torch.load(d / "leading_eigenvalues" / "leading_eigenvalue_final")[0]) == lam


def test_force_removes_a_link_not_its_target(workdirs, tmp_path):
    small = ["digits", "mlp_p=0", "100", "0.05", "--max_epochs", "1", "--abridged_size", "100", "--quiet"]
    assert cli.main(["train", *small]) == 0
    d = Path(workdirs) / results.run_relpath(RunConfig("digits", "mlp_p=0", 100, 0.05, max_epochs=1,
                                                       abridged_size=100))
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (d / "linked").symlink_to(target, target_is_directory=True)
    assert cli.main(["train", *small, "--force"]) == 0
    assert not (d / "linked").exists() and (target / "keep.txt").read_text() == "mine"


def test_sigterm_while_measuring_lambda_max_says_so_and_resumes(workdirs, monkeypatch, capsys):
    small = ["digits", "mlp_p=0", "100", "0.05", "--max_epochs", "1", "--abridged_size", "100", "--quiet"]
    real = train.lambda_max_record

    def killed(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(train, "lambda_max_record", killed)
    assert cli.main(["train", *small]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "while measuring λmax" in err and "Traceback" not in err
    monkeypatch.setattr(train, "lambda_max_record", real)
    assert cli.main(["train", *small]) == 0
    d = Path(workdirs) / results.run_relpath(RunConfig("digits", "mlp_p=0", 100, 0.05, max_epochs=1,
                                                       abridged_size=100))
    assert json.loads((d / "summary.json").read_text())["lambda_max"]["value"] > 0


def test_finished_run_on_a_read_only_file_system_shows_its_result(workdirs, monkeypatch, capsys):
    """No lock can be written (EROFS): a finished run is still shown; training would need writes."""
    small = ["digits", "mlp_p=0", "100", "0.05", "--max_epochs", "1", "--abridged_size", "100", "--quiet"]
    assert cli.main(["train", *small]) == 0
    capsys.readouterr()
    real_open = results.os.open

    def read_only(path, flags, *a):
        if str(path).endswith(results.LOCK) or flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a)

    monkeypatch.setattr(results.os, "open", read_only)
    assert cli.main(["train", *small]) == 0
    assert "[final test accuracy" in capsys.readouterr().out
    assert cli.main(["train", *small[:-3], "--abridged_size", "200", "--quiet"]) == 2  # would re-measure
    assert "Read-only file system" in capsys.readouterr().err
