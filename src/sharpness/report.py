"""Reports: runs.csv, the paper's figures and statistics from a results folder or a sweep."""

from __future__ import annotations

import argparse

from .errors import SharpnessError


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `sharpness report`."""
    p.add_argument("source", help="results folder or sweep file (TOML)")


def cmd_report(args: argparse.Namespace) -> int:
    raise SharpnessError("report is not available yet")
