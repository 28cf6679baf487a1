"""The `sharpness` command line (and the original scripts' argument parsing)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import fields

from .errors import SharpnessError

DESCRIPTION = """Train networks with SGD or SAM, measure the maximum Hessian eigenvalue (λmax),
and relate sharpness to generalization. Results go to $RESULTS (default ./results), datasets to
$DATASETS (default ~/.cache/sharpness/datasets)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # negative numbers in every float spelling (-1e-3, -inf) are values, not options, so that a
        # bad value gets its own message (argparse alone knows only -1 and -1.5)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_bool(text: str) -> bool:
    """True/False, yes/no, 1/0 (any case)."""
    value = str(text).strip().lower()
    if value in ("true", "t", "yes", "y", "1"):
        return True
    if value in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def int_at_least(low: int):
    """An argparse type: a whole number >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(
                f"must be a positive integer, got {text}" if low == 1 else f"must be >= {low}, got {text}")
        return value
    parse.__name__ = "positive integer" if low == 1 else f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def number(text: str) -> float:
    """A float (1e-1, 0.1, ...)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """A boolean option: --name, --name=True, --name=False, --name False."""
    parser.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, default=False,
                        metavar="BOOL", help=help)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of the original train.py / eval.py, plus ours."""
    from .data import DATASETS
    from .models import ARCHITECTURES

    p.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("arch_id", help=f"one of: {', '.join(ARCHITECTURES)}")
    p.add_argument("batch_size", type=positive_int, help="minibatch size")
    p.add_argument("lr", type=number, help="learning rate (constant)")
    o = p.add_argument_group("options of the original code")
    o.add_argument("--opt", choices=["sgd", "sam"], default="sgd", help="optimizer (default: sgd)")
    o.add_argument("--rho", type=number, default=0.05, help="SAM radius (default: 0.05)")
    o.add_argument("--loss", choices=["ce"], default="ce", help="loss: cross-entropy (default: ce)")
    o.add_argument("--network_seed", type=int, default=0, help="seed of the initialisation (default: 0)")
    o.add_argument("--train_seed", type=int, default=1, help="seed of shuffling and dropout (default: 1)")
    o.add_argument("--acc_goal", type=number, default=0.99,
                   help="stop at the first epoch > 0 with train accuracy >= this (default: 0.99)")
    o.add_argument("--physical_batch_size", type=positive_int, default=1000,
                   help="most examples processed at once; larger batches are accumulated in chunks "
                        "of this size (default: 1000)")
    o.add_argument("--abridged_size", type=positive_int, default=1000,
                   help="training examples (strided) used for λmax (default: 1000)")
    add_flag(o, "disable_dropout", "measure λmax in eval mode (dropout off) (default: False)")
    add_flag(o, "between_iterates", "λmax = max over 8 points between the final iterate and one "
             "more step (BN nets at small learning rates) (default: False)")
    o.add_argument("--save_freq", type=positive_int, default=10,
                   help="train: save snapshot_{epoch} and metric files every this many epochs (default: 10)")
    a = p.add_argument_group("added options")
    a.add_argument("--max_epochs", type=positive_int, default=None,
                   help="stop after this many epochs even if acc_goal is not reached (default: none)")
    a.add_argument("--eig_freq", type=nonneg_int, default=0,
                   help="also measure λmax every this many steps into eigs.csv (default: 0 = off)")
    a.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_flag(a, "quiet", "no progress bars or per-epoch lines (default: False)")
    add_flag(a, "force", "train: train again even if the run has finished (default: False)")
    add_flag(a, "channels_last", "train: channels-last memory format (speed only) (default: False)")
    add_flag(a, "compile", "train: torch.compile the training steps and per-epoch evaluation (speed only) "
             "(default: False)")
    add_flag(a, "tf32", "CHANGES NUMERICS: allow TF32 matmuls/convolutions in training (default: False)")
    add_flag(a, "bf16", "CHANGES NUMERICS: bfloat16 autocast in training (default: False)")


def run_config(args: argparse.Namespace):
    """RunConfig and RunOptions from parsed arguments."""
    from .train import RunConfig, RunOptions

    cfg = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})
    opts = RunOptions(**{f.name: getattr(args, f.name) for f in fields(RunOptions)})
    return cfg, opts


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run

    cfg, opts = run_config(args)
    run(cfg, opts)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_run, final_line

    cfg, opts = run_config(args)
    out = evaluate_run(cfg, opts)
    print(final_line({"final": {"test_acc": out["test_acc"]}, "lambda_max": out["lambda_max"]}), flush=True)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import DATASETS, check_dataset_name, datasets_dir, load_dataset
    from .errors import DataUnavailable

    names = args.names or list(DATASETS)
    for name in names:
        check_dataset_name(name)
    failed: set[str] = set()  # sources that could not be prepared: their subsets are not tried again
    for name in names:
        source = DATASETS[name][0]
        if source in failed:
            print(f"error: {name} is a subset of {source}, which is not available (above)\n", file=sys.stderr)
            continue
        try:
            d = load_dataset(name)
        except DataUnavailable as exc:
            print(f"error: {exc}\n", file=sys.stderr)
            failed.add(source)
            continue
        print(f"{name}: {len(d.y_train)} train / {len(d.y_test)} test examples of "
              f"{'x'.join(map(str, d.input_shape))}, {d.num_classes} classes")
    print(f"datasets directory: {datasets_dir()}")
    return 2 if failed else 0


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `sharpness data` (and preprocess_data.py)."""
    p.add_argument("names", nargs="*", help="datasets to prepare (default: all)")


def commands() -> list[tuple[str, str, str, object, object]]:
    """Every subcommand: (name, one-line help, description, add-arguments function, command function)."""
    from . import measure, report, sweep

    return [
        ("train", "train to the accuracy goal, then measure λmax",
         "Train with SGD or SAM until train accuracy reaches acc_goal, then measure λmax. Resumes an "
         "interrupted run; a finished run is shown, not trained again (--force to retrain).",
         add_run_arguments, cmd_train),
        ("eval", "test accuracy and λmax of a finished run",
         "Load snapshot_final of a finished run and print "
         "[final test accuracy = ...]\\t[max hessian eigenvalue = ...]. The arguments name the run as "
         "train did (the same values find the same directory); λmax is measured anew with "
         "--abridged_size, --disable_dropout and --between_iterates. --force, --save_freq, "
         "--channels_last and --compile act in train only.", add_run_arguments, cmd_eval),
        ("data", "download and prepare datasets into $DATASETS",
         "Download (with torchvision's checksums) and prepare datasets.", add_data_arguments, cmd_data),
        ("measure", "more Hessian measurements of a finished run",
         "Measure a finished run's final network (λmax, λmin, top-k, trace, spectral density); results "
         "are appended to measurements.json in the run directory.",
         measure.add_measure_arguments, measure.cmd_measure),
        ("sweep", "run a grid of runs from a TOML file (local processes or Ray)",
         "Run every run of a sweep file; finished runs are skipped, interrupted ones resume.",
         sweep.add_sweep_arguments, sweep.cmd_sweep),
        ("status", "table of a sweep's runs and their status",
         "Status, epochs, test accuracy and λmax of every run of a sweep.",
         sweep.add_status_arguments, sweep.cmd_status),
        ("report", "figures, runs.csv and statistics from a results folder or sweep",
         "Collect every run into runs.csv, draw the paper's figures and write report.md and stats.json.",
         report.add_report_arguments, report.cmd_report),
    ]


def build_parser(prog: str = "sharpness") -> Parser:
    """The full command-line parser."""
    from . import __version__

    parser = Parser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"sharpness {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, help_line, description, add_arguments, func in commands():
        p = sub.add_parser(name, help=help_line, description=description)
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None, prog: str = "sharpness") -> int:
    """Entry point: parse, run, turn known errors into one line and exit code 2."""
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    return dispatch(args)


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command; known errors become one message and their exit code."""
    try:
        return args.func(args)
    except SharpnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sharpness status ... | head`: the reader left; that is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # e.g. a folder this user may not read: one line naming it, no traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


def script_main(command: str, argv: list[str] | None = None) -> int:
    """The original scripts: src/train.py, src/eval.py (run arguments), src/preprocess_data.py."""
    name = "data" if command == "preprocess_data" else command
    description = next(d for n, _, d, _, _ in commands() if n == name)
    parser = Parser(prog=f"{command}.py", description=description)
    if command == "preprocess_data":
        add_data_arguments(parser)
        parser.set_defaults(func=cmd_data)
    else:
        add_run_arguments(parser)
        parser.set_defaults(func={"train": cmd_train, "eval": cmd_eval}[command])
    return dispatch(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
