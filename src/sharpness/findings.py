"""Statistics of a report: seed averages, Kendall's tau, and the rules for the paper's five findings.

Rows are runs.csv rows (see `report.read_run`). Only usable runs count: status done with a λmax and
final metrics (`usable`). Runs are grouped into panels (`panel_key`), averaged over seeds into cells
(`make_cells`), then each finding is checked on the cells by an explicit rule (`finding_1` ...
`finding_5`) that reports the comparison, the rule, the measured numbers and a verdict.
scipy is imported only when a tau is computed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable

ACC_TOL = 0.01  # test-accuracy differences up to 1 point (or 2 seed standard errors) count as "no change"
LAMBDA_CHANGE = 0.10  # λmax differences above 10% count as "a change"
HIGH_DROPOUT = 0.5  # "very high dropout": p >= 0.5
MIN_TAU_RUNS = 3
SUPPORTED, NOT_SUPPORTED, NOT_ENOUGH = "supported", "not supported", "not enough runs"
# settings that define a panel: runs in one panel differ only in optimizer, batch size, learning
# rate and seeds (save_freq, max_epochs and eig_freq do not change a final model that reached the goal)
PANEL_KEYS = ("dataset", "arch_id", "loss", "acc_goal", "physical_batch_size", "abridged_size",
              "disable_dropout", "between_iterates", "tf32", "bf16")
PAPER = (
    "Larger learning rates reduce λmax at every batch size, but the generalization benefit sometimes "
    "vanishes at larger batch sizes.",
    "Scaling batch size and learning rate together changes λmax without changing generalization.",
    "SAM gives smaller λmax at every batch size, but its generalization benefit vanishes at larger "
    "batch sizes.",
    "Very high dropout degrades generalization while still lowering λmax.",
    "BatchNorm does not consistently lower λmax, yet it improves generalization.",
)


# -- rows, panels and groups --------------------------------------------------------------------

def finite(x: Any) -> bool:
    """Whether `x` is a finite int or float (not a bool, not None)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def usable(row: dict) -> bool:
    """Whether a run has a final model with a λmax and test accuracy (it may appear in figures)."""
    return row["status"] == "done" and all(finite(row[k]) for k in ("lambda_max", "test_acc", "gap_acc", "lr")) \
        and row["batch_size"] is not None


def opt_label(row: dict) -> str:
    """SGD, or SAM with its radius."""
    return "SGD" if row["opt"] == "sgd" else f"SAM ρ={float(row['rho']):g}"


def opt_order(label: str) -> tuple:
    """Sort key of optimizer labels: SGD first, then SAM by radius."""
    return (label != "SGD", label)


def panel_key(row: dict) -> tuple:
    """The settings a figure panel holds fixed (see PANEL_KEYS).

    physical_batch_size counts only for BatchNorm nets (it is their batch-statistics batch); without
    BatchNorm, gradient accumulation over chunks gives the same step, so full-batch GD run in chunks
    shares a panel with SGD.
    """
    return tuple((k, row[k]) for k in PANEL_KEYS if k != "physical_batch_size" or bn_base(row["arch_id"]))


def without(panel: tuple, *names: str) -> tuple:
    """A panel key without some settings."""
    return tuple((k, v) for k, v in panel if k not in names)


def panel_title(panel: tuple) -> str:
    """dataset · architecture, plus every setting that differs from its default."""
    from .train import RunConfig

    defaults = {f.name: f.default for f in fields(RunConfig)}
    d = dict(panel)
    head = [str(d[k]) for k in ("dataset", "arch_id") if k in d]
    extra = [f"{k}={v}" for k, v in panel if k not in ("dataset", "arch_id") and v != defaults.get(k)]
    return " · ".join(head + extra)


def group_by(items: Iterable, key: Callable) -> dict:
    """Items grouped by key, in first-seen order."""
    out: dict = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out


def dropout_p(arch: str) -> float | None:
    """The dropout rate of an `mlp_p=...` architecture, else None."""
    from .models import MLP_DROPOUT

    if arch in MLP_DROPOUT:
        return MLP_DROPOUT[arch]
    if isinstance(arch, str) and arch.startswith("mlp_p="):
        try:
            return float(arch.split("=", 1)[1])
        except ValueError:
            return None
    return None


def bn_base(arch: str) -> str | None:
    """For a BatchNorm architecture (…_bn…), the same architecture without BatchNorm."""
    return arch.replace("_bn", "", 1) if isinstance(arch, str) and "_bn" in arch else None


# -- seed averages ------------------------------------------------------------------------------

@dataclass
class Cell:
    """Seed-averaged results of one setting: panel, optimizer, batch size, learning rate."""

    panel: tuple
    opt: str
    bs: int
    lr: float
    n: int
    lam: float
    lam_se: float | None
    acc: float
    acc_se: float | None
    gap: float
    gap_se: float | None

    @property
    def arch(self) -> str:
        """The architecture of the cell's panel."""
        return dict(self.panel)["arch_id"]


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (None for a single value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def make_cells(rows: list[dict]) -> list[Cell]:
    """Average usable runs over seeds (network_seed, train_seed)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if usable(r):
            groups[(panel_key(r), opt_label(r), int(r["batch_size"]), float(r["lr"]))].append(r)
    cells = []
    for (panel, opt, bs, lr), g in groups.items():
        lam, acc, gap = (mean_se([r[k] for r in g]) for k in ("lambda_max", "test_acc", "gap_acc"))
        cells.append(Cell(panel, opt, bs, lr, len(g), *lam, *acc, *gap))
    return sorted(cells, key=lambda c: (str(c.panel), opt_order(c.opt), c.bs, c.lr))


# -- number formats shared with the figures and report.md ---------------------------------------

def fmt_tau(tau: float | None) -> str:
    """A Kendall tau with its sign, or "undefined"."""
    return "undefined" if tau is None else f"{tau:+.2f}"


def fmt_p(p: float | None) -> str:
    """A p-value, or a dash when there is none."""
    return "—" if p is None else f"{p:.3g}"


def fmt_pct(x: float) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{100 * x:.1f}%"


# -- Kendall's tau ------------------------------------------------------------------------------

def kendall(x: list[float], y: list[float]) -> tuple[float | None, float | None]:
    """Kendall's tau-b and its two-sided p-value (scipy); None when undefined (constant values)."""
    import warnings

    from scipy.stats import kendalltau

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: tau is NaN, reported as undefined
        res = kendalltau(x, y)
    tau, p = float(res.statistic), float(res.pvalue)
    return (tau if math.isfinite(tau) else None), (p if math.isfinite(p) else None)


def kendall_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The groups a tau is computed in: all runs, then each panel, then each panel's batch sizes and optimizers.

    Batch-size and optimizer groups stay inside one panel (one dataset, architecture and λmax
    protocol): λmax scales differ between settings, so a tau across them would mostly rank settings.
    """
    use = [r for r in rows if usable(r)]
    panels = sorted(group_by(use, panel_key).items(), key=lambda t: str(t[0]))
    pooled = "all runs" + (" (pooled across settings)" if len(panels) > 1 else "")
    groups = [(pooled, use)]
    for panel, g in panels:
        title = panel_title(panel)
        if len(panels) > 1:  # one setting: its row would repeat "all runs"
            groups.append((title, g))
        by_bs = sorted(group_by(g, lambda r: int(r["batch_size"])).items())
        by_opt = sorted(group_by(g, opt_label).items(), key=lambda t: opt_order(t[0]))
        if len(by_bs) > 1:
            groups += [(f"{title} · batch size {bs}", sub) for bs, sub in by_bs]
        if len(by_opt) > 1:
            groups += [(f"{title} · optimizer {o}", sub) for o, sub in by_opt]
    return groups


def kendall_stats(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Tau between λmax and test accuracy / the accuracy gap in every group of `kendall_groups`."""
    groups = kendall_groups(rows)
    entries, notes = [], []
    for name, g in groups:
        if len(g) < MIN_TAU_RUNS:
            notes.append(f"{name}: {len(g)} run(s), fewer than {MIN_TAU_RUNS}: no Kendall τ")
            continue
        lam = [r["lambda_max"] for r in g]
        entry = {"group": name, "n": len(g)}
        for y in ("test_acc", "gap_acc"):
            tau, p = kendall(lam, [r[y] for r in g])
            entry[f"lambda_max_vs_{y}"] = {"tau": tau, "p_value": p}
        entries.append(entry)
    return entries, notes


# -- the five findings --------------------------------------------------------------------------

def _verdict(parts: list[dict]) -> str:
    verdicts = [p["verdict"] for p in parts]
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    return SUPPORTED if all(v == SUPPORTED for v in verdicts) else NOT_ENOUGH


def _part(comparison: str, rule: str, numbers: list[str], verdict: str) -> dict:
    return {"comparison": comparison, "rule": rule, "numbers": numbers, "verdict": verdict}


def _all(checks: list[bool]) -> str:
    return NOT_ENOUGH if not checks else (SUPPORTED if all(checks) else NOT_SUPPORTED)


def _tol(*cells: Cell) -> float:
    """Accuracy tolerance: 1 point, or 2 seed standard errors when larger."""
    return max([ACC_TOL] + [2 * c.acc_se for c in cells if c.acc_se is not None])


def finding_1(cells: list[Cell]) -> list[dict]:
    """Larger learning rates give smaller λmax; their accuracy benefit vanishes at some larger batch size."""
    lam_checks, lam_numbers, benefit_checks, benefit_numbers = [], [], [], []
    sgd = [c for c in cells if c.opt == "SGD"]
    for panel, group in group_by(sgd, lambda c: c.panel).items():
        benefit: dict[int, bool] = {}
        for bs, g in sorted(group_by(group, lambda c: c.bs).items()):
            if len(g) < 2:
                continue
            t_lam, _ = kendall([c.lr for c in g], [c.lam for c in g])
            t_acc, _ = kendall([c.lr for c in g], [c.acc for c in g])
            lam_checks.append(t_lam is not None and t_lam < 0)
            benefit[bs] = t_acc is not None and t_acc > 0
            lam_numbers.append(f"{panel_title(panel)}, batch size {bs}: τ(η, λmax) = {fmt_tau(t_lam)}, "
                               f"τ(η, test accuracy) = {fmt_tau(t_acc)} over {len(g)} learning rates "
                               f"(λmax {g[0].lam:.4g} at η={g[0].lr:g}, {g[-1].lam:.4g} at η={g[-1].lr:g})")
        if len(benefit) >= 2:
            sizes = sorted(benefit)
            benefit_checks.append(any(benefit[a] and not benefit[b] for i, a in enumerate(sizes) for b in sizes[i + 1:]))
            yes = ", ".join(str(b) for b in sizes if benefit[b]) or "none"
            no = ", ".join(str(b) for b in sizes if not benefit[b]) or "none"
            benefit_numbers.append(f"{panel_title(panel)}: τ(η, test accuracy) > 0 at batch sizes {yes}; "
                                   f"not at {no}")
    return [_part("larger learning rates give smaller λmax at every batch size",
                  "SGD; every panel and batch size with >= 2 learning rates: Kendall τ between η and λmax "
                  "(seed means) < 0", lam_numbers, _all(lam_checks)),
            _part("the test-accuracy benefit of larger learning rates vanishes at some larger batch size",
                  "SGD; benefit at a batch size = τ(η, test accuracy) > 0; supported when every panel with >= 2 "
                  "such batch sizes has a batch size with a benefit and a larger one without",
                  benefit_numbers, _all(benefit_checks))]


def finding_2(cells: list[Cell]) -> list[dict]:
    """Scaling η and batch size together changes λmax but not test accuracy."""
    lam_checks, acc_checks, numbers = [], [], []
    sgd = [c for c in cells if c.opt == "SGD"]
    for (panel, ratio), g in group_by(sgd, lambda c: (c.panel, float(f"{c.lr / c.bs:.6g}"))).items():
        if len({c.bs for c in g}) < 2:
            continue
        lams, accs = [c.lam for c in g], [c.acc for c in g]
        change = max(lams) / min(lams) - 1 if min(lams) > 0 else math.inf
        spread, tol = max(accs) - min(accs), _tol(*g)
        lam_checks.append(change > LAMBDA_CHANGE)
        acc_checks.append(spread <= tol)
        pts = ", ".join(f"(bs {c.bs}, η={c.lr:g}): λmax {c.lam:.4g}, test {fmt_pct(c.acc)}" for c in g)
        numbers.append(f"{panel_title(panel)}, η/bs = {ratio:g}: {pts}; λmax changes by {100 * change:.0f}%, "
                       f"test accuracy spread {100 * spread:.1f} points (tolerance {100 * tol:.1f})")
    return [_part("λmax changes when η and batch size are scaled together",
                  f"SGD; every group of >= 2 batch sizes with the same η/batch size: max/min λmax - 1 > "
                  f"{LAMBDA_CHANGE:.0%}", numbers, _all(lam_checks)),
            _part("test accuracy does not change when η and batch size are scaled together",
                  "same groups: max - min test accuracy <= 1 point (or 2 seed standard errors, if larger)",
                  [], _all(acc_checks))]


def finding_3(cells: list[Cell]) -> list[dict]:
    """SAM gives smaller λmax at every batch size; its accuracy benefit vanishes at larger batch sizes."""
    lam_checks, numbers, benefit_checks, benefit_numbers = [], [], [], []
    sgd = {(c.panel, c.bs, c.lr): c for c in cells if c.opt == "SGD"}
    sam = [c for c in cells if c.opt != "SGD" and (c.panel, c.bs, c.lr) in sgd]
    for c in sam:
        s = sgd[(c.panel, c.bs, c.lr)]
        lam_checks.append(c.lam < s.lam)
        numbers.append(f"{panel_title(c.panel)}, bs {c.bs}, η={c.lr:g}: λmax SGD {s.lam:.4g} vs {c.opt} {c.lam:.4g}; "
                       f"test SGD {fmt_pct(s.acc)} vs {c.opt} {fmt_pct(c.acc)}")
    for (panel, opt, lr), g in group_by(sam, lambda c: (c.panel, c.opt, c.lr)).items():
        if len(g) < 2:
            continue
        small, large = min(g, key=lambda c: c.bs), max(g, key=lambda c: c.bs)
        s_small, s_large = sgd[(panel, small.bs, lr)], sgd[(panel, large.bs, lr)]
        b_small, b_large = small.acc - s_small.acc, large.acc - s_large.acc
        tol = _tol(small, large, s_small, s_large)
        benefit_checks.append(b_small > tol and b_large <= tol)
        benefit_numbers.append(f"{panel_title(panel)}, η={lr:g}: {opt} − SGD test accuracy {100 * b_small:+.1f} points "
                               f"at batch size {small.bs}, {100 * b_large:+.1f} at {large.bs} (tolerance {100 * tol:.1f})")
    return [_part("SAM gives smaller λmax than SGD at every batch size",
                  "every (panel, batch size, η) with both SGD and SAM runs: λmax(SAM) < λmax(SGD) (seed means)",
                  numbers, _all(lam_checks)),
            _part("SAM's test-accuracy benefit vanishes at larger batch sizes",
                  "every (panel, η) with SGD/SAM pairs at >= 2 batch sizes: SAM − SGD test accuracy is above "
                  "the tolerance (1 point, or 2 seed standard errors if larger) at the smallest of these batch "
                  "sizes and not above it at the largest", benefit_numbers, _all(benefit_checks))]


def finding_4(cells: list[Cell]) -> list[dict]:
    """The highest dropout rate has the lowest λmax but worse test accuracy."""
    acc_checks, lam_checks, numbers = [], [], []
    drop = [c for c in cells if dropout_p(c.arch) is not None]
    key = lambda c: (without(c.panel, "arch_id"), c.opt, c.bs, c.lr)  # noqa: E731
    for (panel, opt, bs, lr), g in group_by(drop, key).items():
        g = sorted(g, key=lambda c: dropout_p(c.arch))
        ps = [dropout_p(c.arch) for c in g]
        if len(g) < 2 or ps[-1] < HIGH_DROPOUT:
            continue
        top, rest = g[-1], g[:-1]
        best = max(rest, key=lambda c: c.acc)
        acc_checks.append(top.acc < best.acc - _tol(top, best))
        lam_checks.append(top.lam < min(c.lam for c in rest))
        pts = ", ".join(f"p={p:g}: λmax {c.lam:.4g}, test {fmt_pct(c.acc)}" for p, c in zip(ps, g))
        numbers.append(f"{panel_title(panel)}, {opt}, bs {bs}, η={lr:g}: {pts}")
    return [_part("very high dropout degrades test accuracy",
                  f"every (panel, optimizer, batch size, η) with >= 2 dropout rates, the largest >= {HIGH_DROPOUT}: "
                  "test accuracy at the largest p is below the best at smaller p by more than 1 point "
                  "(or 2 seed standard errors)", numbers, _all(acc_checks)),
            _part("very high dropout still lowers λmax",
                  "same groups: λmax at the largest p is below λmax at every smaller p", [], _all(lam_checks))]


def bn_setting(panel: tuple) -> tuple:
    """What a BatchNorm run and its no-BN twin share: the panel without the architecture, the λmax
    protocol (the paper measures BN nets at small learning rates between iterates, their twins not)
    and the physical batch size (which only the BN net's panel holds)."""
    return without(panel, "arch_id", "between_iterates", "physical_batch_size")


def between(cell: Cell) -> bool:
    """Whether the cell's λmax is the between-iterates maximum."""
    return bool(dict(cell.panel).get("between_iterates"))


def _protocol(cell: Cell) -> str:
    return " (between iterates)" if between(cell) else ""


def bn_twin(cell: Cell, cells: list[Cell]) -> Cell | None:
    """The no-BN cell with the same setting, optimizer, batch size and learning rate (same protocol first)."""
    base = bn_base(cell.arch)
    twins = [c for c in cells if base and c.arch == base and c.opt == cell.opt and c.bs == cell.bs
             and c.lr == cell.lr and bn_setting(c.panel) == bn_setting(cell.panel)]
    return min(twins, key=lambda c: between(c) != between(cell)) if twins else None


def finding_5(cells: list[Cell]) -> list[dict]:
    """BatchNorm does not always lower λmax, yet improves test accuracy."""
    pairs, numbers = [], []
    for c in cells:
        other = bn_twin(c, cells)
        if other is not None:
            pairs.append((c, other))
            numbers.append(f"{panel_title(bn_setting(c.panel) + (('arch_id', c.arch),))} vs {other.arch}, "
                           f"{c.opt}, bs {c.bs}, η={c.lr:g}: λmax BN {c.lam:.4g}{_protocol(c)} vs no BN "
                           f"{other.lam:.4g}{_protocol(other)}; test BN {fmt_pct(c.acc)} vs no BN {fmt_pct(other.acc)}")
    lam = (NOT_ENOUGH if len(pairs) < 2 else
           SUPPORTED if any(bn.lam >= nobn.lam for bn, nobn in pairs) else NOT_SUPPORTED)
    return [_part("BatchNorm does not consistently lower λmax",
                  "pairs of the same setting with and without BN (>= 2 pairs needed): λmax(BN) >= λmax(no BN) "
                  "in at least one pair", numbers, lam),
            _part("BatchNorm improves test accuracy",
                  "same pairs: test accuracy(BN) > test accuracy(no BN) in every pair", [],
                  _all([bn.acc > nobn.acc for bn, nobn in pairs]))]


def findings(cells: list[Cell]) -> list[dict]:
    """The paper's five findings: comparison, rule, measured numbers, verdict."""
    out = []
    for i, fn in enumerate((finding_1, finding_2, finding_3, finding_4, finding_5)):
        parts = fn(cells)
        out.append({"finding": i + 1, "claim": PAPER[i], "verdict": _verdict(parts), "parts": parts})
    return out
