"""Where results live and how files are written: the original layout, atomic writes, safe loads."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import SharpnessError

SUMMARY = "summary.json"
METRICS_CSV = "metrics.csv"
EIGS_CSV = "eigs.csv"
CHECKPOINT = "checkpoint"
CHECKPOINT_PREV = "checkpoint.prev"
MEASUREMENTS = "measurements.json"
METRIC_NAMES = ("train_loss", "test_loss", "train_acc", "test_acc")
TMP_SUFFIX = ".tmp"
LOCK = ".lock"
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# options that change what a run computes, with their defaults: a non-default value is appended
# to the original directory name so that different runs never share a directory
IDENTITY_SUFFIX = (("train_seed", 1), ("acc_goal", 0.99), ("physical_batch_size", 1000),
                   ("max_epochs", None), ("eig_freq", 0), ("tf32", False), ("bf16", False))


def results_root() -> Path:
    """The results root: `$RESULTS`, else ./results."""
    return Path(os.environ.get("RESULTS") or "results")


def fmt_number(x: float | int) -> str:
    """A number as the original prints it in paths: str(float) for floats, str(int) for ints."""
    return str(int(x)) if isinstance(x, int) and not isinstance(x, bool) else str(float(x))


def run_relpath(cfg: Any) -> Path:
    """The run directory of a config, relative to the results root (the original layout)."""
    opt = "sgd" if cfg.opt == "sgd" else f"sam_{fmt_number(float(cfg.rho))}"
    name = f"lr_{fmt_number(float(cfg.lr))}_bs_{fmt_number(int(cfg.batch_size))}_{int(cfg.network_seed)}"
    for key, default in IDENTITY_SUFFIX:
        value = getattr(cfg, key)
        if value != default:
            shown = fmt_number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
            name += f"_{key}_{shown}"
    return Path(cfg.dataset) / f"arch_{cfg.arch_id}" / cfg.loss / opt / "no_change_lr" / name


# -- atomic writes ------------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one."""
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise SharpnessError(f"cannot write {path}: {exc.strerror or exc}"
                             + (" (disk full)" if exc.errno == errno.ENOSPC else "")) from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def remove_stale_temporaries(directory: Path) -> None:
    """Delete half-written temporary files that a killed process left behind."""
    for p in Path(directory).rglob(f".*{TMP_SUFFIX}"):
        try:
            p.unlink()
        except OSError:
            pass


def fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (fsync of the directory; a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write a text file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write JSON (non-finite floats as null)."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Atomically torch.save an object made of tensors, numbers, strings, lists and dicts."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_csv(path: Path, rows: list[dict]) -> None:
    """Atomically write rows (dicts with the same keys) as CSV."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# -- safe loads ---------------------------------------------------------------------------------

def safe_torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True; any failure becomes a clear error naming the file."""
    path = Path(path)
    if not path.exists():
        raise SharpnessError(f"file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise SharpnessError(f"cannot read {path}: corrupt or not a weights-only torch file ({first})") from None


def read_json(path: Path) -> Any:
    """Load a JSON file; a missing or damaged file is a clear error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SharpnessError(f"file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise SharpnessError(f"cannot read {path}: {exc}") from None


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json, or None when the run has not finished (or the file is unreadable)."""
    try:
        return read_json(Path(run_dir) / SUMMARY)
    except SharpnessError:
        return None


def find_runs(root: Path) -> list[Path]:
    """Every run directory under `root` (a directory holding summary.json or a checkpoint)."""
    root = Path(root)
    found = set()
    for marker in (SUMMARY, CHECKPOINT, CHECKPOINT_PREV):
        for p in root.rglob(marker):
            found.add(p.parent)
    return sorted(found)


# -- run lock -----------------------------------------------------------------------------------

_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's "another process holds it"


def json_object(x: Any) -> dict:
    """x when it is a JSON object, else an empty one (a damaged file must not raise)."""
    return x if isinstance(x, dict) else {}


def json_number(x: Any) -> int | float | None:
    """x when it is a JSON number (not a bool), else None."""
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def lock_held(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's lock (the lock file is never created)."""
    import fcntl

    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in _BUSY  # any other error: no flock here, so nobody can hold it
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on a run directory; the OS releases it when the holder dies."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        from .errors import ReadOnlyRun, RunLocked

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            kind = ReadOnlyRun if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else SharpnessError
            raise kind(f"cannot write {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _BUSY:
                os.close(self.fd)
                self.fd = None
                raise SharpnessError(f"cannot lock {self.path}: {exc.strerror or exc} (the file system does "
                                     "not support flock; on Lustre mount it with -o flock)") from None
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            raise RunLocked(f"{self.path.parent} is in use by another process ({holder}); "
                            "wait for it to finish or stop it, then run again") from None
        import socket

        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def load(results_dir: Path | str):
    """Every run under `results_dir` as a pandas DataFrame, one row per run (the columns of runs.csv)."""
    from .report import runs_dataframe

    return runs_dataframe(Path(results_dir))
