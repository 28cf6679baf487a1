"""Sweeps: grid expansion, run identity, bad configs, local and Ray executors, kills, retries, status."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sharpness import cli, executors, results, sweep

TINY = """
[fixed]
dataset = "digits"
arch_id = "mlp_p=0"
abridged_size = 100
max_epochs = 2
"""
MAIN = [sys.executable, "-c", "from sharpness.cli import main; raise SystemExit(main())"]


def write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def summaries(root):
    return {p.parent: json.loads(p.read_text()) for p in Path(root).rglob(results.SUMMARY)}


def comparable(summary):
    return {k: summary[k] for k in ("status", "epochs", "steps", "final", "lambda_max")}


def states(path):
    sw = sweep.read_sweep(path)
    return [sweep.run_state(r)["status"] for r in sw.runs]


# -- grids and identity -------------------------------------------------------------------------

GRID = """
[fixed]
dataset = "digits"
arch_id = "mlp_p=0"

[grid]
opt = ["sgd", "sam"]
lr = [0.01, 0.02, 0.04]
batch_size = [32, 64, 128]
zip = [["lr", "batch_size"]]

[[runs]]
batch_size = 1500
physical_batch_size = 500
lr = [0.01, 0.1]

[[runs]]
batch_size = 16
lr = 1
network_seed = 3
"""


def test_grid_expansion_product_zip_and_explicit_runs(tmp_path, workdirs):
    path = write(tmp_path, GRID)
    cfgs, root = sweep.load_sweep(path)
    got = [(c.opt, c.lr, c.batch_size, c.physical_batch_size, c.network_seed) for c in cfgs]
    zipped = [(0.01, 32), (0.02, 64), (0.04, 128)]
    assert got == ([("sgd", lr, bs, 1000, 0) for lr, bs in zipped] + [("sam", lr, bs, 1000, 0) for lr, bs in zipped]
                   + [("sgd", 0.01, 1500, 500, 0), ("sgd", 0.1, 1500, 500, 0), ("sgd", 1.0, 16, 1000, 3)])
    assert type(cfgs[-1].lr) is float  # lr = 1 in TOML is the float 1.0, as `train ... 1` parses it
    # each run is exactly the config `sharpness train` builds from the same options
    args = cli.build_parser().parse_args(["train", "digits", "mlp_p=0", "1500", "0.1", "--physical_batch_size", "500"])
    assert cli.run_config(args)[0] == cfgs[7]
    assert root == workdirs  # no results key: $RESULTS
    dirs = sweep.sweep_run_dirs(path)
    assert dirs == [root / results.run_relpath(c) for c in cfgs] and all(d.is_absolute() for d in dirs)
    assert len(set(dirs)) == len(dirs) == 9


def test_results_root_key_env_and_default(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    body = TINY + "[grid]\nlr = [0.1]\nbatch_size = 32\n"
    assert sweep.load_sweep(write(sub, '[sweep]\nresults = "../out"\n' + body))[1] == tmp_path / "out"
    monkeypatch.setenv("RESULTS", str(tmp_path / "env"))
    assert sweep.load_sweep(write(sub, body))[1] == tmp_path / "env"
    monkeypatch.delenv("RESULTS")
    monkeypatch.chdir(tmp_path)
    assert sweep.load_sweep(write(sub, body))[1] == tmp_path / "results"


def test_run_identity_same_config_same_dirs_one_change_changes_only_affected(tmp_path, workdirs):
    a = sweep.sweep_run_dirs(write(tmp_path, GRID, "a.toml"))
    assert sweep.sweep_run_dirs(write(tmp_path, GRID, "b.toml")) == a
    changed = sweep.sweep_run_dirs(write(tmp_path, GRID.replace("lr = [0.01, 0.02, 0.04]",
                                                                  "lr = [0.01, 0.02, 0.05]"), "c.toml"))
    differ = [i for i, (x, y) in enumerate(zip(a, changed)) if x != y]
    assert differ == [2, 5]  # the (0.04, 128) pair, for sgd and for sam
    assert all("lr_0.05_bs_128" in changed[i].name for i in differ)
    # a measurement option keeps the run directory: the same runs, measured another way
    measured = sweep.sweep_run_dirs(write(tmp_path, GRID.replace('arch_id = "mlp_p=0"',
                                                                   'arch_id = "mlp_p=0"\nabridged_size = 300'), "d.toml"))
    assert measured == a


BAD = [
    ("[grid]\nlrr = [0.1]\n", "unknown option 'lrr'"),
    ("[grid]\nlr = [0.1]\nbatch_size = [\"32\"]\n", "[grid] batch_size: expected an integer"),
    ("[grid]\nlr = [0.1]\nbatch_size = 32.0\n", "[grid] batch_size: expected an integer"),
    ("[grid]\nlr = []\nbatch_size = 32\n", "[grid] lr: empty list"),
    ("[grid]\n", "[grid] is empty"),
    ("", "no runs"),
    ("[grid]\nlr = [0.1, -1.0]\nbatch_size = 32\n", "lr must be a positive finite number, got -1.0"),
    ("[grid]\nlr = [0.1]\nbatch_size = [32, 2000]\n", "batch_size 2000 is larger than the training set"),
    ("[grid]\nlr = 0.1\nbatch_size = 32\ndisable_dropout = [true, false]\n", "same run directory"),
    ("[grid]\nlr = [0.1, 0.2]\nbatch_size = [32]\nzip = [[\"lr\", \"batch_size\"]]\n", "zip: the paired lists differ"),
    ("[grid]\nbatch_size = 32\n", "missing lr"),
    ("[grid]\nlr = 0.1\nbatch_size = 32\ndevice = \"cuda\"\n", "[grid] device: not a sweep option"),
    ("[sweep]\nretry = 3\n[grid]\nlr = 0.1\nbatch_size = 32\n", "unknown setting 'retry'"),
    ("[grid]\nlr = 0.1\nbatch_size = 32\narch_id = \"vgg12\"\n", "unknown architecture 'vgg12'"),
    ("[grid\nlr = 0.1\n", "invalid TOML"),
    ("[sweep]\ncpus_per_run = nan\n[grid]\nlr = 0.1\nbatch_size = 32\n", "[sweep] cpus_per_run: expected"),
    ("[sweep]\ncpus_per_run = 0.00001\n[grid]\nlr = 0.1\nbatch_size = 32\n", "[sweep] cpus_per_run: expected"),
    ("[grid]\nlr = 0.1\nbatch_size = 32\nnetwork_seed = [" + ", ".join(map(str, range(400))) + "]\ntrain_seed = ["
     + ", ".join(map(str, range(400))) + "]\n", "[grid] has 160,000 runs"),
    ("[sweep]\nresults = \"$SHARPNESS_TEST_UNSET/r\"\n[grid]\nlr = 0.1\nbatch_size = 32\n",
     "environment variable SHARPNESS_TEST_UNSET is not set"),
]


@pytest.mark.parametrize("body, message", BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_bad_config_one_line_exit_2_before_any_run(tmp_path, capsys, body, message):
    path = write(tmp_path, '[sweep]\nresults = "res"\n' + TINY + body if "[sweep]" not in body
                 else body.replace("[grid]", TINY + "[grid]", 1))
    for command in (["sweep", str(path)], ["sweep", str(path), "--dry-run"], ["status", str(path)]):
        if "batch_size 2000" in message and command[0] == "status":
            continue  # dataset-dependent checks belong to sweep (they need the data)
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and message in err, err
    assert not (tmp_path / "res").exists()


def test_top_level_option_is_explained(tmp_path, capsys):
    path = write(tmp_path, "lr = 0.1\n" + TINY)
    assert cli.main(["status", str(path)]) == 2
    assert "options of train go under [fixed], [grid] or [[runs]]" in capsys.readouterr().err


def test_ray_executor_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    path = write(tmp_path, '[sweep]\nresults = "res"\n' + TINY + "[grid]\nlr = 0.1\nbatch_size = 32\n")
    assert cli.main(["sweep", str(path), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert err == "error: the ray executor needs Ray: pip install 'sharpness[ray]'\n"
    assert not (tmp_path / "res").exists()


def test_ray_executor_unreachable_address_is_one_line(tmp_path, capsys):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'sharpness[ray]')")
    path = write(tmp_path, '[sweep]\nresults = "res"\n' + TINY + "[grid]\nlr = 0.1\nbatch_size = 32\n")
    assert cli.main(["sweep", str(path), "--executor", "ray", "--address", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the Ray cluster at 127.0.0.1:") and len(err.splitlines()) == 1


# -- status -------------------------------------------------------------------------------------

def test_status_running_is_a_held_lock_and_probing_creates_nothing(tmp_path, capsys):
    path = write(tmp_path, '[sweep]\nresults = "res"\n' + TINY + "[grid]\nlr = 0.1\nbatch_size = 32\n")
    run_dir = sweep.sweep_run_dirs(path)[0]
    assert states(path) == ["pending"] and not run_dir.exists()
    run_dir.mkdir(parents=True)
    assert states(path) == ["pending"] and not (run_dir / results.LOCK).exists()
    with results.RunLock(run_dir):
        assert states(path) == ["running"]
    (run_dir / results.CHECKPOINT).write_bytes(b"")
    assert states(path) == ["interrupted"]  # a checkpoint, no summary, no live lock
    results.atomic_write_json(run_dir / sweep.FAILED, {"error": "RuntimeError: boom"})
    assert cli.main(["status", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"][0]["status"] == "failed" and out["runs"][0]["error"] == "RuntimeError: boom"
    assert out["runs"][0]["run_dir"] == str(run_dir) and out["results"] == str(tmp_path / "res")


# -- local executor -----------------------------------------------------------------------------

def test_local_slots_pin_runs_to_gpus_as_visible_devices_name_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert executors.local_gpus() == ["3", "5"]
    monkeypatch.setattr(executors, "_cpu_count", lambda: 16)
    settings = sweep.Settings(runs_per_gpu=2)
    assert executors.local_slots(settings, None, 100) == (["3", "5", "3", "5"], 4)
    assert executors.local_slots(settings, 3, 100) == (["3", "5", "3"], 5)
    assert executors.local_slots(settings, None, 1) == (["3"], 4)  # no more workers than runs, same threads
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert executors.local_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert executors.local_slots(sweep.Settings(threads=3), None, 100) == ([None] * 16, 3)
    # a run's thread count never depends on how many runs are left (it can change a CPU run's bits)
    assert executors.local_slots(sweep.Settings(), None, 1) == ([None], 1)
    assert executors.local_slots(sweep.Settings(), 2, 1) == ([None], 8)


LOCAL = """
[sweep]
results = "res"
threads = 1

[grid]
lr = [0.05, 0.1]
batch_size = [32, 64]
zip = [["lr", "batch_size"]]

[[runs]]          # diverges: a result, not a failure
lr = 5.0
batch_size = 32
"""


def test_local_two_workers_identical_to_sequential_train(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, TINY + LOCAL)
    assert cli.main(["sweep", str(path), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "executor local: 2 workers, 1 torch thread each" in out
    swept = summaries(tmp_path / "res")
    assert [s["status"] for s in swept.values()].count("diverged") == 1 and len(swept) == 3
    assert states(path) == ["max_epochs", "max_epochs", "diverged"]
    assert not list((tmp_path / "res").rglob(sweep.FAILED))
    # the same runs one after the other with `sharpness train` (same thread count)
    monkeypatch.setenv("RESULTS", str(tmp_path / "seq"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run in (["0.05", "32"], ["0.1", "64"], ["5.0", "32"]):
            cli.main(["train", "digits", "mlp_p=0", run[1], run[0], "--abridged_size", "100",
                      "--max_epochs", "2", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    seq = summaries(tmp_path / "seq")
    assert {d.relative_to(tmp_path / "res"): comparable(s) for d, s in swept.items()} == \
           {d.relative_to(tmp_path / "seq"): comparable(s) for d, s in seq.items()}
    assert all(s["lambda_max"] is None or s["lambda_max"]["converged"] for s in swept.values())
    # a second sweep does nothing; a changed λmax setting is measured again without retraining
    capsys.readouterr()
    assert cli.main(["sweep", str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    remeasure = write(tmp_path, TINY.replace("abridged_size = 100", "abridged_size = 200") + LOCAL, "m.toml")
    assert states(remeasure) == ["remeasure", "remeasure", "diverged"]
    # a failed attempt to measure again is shown, not hidden behind the stored result
    first = sweep.read_sweep(remeasure).runs[0]
    (first.run_dir / sweep.FAILED).write_text(json.dumps({"error": "out of memory"}))
    state = sweep.run_state(first)
    assert state["status"] == "remeasure" and "measuring λmax again failed: out of memory" in state["error"]


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, capsys):
    path = write(tmp_path, TINY.replace("max_epochs = 2", "max_epochs = 3") + """
        [sweep]
        results = "res"
        threads = 1
        [grid]
        lr = [0.01, 0.02, 0.03, 0.04]
        batch_size = 8
        """)
    proc = subprocess.Popen([*MAIN, "sweep", str(path), "--workers", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not summaries(tmp_path / "res") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers
        proc.wait()
        wait_group_gone(proc.pid)
    before = {d: (s["finished_at"], (d / results.SUMMARY).stat().st_mtime_ns)
              for d, s in summaries(tmp_path / "res").items()}
    assert 1 <= len(before) < 4
    mid = states(path)
    assert "running" not in mid  # the locks died with the workers
    assert sum(st in sweep.FINISHED for st in mid) == len(before)
    assert cli.main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{4 - len(before)} to run" in out and "nothing was started" in out
    assert cli.main(["sweep", str(path), "--workers", "2"]) == 0
    assert all(st in sweep.FINISHED for st in states(path))
    after = summaries(tmp_path / "res")
    for d, (finished_at, mtime) in before.items():
        assert after[d]["finished_at"] == finished_at and (d / results.SUMMARY).stat().st_mtime_ns == mtime
    for d, state in zip(sweep.sweep_run_dirs(path), mid):  # killed after a checkpoint: continued from it;
        assert after[d]["resumed"] is (state == "interrupted")  # never started or finished: not resumed


def wait_group_gone(pgid, timeout=30):
    """Until every process of the group has exited (a killed worker's lock is released on exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


SITECUSTOMIZE = """
import os, pathlib
if os.environ.get("SWEEP_TEST_FAIL"):
    from sharpness import train
    _real = train.Trainer.run
    def _run(self):
        if self.cfg.lr == 0.05:
            raise RuntimeError("injected failure")
        marker = pathlib.Path(os.environ["SWEEP_TEST_FAIL"]) / "failed-once"
        if not marker.exists():
            marker.touch()
            raise RuntimeError("first attempt fails")
        return _real(self)
    train.Trainer.run = _run
"""


def test_failed_runs_are_retried_then_recorded_and_a_new_sweep_tries_again(tmp_path, monkeypatch, capsys):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SWEEP_TEST_FAIL", str(tmp_path))
    path = write(tmp_path, TINY + '[sweep]\nresults = "res"\nretries = 1\nthreads = 1\n'
                 "[grid]\nlr = [0.05, 0.1]\nbatch_size = 32\n")
    assert cli.main(["sweep", str(path), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "retry" in out and "first attempt fails" in out
    failing, flaky = sweep.sweep_run_dirs(path)
    record = json.loads((failing / sweep.FAILED).read_text())
    assert record["error"] == "RuntimeError: injected failure" and record["attempts"] == 2
    assert "Traceback" in record["traceback"] and record["config"]["lr"] == 0.05
    assert not (flaky / sweep.FAILED).exists() and (flaky / results.SUMMARY).exists()
    assert states(path) == ["failed", "max_epochs"]
    assert cli.main(["status", str(path)]) == 0
    assert "RuntimeError: injected failure" in capsys.readouterr().out
    monkeypatch.delenv("SWEEP_TEST_FAIL")  # the cause is fixed: the next sweep retries the failed run
    assert cli.main(["sweep", str(path)]) == 0
    assert states(path) == ["max_epochs", "max_epochs"] and not (failing / sweep.FAILED).exists()


# -- Ray executor -------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A real Ray head node (`ray start --head --block`), stopped by its own pid afterwards."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'sharpness[ray]')")
    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = Path(sys.executable).parent / "ray"
    log = open(Path(temp) / "start.log", "w+")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-port={free_port()}", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "block forever" not in Path(log.name).read_text():
            assert head.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-2000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", env
    finally:
        head.terminate()  # `ray start --block` stops every process of its node on SIGTERM
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_on_a_real_cluster_survives_a_killed_worker(tmp_path, ray_cluster):
    address, env = ray_cluster
    path = write(tmp_path, TINY + """
        [sweep]
        results = "res"
        [grid]
        lr = [0.01, 0.1]
        batch_size = [4, 32]
        max_epochs = [5, 2]
        zip = [["lr", "batch_size", "max_epochs"]]
        """)
    slow = sweep.sweep_run_dirs(path)[0]
    sweep_log = open(tmp_path / "sweep.log", "w+")
    proc = subprocess.Popen([*MAIN, "sweep", str(path), "--executor", "ray", "--address", address],
                            stdout=sweep_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        pid = None
        while pid is None:  # the slow run's worker, once it has written its first checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, Path(sweep_log.name).read_text()
            holder = (slow / results.LOCK).read_text() if (slow / results.LOCK).exists() else ""
            if holder.startswith("pid ") and (slow / results.CHECKPOINT).exists():
                pid = int(holder.split()[1])
            time.sleep(0.02)
        assert b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes().lower()  # a Ray worker process
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(240) == 0, Path(sweep_log.name).read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        sweep_log.close()
    out = Path(sweep_log.name).read_text()
    assert "executor ray: 1 node(s), 2 CPUs, 0 GPUs" in out
    assert "retry      [" not in out  # Ray itself started the task again (max_retries), not the sweep
    assert all(st in sweep.FINISHED for st in states(path))
    done = summaries(tmp_path / "res")
    assert done[slow]["resumed"] is True  # the retry continued from the killed worker's checkpoint
    assert not list((tmp_path / "res").rglob(sweep.FAILED))
    assert not list((tmp_path / "res").glob(".sweep-marker-*"))
    # a run asking for more CPUs than any node has could never start: an error, not a silent wait
    big = write(tmp_path, TINY + """
        [sweep]
        results = "res2"
        cpus_per_run = 4
        [grid]
        lr = 0.1
        batch_size = 32
        """, name="big.toml")
    proc = subprocess.run([*MAIN, "sweep", str(big), "--executor", "ray", "--address", address],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "largest node of the Ray cluster has 2 CPUs" in proc.stderr, proc.stderr
