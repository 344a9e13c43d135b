"""Crash-safe directory writes: a reader sees the old directory or the new one, never a mix.

Files are written into a fresh temporary sibling directory, flushed to disk, and the two
directories are then swapped in one step with Linux's ``renameat2(RENAME_EXCHANGE)``. Where
that call is missing (other systems, old kernels), the swap falls back to two renames, with
a short window in which the target is absent but the old copy is kept beside it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty directory to fill; on a clean exit it replaces ``target`` atomically.

    Entries already in ``target`` that the block does not write (a README, training state)
    are carried over as hard links. On an exception ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            _carry_over(target, staging)
        _fsync_tree(staging)
        if target.exists():
            _exchange(staging, target)  # staging now holds the old directory
        else:
            os.rename(staging, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    for entry in old.iterdir():
        dest = new / entry.name
        if dest.exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest, copy_function=os.link, symlinks=True)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), dest)
        else:
            os.link(entry, dest)


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
        if rc == 0:
            return
    # fallback: not atomic, but the old copy survives under a sibling name until the end
    old = b.with_name(f".{b.name}.old-{os.getpid()}")
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
