"""Executors of a sweep: local worker processes or Ray tasks, with retries and failure records.

Both executors run each run in a fresh process through `execute` (exactly `sharpness train`, quiet)
and share the `Driver`: the queue, retries, `failure.json` records, per-run lines, progress bar.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from . import results
from .errors import SharpnessError
from .sweep import FAILED, INSTALL_RAY, Settings, Sweep, SweepRun


# -- running one run (in a worker process or a Ray task) ----------------------------------------

def execute(spec: dict) -> dict:
    """Run one sweep run in this process exactly as `sharpness train` would; the outcome as a dict."""
    import torch

    from .errors import RunLocked
    from .train import Interrupted, RunConfig, RunOptions, run

    os.environ.update(spec.get("env") or {})
    torch.set_num_threads(int(spec["threads"]))
    cfg = RunConfig(**spec["config"])
    opts = RunOptions(device=spec.get("device"), quiet=True, channels_last=spec.get("channels_last", False),
                      compile=spec.get("compile", False))
    where = {"host": socket.gethostname(), "pid": os.getpid()}
    for attempt in range(2):
        try:
            summary = run(cfg, opts, Path(spec["root"]))
        except RunLocked as exc:  # a `status` probe holds the lock for microseconds; another process for long
            if attempt == 0:
                time.sleep(1.0)
                continue
            return {"kind": "locked", "error": str(exc), **where}
        except Interrupted as exc:
            return {"kind": "interrupted", "error": str(exc), **where}
        except SharpnessError as exc:
            return {"kind": "bad_input", "error": str(exc), **where}
        except Exception as exc:  # noqa: BLE001 - every failure of a run is recorded
            return {"kind": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                    "traceback": traceback.format_exc()[-4000:], **where}
        return {"kind": "finished", "status": summary["status"], "epochs": summary.get("epochs"),
                "test_acc": (summary.get("final") or {}).get("test_acc"),
                "lambda_max": (summary.get("lambda_max") or {}).get("value"),
                "wall_time_s": summary.get("wall_time_s"), **where}
    raise AssertionError("unreachable")


def _child_main(spec_json: str) -> int:
    """Entry point of a local worker process: run, then write the outcome file."""
    spec = json.loads(spec_json)
    outcome = execute(spec)
    results.atomic_write_json(Path(spec["outcome"]), outcome)
    return 0


CHILD = "import sys; from sharpness.executors import _child_main; sys.exit(_child_main(sys.argv[1]))"


# -- the driver: queue, retries, failure records, progress ----------------------------------------

@dataclass
class Task:
    """A run the driver still has to bring to an end."""

    index: int
    run: SweepRun
    attempts: int = 0


class Driver:
    """What both executors share: retries, failure.json, per-run lines and the progress bar."""

    def __init__(self, sweep: Sweep, tasks: list[Task], executor: str):
        from tqdm import tqdm

        self.sweep, self.executor = sweep, executor
        self.queue = deque(tasks)
        self.outcomes: Counter = Counter()
        self.total, self.ended = len(tasks), 0
        self.bar = tqdm(total=len(tasks), unit="run", desc="sweep", file=sys.stderr, dynamic_ncols=True,
                        disable=None)  # a bar on a terminal; logs get the per-run lines

    def spec(self, task: Task, device: str | None, threads: int) -> dict:
        """What a worker needs to run the task (JSON-ready)."""
        s = self.sweep.settings
        env = {k: os.environ[k] for k in ("DATASETS",) if os.environ.get(k)}
        return {"config": task.run.cfg.identity(), "root": str(self.sweep.root), "device": device,
                "threads": threads, "channels_last": s.channels_last, "compile": s.compile, "env": env}

    def finish(self, task: Task, outcome: dict, stopping: bool) -> None:
        """Record a run's outcome: done, retried, failed, left for later."""
        kind = outcome.get("kind")
        label = f"[{self.ended + 1}/{self.total}] {self.sweep.label(task.run)}"
        if kind == "finished":
            try:
                (task.run.run_dir / FAILED).unlink()
            except OSError:
                pass
            lam, acc = outcome.get("lambda_max"), outcome.get("test_acc")
            self.say(f"{outcome['status']:<10} {label}  epochs {outcome.get('epochs')}"
                     + (f"  test_acc {acc:.4f}" if acc is not None else "")
                     + (f"  λmax {lam:.4f}" if lam is not None else "")
                     + (f"  (trained in {outcome['wall_time_s']:.1f} s)" if outcome.get("wall_time_s") is not None else ""))
            self.outcomes[outcome["status"]] += 1
        elif kind == "locked":
            self.say(f"{'skipped':<10} {label}: in use by another process")
            self.outcomes["in use elsewhere"] += 1
        elif stopping and kind in ("interrupted", "crash"):
            self.outcomes["stopped"] += 1
            return
        else:
            task.attempts += 1
            retries = self.sweep.settings.retries
            if kind != "bad_input" and task.attempts <= retries:
                self.say(f"{'retry':<10} {label}: attempt {task.attempts} failed ({outcome.get('error')}); "
                         f"trying again ({task.attempts}/{retries})")
                self.queue.append(task)
                return
            self.record_failure(task, outcome)
            self.say(f"{'failed':<10} {label}: {outcome.get('error')} (see {task.run.run_dir / FAILED})")
            self.outcomes["failed"] += 1
        self.ended += 1
        self.bar.update(1)

    def record_failure(self, task: Task, outcome: dict) -> None:
        """Write failure.json (atomically) into the run directory."""
        record = {"error": outcome.get("error"), "kind": outcome.get("kind"), "attempts": task.attempts,
                  "executor": self.executor, "host": outcome.get("host"), "pid": outcome.get("pid"),
                  "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sweep": str(self.sweep.path),
                  "config": task.run.cfg.identity(), "traceback": outcome.get("traceback")}
        results.atomic_write_json(task.run.run_dir / FAILED, record)

    def say(self, line: str) -> None:
        """One line on stdout, above the progress bar."""
        self.bar.write(line, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        """Remove the progress bar."""
        self.bar.close()


def _crash(message: str, log: str = "") -> dict:
    tail = [ln for ln in log.strip().splitlines() if ln.strip()]
    return {"kind": "crash", "error": message + (f": {tail[-1][:300]}" if tail else ""),
            "traceback": log[-4000:] or None}


# -- executor: local worker processes -----------------------------------------------------------

def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def local_gpus() -> list[str]:
    """CUDA device ids (as CUDA_VISIBLE_DEVICES names them) that this process can use."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible else [str(i) for i in range(n)]
    return ids[:n]


def local_slots(settings: Settings, workers: int | None, todo: int) -> tuple[list[str | None], int]:
    """One entry per worker (its GPU id, or None on CPU) and the torch threads of each worker."""
    gpus = local_gpus()
    if gpus:
        slots = [g for _ in range(settings.runs_per_gpu) for g in gpus]
        slots = slots[:workers] if workers else slots
    else:
        slots = [None] * (workers or _cpu_count())
    # threads from the configured workers, never from how many runs are left: the thread count can
    # change a CPU run's last bits, so a run resumed at the end of a sweep must keep its count
    threads = settings.threads or max(1, _cpu_count() // len(slots))
    return slots[:max(1, todo)], threads


def _die_with_parent():
    """preexec_fn: the worker gets SIGTERM (checkpoint, exit) when the sweep process dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def set_pdeathsig():
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_pdeathsig if sys.platform.startswith("linux") else None


def run_local(sweep: Sweep, tasks: list[Task], workers: int | None) -> Counter:
    """Run the tasks in worker processes (`python -c ... execute`), one per slot at a time."""
    import subprocess

    slots, threads = local_slots(sweep.settings, workers, len(tasks))
    gpu = slots[0] is not None
    print(f"executor local: {len(slots)} worker{'s' * (len(slots) > 1)}"
          + (f" on GPUs {', '.join(dict.fromkeys(slots))}" if gpu else "") + f", {threads} torch "
          f"thread{'s' * (threads > 1)} each", flush=True)
    driver = Driver(sweep, tasks, "local")
    free = list(range(len(slots)))
    active: dict = {}  # slot -> (Popen, task, outcome path, log file)
    pkg_parent = str(Path(__file__).resolve().parents[1])
    preexec = _die_with_parent()
    tmp = tempfile.TemporaryDirectory(prefix="sharpness-sweep-")
    stopping = None
    old_term = _on_sigterm(_raise_stop)
    try:
        while active or (driver.queue and stopping is None):
            try:
                while driver.queue and free and stopping is None:
                    slot, task = free.pop(0), driver.queue.popleft()
                    device = slots[slot]
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                           "PYTHONPATH": os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")]))}
                    if device is not None:
                        env["CUDA_VISIBLE_DEVICES"] = device
                    outcome = Path(tmp.name) / f"outcome-{task.index}-{task.attempts}.json"
                    spec = {**driver.spec(task, "cuda" if device is not None else None, threads),
                            "outcome": str(outcome)}
                    log = tempfile.TemporaryFile(dir=tmp.name)
                    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], env=env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=preexec)
                    active[slot] = (proc, task, outcome, log)
                time.sleep(0.05)
                for slot, (proc, task, outcome, log) in list(active.items()):
                    if proc.poll() is None:
                        continue
                    del active[slot]
                    free.append(slot)
                    driver.finish(task, _local_outcome(proc, outcome, log), stopping is not None)
            except (KeyboardInterrupt, _Stop) as exc:
                if stopping is not None:
                    for proc, *_ in active.values():
                        proc.kill()
                    raise KeyboardInterrupt from None
                stopping = signal.SIGTERM if isinstance(exc, _Stop) else signal.SIGINT
                driver.say(f"stopping: {len(active)} running run(s) save a checkpoint and exit "
                           "(interrupt again to kill them)")
                for proc, *_ in active.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
    finally:
        _on_sigterm(old_term)
        driver.close()
        tmp.cleanup()
    if stopping is not None:
        _stopped(stopping)
    return driver.outcomes


def _local_outcome(proc, outcome: Path, log) -> dict:
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    try:
        return json.loads(outcome.read_text())
    except (OSError, ValueError):
        code = proc.returncode
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        if code < 0 and -code in signal.valid_signals():
            how = f"killed by {signal.Signals(-code).name}"
        return _crash(f"worker process {how}", text)


class _Stop(Exception):
    """SIGTERM to the sweep process."""


def _raise_stop(signum, frame):
    raise _Stop()


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only); return the previous one."""
    import threading

    if threading.current_thread() is not threading.main_thread() or handler is None:
        return None
    return signal.signal(signal.SIGTERM, handler)


def _stopped(signum: int):
    from .train import Interrupted

    raise Interrupted("sweep stopped; unfinished runs saved a checkpoint: run the same command to "
                      "resume", signum)


# -- executor: Ray ------------------------------------------------------------------------------

def import_ray(local: bool):
    """Ray, imported on demand (token auth off for a fresh local instance)."""
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray 2.60 turns token auth on for later clusters
    try:
        import ray
    except ImportError:
        raise SharpnessError(INSTALL_RAY) from None
    return ray


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A host:port Ray address must accept a TCP connection (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or address.startswith(("auto", "ray://")) or not port.isdigit():
        return  # 'auto', ray:// client addresses and the like: Ray resolves them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SharpnessError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                             "check the head node's address and port (`ray start --head` prints it)") from None


def node_check(marker: str, token: str) -> tuple[str, str, bool]:
    """Ray task: (node id, host, whether this node sees the marker file with its token)."""
    import ray

    try:
        ok = Path(marker).read_text() == token
    except OSError:
        ok = False
    return ray.get_runtime_context().get_node_id(), socket.gethostname(), ok


def check_shared_root(ray, root: Path) -> None:
    """Every alive node must see the results root (a marker file written here, read there)."""
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root.mkdir(parents=True, exist_ok=True)
    marker, token = root / f".sweep-marker-{uuid.uuid4().hex}", uuid.uuid4().hex
    marker.write_text(token)
    try:
        remote = ray.remote(num_cpus=0)(node_check)
        refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), token) for n in ray.nodes() if n["Alive"]]
        try:
            answers = ray.get(refs, timeout=120)
        except Exception as exc:  # noqa: BLE001 - e.g. sharpness not importable on a node
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            raise SharpnessError(f"cannot run sharpness on the Ray cluster's nodes ({first}); install "
                                 "sharpness in the Python environment of `ray start` on every node") from None
    finally:
        marker.unlink(missing_ok=True)
    blind = [f"{host} ({node[:8]})" for node, host, ok in answers if not ok]
    if blind:
        raise SharpnessError(f"the results root {root} is not visible from Ray node(s) {', '.join(blind)}: "
                             "it must be a filesystem all nodes share (set [sweep] results or $RESULTS "
                             "to a shared path, e.g. on NFS)")


def ray_task(spec: dict) -> dict:
    """Ray task: one run (threads = the task's CPUs)."""
    return execute(spec)


def run_ray(sweep: Sweep, tasks: list[Task], workers: int | None, address: str | None) -> Counter:
    """Run the tasks as Ray tasks on a cluster (address) or a fresh local Ray instance."""
    ray = import_ray(local=address is None)
    s = sweep.settings
    started = not ray.is_initialized()
    if started:
        if address:
            check_reachable(address)
        kw = dict(address=address) if address else dict(include_dashboard=False)
        try:
            ray.init(log_to_driver=False, **kw)
        except Exception as exc:  # noqa: BLE001 - wrong address, version mismatch, auth
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            where = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
            raise SharpnessError(f"cannot {where}: {first}") from None
    stopping = None
    old_term = _on_sigterm(_raise_stop)
    driver = None
    try:
        check_shared_root(ray, sweep.root)
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 0)
        largest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if s.cpus_per_run > largest:  # Ray would queue every run forever, silently
            raise SharpnessError(f"[sweep] cpus_per_run = {s.cpus_per_run:g} but the largest node of the Ray "
                                 f"cluster has {largest:g} CPUs: no run could ever start; lower cpus_per_run")
        num_gpus = 1.0 / s.runs_per_gpu if gpus else 0
        threads = max(1, int(s.threads or s.cpus_per_run))
        remote = ray.remote(max_calls=1)(ray_task).options(
            num_cpus=s.cpus_per_run, num_gpus=num_gpus, max_retries=s.ray_max_retries, retry_exceptions=False)
        print(f"executor ray: {len(ray.nodes())} node(s), {cpus:g} CPUs, {gpus:g} GPUs; each run asks for "
              f"{s.cpus_per_run:g} CPU(s)" + (f" and {num_gpus:g} GPU" if gpus else "")
              + (f"; at most {workers} at a time" if workers else ""), flush=True)
        driver = Driver(sweep, tasks, "ray")
        pending: dict = {}  # ObjectRef -> Task
        while pending or (driver.queue and stopping is None):
            try:
                while driver.queue and stopping is None and (not workers or len(pending) < workers):
                    task = driver.queue.popleft()
                    pending[remote.remote(driver.spec(task, "cuda" if gpus else "cpu", threads))] = task
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - lost workers after max_retries, cancelled tasks
                        outcome = _crash(f"Ray task failed ({type(exc).__name__})", str(exc))
                    driver.finish(task, outcome, stopping is not None)
            except (KeyboardInterrupt, _Stop) as exc:
                if stopping is not None:
                    raise KeyboardInterrupt from None
                stopping = signal.SIGTERM if isinstance(exc, _Stop) else signal.SIGINT
                driver.say(f"stopping: cancelling {len(pending)} running run(s); they save a checkpoint")
                for ref in pending:
                    ray.cancel(ref)
    finally:
        _on_sigterm(old_term)
        if driver is not None:
            driver.close()
        if started:
            ray.shutdown()
    if stopping is not None:
        _stopped(stopping)
    return driver.outcomes
