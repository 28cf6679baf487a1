"""The original `preprocess_data.py`, kept so that the paper's README commands work from a clone."""

import sys

from sharpness.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("preprocess_data"))
