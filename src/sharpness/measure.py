"""The paper's λmax protocol on a trained network: abridged data, train-mode chunks, between iterates."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from . import hessian
from .data import Dataset, strided_indices
from .models import has_dropout
from .optim import sam_step, sgd_step

LAMBDA_TOL = 1e-3  # relative residual at which λmax is accepted (its error is far smaller)
BETWEEN_POINTS = 8  # interpolation weights 0, 1/7, ..., 1


def abridged(data: Dataset, size: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The strided subset of the training set used for λmax (the whole set when size >= N)."""
    idx = strided_indices(len(data.y_train), size, offset)
    return data.X_train[idx], data.y_train[idx]


def measurement_modes(cfg: Any, model: nn.Module) -> tuple[str, str]:
    """(mode, dropout) of the Hessian: eval with --disable_dropout, else train with fixed dropout masks."""
    if cfg.disable_dropout:
        return "eval", "off"
    return "train", ("fixed" if has_dropout(model) else "off")


def chunk_size(cfg: Any) -> int:
    """Examples per chunk of the Hessian (the BatchNorm batch in train mode)."""
    return min(int(cfg.batch_size), int(cfg.physical_batch_size))


def lambda_max_record(model: nn.Module, X: torch.Tensor, y: torch.Tensor, cfg: Any,
                      progress: bool = False, tol: float = LAMBDA_TOL) -> dict:
    """λmax of the model on (X, y) under the run's protocol, as a JSON-ready record."""
    mode, dropout = measurement_modes(cfg, model)
    spec = hessian.top_eigenvalues(model, X, y, k=1, batch_size=chunk_size(cfg), mode=mode,
                                   dropout=dropout, tol=tol, seed=0, progress=progress)
    return {"value": spec.eigenvalues[0], "residual": spec.residuals[0], "matvecs": spec.matvecs,
            "converged": spec.converged, "tol": tol, "mode": mode, "dropout": dropout,
            "chunk_size": chunk_size(cfg), "abridged_size": len(y)}


def extra_iterate(model: nn.Module, data: Dataset, cfg: Any, device: torch.device, autocast=None) -> dict:
    """The state after one more training step from `model` (first minibatch of a fresh shuffle)."""
    twin = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(int(cfg.train_seed))
    idx = torch.randperm(len(data.y_train), generator=gen)[:int(cfg.batch_size)]
    X, y = data.X_train[idx].to(device), data.y_train[idx].to(device)
    optimizer = torch.optim.SGD(twin.parameters(), lr=float(cfg.lr))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(cfg.train_seed))
        if cfg.opt == "sam":
            sam_step(twin, optimizer, X, y, int(cfg.physical_batch_size), float(cfg.rho), autocast)
        else:
            sgd_step(twin, optimizer, X, y, int(cfg.physical_batch_size), autocast)
    return {k: v.detach().clone() for k, v in twin.state_dict().items()}


def interpolate(final: dict, extra: dict, alpha: float) -> dict:
    """(1 - alpha) * final + alpha * extra for floating-point entries; others from `final`."""
    return {k: ((1 - alpha) * v + alpha * extra[k]) if v.is_floating_point() else v.clone()
            for k, v in final.items()}


def between_iterates_record(model: nn.Module, extra_state: dict, X: torch.Tensor, y: torch.Tensor,
                            cfg: Any, progress: bool = False) -> dict:
    """λmax at 8 points from the final to the extra iterate; the record of the largest, all values kept."""
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    records = []
    for i in range(BETWEEN_POINTS):
        twin.load_state_dict(interpolate(final, extra_state, i / (BETWEEN_POINTS - 1)))
        records.append(lambda_max_record(twin, X, y, cfg, progress=progress))
    best = max(records, key=lambda r: r["value"])
    return {**best, "between_iterates": True,
            "between_values": [r["value"] for r in records],
            "between_residuals": [r["residual"] for r in records],
            "matvecs": sum(r["matvecs"] for r in records)}


# -- `sharpness measure` ------------------------------------------------------------------------

WHATS = ("lambda_max", "lambda_min", "topk", "trace", "density")


def add_measure_arguments(p) -> None:
    """Arguments of `sharpness measure`."""
    p.add_argument("run_dir", help="a finished run's directory")
    p.add_argument("--what", default="lambda_max",
                   help=f"comma-separated, any of: {','.join(WHATS)} (default: lambda_max)")
    p.add_argument("--k", type=int, default=5, help="eigenvalues for topk (default: 5)")
    p.add_argument("--mode", choices=["train", "eval"], default=None,
                   help="BatchNorm batch statistics (train) or running statistics (eval) "
                        "(default: the run's protocol: eval with --disable_dropout, else train)")
    p.add_argument("--tol", type=float, default=LAMBDA_TOL,
                   help=f"relative residual at which eigenvalues are accepted (default: {LAMBDA_TOL:g})")
    p.add_argument("--abridged_size", type=int, default=None,
                   help="training examples per subset (default: the run's abridged_size)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure on R strided subsets (offsets 0..R-1): mean and standard error (default: 1)")
    p.add_argument("--samples", type=int, default=100, help="Hutchinson probes for trace (default: 100)")
    p.add_argument("--lanczos_steps", type=int, default=80, help="Lanczos steps per density run (default: 80)")
    p.add_argument("--runs", type=int, default=1, help="random starts per subset for density (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of start vectors and probes (default: 0)")
    p.add_argument("--float64", action="store_true", help="measure in float64 (slower, for validation)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_measure(args) -> int:
    """Measure a finished run and append the results to measurements.json."""
    from pathlib import Path

    from . import results
    from .data import load_dataset
    from .errors import SharpnessError
    from .train import RunConfig, check_seed, load_final_model, resolve_device

    whats = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in whats if w not in WHATS]
    if bad or not whats:
        raise SharpnessError(f"unknown --what {','.join(bad) or repr(args.what)}; valid: {','.join(WHATS)}")
    for name, value, low in (("k", args.k, 1), ("repeats", args.repeats, 1), ("samples", args.samples, 2),
                             ("lanczos_steps", args.lanczos_steps, 1), ("runs", args.runs, 1)):
        if value < low:
            raise SharpnessError(f"--{name} must be >= {low}, got {value}")
    check_seed("--seed", args.seed)
    if not 0 < args.tol < 1:
        raise SharpnessError(f"--tol must be > 0 and < 1 (a relative residual), got {args.tol}")
    run_dir = Path(args.run_dir)
    summary = results.read_summary(run_dir)
    if summary is None:
        raise SharpnessError(f"{run_dir} is not a finished run (no readable summary.json)")
    if summary.get("status") == "diverged":
        raise SharpnessError(f"the run at {run_dir} diverged; it has no final network to measure")
    try:
        cfg = RunConfig(**summary["config"])
    except TypeError as exc:
        raise SharpnessError(f"{run_dir / results.SUMMARY} has an unknown config: {exc}") from None
    if args.abridged_size is not None:
        if args.abridged_size < 1:
            raise SharpnessError(f"--abridged_size must be >= 1, got {args.abridged_size}")
        cfg.abridged_size = args.abridged_size
    device = resolve_device(args.device)
    data = load_dataset(cfg.dataset)
    model = load_final_model(run_dir, cfg, data, device)
    mode, dropout = measurement_modes(cfg, model)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if "topk" in whats and args.k > numel:
        raise SharpnessError(f"--k {args.k} exceeds the network's {numel} parameters (the Hessian's size)")
    if args.mode is not None:
        mode = args.mode
        dropout = "off" if mode == "eval" else dropout
    n = len(data.y_train)
    if args.repeats > 1 and args.repeats > n // min(cfg.abridged_size, n):
        raise SharpnessError(f"--repeats {args.repeats} needs disjoint strided subsets: with {n} training "
                             f"examples use --abridged_size {n // args.repeats} or less")
    subsets = [abridged(data, cfg.abridged_size, offset) for offset in range(args.repeats)]
    common = {"mode": mode, "dropout": dropout, "chunk_size": chunk_size(cfg),
              "abridged_size": len(subsets[0][1]), "offsets": list(range(args.repeats)),
              "repeats": args.repeats, "seed": args.seed, "float64": bool(args.float64)}
    path = run_dir / results.MEASUREMENTS
    with results.RunLock(run_dir):
        stored = _stored_measurements(path)  # checked before hours of products, not after
        for what in whats:
            try:
                rec = _measure_one(what, model, subsets, device, args, common)
            except ValueError as exc:  # non-finite products, k above the parameter count, ...
                raise SharpnessError(f"{what} of {run_dir} cannot be measured: {exc}") from None
            print(_describe(rec), flush=True)
            stored["measurements"].append(rec)
            results.atomic_write_json(path, stored)  # each quantity is kept as soon as it is measured
    print(f"appended {len(whats)} measurement(s) to {path}")
    return 0


def _stored_measurements(path) -> dict:
    """The contents of measurements.json ({"measurements": [...]}, empty when missing); an error if malformed."""
    from . import results
    from .errors import SharpnessError

    if not path.exists():
        return {"measurements": []}
    stored = results.read_json(path)
    if not isinstance(stored, dict) or not isinstance(stored.get("measurements"), list):
        raise SharpnessError(f"{path} is not a measurements file (expected an object with a 'measurements' "
                             "list); move it away and run again")
    return stored


def _measure_one(what: str, model, subsets, device, args, common: dict) -> dict:
    """One quantity on every subset, aggregated: mean, per-subset values, standard error over subsets."""
    import time

    from .findings import mean_se
    from .train import versions

    kw = dict(batch_size=common["chunk_size"], mode=common["mode"], dropout=common["dropout"],
              dtype=torch.float64 if args.float64 else None)
    rec = {"what": what, **common, "tol": args.tol if what in ("lambda_max", "lambda_min", "topk") else None}
    subsets = [(X.to(device), y.to(device)) for X, y in subsets]
    if what == "density":
        densities = [hessian.spectral_density(model, X, y, lanczos_steps=args.lanczos_steps, runs=args.runs,
                                              seed=args.seed, **kw) for X, y in subsets]
        rec.update(matvecs=sum(d.matvecs for d in densities), **_density_files(densities, args))
    elif what == "trace":
        # independent probes per subset: the spread over subsets then holds the probes' noise too
        seeds = [args.seed + offset for offset in common["offsets"]]
        estimates = [hessian.hessian_trace(model, X, y, samples=args.samples, seed=seed, **kw)
                     for (X, y), seed in zip(subsets, seeds)]
        values = [est for est, _ in estimates]
        mean, spread = mean_se(values)
        # the probes' own error of the mean: a floor that the spread of a few subsets can fall below
        probes = math.sqrt(sum(se_ ** 2 for _, se_ in estimates)) / len(estimates)
        rec.update(value=mean, values=values, samples=args.samples, matvecs=args.samples * len(subsets),
                   probe_seeds=seeds, probe_stderr=[se_ for _, se_ in estimates],
                   stderr=probes if spread is None else max(spread, probes),
                   stderr_subsets=spread, stderr_probes=probes)
    else:
        fn = hessian.bottom_eigenvalues if what == "lambda_min" else hessian.top_eigenvalues
        k = args.k if what == "topk" else 1
        specs = [fn(model, X, y, k=k, tol=args.tol, seed=args.seed, progress=not args.quiet, **kw)
                 for X, y in subsets]
        rec.update(matvecs=sum(sp.matvecs for sp in specs), converged=all(sp.converged for sp in specs))
        columns = [mean_se([sp.eigenvalues[i] for sp in specs]) for i in range(k)]
        worst = [max(sp.residuals[i] for sp in specs) for i in range(k)]
        if what == "topk":
            rec.update(k=k, block=specs[0].extra["block"], value=[m for m, _ in columns],
                       values=[sp.eigenvalues for sp in specs],
                       stderr=[se for _, se in columns] if len(specs) > 1 else None, residual=worst)
        else:
            rec.update(value=columns[0][0], values=[sp.eigenvalues[0] for sp in specs],
                       stderr=columns[0][1], residual=worst[0])
    rec.update(versions=versions(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return rec


def _density_files(densities, args) -> dict:
    """Average the subsets' quadratures; write spectral_density.png and .npz next to the run."""
    from pathlib import Path

    import numpy as np

    from . import results

    nodes = np.concatenate([d.nodes for d in densities])
    weights = np.concatenate([d.weights / len(densities) for d in densities])
    grid, density, sigma = hessian.smoothed_density(nodes, weights)
    run_dir = Path(args.run_dir)
    import io

    buf = io.BytesIO()
    np.savez(buf, grid=grid, density=density, nodes=nodes, weights=weights)
    results.atomic_write_bytes(run_dir / "spectral_density.npz", buf.getvalue())
    _plot_density(grid, density, run_dir / "spectral_density.png", run_dir.name)
    return {"value": None, "png": "spectral_density.png", "npz": "spectral_density.npz", "sigma": sigma,
            "lanczos_steps": args.lanczos_steps, "runs": args.runs,
            "range": [float(nodes.min()), float(nodes.max())]}


def _plot_density(grid, density, path, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from . import results

    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    ax.semilogy(grid, np.maximum(density, 1e-12), color="tab:blue")
    ax.set_ylim(bottom=max(1e-8, float(density.max()) * 1e-8))
    ax.set_xlabel("eigenvalue of the training-loss Hessian")
    ax.set_ylabel("density (log scale)")
    ax.set_title(f"Hessian spectral density (SLQ)\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    results.atomic_write_bytes(path, buf.getvalue())


def _describe(rec: dict) -> str:
    what = rec["what"]
    n = f"{rec['repeats']} subset(s) of {rec['abridged_size']}"
    if what == "density":
        lo, hi = rec["range"]
        return f"density: eigenvalues in [{lo:.4g}, {hi:.4g}], {n}, {rec['matvecs']} HVPs -> {rec['png']}"
    if what == "topk":
        vals = ", ".join(f"{v:.4f}" for v in rec["value"])
        return f"top {rec['k']}: {vals} ({n}, max residual {max(rec['residual']):.1e}, {rec['matvecs']} HVPs)"
    se = f" ± {rec['stderr']:.4f}" if rec.get("stderr") is not None else ""
    tail = f"residual {rec['residual']:.1e}, " if "residual" in rec else ""
    return f"{what} = {rec['value']:.4f}{se} ({n}, {tail}{rec['matvecs']} HVPs)"
