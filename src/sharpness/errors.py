"""Errors that the command line reports as one clear message and exit code 2."""

from __future__ import annotations


class SharpnessError(Exception):
    """Bad input or an unusable environment: shown to the user without a traceback."""

    exit_code = 2


class DataUnavailable(SharpnessError):
    """A dataset's files are missing and cannot be downloaded."""


class RunLocked(SharpnessError):
    """Another live process holds the run directory."""


class ReadOnlyRun(SharpnessError):
    """The run directory cannot be written (a read-only file system or no permission)."""
