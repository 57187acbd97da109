"""Atomic writes: a file or a whole directory appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


# atomic writes ----------------------------------------------------------------------------------------
def umask_mode(base: int = 0o666) -> int:
    """`base` under the process umask: the mode any other tool's output would get."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def follow_umask(path: str | Path, base: int = 0o666) -> None:
    """Give a file written through mkstemp (0600) or a library that writes 0600 the user's usual mode."""
    os.chmod(path, umask_mode(base))


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dir_atomically(out_dir: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Build the directory in a temporary sibling, then move it into place; on error nothing is left."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{str(out_dir)!r} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} is not empty; choose a new directory or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    tmp.chmod(umask_mode(0o777))
    try:
        fill(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
