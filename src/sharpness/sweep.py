"""Sweeps: grids of runs from a TOML file, on local worker processes or a Ray cluster."""

from __future__ import annotations

import argparse

from .errors import SharpnessError


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `sharpness sweep`."""
    p.add_argument("config", help="sweep file (TOML)")


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `sharpness status`."""
    p.add_argument("config", help="sweep file (TOML)")


def cmd_sweep(args: argparse.Namespace) -> int:
    raise SharpnessError("sweep is not available yet")


def cmd_status(args: argparse.Namespace) -> int:
    raise SharpnessError("status is not available yet")
