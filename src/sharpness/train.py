"""A training run from start to finish: SGD or SAM to the accuracy goal, checkpoints, λmax, results.

Read top to bottom: `RunConfig` says what a run is, `run()` does it. Every epoch starts with
eval-mode metrics on the train and test sets; the run stops at the first epoch > 0 whose train
accuracy reaches `acc_goal`. A checkpoint is written every epoch (and on SIGTERM/Ctrl-C), so the
same command resumes an interrupted run and ends with the same numbers.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, results
from .data import Dataset, check_dataset_name, load_dataset
from .errors import ReadOnlyRun, SharpnessError
from .hessian import NonFiniteError
from .measure import abridged, between_iterates_record, extra_iterate, lambda_max_record
from .models import build_model, check_arch_name, check_compatible
from .optim import sam_step, sgd_step

@dataclass
class RunConfig:
    """Everything that defines a run (the original options plus ours)."""

    dataset: str
    arch_id: str
    batch_size: int
    lr: float
    opt: str = "sgd"
    rho: float = 0.05
    loss: str = "ce"
    network_seed: int = 0
    train_seed: int = 1
    acc_goal: float = 0.99
    physical_batch_size: int = 1000
    abridged_size: int = 1000
    disable_dropout: bool = False
    between_iterates: bool = False
    save_freq: int = 10
    max_epochs: int | None = None
    eig_freq: int = 0
    tf32: bool = False
    bf16: bool = False

    def validate(self) -> None:
        """Reject impossible settings with a clear message (data-dependent checks come later)."""
        check_dataset_name(self.dataset)
        check_arch_name(self.arch_id)
        if self.opt not in ("sgd", "sam"):
            raise SharpnessError(f"unknown optimizer {self.opt!r}; valid: sgd, sam")
        if self.loss != "ce":
            raise SharpnessError(f"unknown loss {self.loss!r}; only 'ce' (cross-entropy) is supported")
        _positive_finite("lr", self.lr)
        if self.opt == "sam":
            _positive_finite("rho", self.rho)
        for name in ("batch_size", "physical_batch_size", "abridged_size", "save_freq"):
            if int(getattr(self, name)) < 1:
                raise SharpnessError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.acc_goal <= 1:
            raise SharpnessError(f"acc_goal must be in (0, 1], got {self.acc_goal}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise SharpnessError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.eig_freq < 0:
            raise SharpnessError(f"eig_freq must be >= 0 (0 = off), got {self.eig_freq}")
        for name in ("network_seed", "train_seed"):
            check_seed(name, getattr(self, name))
        if self.batch_size > self.physical_batch_size and self.batch_size % self.physical_batch_size:
            raise SharpnessError(
                f"batch_size {self.batch_size} is larger than physical_batch_size "
                f"{self.physical_batch_size} but not a multiple of it, so it cannot be split into "
                f"equal chunks; choose a physical_batch_size that divides {self.batch_size}")

    def check_data(self, data: Dataset) -> None:
        """Checks that need the dataset: batch size vs training set, architecture vs inputs."""
        n = len(data.y_train)
        if self.batch_size > n:
            raise SharpnessError(f"batch_size {self.batch_size} is larger than the training set of "
                                 f"{self.dataset} ({n} examples)")
        check_compatible(self.arch_id, data.input_shape, self.dataset)

    def identity(self) -> dict:
        """Every setting of the run, as a dict."""
        return asdict(self)

    def training_identity(self) -> dict:
        """The settings that determine the training trajectory (rho only matters for SAM)."""
        return {k: v for k, v in asdict(self).items()
                if k not in NOT_TRAINING_FIELDS and not (k == "rho" and self.opt == "sgd")}


@dataclass
class RunOptions:
    """How to execute a run; none of these change its numbers."""

    device: str | None = None
    quiet: bool = False
    force: bool = False
    channels_last: bool = False
    compile: bool = False


MEASUREMENT_FIELDS = ("abridged_size", "disable_dropout", "between_iterates")
EIG_FREQ_FIELDS = ("abridged_size", "disable_dropout")  # the protocol of eigs.csv's values
NOT_TRAINING_FIELDS = MEASUREMENT_FIELDS + ("save_freq",)  # may change when a run resumes


def remeasure_fields(summary: dict, wanted: dict) -> list[str]:
    """The λmax settings (MEASUREMENT_FIELDS) in which a finished run's summary differs from `wanted`
    (a config dict); none for a diverged run, which has no final network to measure."""
    if summary.get("status") == "diverged":
        return []
    stored = results.json_object(summary.get("config"))
    return [k for k in MEASUREMENT_FIELDS if stored.get(k) != wanted.get(k)]


def _check_eigs_protocol(cfg: "RunConfig", stored: dict, path: Path) -> None:
    """eigs.csv (λmax during training) cannot be measured again: its settings must not change."""
    changed = [k for k in EIG_FREQ_FIELDS if stored.get(k) != getattr(cfg, k)]
    if cfg.eig_freq and changed:
        raise SharpnessError(
            f"{path} was trained with --eig_freq and " + ", ".join(f"{k}={stored.get(k)}" for k in changed)
            + "; its eigs.csv (λmax during training) cannot be measured again with "
            + ", ".join(f"{k}={getattr(cfg, k)}" for k in changed) + " without training again: "
            "use the stored settings, or --force to train again")


def check_seed(name: str, value: int) -> None:
    """Seeds are integers in [0, 2**63) (what torch's generators take)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise SharpnessError(f"{name} must be an integer in [0, 2**63), got {value}")


def _positive_finite(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise SharpnessError(f"{name} must be a positive finite number, got {value}")


def resolve_device(name: str | None) -> torch.device:
    """The device to use: `name`, else cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SharpnessError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SharpnessError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SharpnessError(f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    if device.type not in ("cpu", "cuda"):
        raise SharpnessError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def versions() -> dict:
    """Versions of what produced a result."""
    import numpy
    import torchvision

    return {"sharpness": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__}


# -- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (running BN statistics, no dropout)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=X.device, dtype=torch.float64)
    correct = torch.zeros((), device=X.device, dtype=torch.int64)
    for s in range(0, len(y), chunk):
        out = model(X[s:s + chunk]).float()
        loss += F.cross_entropy(out, y[s:s + chunk], reduction="sum").double()
        correct += (out.argmax(1) == y[s:s + chunk]).sum()
    model.train(was_training)
    return loss.item() / len(y), correct.item() / len(y)


def stop_status(epoch: int, metrics: dict, cfg: RunConfig) -> str | None:
    """Why training stops at the start of `epoch` (None: it goes on)."""
    if not (math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["test_loss"])):
        return "diverged"
    if epoch > 0 and metrics["train_acc"] >= cfg.acc_goal:
        return "done"
    if cfg.max_epochs is not None and epoch >= cfg.max_epochs:
        return "max_epochs"
    return None


# -- signals ------------------------------------------------------------------------------------

class StopRequest:
    """SIGTERM / first Ctrl-C set a flag: the loop checkpoints at the next step and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._saved: dict = {}

    def __enter__(self) -> "StopRequest":
        self._saved = _set_handlers(dict.fromkeys((signal.SIGTERM, signal.SIGINT), self._handle))
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    def __exit__(self, *exc) -> None:
        _set_handlers(self._saved)


def _set_handlers(handlers: dict) -> dict:
    """Set signal handlers ({signal: handler}) and return the ones they replace; in threads other
    than the main one, where handlers cannot be set, nothing happens."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}


class Interrupted(SharpnessError):
    """The run stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _stop_at_once(what: str, run_dir: Path):
    """SIGTERM / Ctrl-C abandon `what` at once (the last epoch's checkpoint is already saved)."""
    def handle(signum, frame):
        raise Interrupted(f"stopped by {signal.Signals(signum).name} while {what}; the training is saved "
                          f"in {run_dir}; run the same command to finish", signum)

    saved = _set_handlers(dict.fromkeys((signal.SIGTERM, signal.SIGINT), handle))
    try:
        yield
    finally:
        _set_handlers(saved)


# -- the run ------------------------------------------------------------------------------------

def run(cfg: RunConfig, opts: RunOptions | None = None, root: Path | None = None) -> dict:
    """Train (or resume) the run, measure λmax, write every result file; return the summary."""
    opts = opts or RunOptions()
    cfg.validate()
    device = resolve_device(opts.device)
    data = load_dataset(cfg.dataset)
    cfg.check_data(data)
    run_dir = Path(root or results.results_root()) / results.run_relpath(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SharpnessError(f"cannot create {run_dir}: {exc.strerror or exc}") from None
    log = (lambda *a: None) if opts.quiet else _write
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(results.RunLock(run_dir))
        except ReadOnlyRun:  # a read-only archive of finished runs can still be shown
            summary = results.read_summary(run_dir)
            if summary is None or opts.force or remeasure_fields(summary, cfg.identity()):
                raise
            return _finished(run_dir, summary, cfg, data, device, log, writable=False)
        summary = results.read_summary(run_dir)
        if summary is not None and not opts.force:
            return _finished(run_dir, summary, cfg, data, device, log)
        if opts.force:
            _clear_run(run_dir)
        results.remove_stale_temporaries(run_dir)
        return Trainer(cfg, opts, data, device, run_dir, log).run()


def _write(*args) -> None:
    from tqdm import tqdm

    tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)


def _warn(message: str) -> None:
    """A warning on stderr, shown even with --quiet."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def _clear_run(run_dir: Path) -> None:
    for entry in run_dir.iterdir():
        if entry.name == results.LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()  # a link is removed, never what it points to


def _check_summary(run_dir: Path, summary: object, cfg: RunConfig) -> None:
    """A finished run's summary.json must be this run's and well-formed before it is trusted."""
    path = run_dir / results.SUMMARY
    damaged = (f"{path} is damaged ({{}}); move it away to finish the run from its checkpoint, "
               "or use --force to train again")
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise SharpnessError(damaged.format("no config object"))
    try:
        stored = RunConfig(**summary["config"])
    except TypeError as exc:
        raise SharpnessError(damaged.format(f"config: {exc}")) from None
    if stored.training_identity() != cfg.training_identity():
        raise SharpnessError(f"{path} belongs to a different configuration; use --force to start this run over")
    for key in ("final", "lambda_max"):
        if summary.get(key) is not None and not isinstance(summary[key], dict):
            raise SharpnessError(damaged.format(f"{key} is not an object"))
    for key, value in [("test_acc", (summary.get("final") or {}).get("test_acc")),
                       ("lambda_max", (summary.get("lambda_max") or {}).get("value"))]:
        if value is not None and results.json_number(value) is None:
            raise SharpnessError(damaged.format(f"{key} = {value!r} is not a number"))
    if summary.get("status") != "diverged":
        _check_eigs_protocol(cfg, summary["config"], run_dir)


def _finished(run_dir: Path, summary: dict, cfg: RunConfig, data: Dataset, device, log,
              writable: bool = True) -> dict:
    """A finished run is not trained again; a changed λmax setting is measured anew."""
    _check_summary(run_dir, summary, cfg)
    changed = remeasure_fields(summary, cfg.identity())
    if changed:
        log(f"run already trained; measuring λmax again for the new {', '.join(changed)}")
        model = load_final_model(run_dir, cfg, data, device)
        summary["lambda_max"] = measure_final(model, run_dir, cfg, data, device, progress=True)
        write_lambda_files(run_dir, summary["lambda_max"])
        summary["config"] = cfg.identity()
        results.atomic_write_json(run_dir / results.SUMMARY, summary)
    else:
        log(f"run already finished ({summary.get('status')}); showing the stored result "
            "(--force trains again)")
        if writable and summary.get("lambda_max") and not _lambda_files_agree(run_dir, summary["lambda_max"]):
            write_lambda_files(run_dir, summary["lambda_max"])  # a kill between the two writes: heal
    _write(final_line(summary))
    _write(f"results: {run_dir}")
    return summary


def final_line(summary: dict) -> str:
    """The original eval.py line: final test accuracy and max Hessian eigenvalue."""
    acc = results.json_number(results.json_object(summary.get("final")).get("test_acc"))
    lam = results.json_number(results.json_object(summary.get("lambda_max")).get("value"))
    acc_s = f"{acc:.4f}" if acc is not None else "nan"
    lam_s = f"{lam:.4f}" if lam is not None else "nan"
    return f"[final test accuracy = {acc_s}]\t[max hessian eigenvalue = {lam_s}]"


def load_final_model(run_dir: Path, cfg: RunConfig, data: Dataset, device) -> torch.nn.Module:
    """The network of `snapshot_final`."""
    model = build_model(cfg.arch_id, data.input_shape, data.num_classes)
    state = results.safe_torch_load(run_dir / "snapshot_final")
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise SharpnessError(f"cannot use {run_dir / 'snapshot_final'}: it does not fit "
                             f"{cfg.arch_id} on {cfg.dataset} ({str(exc).splitlines()[0][:120]})") from None
    return model.to(device)


def measure_final(model, run_dir: Path, cfg: RunConfig, data: Dataset, device, progress: bool) -> dict:
    """λmax of the final network by the paper's protocol (between iterates when asked)."""
    try:
        return _measure_final(model, run_dir, cfg, data, device, progress)
    except NonFiniteError as exc:
        raise SharpnessError(f"λmax of the final network in {run_dir} cannot be measured: {exc}") from None


def _measure_final(model, run_dir: Path, cfg: RunConfig, data: Dataset, device, progress: bool) -> dict:
    X, y = abridged(data, cfg.abridged_size)
    X, y = X.to(device), y.to(device)
    if cfg.between_iterates:
        extra_path = run_dir / "snapshot_extra_iter"
        if extra_path.exists():
            extra = results.safe_torch_load(extra_path, map_location=device)
        else:
            with _numerics(cfg):  # the extra step is a training step: the run's TF32 and bf16 settings
                extra = extra_iterate(model, data, cfg, device, autocast=_autocast(cfg, device))
            try:
                results.atomic_torch_save({k: v.cpu() for k, v in extra.items()}, extra_path)
            except SharpnessError as exc:  # e.g. eval of a read-only archive: the step is deterministic
                _warn(f"{exc}; the extra step is used without being kept")
        return between_iterates_record(model, extra, X, y, cfg, progress=progress)
    return {**lambda_max_record(model, X, y, cfg, progress=progress), "between_iterates": False}


def _lambda_files_agree(run_dir: Path, record: dict) -> bool:
    """Whether leading_eigenvalue_final holds the summary's λmax (False when missing or unreadable)."""
    try:
        stored = results.safe_torch_load(run_dir / "leading_eigenvalues" / "leading_eigenvalue_final")
        return float(stored[0]) == float(record["value"])
    except (SharpnessError, OSError, TypeError, ValueError, IndexError, KeyError):
        return False


def write_lambda_files(run_dir: Path, record: dict) -> None:
    """leading_eigenvalues/leading_eigenvalue_final (and the eight between-iterates values)."""
    out = run_dir / "leading_eigenvalues"
    results.atomic_torch_save(torch.tensor([record["value"]], dtype=torch.float64),
                              out / "leading_eigenvalue_final")
    between = out / "leading_eigenvalue_between_iterates"
    if record.get("between_iterates"):
        results.atomic_torch_save(torch.tensor(record["between_values"], dtype=torch.float64), between)
    else:  # measured again without the flag: the old eight values no longer belong to this λmax
        between.unlink(missing_ok=True)


def evaluate_run(cfg: RunConfig, opts: RunOptions | None = None, root: Path | None = None) -> dict:
    """Load a finished run's final network: test accuracy and λmax (measured anew)."""
    opts = opts or RunOptions()
    cfg.validate()
    device = resolve_device(opts.device)
    run_dir = Path(root or results.results_root()) / results.run_relpath(cfg)
    if not run_dir.is_dir():
        raise SharpnessError(f"no run at {run_dir}: train it first (same arguments to train.py "
                             "or `sharpness train`), or set RESULTS to where it was saved")
    summary = results.read_summary(run_dir)
    if summary is not None and summary.get("status") == "diverged":
        raise SharpnessError(f"the run at {run_dir} diverged; it has no final network to evaluate")
    if not (run_dir / "snapshot_final").exists():
        raise SharpnessError(f"the run at {run_dir} has not finished (no snapshot_final); "
                             "run train with the same arguments to resume it")
    data = load_dataset(cfg.dataset)
    cfg.check_data(data)
    model = load_final_model(run_dir, cfg, data, device)
    with _numerics(cfg):  # the same TF32 setting as the metrics computed in training
        _, test_acc = evaluate(model, data.X_test.to(device), data.y_test.to(device), cfg.physical_batch_size)
        lam = measure_final(model, run_dir, cfg, data, device, progress=not opts.quiet)
    return {"test_acc": test_acc, "lambda_max": lam, "run_dir": str(run_dir)}


class Trainer:
    """The state of one run while it trains."""

    def __init__(self, cfg: RunConfig, opts: RunOptions, data: Dataset, device: torch.device,
                 run_dir: Path, log):
        self.cfg, self.opts, self.device, self.run_dir, self.log = cfg, opts, device, run_dir, log
        self.data = data.to(device)
        self.model = build_model(cfg.arch_id, data.input_shape, data.num_classes,
                                 seed=cfg.network_seed).to(device)
        if opts.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward_model = torch.compile(self.model) if opts.compile else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        self.shuffle = torch.Generator().manual_seed(cfg.train_seed)
        torch.manual_seed(cfg.train_seed)  # dropout masks
        self.epoch, self.batch, self.step, self.perm = 0, 0, 0, None
        self.history: list[dict] = []
        self.eigs: list[dict] = []
        self.wall = 0.0
        self.diverged_at: dict | None = None
        self.resumed_from: str | None = None

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """Everything needed to continue exactly where the run is."""
        # the training device's generator only: a resume may see fewer (or other) GPUs
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"format": 1, "config": self.cfg.identity(), "epoch": self.epoch, "batch": self.batch,
                "step": self.step, "perm": self.perm, "history": self.history, "eigs": self.eigs,
                "wall": self.wall, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "cuda": cuda, "shuffle": self.shuffle.get_state()}}

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically, keeping the previous one as a fallback."""
        path, prev = self.run_dir / results.CHECKPOINT, self.run_dir / results.CHECKPOINT_PREV
        state = self.checkpoint_state()
        buf = io.BytesIO()
        torch.save(state, buf)
        tmp = self.run_dir / f".checkpoint.next{results.TMP_SUFFIX}"
        try:
            results.atomic_write_bytes(tmp, buf.getvalue())
        except SharpnessError as exc:  # name the checkpoint, not the staging file
            raise SharpnessError(str(exc).replace(str(tmp), str(path))) from None
        try:
            if path.exists():
                _keep_previous(path, prev)
            tmp.replace(path)
            results.fsync_dir(self.run_dir)
        except OSError as exc:
            raise SharpnessError(f"cannot write {path}: {exc.strerror or exc}") from None

    def try_resume(self) -> None:
        """Continue from the newest readable checkpoint, if there is one."""
        for name in (results.CHECKPOINT, results.CHECKPOINT_PREV):
            path = self.run_dir / name
            if not path.exists():
                continue
            try:
                state = results.safe_torch_load(path, map_location="cpu")
            except SharpnessError as exc:
                _warn(f"{exc}; trying the previous checkpoint")
                continue
            try:
                stored = RunConfig(**state["config"]).training_identity()
            except (TypeError, KeyError):
                _warn(f"{path} is not a checkpoint of this package; trying the previous checkpoint")
                continue
            if stored != self.cfg.training_identity():
                raise SharpnessError(f"{path} belongs to a different configuration; "
                                     "use --force to start this run over")
            if state.get("eigs"):  # λmax values already in eigs.csv: the rest must use their settings
                _check_eigs_protocol(self.cfg, state["config"], self.run_dir)
            try:
                self.load_state(state)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                _warn(f"cannot use {path} ({type(exc).__name__}: {exc}); trying the previous checkpoint")
                self.__init__(self.cfg, self.opts, self.data, self.device, self.run_dir, self.log)
                continue
            self.resumed_from = name
            self.log(f"resuming from {path} (epoch {self.epoch}, step {self.step})")
            return

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.perm, self.history, self.eigs = state["perm"], state["history"], state["eigs"]
        self.wall = state["wall"]
        torch.set_rng_state(state["rng"]["torch"])
        cuda = state["rng"]["cuda"]
        if cuda is not None and self.device.type == "cuda":
            if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state
                cuda = cuda[min(self.device.index or 0, len(cuda) - 1)]
            torch.cuda.set_rng_state(cuda, self.device)
        self.shuffle.set_state(state["rng"]["shuffle"])

    # -- per-epoch files ------------------------------------------------------------------------
    def save_epoch_files(self) -> None:
        """Snapshots of this epoch's network, then the metrics so far."""
        d = self.run_dir
        model_state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        results.atomic_torch_save(model_state, d / "snapshot_most_recent")
        if self.epoch % self.cfg.save_freq == 0:
            results.atomic_torch_save(model_state, d / f"snapshot_{self.epoch}")
        self.save_metrics()

    def save_metrics(self, final: bool = False) -> None:
        """Metric tensors (`*_most_recent` always, the plain ones every save_freq epochs and at the end) and CSVs."""
        d, cfg = self.run_dir, self.cfg
        periodic = self.epoch % cfg.save_freq == 0
        for name in results.METRIC_NAMES:
            values = torch.tensor([h[name] for h in self.history], dtype=torch.float64)
            results.atomic_torch_save(values, d / f"{name}_most_recent")
            if periodic or final:
                results.atomic_torch_save(values, d / name)
        results.atomic_write_csv(d / results.METRICS_CSV, self.history)
        if cfg.eig_freq:
            results.atomic_write_csv(d / results.EIGS_CSV, self.eigs)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.try_resume()
        self.log(f"run directory: {self.run_dir}")
        self.log("epoch\telapsed_s\ttrain_loss\ttrain_acc\ttest_loss\ttest_acc")
        for h in self.history:
            self.log(_epoch_line(h))
        with _numerics(cfg), StopRequest() as stop, _epoch_bar(self.opts.quiet, cfg.max_epochs, self.epoch) as bar:
            started = time.perf_counter() - self.wall
            status = None
            while status is None:
                if len(self.history) == self.epoch:
                    self.wall = time.perf_counter() - started
                    self.history.append(self.evaluate_epoch())
                    self.log(_epoch_line(self.history[-1]))
                    self.save_epoch_files()
                    self.save_checkpoint()
                status = stop_status(self.epoch, self.history[self.epoch], cfg)
                if status == "diverged" and self.diverged_at is None:  # caught by the evaluation
                    h = self.history[self.epoch]
                    loss = h["train_loss"] if not math.isfinite(h["train_loss"]) else h["test_loss"]
                    which = "training" if not math.isfinite(h["train_loss"]) else "test"
                    status = self._diverged(f"the {which} loss at the evaluation became {loss}", loss)
                if status is None:
                    status = self.train_epoch(stop, started)
                    bar.update(1)
            self.wall = time.perf_counter() - started
            if stop.signal is not None and status != "diverged":  # asked during the last evaluation
                raise Interrupted(f"stopped by {signal.Signals(stop.signal).name} before measuring λmax; "
                                  f"the training is saved in {self.run_dir}; run the same command to finish",
                                  stop.signal)
        return self.finish(status)

    def evaluate_epoch(self) -> dict:
        d, chunk = self.data, self.cfg.physical_batch_size
        train_loss, train_acc = evaluate(self.forward_model, d.X_train, d.y_train, chunk)
        test_loss, test_acc = evaluate(self.forward_model, d.X_test, d.y_test, chunk)
        return {"epoch": self.epoch, "step": self.step, "elapsed_s": round(self.wall, 3),
                "train_loss": train_loss, "train_acc": train_acc,
                "test_loss": test_loss, "test_acc": test_acc}

    def train_epoch(self, stop: StopRequest, started: float) -> str | None:
        """One pass over the shuffled training set; 'diverged' when the loss stops being finite."""
        cfg, d = self.cfg, self.data
        n = len(d.y_train)
        if self.perm is None:
            self.perm, self.batch = torch.randperm(n, generator=self.shuffle), 0
        perm = self.perm.to(self.device)
        batches = math.ceil(n / cfg.batch_size)
        autocast = _autocast(cfg, self.device)
        # on a GPU the host looks at the loss every 20 steps (a look waits for the GPU); the first
        # non-finite step and its loss are tracked on the device in between, without waiting
        check_every = _check_interval(self.device)
        first_bad = torch.full((), -1, device=self.device, dtype=torch.int64)
        bad_loss = torch.zeros((), device=self.device)
        self.model.train()
        while self.batch < batches:
            if stop.signal is not None:
                if check_every > 1 and int(first_bad) >= 0:  # never checkpoint past a non-finite step
                    return self._diverged(f"the training loss became {float(bad_loss)}", float(bad_loss),
                                          step=int(first_bad))
                self.wall = time.perf_counter() - started
                self.save_checkpoint()
                name = signal.Signals(stop.signal).name
                raise Interrupted(f"stopped by {name} at epoch {self.epoch}, step {self.step}; "
                                  f"checkpoint saved in {self.run_dir}; run the same command to resume",
                                  stop.signal)
            if cfg.eig_freq and self.step % cfg.eig_freq == 0:
                if not _finite_parameters(self.model):
                    return self._diverged("the parameters became non-finite", math.nan)
                self.record_eig()
            idx = perm[self.batch * cfg.batch_size:(self.batch + 1) * cfg.batch_size]
            X, y = d.X_train[idx], d.y_train[idx]
            if self.opts.channels_last and X.dim() == 4:
                X = X.contiguous(memory_format=torch.channels_last)
            if cfg.opt == "sam":
                loss = sam_step(self.forward_model, self.optimizer, X, y, cfg.physical_batch_size,
                                cfg.rho, autocast)
            else:
                loss = sgd_step(self.forward_model, self.optimizer, X, y, cfg.physical_batch_size, autocast)
            self.step += 1
            self.batch += 1
            if check_every == 1:
                value = float(loss)  # on a CPU reading the loss costs nothing
                if not math.isfinite(value):
                    return self._diverged(f"the training loss became {value}", value)
                continue
            new_bad = ~torch.isfinite(loss.detach()) & (first_bad < 0)
            first_bad = torch.where(new_bad, first_bad.new_full((), self.step), first_bad)
            bad_loss = torch.where(new_bad, loss.detach().float(), bad_loss)
            if (self.step % check_every == 0 or self.batch == batches) and int(first_bad) >= 0:
                return self._diverged(f"the training loss became {float(bad_loss)}", float(bad_loss),
                                      step=int(first_bad))
        if not _finite_parameters(self.model):  # a finite loss, then an update that overflowed
            return self._diverged("the parameters became non-finite", math.nan)
        self.perm, self.batch = None, 0
        self.epoch += 1
        return None

    def _diverged(self, what: str, loss: float, step: int | None = None) -> str:
        """Record the divergence (epoch, first non-finite step, loss) and say so."""
        step = self.step if step is None else step
        self.diverged_at = {"epoch": self.epoch, "step": step, "loss": loss}
        self.log(f"{what} at epoch {self.epoch}, step {step}: the run diverged (try a smaller learning rate)")
        return "diverged"

    def record_eig(self) -> None:
        """λmax of the current iterate on the abridged set (eig_freq); the model is not changed."""
        X, y = abridged(self.data, self.cfg.abridged_size)
        try:
            rec = lambda_max_record(self.model, X, y, self.cfg)
        except NonFiniteError as exc:  # finite parameters, overflowing curvature: no value, say why
            _warn(f"λmax at step {self.step} not measured: {exc}")
            rec = {"value": math.nan, "residual": math.nan}
        self.eigs.append({"step": self.step, "epoch": self.epoch, "lambda_max": rec["value"],
                          "residual": rec["residual"]})

    def finish(self, status: str) -> dict:
        """Final files: snapshot_final, λmax, metric tensors, summary.json."""
        cfg, d = self.cfg, self.run_dir
        self.save_metrics(final=True)
        lam = None
        if status != "diverged":
            results.atomic_torch_save({k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                                      d / "snapshot_final")
            self.log(f"measuring λmax on {min(cfg.abridged_size, len(self.data.y_train))} training "
                     "examples ...")
            with _stop_at_once("measuring λmax", d):
                lam = measure_final(self.model, d, cfg, self.data, self.device, progress=not self.opts.quiet)
            write_lambda_files(d, lam)
        if status == "diverged":
            self.log("the run diverged: no λmax is measured")
        last = self.history[-1] if self.history else {}
        summary = {
            "config": cfg.identity(),
            "run_dir": str(results.run_relpath(cfg)),
            "status": status,
            "reached_goal": status == "done",
            "epochs": self.epoch,
            "steps": self.step,
            "final": {k: last.get(k) for k in results.METRIC_NAMES} if status != "diverged" else None,
            "diverged_at": self.diverged_at,
            "lambda_max": lam,
            "two_over_lr": 2.0 / cfg.lr,
            "wall_time_s": round(self.wall, 3),
            "device": _device_name(self.device),
            "options": {"channels_last": self.opts.channels_last, "compile": self.opts.compile,
                        "tf32": cfg.tf32, "bf16": cfg.bf16},
            "resumed": self.resumed_from is not None,
            "versions": versions(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        results.atomic_write_json(d / results.SUMMARY, summary)
        if status == "max_epochs":
            self.log(f"stopped at max_epochs={cfg.max_epochs} without reaching train accuracy "
                     f"{cfg.acc_goal}; λmax is of the last iterate")
        _write(final_line(summary))
        _write(f"results: {d}")
        return summary


def _epoch_line(h: dict) -> str:
    return (f"{h['epoch']}\t{h['elapsed_s']:.3f}\t{h['train_loss']:.3f}\t{h['train_acc']:.3f}\t"
            f"{h['test_loss']:.3f}\t{h['test_acc']:.3f}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _check_interval(device: torch.device) -> int:
    """Steps between two looks at the loss: every step on a CPU, every 20 on a GPU."""
    return 1 if device.type == "cpu" else 20


def _finite_parameters(model: nn.Module) -> bool:
    """Whether every parameter entry is finite (one look at the device)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _keep_previous(path: Path, prev: Path) -> None:
    """Make `prev` a copy of `path` while `path` stays in place (a hard link, renamed over `prev`), so
    that a kill at any moment leaves a complete newest checkpoint under its own name."""
    link = path.parent / f".checkpoint.prev{results.TMP_SUFFIX}"
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # a file system without hard links: the old order (a short window without `path`)
        path.replace(prev)
        return
    link.replace(prev)


def _autocast(cfg: RunConfig, device: torch.device):
    """bf16 autocast for training steps when the run asks for it, else None."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else None


@contextlib.contextmanager
def _numerics(cfg: RunConfig):
    """TF32 only when asked for (torch enables it for cuDNN convolutions by default)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def _epoch_bar(quiet: bool, total: int | None, initial: int):
    if quiet:
        yield _NoBar()
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc="epochs", unit="epoch", leave=False,
               dynamic_ncols=True, file=sys.stderr, disable=None)  # none when stderr is not a terminal
    try:
        yield bar
    finally:
        bar.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def config_fields() -> list[str]:
    """Names of RunConfig's fields, in order."""
    return [f.name for f in fields(RunConfig)]
