"""skrr-compile command line: `main` builds the parser from one module per command group."""

from skrr_compile.cli.main import main

__all__ = ["main"]
