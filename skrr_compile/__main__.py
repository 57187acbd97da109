"""`python -m skrr_compile` is the `skrr-compile` command line."""

import sys

from skrr_compile.cli import main

sys.exit(main())
