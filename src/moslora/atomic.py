"""Crash-safe writes: a reader sees the old directory (or file) or the new one, never a mix.

Files are written into a fresh staging sibling, flushed to disk, and the staging entry then
replaces the target in one step: Linux's ``renameat2(RENAME_EXCHANGE)`` swaps two directories,
``os.replace`` a file. Where ``renameat2`` is missing (other systems, old kernels), the swap
falls back to two renames, with a short window in which the target is absent but the old copy
is kept beside it.

Files come out with the mode a plain ``open()`` gives them (``0666`` minus the umask, so
0644 under umask 022): some writers, safetensors among them, create 0600 files, which a
server running as another user could not read.

A staging directory is named ``.<target>.tmp-<pid>@<host>-<token>``. A writer killed mid-save
leaves it behind; the next save of the same target (or ``remove_stale_staging``) deletes the
ones whose writer is gone: same host, and that process id no longer exists.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import socket
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# <name>.tmp-<pid>@<host>-<token>: the token never holds "-", so the host is everything up to
# the last "-" (host names may contain "-" and ".")
_STAGING = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)@(?P<host>.*)-(?P<token>[0-9a-f]+)")


@contextmanager
def atomic_directory(target: str | Path, keep_others: bool = True) -> Iterator[Path]:
    """Yield an empty directory to fill; on a clean exit it replaces ``target`` atomically.

    With ``keep_others``, entries already in ``target`` that the block does not write (a
    README, training state) are carried over as hard links; without, the old directory goes
    whole. On an exception ``target`` is untouched. Staging
    directories of ``target`` left by killed writers are removed first.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    staging = staging_directory(target)
    try:
        yield staging
        if keep_others and target.exists():
            _carry_over(target, staging)
        publish_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a staging path to write; on a clean exit it replaces ``target`` atomically."""
    target = Path(target)
    staging = _staging_path(target)
    try:
        yield staging
        _widen_to_umask(staging)
        _fsync_path(staging)
        os.replace(staging, target)
        _fsync_path(target.parent)
    finally:
        staging.unlink(missing_ok=True)


def staging_directory(target: str | Path) -> Path:
    """Create and return a fresh, empty staging directory beside ``target``.

    Fill it, then ``publish_directory(staging, target)``. Stale staging directories of
    ``target`` (their writer is dead) are removed first.
    """
    staging = _staging_path(Path(target))
    staging.mkdir()  # not mkdtemp: the directory gets the umask's mode, not 0700
    return staging


def publish_directory(staging: Path, target: Path) -> None:
    """Flush ``staging`` to disk and make it ``target`` in one step; drop the old ``target``.

    Its files get at least the read and write bits the umask allows (see the module doc).
    """
    for dirpath, _, files in os.walk(staging):
        for name in files:
            _widen_to_umask(Path(dirpath) / name)
    _fsync_tree(staging)
    if target.exists():
        _exchange(staging, target)  # staging now holds the old directory
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.rename(staging, target)
    _fsync_path(target.parent)


def remove_directory(path: str | Path) -> None:
    """Delete a directory so that readers see it whole or not at all.

    It is first renamed to a staging name (one atomic step), then deleted; a kill during the
    deletion leaves a stale staging directory, which the next save beside it removes.
    """
    path = Path(path)
    doomed = _staging_path(path)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_staging(parent: str | Path, name: str | None = None) -> list[Path]:
    """Delete staging directories in ``parent`` whose writer process is gone; return them.

    Only entries named by this module with this host's name and a process id that no longer
    exists are removed, and only for target ``name`` (``None``: any target). Staging entries
    of live writers, of other hosts (a shared file system) and of unknown origin are kept.
    """
    removed = []
    host = socket.gethostname()
    for entry in Path(parent).iterdir():
        match = _STAGING.fullmatch(entry.name)
        if (match is None or (name is not None and match["name"] != name)
                or match["host"] != host or _alive(int(match["pid"]))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _staging_path(target: Path) -> Path:
    """A new staging name beside ``target``, after removing the stale ones."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent, target.name)
    owner = f"{os.getpid()}@{socket.gethostname()}"
    return target.with_name(f".{target.name}.tmp-{owner}-{secrets.token_hex(8)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False  # not a valid pid on this system
    return True


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


def _widen_to_umask(path: Path) -> None:
    """Add the permission bits ``open()`` would have given a new file (never remove any)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode) and (stat.S_IMODE(mode) | _new_file_mode()) != stat.S_IMODE(mode):
        os.chmod(path, stat.S_IMODE(mode) | _new_file_mode())


def _new_file_mode() -> int:
    """``0666`` minus the process umask: the mode of a file created by ``open()``."""
    try:  # Linux shows the umask without changing it (os.umask can only read by setting)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


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
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
