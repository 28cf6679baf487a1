"""`sharpness report`: runs.csv, the paper's figures and statistics from a results folder or a sweep.

Read top to bottom: the command line, then one row per run (`read_run`: settings, final metrics,
λmax, status and notes, never an error for a damaged run), which runs are left out of the figures
and why, report.md (`render`), and `build_report`, which writes runs.csv, the figures
(figures.py), stats.json and report.md. The statistics and the rules for the paper's five findings
are in findings.py. Figures use only runs that reached the accuracy goal (status done) and have a
λmax; everything else is listed as left out.
matplotlib, scipy and pandas are imported only when a report is built.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import results
from .errors import SharpnessError
from .figures import (FIGURE_TEXT, RC, Canvas, Section, encodings, fig_bn, fig_dropout, fig_run, fig_sam,
                      fig_scatter, fig_vs_lr, md_table)
from .findings import (ACC_TOL, HIGH_DROPOUT, LAMBDA_CHANGE, MIN_TAU_RUNS, finite, findings, fmt_p, fmt_tau,
                       group_by, kendall_stats, make_cells, opt_label, panel_key, usable)

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("png", "pdf", "svg")
FAILURE = "failure.json"  # written into a run directory by a sweep when the run failed for good
LEFT_OUT_REASON = {
    "diverged": "diverged: no final model",
    "max_epochs": "stopped at max_epochs before reaching the accuracy goal: not a final model",
    "running": "still training",
    "interrupted": "not finished (interrupted)",
    "failed": "failed",
    "unreadable": "summary.json unreadable",
    "pending": "not started",
    "remeasure": "λmax measured under other settings than the sweep file's",
}


# -- command line -------------------------------------------------------------------------------

def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `sharpness report`."""
    p.add_argument("source", help="results folder, or sweep file (TOML) whose runs to report")
    p.add_argument("--out", default=None,
                   help="output folder (default: RESULTS_DIR/report for a folder; ROOT/reports/NAME "
                        "for a sweep file NAME.toml, ROOT being the sweep's results root)")
    p.add_argument("--format", choices=FORMATS, default="png", help="figure format (default: png)")


def cmd_report(args: argparse.Namespace) -> int:
    """Build the report and say where it is."""
    build_report(Path(args.source), Path(args.out) if args.out else None, args.format, log=print)
    return 0


# -- one row per run ----------------------------------------------------------------------------

@dataclass
class Run:
    """A run directory and its runs.csv row."""

    dir: Path
    row: dict


def columns() -> list[str]:
    """The columns of runs.csv (and of `results.load`)."""
    from .train import config_fields

    return ["run_dir", "status", *config_fields(), "epochs", "steps", "train_loss", "train_acc",
            "test_loss", "test_acc", "gap_acc", "gap_loss", "lambda_max", "lambda_max_residual",
            "lambda_max_converged", "lambda_max_repeats", "lambda_max_mean", "lambda_max_stderr",
            "trace", "trace_stderr", "two_over_lr", "wall_time_s", "note"]


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories under `root`: finished, in progress, or recorded as failed."""
    dirs = set(results.find_runs(root)) | {p.parent for p in Path(root).rglob(FAILURE)}
    return sorted(dirs)


def read_run(run_dir: Path, root: Path, config: dict | None = None) -> Run:
    """Everything known about one run; unreadable files become a note, never an error.
    `config` (from a sweep file) fills the settings of a run whose files do not say them."""
    row: dict[str, Any] = dict.fromkeys(columns())
    row["run_dir"] = _relative(run_dir, root)
    notes: list[str] = []
    summary = _read_dict(run_dir / results.SUMMARY, notes)
    if summary is not None:
        _fill_config(row, summary.get("config"), notes)
        _fill_summary(row, summary, notes)
        _fill_measurements(row, run_dir, results.json_object(summary.get("lambda_max")), notes)
        _check_sweep_settings(row, summary, config, notes)
        if (run_dir / FAILURE).exists():  # a sweep removes it when the run succeeds: a later attempt failed
            failure = _read_dict(run_dir / FAILURE, notes) or {}
            notes.append(f"the sweep's last attempt failed: {failure.get('error') or 'no error message recorded'}")
    else:
        failure = _read_dict(run_dir / FAILURE, notes)
        state = _read_checkpoint(run_dir, notes)
        _fill_config(row, (failure or {}).get("config") or (state or {}).get("config"), notes)
        if state is not None:
            row["epochs"], row["steps"] = state.get("epoch"), state.get("step")
        if (run_dir / results.SUMMARY).exists():
            row["status"] = "unreadable"
        elif failure is not None:
            row["status"] = "failed"
            notes.append(f"failed: {failure.get('error') or 'no error message recorded'}")
        elif run_dir.is_dir() and any((run_dir / n).exists() for n in (results.CHECKPOINT, results.CHECKPOINT_PREV)):
            row["status"] = "running" if results.lock_held(run_dir) else "interrupted"
            notes.append("no summary.json yet" + ("" if row["status"] == "running" else
                                                  ": run the same command (or the sweep) again to resume"))
        else:
            row["status"] = "pending"
            notes.append("not started")
    if row["dataset"] is None and config is not None:
        _fill_config(row, config)
    if row["dataset"] is None and row["status"] != "pending" and not any(
            n.startswith("settings unknown") for n in notes):
        notes.append("settings unknown (no readable summary.json, checkpoint or failure record)")
    if row["two_over_lr"] is None and finite(row["lr"]) and row["lr"] > 0:
        row["two_over_lr"] = 2.0 / row["lr"]
    row["note"] = "; ".join(notes) or None
    return Run(Path(run_dir), row)


def collect(run_dirs: Iterable[Path], root: Path, configs: list[dict] | None = None) -> list[Run]:
    """One `Run` per directory (with the sweep file's settings of each, when given)."""
    dirs = list(run_dirs)
    return [read_run(Path(d), Path(root), c) for d, c in zip(dirs, configs or [None] * len(dirs))]


def runs_dataframe(root: Path) -> pd.DataFrame:
    """Every run under `root` as a pandas DataFrame with the columns of runs.csv."""
    try:
        import pandas as pd
    except ImportError:
        raise SharpnessError("results.load needs pandas: pip install 'sharpness[notebook]'") from None
    root = Path(root)
    if not root.is_dir():
        raise SharpnessError(f"no such results folder: {root}")
    return pd.DataFrame([r.row for r in collect(find_run_dirs(root), root)], columns=columns())


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _read_dict(path: Path, notes: list[str]) -> dict | None:
    if not path.exists():
        return None
    try:
        data = results.read_json(path)
    except SharpnessError as exc:
        notes.append(str(exc))
        return None
    if not isinstance(data, dict):
        notes.append(f"cannot read {path}: not a JSON object")
        return None
    return data


def _read_checkpoint(run_dir: Path, notes: list[str]) -> dict | None:
    for name in (results.CHECKPOINT, results.CHECKPOINT_PREV):
        if (run_dir / name).exists():
            try:
                state = results.safe_torch_load(run_dir / name)
            except SharpnessError as exc:
                notes.append(str(exc))
                continue
            if isinstance(state, dict):
                return state
    return None


def _fill_config(row: dict, config: Any, notes: list[str] | None = None) -> None:
    """The run's settings from a recorded config; one that is not a valid run's is a note instead."""
    from .train import config_fields

    if config is None:
        return
    problem = _config_problem(config)
    if problem is not None:
        if notes is not None:
            notes.append(f"settings unknown: the recorded config is not a valid run's ({problem})")
        return
    for k in config_fields():
        row[k] = config.get(k)


def _config_problem(config: Any) -> str | None:
    """What makes a recorded config unusable (wrong types, impossible values), or None."""
    from .sweep import _coerce
    from .train import RunConfig, config_fields

    if not isinstance(config, dict):
        return "not a JSON object"

    def fail(message: str):
        raise SharpnessError(message)

    known = {k: v for k, v in config.items() if k in config_fields()}
    try:
        for k, v in known.items():
            if not (k == "max_epochs" and v is None):
                _coerce(k, v, "config", fail)
        RunConfig(**known).validate()
    except TypeError as exc:  # a required setting is missing
        return str(exc).split(".__init__() ")[-1]
    except SharpnessError as exc:
        return str(exc)
    return None


def _check_sweep_settings(row: dict, summary: dict, config: dict | None, notes: list[str]) -> None:
    """A finished run whose λmax settings differ from what the sweep file asks is 'remeasure'."""
    from .train import remeasure_fields

    if config is None:
        return
    diff = remeasure_fields(summary, config)
    stored = results.json_object(summary.get("config"))
    if diff:
        row["status"] = "remeasure"
        notes.append("λmax was measured with " + ", ".join(f"{k}={stored.get(k)}" for k in diff)
                     + "; the sweep file asks " + ", ".join(f"{k}={config.get(k)}" for k in diff)
                     + ": run the sweep again to measure it again")


def _fill_summary(row: dict, summary: dict, notes: list[str]) -> None:
    status = summary.get("status")
    row["status"] = status if isinstance(status, str) and status else "unknown"
    row["epochs"], row["steps"] = (_integer(summary.get(k)) for k in ("epochs", "steps"))
    final = results.json_object(summary.get("final"))
    for k in results.METRIC_NAMES:
        row[k] = _number(final.get(k))
    if row["train_acc"] is not None and row["test_acc"] is not None:
        row["gap_acc"] = row["train_acc"] - row["test_acc"]
    if row["train_loss"] is not None and row["test_loss"] is not None:
        row["gap_loss"] = row["test_loss"] - row["train_loss"]
    lam = results.json_object(summary.get("lambda_max"))
    row["lambda_max"] = _number(lam.get("value"))
    row["lambda_max_residual"] = _number(lam.get("residual"))
    row["lambda_max_converged"] = lam.get("converged")
    row["lambda_max_repeats"] = 1 if row["lambda_max"] is not None else None
    row["two_over_lr"] = _number(summary.get("two_over_lr"))
    row["wall_time_s"] = _number(summary.get("wall_time_s"))
    if row["status"] == "diverged":
        at = results.json_object(summary.get("diverged_at"))
        notes.append(f"diverged at epoch {at.get('epoch')}, step {at.get('step')}")
    elif row["status"] == "max_epochs":
        notes.append(f"stopped at max_epochs={row['max_epochs']} before train accuracy reached {row['acc_goal']}")
    if lam and lam.get("converged") is False:
        notes.append("λmax did not reach its residual tolerance")


PROTOCOL_KEYS = ("mode", "dropout", "abridged_size")  # what a repeated λmax must share with the run's λmax


def _fill_measurements(row: dict, run_dir: Path, lam: dict, notes: list[str]) -> None:
    data = _read_dict(run_dir / results.MEASUREMENTS, notes)
    records = data.get("measurements") if data is not None else []
    records = [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []
    repeated = [r for r in records if r.get("what") == "lambda_max" and _number(r.get("repeats")) is not None
                and r["repeats"] > 1]
    # a mean over subsets stands next to lambda_max only when it measures the same quantity
    same = [r for r in repeated if not lam.get("between_iterates")
            and all(r.get(k) == lam.get(k) for k in PROTOCOL_KEYS)]
    if repeated and not same:
        r = repeated[-1]
        why = ("the run's λmax is the between-iterates maximum" if lam.get("between_iterates") else
               ", ".join(f"{k} {r.get(k)} vs {lam.get(k)}" for k in PROTOCOL_KEYS if r.get(k) != lam.get(k)))
        notes.append(f"a repeated λmax in {results.MEASUREMENTS} uses another protocol ({why}): "
                     "not in lambda_max_mean")
    if same:
        r = same[-1]
        row["lambda_max_repeats"] = r.get("repeats")
        row["lambda_max_mean"], row["lambda_max_stderr"] = _number(r.get("value")), _number(r.get("stderr"))
    traces = [r for r in records if r.get("what") == "trace"]
    if traces:
        row["trace"], row["trace_stderr"] = _number(traces[-1].get("value")), _number(traces[-1].get("stderr"))


def _integer(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _number(x: Any) -> float | None:
    value = results.json_number(x)
    return None if value is None else float(value)


# -- runs left out of the figures ---------------------------------------------------------------

def duplicates(rows: list[dict]) -> dict[str, str]:
    """Usable runs with the same settings and seeds as an earlier one (they differ only in max_epochs,
    eig_freq or save_freq, which do not change a final model, or in physical_batch_size without
    BatchNorm): run_dir -> the run_dir that is kept."""
    kept: dict[tuple, str] = {}
    out = {}
    for r in sorted((r for r in rows if usable(r)), key=lambda r: r["run_dir"]):
        key = (panel_key(r), opt_label(r), r["batch_size"], r["lr"], r["network_seed"], r["train_seed"])
        if key in kept:
            out[r["run_dir"]] = kept[key]
        else:
            kept[key] = r["run_dir"]
    return out


def left_out_reason(row: dict) -> str:
    """Why a run is not in the figures."""
    if row["status"] in LEFT_OUT_REASON:
        return LEFT_OUT_REASON[row["status"]]
    if row["status"] == "done":
        return "no λmax or final metrics" if row["dataset"] is not None else "settings unknown"
    return f"status {row['status']}"


# -- report.md ----------------------------------------------------------------------------------

def _embed(rel: str, title: str) -> str:
    return f"[{title} ({rel})]({rel})" if rel.endswith(".pdf") else f"![{title}]({rel})"


def _section_md(s: Section, table_first: bool) -> list[str]:
    """The lines of one figure section: title, figures and table (in either order), notes."""
    figs = [_embed(f, s.title) for f in s.files]
    body = [s.table, ""] + figs if table_first else figs + ["", s.table]
    return [f"### {s.title}", ""] + body + [""] + [f"- {n}" for n in s.notes] + ([""] if s.notes else [])


def render(source: str, runs: list[Run], left_out: list[dict], skipped: list[str], taus: list[dict],
           tau_notes: list[str], finds: list[dict], figures: list[tuple[str, str, list[Section]]],
           per_run: list[Section]) -> str:
    """The text of report.md."""
    from . import __version__

    counts = group_by(runs, lambda r: r.row["status"])
    out = [f"# Sharpness report: {source}", "",
           f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} by sharpness {__version__}. "
           f"{len(runs)} runs: " + ", ".join(f"{len(v)} {k}" for k, v in sorted(counts.items())) + ".",
           "Every run is one row of [runs.csv](runs.csv); the numbers below are also in [stats.json](stats.json).",
           "Figures use runs that reached the accuracy goal (status done) and have a λmax; runs that differ "
           "only in seeds are averaged (mean ± standard error). Generalization gap = train accuracy − test "
           "accuracy. Colour = batch size, marker = optimizer, in every figure.", ""]
    if left_out:
        out += ["## Runs left out of the figures", "",
                md_table(["run", "status", "why", "note"],
                         [[d["run_dir"], d["status"], d["reason"], d["note"] or ""] for d in left_out]), ""]
    if skipped:
        out += ["## Figures not drawn", ""] + [f"- {s}" for s in skipped] + [""]
    out += ["## Kendall's τ between λmax and generalization", "",
            "Kendall's tau-b with its two-sided p-value (scipy.stats.kendalltau) over individual runs "
            "(not seed means): all runs, then each setting (dataset, architecture, λmax protocol), and "
            "within a setting each batch size and each optimizer. Only the first row pools settings whose "
            "λmax scales may differ: read the per-setting rows.", ""]
    out.append(md_table(["runs", "n", "τ(λmax, test acc)", "p", "τ(λmax, train − test acc)", "p"],
                        [[e["group"], str(e["n"]), fmt_tau(e["lambda_max_vs_test_acc"]["tau"]),
                          fmt_p(e["lambda_max_vs_test_acc"]["p_value"]), fmt_tau(e["lambda_max_vs_gap_acc"]["tau"]),
                          fmt_p(e["lambda_max_vs_gap_acc"]["p_value"])] for e in taus]) if taus else
               "No group has enough runs.")
    out += [""] + [f"- skipped: {n}" for n in tau_notes] + [""]
    out += ["## The paper's findings in this results folder", "",
            "Each comparison is checked on seed means with the rule next to it; 'not enough runs' means this "
            "folder has no runs that the rule can use.", ""]
    for f in finds:
        out += [f"### Finding {f['finding']}: {f['verdict']}", "", f"> {f['claim']}", ""]
        for p in f["parts"]:
            out += [f"- **{p['comparison']}**: {p['verdict']}", f"  - rule: {p['rule']}"]
            out += [f"  - {n}" for n in p["numbers"]]
        out.append("")
    for title, about, sections in figures:
        if not sections:
            continue
        out += [f"## {title}", "", about, ""]
        for s in sections:
            out += _section_md(s, table_first=False)
    if per_run:
        out += ["## 7. Training curves of each run", "",
                "Loss and accuracy at the start of every epoch (eval mode); with `--eig_freq`, λmax over "
                "optimisation steps against 2/η.", ""]
        for s in per_run:
            out += _section_md(s, table_first=True)
    return "\n".join(out).rstrip() + "\n"


# -- the whole report ---------------------------------------------------------------------------

def resolve_source(source: Path) -> tuple[list[Path], list[dict] | None, Path, Path]:
    """(run directories, their settings when known, root that run_dir is relative to, default output
    folder) of a results folder or a sweep file."""
    if source.suffix == ".toml" or source.is_file():
        if not source.is_file():
            raise SharpnessError(f"sweep file not found: {source}")
        from .sweep import load_sweep, sweep_run_dirs

        configs, root = load_sweep(source)
        return ([Path(d) for d in sweep_run_dirs(source)], [c.identity() for c in configs], Path(root),
                Path(root) / "reports" / source.stem)
    if not source.is_dir():
        raise SharpnessError(f"no such results folder or sweep file: {source}")
    return find_run_dirs(source), None, source, source / "report"


def build_report(source: Path, out: Path | None = None, fmt: str = "png",
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Write runs.csv, the figures, stats.json and report.md for a results folder or sweep file; return the stats."""
    if fmt not in FORMATS:
        raise SharpnessError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    source = Path(source)
    run_dirs, configs, root, default_out = resolve_source(source)
    if not run_dirs:
        raise SharpnessError(f"no runs in {source} (no summary.json, checkpoint or {FAILURE} found)")
    out = Path(out) if out is not None else default_out
    runs = collect(run_dirs, root, configs)
    rows = [r.row for r in runs]
    results.atomic_write_csv(out / "runs.csv", rows)

    dup = duplicates(rows)
    left_out = [{"run_dir": r["run_dir"], "status": r["status"], "reason": left_out_reason(r), "note": r["note"]}
                for r in rows if not usable(r)]
    left_out += [{"run_dir": d, "status": "done", "reason": f"same settings and seeds as {k}: counted once",
                  "note": None} for d, k in dup.items()]
    fig_rows = [r for r in rows if usable(r) and r["run_dir"] not in dup]
    import matplotlib

    colors, markers = encodings(rows)
    cv = Canvas(out, fmt, colors, markers)
    cells = make_cells(fig_rows)
    draw = (lambda: fig_vs_lr(cv, cells, "lambda"), lambda: fig_vs_lr(cv, cells, "acc"),
            lambda: fig_scatter(cv, fig_rows), lambda: fig_sam(cv, cells), lambda: fig_dropout(cv, cells),
            lambda: fig_bn(cv, cells))
    with matplotlib.rc_context(RC):
        figures = [(title, about, fn()) for (title, about), fn in zip(FIGURE_TEXT, draw)]
        per_run = [s for s in (fig_run(cv, r.dir, r.row) for r in runs) if s is not None]
    taus, tau_notes = kendall_stats(fig_rows)
    finds = findings(cells)

    files = [f for _, _, ss in figures for s in ss for f in s.files] + [f for s in per_run for f in s.files]
    stats = {"source": str(source), "runs": len(rows),
             "status_counts": {k: len(v) for k, v in sorted(group_by(rows, lambda r: r["status"]).items())},
             "runs_in_figures": len(fig_rows), "left_out": left_out,
             "kendall": taus, "kendall_skipped": tau_notes, "findings": finds,
             "figures": files, "figures_skipped": cv.skipped,
             "rules": {"acc_tolerance": ACC_TOL, "lambda_change": LAMBDA_CHANGE, "high_dropout": HIGH_DROPOUT,
                       "min_runs_for_tau": MIN_TAU_RUNS}}
    results.atomic_write_json(out / "stats.json", stats)
    results.atomic_write_text(out / "report.md", render(str(source), runs, left_out, cv.skipped, taus, tau_notes,
                                                        finds, figures, per_run))
    counts = ", ".join(f"{v} {k}" for k, v in stats["status_counts"].items())
    log(f"{len(rows)} runs ({counts}); {stats['runs_in_figures']} in the figures")
    for d in left_out:
        log(f"left out of the figures: {d['run_dir']} ({d['reason']}" + (f"; {d['note']})" if d["note"] else ")"))
    for line in cv.skipped:
        log(f"skipped {line}")
    for f in finds:
        log(f"finding {f['finding']}: {f['verdict']}")
    log(f"wrote runs.csv, stats.json, {len(files)} figures and report.md to {out}")
    return stats
