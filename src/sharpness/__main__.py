"""`python -m sharpness ...` runs the command line."""

import sys

from sharpness.cli import main

sys.exit(main())
