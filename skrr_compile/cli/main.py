"""skrr-compile command line. Each feature module adds its sub-commands through `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Feature modules that contribute sub-commands (each defines `register(subparsers)`).
COMMAND_MODULES = (
    "skrr_compile.cli.core",
    "skrr_compile.cli.search",
    "skrr_compile.cli.deploy",
    "skrr_compile.cli.magnitude",
)


class CLIError(Exception):
    """A user error the CLI reports in one line (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skrr-compile", description="Shrink the text encoders of text-to-image diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # feature not installed in this build
                continue
            raise
        module.register(sub)
    return parser


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def existing_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{path!r} does not exist")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; state written so far is kept (use --resume where offered)", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"skrr-compile {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
