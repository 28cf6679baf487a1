"""Figures of a report: the paper's figures 1-6 from seed-averaged cells and figure 7 for each run.

Every `fig_*` function draws one kind of figure per group, saves it through a `Canvas` (output folder,
format, one colour per batch size and one marker per optimizer for every figure) and returns the
`Section`s report.md shows: the figure files, a Markdown table of the numbers drawn, and notes.
A figure that cannot be drawn is recorded with `Canvas.skip`, with the reason.
matplotlib is imported only inside the functions that draw; figures never use pyplot.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import results
from .findings import (MIN_TAU_RUNS, Cell, between, bn_base, bn_setting, bn_twin, dropout_p, finite, fmt_p,
                       fmt_pct, fmt_tau, group_by, kendall, opt_label, opt_order, panel_key, panel_title, usable,
                       without)

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B")
MARKERS = ("o", "^", "s", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "figure.titlesize": 11,
      "svg.hashsalt": "sharpness"}  # reproducible SVG ids
NO_USABLE_RUN = "no run reached the accuracy goal with a λmax"
FIGURE_TEXT = (
    ("1. λmax vs learning rate", "λmax of the final network against the learning rate, one line per batch size, "
     "with the 2/η line (edge of stability). One figure per dataset, architecture and setting; one panel per optimizer."),
    ("2. Test accuracy vs learning rate", "Same encoding as figure 1."),
    ("3. Accuracy and generalization gap vs λmax", "Every run as a point; the table gives Kendall's τ in this group."),
    ("4. SGD vs SAM", "λmax and test accuracy against batch size; a row per learning rate where both optimizers ran."),
    ("5. Dropout", "λmax and test accuracy against the dropout rate p of the mlp_p=... architectures."),
    ("6. BatchNorm", "λmax and test accuracy against learning rate, with (solid lines, filled markers) and "
     "without (dashed lines, open markers) BatchNorm."),
)


@dataclass
class Section:
    """One figure (or a set of them) in report.md with its table and notes."""

    title: str
    files: list[str]
    table: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Canvas:
    """Where and how figures are written, the shared colour and marker encodings, and what was skipped."""

    out: Path
    fmt: str
    colors: dict
    markers: dict
    skipped: list[str] = field(default_factory=list)

    def save(self, fig, name: str) -> str:
        """Write a figure atomically; return its path relative to the report folder."""
        buf = io.BytesIO()
        meta = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(self.fmt, {})
        fig.savefig(buf, format=self.fmt, dpi=150, bbox_inches="tight", metadata=meta)
        rel = f"figures/{name}.{self.fmt}"
        results.atomic_write_bytes(self.out / rel, buf.getvalue())
        return rel

    def skip(self, line: str) -> None:
        """Remember a figure that was not drawn, and why."""
        self.skipped.append(line)


def encodings(rows: list[dict]) -> tuple[dict, dict]:
    """One colour per batch size and one marker per optimizer, for every figure."""
    sizes = sorted({int(r["batch_size"]) for r in rows if r["batch_size"] is not None})
    if len(sizes) <= len(PALETTE):
        colors = {bs: PALETTE[i] for i, bs in enumerate(sizes)}
    else:
        import matplotlib

        cmap = matplotlib.colormaps["viridis"]
        colors = {bs: cmap(i / (len(sizes) - 1)) for i, bs in enumerate(sizes)}
    sams = sorted({opt_label(r) for r in rows if r["opt"] is not None} - {"SGD"})
    return colors, {"SGD": MARKERS[0], **{o: MARKERS[1 + i % (len(MARKERS) - 1)] for i, o in enumerate(sams)}}


# -- tables -------------------------------------------------------------------------------------

def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def fmt_or_dash(x: Any, f: Callable[[float], str]) -> str:
    """`f(x)` for a finite number, else a dash."""
    return f(x) if finite(x) else "—"


def _pm(mean: float, se: float | None, fmt: Callable[[float], str], se_fmt: Callable[[float], str] | None = None) -> str:
    return fmt(mean) if se is None else f"{fmt(mean)} ± {(se_fmt or fmt)(se)}"


LAM_COL = ("λmax", lambda c: _pm(c.lam, c.lam_se, lambda v: f"{v:.4g}", lambda v: f"{v:.2g}"))
ACC_COL = ("test accuracy", lambda c: _pm(c.acc, c.acc_se, fmt_pct))
GAP_COL = ("train − test accuracy", lambda c: _pm(c.gap, c.gap_se, lambda v: f"{100 * v:.1f} pt"))
BASE_COLS = [("optimizer", lambda c: c.opt), ("batch size", lambda c: str(c.bs)), ("η", lambda c: f"{c.lr:g}")]
N_COL = ("runs (seeds)", lambda c: str(c.n))
LAM_ACC_N_COLS = [LAM_COL, ACC_COL, N_COL]


def _cell_section(title: str, file: str, cells_: list[Cell], cols: list[tuple[str, Callable[[Cell], str]]]) -> Section:
    """A figure's section: its file, a table of the cells it shows, and how error bars are made."""
    n = max((c.n for c in cells_), default=1)
    notes = ["error bars: standard error over seeds; points are seed means"] if n > 1 else []
    return Section(title, [file], md_table([h for h, _ in cols], [[f(c) for _, f in cols] for c in cells_]), notes)


# -- drawing helpers ----------------------------------------------------------------------------

def _subplots(nrows: int, ncols: int, figsize: tuple[float, float], **kw):
    """A figure and its axes, without pyplot: no global state, no GUI (PNG is drawn by Agg)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def _legend(fig, axes, extra: list | None = None) -> None:
    """One legend for the whole figure, below the panels."""
    seen: dict = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    for h in extra or []:
        seen.setdefault(h.get_label(), h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(4, len(seen)), frameon=False)


def _finish(cv: Canvas, fig, title: str, name: str, axes=(), handles: list | None = None) -> str:
    """Title, layout and the shared legend (from `axes` and `handles`); save and return the file."""
    fig.suptitle(title)
    fig.tight_layout()
    _legend(fig, axes, handles)
    return cv.save(fig, name)


def _bs_handles(cv: Canvas, sizes) -> list:
    """Legend entries: one colour per batch size."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=cv.colors[bs], marker="o", ls="", label=f"batch size {bs}") for bs in sizes]


def _errorbar(ax, x, cells_, value: str, scale: float, **kw) -> None:
    y = [getattr(c, value) * scale for c in cells_]
    se = [(getattr(c, value + "_se") or 0.0) * scale for c in cells_]
    ax.errorbar(x, y, yerr=se if any(se) else None, capsize=3, lw=1.5, ms=5, **kw)


def _label(ax, xlabel: str, ylabel: str) -> None:
    """Axis labels and a light grid."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _log_axis(ax, axis: str, values: list[float], always: bool = False) -> bool:
    """Log scale with plain tick labels when the values are positive and span >= 3x (or `always`)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    vals = sorted({v for v in values if finite(v)})
    if not vals or vals[0] <= 0 or (not always and vals[-1] / vals[0] < 3):
        return False
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    a = ax.xaxis if axis == "x" else ax.yaxis
    subs = (1.0, 2.0, 3.0, 5.0) if vals[-1] / vals[0] >= 10 else (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
    fixed = always and len(vals) <= 8
    a.set_major_locator(FixedLocator(vals) if fixed else LogLocator(10, subs=subs))
    shown = _spaced(vals) if fixed else None  # ticks at every value, labels only where they fit
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if shown is None or v in shown else ""))
    a.set_minor_formatter(NullFormatter())
    return True


def _spaced(vals: list[float], fraction: float = 0.1) -> set[float]:
    """The values to label on a log axis: each at least `fraction` of the axis span from the last."""
    import math

    span = math.log(vals[-1] / vals[0]) or 1.0
    kept = [vals[0]]
    for v in vals[1:]:
        if math.log(v / kept[-1]) >= fraction * span:
            kept.append(v)
    if vals[-1] not in kept:  # the largest value is always labelled; drop its crowded neighbour
        if len(kept) > 1 and math.log(vals[-1] / kept[-1]) < fraction * span:
            kept.pop()
        kept.append(vals[-1])
    return set(kept)


def _log_label(text: str, log: bool) -> str:
    return f"{text} (log scale)" if log else text


def slug(text: str) -> str:
    """A file-name-safe version of `text`."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_.") or "run"  # never hidden, never ".."


# -- figures 1-6 --------------------------------------------------------------------------------

def fig_vs_lr(cv: Canvas, cells: list[Cell], which: str) -> list[Section]:
    """Figures 1 and 2: λmax (with 2/η) or test accuracy vs learning rate; a line per batch size, a panel per optimizer."""
    number, name = (1, "lambda_vs_lr") if which == "lambda" else (2, "test_acc_vs_lr")
    sections = []
    for panel, group in group_by(cells, lambda c: c.panel).items():
        lines = group_by(group, lambda c: (c.opt, c.bs))
        if max(len(v) for v in lines.values()) < 2:
            cv.skip(f"figure {number} ({name}) for {panel_title(panel)}: needs >= 2 learning rates at one batch "
                    f"size and optimizer (has {len({c.lr for c in group})} learning rate(s))")
            continue
        opts = sorted({c.opt for c in group}, key=opt_order)
        fig, axes = _subplots(1, len(opts), figsize=(max(6.0, 4.3 * len(opts)), 3.6), sharex=True, sharey=True,
                              squeeze=False)
        for ax, opt in zip(axes[0], opts):
            for (o, bs), line in sorted(lines.items(), key=lambda t: t[0][1]):
                if o == opt:
                    _errorbar(ax, [c.lr for c in line], line, "lam" if which == "lambda" else "acc",
                              1.0 if which == "lambda" else 100.0, color=cv.colors[bs], marker=cv.markers[opt],
                              label=f"batch size {bs}")
            lrs = sorted({c.lr for c in group})
            log_y = False
            if which == "lambda":
                ax.plot(lrs, [2 / x for x in lrs], "k--", lw=1, label="2/η (stability threshold)")
                log_y = _log_axis(ax, "y", [c.lam for c in group] + [2 / x for x in lrs])
            _log_axis(ax, "x", lrs, always=True)
            ax.set_xlim(lrs[0] / 1.3, lrs[-1] * 1.3)
            ax.set_xlabel("learning rate η (log scale)")
            ax.set_title(opt)
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel(_log_label("λmax", log_y) + "\n(largest Hessian eigenvalue of the training loss)"
                              if which == "lambda" else "test accuracy (%)")
        what = "λmax" if which == "lambda" else "Test accuracy"
        f = _finish(cv, fig, f"{what} vs learning rate — {panel_title(panel)}",
                    f"{number}_{name}-{slug(panel_title(panel))}", axes[0])
        cols = BASE_COLS + ([LAM_COL, ("2/η", lambda c: f"{2 / c.lr:.4g}")] if which == "lambda" else [ACC_COL, GAP_COL])
        sections.append(_cell_section(panel_title(panel), f, group, cols + [N_COL]))
    if not cells:
        cv.skip(f"figure {number} ({name}): {NO_USABLE_RUN}")
    return sections


def fig_scatter(cv: Canvas, rows: list[dict]) -> list[Section]:
    """Figure 3: test accuracy and accuracy gap vs λmax, every run; colour = batch size, marker = optimizer."""
    from matplotlib.lines import Line2D

    sections = []
    use = [r for r in rows if usable(r)]
    for panel, g in group_by(use, lambda r: without(panel_key(r), "opt")).items():
        title = panel_title(panel)
        if len(g) < MIN_TAU_RUNS:
            cv.skip(f"figure 3 (accuracy vs λmax) for {title}: {len(g)} run(s), needs >= {MIN_TAU_RUNS}")
            continue
        fig, axes = _subplots(1, 2, figsize=(9, 3.6))
        for (bs, opt), pts in sorted(group_by(g, lambda r: (int(r["batch_size"]), opt_label(r))).items()):
            for ax, key in zip(axes, ("test_acc", "gap_acc")):
                ax.scatter([r["lambda_max"] for r in pts], [100 * r[key] for r in pts], color=cv.colors[bs],
                           marker=cv.markers[opt], s=36, edgecolors="black", linewidths=0.4)
        for ax, ylabel in zip(axes, ("test accuracy (%)", "generalization gap:\ntrain − test accuracy (points)")):
            log_x = _log_axis(ax, "x", [r["lambda_max"] for r in g])
            _label(ax, _log_label("λmax", log_x), ylabel)
        handles = _bs_handles(cv, sorted({int(r["batch_size"]) for r in g}))
        handles += [Line2D([], [], color="0.45", marker=cv.markers[o], ls="", label=o)
                    for o in sorted({opt_label(r) for r in g}, key=opt_order)]
        f = _finish(cv, fig, f"Accuracy vs λmax, every run — {title}", f"3_acc_vs_lambda-{slug(title)}", (), handles)
        lam = [r["lambda_max"] for r in g]
        trs = [(y, *kendall(lam, [r[k] for r in g]))
               for y, k in (("test accuracy", "test_acc"), ("train − test accuracy", "gap_acc"))]
        table = md_table(["λmax against", "runs", "Kendall τ", "p-value"],
                         [[y, str(len(g)), fmt_tau(t), fmt_p(p)] for y, t, p in trs])
        sections.append(Section(title, [f], table))
    if not use:
        cv.skip(f"figure 3 (accuracy vs λmax): {NO_USABLE_RUN}")
    return sections


def fig_sam(cv: Canvas, cells: list[Cell]) -> list[Section]:
    """Figure 4: SGD vs SAM, λmax and test accuracy vs batch size; a row per learning rate."""
    from matplotlib.lines import Line2D

    sections = []
    for panel, group in group_by(cells, lambda c: c.panel).items():
        opts = sorted({c.opt for c in group}, key=opt_order)
        if "SGD" not in opts or len(opts) < 2:
            continue
        by = {(c.opt, c.bs, c.lr): c for c in group}
        rows_ = []
        for lr in sorted({c.lr for c in group}):
            sizes = sorted({c.bs for c in group if c.lr == lr and ("SGD", c.bs, lr) in by
                            and any((o, c.bs, lr) in by for o in opts[1:])})
            if len(sizes) >= 2:
                rows_.append((lr, sizes))
        title = panel_title(panel)
        if not rows_:
            cv.skip(f"figure 4 (SGD vs SAM) for {title}: needs SGD and SAM runs at the same learning rate "
                    "for >= 2 batch sizes")
            continue
        fig, axes = _subplots(len(rows_), 2, figsize=(9, 3.2 * len(rows_) + 0.4), squeeze=False)
        used = []
        for (lr, sizes), (ax_l, ax_a) in zip(rows_, axes):
            for i, opt in enumerate(opts):
                line = [by[(opt, bs, lr)] for bs in sizes if (opt, bs, lr) in by]
                if not line:
                    continue
                used.append(opt)
                for ax, value, scale in ((ax_l, "lam", 1.0), (ax_a, "acc", 100.0)):
                    ax.plot([c.bs for c in line], [getattr(c, value) * scale for c in line], color="0.35",
                            ls=LINESTYLES[i % len(LINESTYLES)], lw=1.2, zorder=1)
                    for c in line:
                        _errorbar(ax, [c.bs], [c], value, scale, color=cv.colors[c.bs], marker=cv.markers[opt],
                                  mec="black", mew=0.4)
            for ax, ylabel in ((ax_l, "λmax"), (ax_a, "test accuracy (%)")):
                ax.set_xscale("log", base=2)
                ax.set_xticks(sizes, [str(b) for b in sizes])
                ax.minorticks_off()
                ax.set_title(f"η = {lr:g}")
                _label(ax, "batch size (log scale)", ylabel)
        handles = [Line2D([], [], color="0.35", marker=cv.markers[o], ls=LINESTYLES[i % len(LINESTYLES)], label=o)
                   for i, o in enumerate(opts) if o in used]
        handles += _bs_handles(cv, sorted({b for _, s in rows_ for b in s}))
        f = _finish(cv, fig, f"SGD vs SAM across batch sizes — {title}", f"4_sgd_vs_sam-{slug(title)}", (), handles)
        shown = [c for c in group if any(c.lr == lr and c.bs in s for lr, s in rows_)]
        sections.append(_cell_section(title, f, shown, BASE_COLS + LAM_ACC_N_COLS))
    if not sections and not any(line.startswith("figure 4") for line in cv.skipped):
        cv.skip("figure 4 (SGD vs SAM): no setting has both SGD and SAM runs that reached the accuracy goal")
    return sections


def fig_dropout(cv: Canvas, cells: list[Cell]) -> list[Section]:
    """Figure 5: λmax and test accuracy vs dropout rate p (mlp_p=... architectures); a line per batch size and η."""
    sections = []
    drop = [c for c in cells if dropout_p(c.arch) is not None]
    for (panel, opt), group in group_by(drop, lambda c: (without(c.panel, "arch_id"), c.opt)).items():
        lines = {k: sorted(v, key=lambda c: dropout_p(c.arch))
                 for k, v in group_by(group, lambda c: (c.bs, c.lr)).items() if len(v) >= 2}
        title = f"{panel_title(panel)} · {opt}"
        if len({c.arch for c in group}) < 2:
            continue
        if not lines:
            cv.skip(f"figure 5 (dropout) for {title}: the dropout rates were run at different batch sizes or "
                    "learning rates; needs >= 2 rates at the same batch size and learning rate")
            continue
        lrs = sorted({lr for _, lr in lines})
        fig, axes = _subplots(1, 2, figsize=(9, 3.6))
        for (bs, lr), line in sorted(lines.items()):
            ps = [dropout_p(c.arch) for c in line]
            ls = LINESTYLES[lrs.index(lr) % len(LINESTYLES)]
            label = f"batch size {bs}" + (f", η={lr:g}" if len(lrs) > 1 else "")
            for ax, value, scale in ((axes[0], "lam", 1.0), (axes[1], "acc", 100.0)):
                _errorbar(ax, ps, line, value, scale, color=cv.colors[bs], marker=cv.markers[opt], ls=ls, label=label)
        for ax, ylabel in zip(axes, ("λmax", "test accuracy (%)")):
            _label(ax, "dropout rate p", ylabel)
        f = _finish(cv, fig, f"Dropout — {title}" + (f", η = {lrs[0]:g}" if len(lrs) == 1 else ""),
                    f"5_dropout-{slug(title)}", axes[:1])
        shown = [c for v in lines.values() for c in v]
        cols = [("p", lambda c: f"{dropout_p(c.arch):g}")] + BASE_COLS[1:] + LAM_ACC_N_COLS
        sections.append(_cell_section(title, f, shown, cols))
    if not sections and not any(line.startswith("figure 5") for line in cv.skipped):
        cv.skip("figure 5 (dropout): no setting has runs at >= 2 dropout rates (mlp_p=...) that reached the "
                "accuracy goal")
    return sections


def fig_bn(cv: Canvas, cells: list[Cell]) -> list[Section]:
    """Figure 6: with vs without BatchNorm, λmax and test accuracy vs learning rate; colour = batch size."""
    sections = []
    bn = [c for c in cells if bn_base(c.arch)]
    for (setting, arch, opt), group in group_by(bn, lambda c: (bn_setting(c.panel), c.arch, c.opt)).items():
        base = bn_base(arch)
        plain = [c for c in cells if bn_setting(c.panel) == setting and c.arch == base and c.opt == opt]
        title = f"{panel_title(setting)} · {arch} vs {base} · {opt}"
        if not any(bn_twin(c, cells) for c in group):
            cv.skip(f"figure 6 (BatchNorm) for {title}: no run of {base} at the same batch size and learning rate")
            continue
        fig, axes = _subplots(1, 2, figsize=(9, 3.6))
        for variant, cs, ls, face in (("BN", group, "-", None), ("no BN", plain, "--", "white")):
            for bs, line in sorted(group_by(cs, lambda c: c.bs).items()):
                line = sorted(line, key=lambda c: c.lr)
                for ax, value, scale in ((axes[0], "lam", 1.0), (axes[1], "acc", 100.0)):
                    _errorbar(ax, [c.lr for c in line], line, value, scale, color=cv.colors[bs],
                              marker=cv.markers[opt], mfc=face or cv.colors[bs], ls=ls,
                              label=f"batch size {bs}, {variant}")
        log_y = _log_axis(axes[0], "y", [c.lam for c in group + plain])
        for ax, ylabel in zip(axes, (_log_label("λmax", log_y), "test accuracy (%)")):
            _log_axis(ax, "x", [c.lr for c in group + plain], always=True)
            _label(ax, "learning rate η (log scale)", ylabel)
        f = _finish(cv, fig, f"BatchNorm — {title}", f"6_batchnorm-{slug(title)}", axes[:1])
        cols = ([("arch", lambda c: c.arch)] + BASE_COLS[1:]
                + [("λmax at", lambda c: "between iterates" if between(c) else "final iterate")] + LAM_ACC_N_COLS)
        sections.append(_cell_section(title, f, group + plain, cols))
    if not bn:
        cv.skip("figure 6 (BatchNorm): no run of a BatchNorm architecture (e.g. vgg11_bn_no_dropout) reached "
                "the accuracy goal")
    return sections


# -- figure 7: one run --------------------------------------------------------------------------

def read_table(path: Path) -> list[dict[str, float]] | None:
    """A numeric CSV (metrics.csv, eigs.csv) as rows of floats; None when missing or unreadable."""
    try:
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    except (OSError, ValueError, TypeError):
        return None
    return rows or None


def fig_run(cv: Canvas, run_dir: Path, row: dict) -> Section | None:
    """Figure 7: one run's loss and accuracy per epoch and, with eigs.csv, λmax over steps against 2/η."""
    from matplotlib.ticker import MaxNLocator

    if row["status"] == "pending":
        return None
    metrics = read_table(run_dir / results.METRICS_CSV)
    if metrics is None:
        if row["status"] in ("done", "max_epochs", "diverged") or (run_dir / results.METRICS_CSV).exists():
            cv.skip(f"figure 7 (training curves) for {row['run_dir']}: metrics.csv missing or unreadable")
        return None
    eigs = read_table(run_dir / results.EIGS_CSV) if (run_dir / results.EIGS_CSV).exists() else None
    color = cv.colors.get(int(row["batch_size"])) if row["batch_size"] is not None else None
    fig, axes = _subplots(1, 3 if eigs else 2, figsize=(12.5 if eigs else 8.5, 3.3))
    epochs = [m["epoch"] for m in metrics]
    clean = lambda v: v if math.isfinite(v) else float("nan")  # noqa: E731
    for key, ls in (("train", "-"), ("test", "--")):
        axes[0].plot(epochs, [clean(m[f"{key}_loss"]) for m in metrics], ls=ls, marker=".", color=color, label=key)
        axes[1].plot(epochs, [100 * clean(m[f"{key}_acc"]) for m in metrics], ls=ls, marker=".", color=color, label=key)
    log_y = _log_axis(axes[0], "y", [m[k] for m in metrics for k in ("train_loss", "test_loss")])
    axes[0].set_ylabel(_log_label("cross-entropy loss (nats)", log_y))
    axes[1].set_ylabel("accuracy (%)")
    if finite(row["acc_goal"]):
        axes[1].axhline(100 * row["acc_goal"], color="0.5", ls=":", lw=1, label="accuracy goal")
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if max(epochs) - min(epochs) < 2:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.set_xlabel("epoch")
        ax.legend(loc="best")
        ax.grid(True, alpha=0.3)
    if eigs:
        ax = axes[2]
        ax.plot([e["step"] for e in eigs], [clean(e["lambda_max"]) for e in eigs], marker=".", color=color,
                label="λmax during training")
        if finite(row["lambda_max"]) and finite(row["steps"]):
            ax.plot([row["steps"]], [row["lambda_max"]], ls="", marker="*", ms=10, color=color, mec="black",
                    mew=0.5, label="λmax of the final network")
        if finite(row["two_over_lr"]):
            ax.axhline(row["two_over_lr"], color="black", ls="--", lw=1, label=f"2/η = {row['two_over_lr']:.4g}")
        _label(ax, "optimisation step", "λmax")
        ax.legend(loc="best")
    detail = f"; {row['note']}" if row["status"] == "diverged" and row["note"] else ""
    fig.suptitle(f"{row['run_dir']}\nstatus {row['status']}, {row['epochs']} epoch(s){detail}", fontsize=9)
    fig.tight_layout()
    f = cv.save(fig, f"runs/{slug(row['run_dir'].replace('/', '__'))}")
    table = md_table(["status", "epochs", "train acc", "test acc", "λmax", "2/η"],
                     [[str(row["status"]), str(row["epochs"]), fmt_or_dash(row["train_acc"], fmt_pct),
                       fmt_or_dash(row["test_acc"], fmt_pct), fmt_or_dash(row["lambda_max"], lambda v: f"{v:.4g}"),
                       fmt_or_dash(row["two_over_lr"], lambda v: f"{v:.4g}")]])
    return Section(row["run_dir"], [f], table, [row["note"]] if row["note"] else [])
