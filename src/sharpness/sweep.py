"""Sweeps: grids of runs from a TOML file, on local worker processes or a Ray cluster.

A sweep file holds `[fixed]` options of `train`, a `[grid]` whose lists are crossed (or paired
with `zip`), and optional `[[runs]]` blocks; every run is exactly `sharpness train` with those
options, in the same results layout. Finished runs are skipped, interrupted ones resume, failed
ones are retried and then recorded in their run directory's `failure.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from . import results
from .errors import SharpnessError

FAILED = "failure.json"
MAX_RUNS = 100_000  # a sweep file beyond this is a typo (or needs splitting), not a plan
TABLES = ("sweep", "fixed", "grid", "runs")
FINISHED = ("done", "max_epochs", "diverged")
TODO = ("pending", "interrupted", "failed", "remeasure")
INSTALL_RAY = "the ray executor needs Ray: pip install 'sharpness[ray]'"
NOT_IN_SWEEP = {
    "device": "the executor chooses the device (one GPU per run when there are GPUs)",
    "quiet": "sweep runs are always quiet",
    "force": "a sweep never retrains a finished run; delete its run directory to train it again",
}


@dataclass
class Settings:
    """How a sweep is executed (its [sweep] table); none of these change a run's numbers."""

    results: str | None = None
    retries: int = 2
    runs_per_gpu: int = 1
    threads: int | None = None
    cpus_per_run: float = 1.0
    ray_max_retries: int = 3
    channels_last: bool = False
    compile: bool = False


SETTING_CHECKS = {  # name -> (accepted types, smallest value, what to write)
    "results": ((str,), None, "a path"), "retries": ((int,), 0, "an integer >= 0"),
    "runs_per_gpu": ((int,), 1, "an integer >= 1"), "threads": ((int,), 1, "an integer >= 1"),
    "cpus_per_run": ((int, float), 0, "a number >= 0.0001 in steps of 0.0001 (Ray's precision)"),
    "ray_max_retries": ((int,), 0, "an integer >= 0"),
    "channels_last": ((bool,), None, "true or false"), "compile": ((bool,), None, "true or false"),
}


@dataclass
class SweepRun:
    """One run of a sweep: its config, where it comes from in the file, its run directory."""

    cfg: object  # train.RunConfig
    where: str
    run_dir: Path


@dataclass
class Sweep:
    """A parsed sweep file."""

    path: Path
    root: Path
    settings: Settings
    runs: list[SweepRun] = field(default_factory=list)
    _varying: list[str] | None = field(default=None, repr=False)

    def varying(self) -> list[str]:
        """Options whose value differs between runs (the columns that tell runs apart)."""
        if self._varying is None:
            ids = [r.cfg.identity() for r in self.runs]
            self._varying = [k for k in ids[0] if len({json.dumps(i[k]) for i in ids}) > 1] if ids else []
        return self._varying

    def label(self, run: SweepRun) -> str:
        """The run's varying options as `key=value ...` (the run directory's name if none vary)."""
        keys = self.varying()
        ident = run.cfg.identity()
        return " ".join(f"{k}={ident[k]}" for k in keys) or run.run_dir.name


# -- reading a sweep file -----------------------------------------------------------------------

def load_sweep(config_path) -> tuple[list, Path]:
    """The RunConfigs of a sweep file, in order, and its absolute results root."""
    sweep = read_sweep(config_path)
    return [r.cfg for r in sweep.runs], sweep.root


def sweep_run_dirs(config_path) -> list[Path]:
    """Absolute run directories of a sweep's runs, in order."""
    return [r.run_dir for r in read_sweep(config_path).runs]


def read_sweep(config_path) -> Sweep:
    """Parse and check a sweep file: every run valid, no two runs in one directory."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(config_path).expanduser()
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SharpnessError(f"sweep file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SharpnessError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SharpnessError(f"{path}: invalid TOML: {exc}") from None
    fail = _failer(path)
    for key, value in doc.items():
        if key not in TABLES:
            hint = (" (options of train go under [fixed], [grid] or [[runs]])"
                    if key in _run_fields() else "")
            fail(f"unknown key {key!r} at the top level{hint}; expected the tables "
                 "[sweep], [fixed], [grid] and [[runs]]")
    for name in ("sweep", "fixed", "grid"):
        if name in doc and not isinstance(doc[name], dict):
            fail(f"{name} must be a table ([{name}])")
    if "runs" in doc and not (isinstance(doc["runs"], list) and all(isinstance(t, dict) for t in doc["runs"])):
        fail("runs must be an array of tables ([[runs]])")
    settings = _read_settings(doc.get("sweep", {}), fail)
    sweep = Sweep(path.resolve(), _results_root(settings, path, fail), settings)
    fixed = {k: _coerce(k, v, "[fixed]", fail) for k, v in doc.get("fixed", {}).items()}
    blocks = ([("[grid]", doc["grid"])] if "grid" in doc else []) + \
             [(f"[[runs]] #{i + 1}", t) for i, t in enumerate(doc.get("runs", []))]
    if not blocks:
        fail("no runs: add a [grid] table or [[runs]] tables")
    if "grid" in doc and not doc["grid"]:
        fail("[grid] is empty: give it at least one option")
    for name, table in blocks:
        for where, values in _expand_block(name, table, fail):
            cfg = _make_config({**fixed, **values}, where, fail)
            sweep.runs.append(SweepRun(cfg, where, sweep.root / results.run_relpath(cfg)))
    _check_distinct(sweep.runs, fail)
    return sweep


def _failer(path: Path):
    def fail(message: str):
        raise SharpnessError(f"{path}: {message}")
    return fail


def _run_fields() -> dict:
    from dataclasses import fields

    from .train import RunConfig

    return {f.name: f for f in fields(RunConfig)}


def _kind(f) -> type:
    """The Python type of a RunConfig field (None allowed only by leaving the option out)."""
    text = str(f.type).replace(" ", "").removesuffix("|None")
    return {"str": str, "int": int, "float": float, "bool": bool}[text]


def _coerce(key: str, value, where: str, fail, allow_list: bool = False):
    """A TOML value of a run option, checked against the option's type (lists when allowed)."""
    run_fields = _run_fields()
    if key not in run_fields:
        if key in NOT_IN_SWEEP:
            fail(f"{where} {key}: not a sweep option: {NOT_IN_SWEEP[key]}")
        fail(f"{where}: unknown option {key!r}; options of train: {', '.join(run_fields)}")
    if isinstance(value, list):
        if not allow_list:
            fail(f"{where} {key}: a list is not allowed here; lists go in [grid] or [[runs]]")
        if not value:
            fail(f"{where} {key}: empty list (a grid needs at least one value)")
        return [_coerce(key, v, where, fail) for v in value]
    kind = _kind(run_fields[key])
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, kind) and not isinstance(value, bool) if kind in (int, str) else
          isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        fail(f"{where} {key}: expected {want}, got {value!r}")
    return float(value) if kind is float else value


def _read_settings(table: dict, fail) -> Settings:
    settings = Settings()
    for key, value in table.items():
        if key not in SETTING_CHECKS:
            fail(f"[sweep]: unknown setting {key!r}; settings: {', '.join(SETTING_CHECKS)}")
        types, low, want = SETTING_CHECKS[key]
        bad = not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        if not bad and isinstance(value, float) and not math.isfinite(value):
            bad = True
        if not bad and key == "cpus_per_run":
            bad = value < 1e-4 or abs(value * 1e4 - round(value * 1e4)) > 1e-6
        if bad or (low is not None and value < low):
            fail(f"[sweep] {key}: expected {want}, got {value!r}")
        setattr(settings, key, value)
    return settings


def _results_root(settings: Settings, path: Path, fail) -> Path:
    """[sweep] results (relative to the sweep file), else $RESULTS, else ./results; absolute."""
    if settings.results:
        expanded = os.path.expandvars(settings.results)
        unset = re.search(r"\$\{?(\w+)", expanded)
        if unset:
            fail(f"[sweep] results = {settings.results!r}: environment variable {unset.group(1)} is not set")
        root = Path(expanded).expanduser()
        root = root if root.is_absolute() else path.parent / root
    else:
        root = results.results_root().expanduser()
    return Path(os.path.abspath(root))


def _expand_block(name: str, table: dict, fail) -> list[tuple[str, dict]]:
    """The runs of one block: the product of its lists, zipped groups taken element by element."""
    table = dict(table)
    groups = table.pop("zip", [])
    if not (isinstance(groups, list) and all(isinstance(g, list) and g and all(isinstance(k, str) for k in g)
                                             for g in groups)):
        fail(f"{name} zip: expected a list of lists of option names, e.g. zip = [[\"lr\", \"batch_size\"]]")
    values = {k: _coerce(k, v, name, fail, allow_list=True) for k, v in table.items()}
    group_of = {}
    for g in groups:
        for k in g:
            if k not in values or not isinstance(table[k], list):
                fail(f"{name} zip: {k!r} must be a list in {name}")
            if k in group_of:
                fail(f"{name} zip: {k!r} appears in more than one zip group")
            group_of[k] = tuple(g)
        lengths = {k: len(values[k]) for k in g}
        if len(set(lengths.values())) > 1:
            fail(f"{name} zip: the paired lists differ in length "
                 f"({', '.join(f'{k}: {n}' for k, n in lengths.items())})")
    axes, placed = [], set()
    for k, v in values.items():
        keys = group_of.get(k, (k,))
        if keys in placed:
            continue
        placed.add(keys)
        seqs = [values[x] if isinstance(values[x], list) else [values[x]] for x in keys]
        axes.append((keys, list(zip(*seqs))))
    size = math.prod(len(vals) for _, vals in axes)
    if size > MAX_RUNS:
        fail(f"{name} has {size:,} runs (the product of its lists), more than {MAX_RUNS:,}: "
             "split the sweep into several files")
    shown = [k for k in values if isinstance(table[k], list)]
    out = []
    for i, combo in enumerate(itertools.product(*[vals for _, vals in axes])):
        run = {}
        for (keys, _), tup in zip(axes, combo):
            run.update(zip(keys, tup))
        desc = ", ".join(f"{k}={run[k]}" for k in shown)
        out.append((f"{name} run {i + 1}" + (f" ({desc})" if desc else ""), run))
    return out


def _make_config(values: dict, where: str, fail):
    from .train import RunConfig

    required = [n for n, f in _run_fields().items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        fail(f"{where}: missing {', '.join(missing)} (every run needs {', '.join(required)}; "
             "put shared values in [fixed])")
    cfg = RunConfig(**values)
    try:
        cfg.validate()
    except SharpnessError as exc:
        fail(f"{where}: {exc}")
    return cfg


def _check_distinct(runs: list[SweepRun], fail) -> None:
    from .train import MEASUREMENT_FIELDS

    seen: dict[Path, SweepRun] = {}
    for run in runs:
        other = seen.setdefault(run.run_dir, run)
        if other is run:
            continue
        a, b = other.cfg.identity(), run.cfg.identity()
        diff = [k for k in a if a[k] != b[k]]
        why = (f"they differ only in {', '.join(diff)}, which {'does' if len(diff) == 1 else 'do'} not "
               "change the run directory" if diff else "the same run twice")
        if diff and set(diff) <= set(MEASUREMENT_FIELDS):
            why += " (these options only change how λmax is measured; a run is measured one way per sweep)"
        elif diff == ["rho"]:
            why += " (rho only matters for opt = \"sam\"; give SAM its own [[runs]] block)"
        fail(f"{other.where} and {run.where} map to the same run directory "
             f"{results.run_relpath(run.cfg)}: {why}")


def check_data(sweep: Sweep, prepare: bool) -> None:
    """Dataset-dependent checks (batch size vs training set, architecture vs inputs) before any run.

    With `prepare`, datasets are prepared (downloaded) here once; otherwise only datasets that are
    available offline are checked and the rest are checked by each run."""
    from .data import DATASETS, is_prepared, load_dataset

    for name in dict.fromkeys(r.cfg.dataset for r in sweep.runs):
        if not (prepare or DATASETS[name][0] == "digits" or is_prepared(name)):
            continue
        data = load_dataset(name)
        for run in sweep.runs:
            if run.cfg.dataset == name:
                try:
                    run.cfg.check_data(data)
                except SharpnessError as exc:
                    raise SharpnessError(f"{sweep.path}: {run.where}: {exc}") from None
        del data


# -- the state of runs --------------------------------------------------------------------------

def run_state(run: SweepRun) -> dict:
    """Status (pending, running, interrupted, done, max_epochs, diverged, failed, remeasure), epochs,
    test accuracy, λmax and the failure message of a run, from its files."""
    from .train import remeasure_fields

    d = run.run_dir
    summary = results.read_summary(d)
    state = {"run_dir": str(d), "status": "pending", "epochs": None, "test_acc": None,
             "lambda_max": None, "error": None, "holder": None}
    if summary is not None:
        final, lam = (results.json_object(summary.get(k)) for k in ("final", "lambda_max"))
        state.update(status=str(summary.get("status")), epochs=results.json_number(summary.get("epochs")),
                     test_acc=results.json_number(final.get("test_acc")),
                     lambda_max=results.json_number(lam.get("value")))
        if not remeasure_fields(summary, run.cfg.identity()):
            return state
        state["status"] = "remeasure"
        failure = _read_failure(d)  # removed when a run succeeds: the last attempt to measure again failed
        if failure is not None:
            state["error"] = f"measuring λmax again failed: {failure.get('error')}"
    else:
        rows = _metric_rows(d)
        if rows:
            state.update(epochs=len(rows) - 1, test_acc=_float(rows[-1].get("test_acc")))
        if (d / results.CHECKPOINT).exists() or (d / results.CHECKPOINT_PREV).exists():
            state["status"] = "interrupted"
        failure = _read_failure(d)
        if failure is not None:
            state.update(status="failed", error=failure.get("error"))
    if results.lock_held(d):
        state["status"] = "running"
        state["error"] = None
        try:
            state["holder"] = (d / results.LOCK).read_text().strip() or None  # "pid N on HOST"
        except OSError:
            pass
    return state


def _metric_rows(run_dir: Path) -> list[dict]:
    import csv

    try:
        return list(csv.DictReader((run_dir / results.METRICS_CSV).read_text().splitlines()))
    except (OSError, csv.Error):
        return []


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _read_failure(run_dir: Path) -> dict | None:
    try:
        failure = json.loads((run_dir / FAILED).read_text())
    except (OSError, ValueError):
        return None
    return failure if isinstance(failure, dict) else {"error": "failure.json is damaged"}


def status_table(sweep: Sweep, states: list[dict]) -> str:
    """The runs of a sweep as an aligned text table."""
    keys = sweep.varying()
    head = ["#", *keys, "status", "epochs", "test_acc", "λmax", "note"]
    rows = []
    for i, (run, st) in enumerate(zip(sweep.runs, states), 1):
        ident = run.cfg.identity()
        note = st["error"] or st.get("holder") or (
            "measure λmax again: its settings changed" if st["status"] == "remeasure" else "")
        rows.append([str(i), *(str(ident[k]) for k in keys), st["status"],
                     "" if st["epochs"] is None else str(st["epochs"]),
                     "" if st["test_acc"] is None else f"{st['test_acc']:.4f}",
                     "" if st["lambda_max"] is None else f"{st['lambda_max']:.4f}",
                     note if len(note) <= 100 else note[:97] + "..."])
    if not keys:
        head.insert(1, "run")
        for row, run in zip(rows, sweep.runs):
            row.insert(1, str(results.run_relpath(run.cfg)))
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def count_line(states: list[dict]) -> str:
    """'N runs: a done, b pending, ...'."""
    counts = Counter(s["status"] for s in states)
    order = ["done", "max_epochs", "diverged", "running", "interrupted", "remeasure", "pending", "failed"]
    parts = [f"{counts[k]} {k}" for k in order if counts[k]]
    return f"{len(states)} runs: " + ", ".join(parts)


# -- commands -----------------------------------------------------------------------------------

def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `sharpness sweep`."""
    from .cli import positive_int

    p.add_argument("config", help="sweep file (TOML)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local worker processes (default) or Ray tasks")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="runs at a time (local default: one per CPU core, or runs_per_gpu per GPU; "
                        "ray default: as many as the cluster's resources allow)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (host:port or 'auto'; default: a fresh local Ray instance)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are done; run nothing")


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `sharpness status`."""
    p.add_argument("config", help="sweep file (TOML)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Bring every run of a sweep to an end; exit 1 when some runs failed."""
    if args.address and args.executor != "ray":
        raise SharpnessError("--address is for --executor ray")
    from .executors import Task, import_ray, run_local, run_ray

    if args.executor == "ray" and not args.dry_run:
        import_ray(local=args.address is None)  # fail before any work when Ray is missing
    sweep = read_sweep(args.config)
    check_data(sweep, prepare=not args.dry_run and (args.executor == "local" or args.address is None))
    states = [run_state(r) for r in sweep.runs]
    todo = [Task(i, r) for i, (r, st) in enumerate(zip(sweep.runs, states)) if st["status"] in TODO]
    busy = sum(st["status"] == "running" for st in states)
    print(f"sweep {sweep.path}: {count_line(states)}; results in {sweep.root}", flush=True)
    if args.dry_run:
        print(status_table(sweep, states))
        print(f"{len(todo)} to run, {busy} running elsewhere, "
              f"{sum(st['status'] in FINISHED for st in states)} finished (dry run: nothing was started)")
        return 0
    if busy:
        print(f"skipping {busy} run(s) in use by another process", flush=True)
    if not todo:
        print("nothing to do: every run has finished" + (" or is running elsewhere" if busy else ""), flush=True)
        return 0
    t0 = time.perf_counter()
    if args.executor == "ray":
        outcomes = run_ray(sweep, todo, args.workers, args.address)
    else:
        outcomes = run_local(sweep, todo, args.workers)
    parts = ", ".join(f"{n} {k}" for k, n in outcomes.items())
    print(f"sweep finished in {time.perf_counter() - t0:.1f} s: {parts}; "
          f"`sharpness status {args.config}` shows every run", flush=True)
    return 1 if outcomes["failed"] else 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status of every run of a sweep."""
    sweep = read_sweep(args.config)
    states = [run_state(r) for r in sweep.runs]
    if args.json:
        rows = [{"index": i, "config": r.cfg.identity(), **st} for i, (r, st) in enumerate(zip(sweep.runs, states), 1)]
        print(json.dumps({"sweep": str(sweep.path), "results": str(sweep.root), "runs": rows}, indent=2))
        return 0
    print(f"sweep {sweep.path}; results in {sweep.root}")
    print(status_table(sweep, states))
    print(count_line(states))
    return 0
