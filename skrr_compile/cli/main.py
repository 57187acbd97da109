"""skrr-compile command line. Each feature module adds its sub-commands through `register(subparsers)`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

from safetensors import SafetensorError

# Feature modules that contribute sub-commands (each defines `register(subparsers)`).
COMMAND_MODULES = (
    "skrr_compile.cli.core",
    "skrr_compile.cli.search",
    "skrr_compile.cli.deploy",
    "skrr_compile.cli.magnitude",
    "skrr_compile.cli.quantize",
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


def check_out_dir(path: str | Path, *, may_exist_nonempty: bool = False, label: str = "--out") -> Path:
    """Refuse an output directory that cannot be written, before any work is done; create nothing.

    `may_exist_nonempty`: the command itself decides what a non-empty directory may hold (--overwrite, --resume).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{label} {str(path)!r} exists and is not a directory; give a directory path")
    if out.is_dir() and not may_exist_nonempty and any(out.iterdir()):
        raise CLIError(f"{label} {str(path)!r} is not empty; choose a new directory or pass --overwrite")
    probe = out
    while not probe.exists():  # the nearest existing ancestor must be a writable directory
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"{label} {str(path)!r} cannot be created: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"{label} {str(path)!r} cannot be written: permission denied on {str(probe)!r}")
    return out


def join_group(device: str = "cpu", timeout_s: float = 600.0):
    """Under torchrun: join the process group (gloo on CPU, NCCL on CUDA); otherwise a single process (Solo)."""
    from skrr_compile.blocksearch.distributed import init_from_env

    return init_from_env(device, timeout_s=timeout_s)


def candidate_batch_arg(text: str):
    """--candidate-batch: a number of candidates >= 1, or auto."""
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a number of candidates >= 1 or 'auto', got {text!r}")


def heal_ridge_arg(text: str):
    """--heal-ridge: a number >= 0 (relative to the mean diagonal of f^T f), or auto."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or 'auto', got {text!r}")
    return value


def add_distribute(p) -> None:
    """`--distribute`, for the searching commands."""
    from skrr_compile.blocksearch.evaluator import DISTRIBUTE

    p.add_argument("--distribute", default=DISTRIBUTE[0], choices=DISTRIBUTE,
                   help="under torchrun: candidates (default; each rank scores its share of the candidates on "
                        "every prompt chunk, the fastest) or chunks (each rank scores every candidate on its "
                        "shard of the chunks: 1/world of the boundary states and the reference per rank)")


def add_dist_timeout(p) -> None:
    """`--dist-timeout`, for every command that runs on several ranks under torchrun."""
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun: seconds a collective may wait for the other ranks before failing")


RESUME_HINT = "the last checkpoint in --out resumes with --resume, with any number of ranks"


# what torch.distributed's backends say when a collective fails because a peer died or hung: gloo raises a plain
# RuntimeError naming its transport ("...gloo/transport/tcp/pair.cc:537] Read error ...: Connection reset by peer",
# "...unbound_buffer.cc:78] Timed out waiting 600000ms for recv operation"); NCCL and the store raise DistError
_COLLECTIVE_SIGNS = ("gloo", "nccl", "c10d", "processgroup", "watchdog", "timed out", "timeout", "connection reset",
                     "connection closed", "connection refused", "broken pipe", "socket")


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a failed collective (a dead, hung or unreachable rank), not an error of the work itself."""
    import torch.distributed as dist

    if isinstance(e, CLIError):
        return False
    if isinstance(e, (dist.DistError, TimeoutError, ConnectionError)):
        return True
    return isinstance(e, RuntimeError) and any(sign in str(e).lower() for sign in _COLLECTIVE_SIGNS)


def distributed(run, hint: str = RESUME_HINT):
    """Run `run()`; a collective that fails because another rank died or hung becomes a one-line error
    (`hint`: what the user can do next). Any other error (a shape error in a forward, a bad input) is raised
    as it is, with its own message, as in one process."""
    import torch.distributed as dist

    try:
        return run()
    except Exception as e:
        if not dist.is_initialized() or not is_collective_failure(e):
            raise
        raise CLIError(f"rank {dist.get_rank()}: another rank stopped or timed out "
                       f"({str(e).splitlines()[0][:160]}); {hint}") from e


def agree(group, check):
    """`check()` on rank 0 alone (it reads --out), its result or its one-line error given to every rank, so a
    refused input stops all ranks at once instead of leaving the others waiting for rank 0."""
    if group.world == 1:
        return check()
    outcome = None
    if group.is_writer:
        try:
            outcome = ("ok", check())
        except (CLIError, ValueError, OSError) as e:
            error = e
            outcome = ("error", _one_line(e))
    outcome = distributed(lambda: group.broadcast_object(outcome))
    if outcome[0] == "error":
        if group.is_writer:
            raise error
        raise CLIError(f"rank 0: {outcome[1]}")
    return outcome[1]


def _oserror_line(e: OSError) -> str:
    """One line for an OSError: what failed, on which path."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device (or quota exceeded); free some space or write elsewhere"
    elif e.errno == errno.EROFS:
        what = "read-only file system; write elsewhere"
    else:
        what = e.strerror or str(e)
    files = [f for f in (e.filename, e.filename2) if f]
    return f"{what}: {' -> '.join(repr(str(f)) for f in files)}" if files else what


def existing_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{path!r} does not exist")
    return p


def main(argv: list[str] | None = None) -> int:
    from skrr_compile.blocksearch.distributed import exit_rank, in_group
    from skrr_compile.utils.quiet import import_torchao_quietly

    import_torchao_quietly()  # before anything imports it (the parser's quantize options, transformers)
    parser = build_parser()
    args = parser.parse_args(argv)
    # dependency bars (loading / writing weights) redraw with carriage returns: none in logs, none when --quiet
    code = 1
    try:
        with _quiet_dependencies(getattr(args, "quiet", False) or not _isatty(sys.stderr)):
            code = _run(args)
        return code
    except BaseException:
        if in_group():  # exit_rank below ends the process before Python would print it
            traceback.print_exc()
        raise
    finally:  # under torchrun: each rank leaves the group and exits here, or teardown may abort (exit_rank)
        exit_rank(code)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def _quiet_dependencies(quiet: bool):
    """Hide the progress bars of transformers / huggingface_hub (loading and writing weights)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; state written so far is kept (use --resume where offered)", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"skrr-compile {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, disk full, a file where a directory is expected, ...
        print(f"skrr-compile {args.command}: error: {_oserror_line(e)}", file=sys.stderr)
        return 2
    except SafetensorError as e:  # a weights file read somewhere that does not wrap the error
        print(f"skrr-compile {args.command}: error: a safetensors file cannot be read ({_one_line(e)}): it is "
              "truncated or not a safetensors file", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:  # raised by the OS: "[Errno 2] ..." reads badly
        return _oserror_line(e)
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split()) if "\n" in text else text


if __name__ == "__main__":
    sys.exit(main())
