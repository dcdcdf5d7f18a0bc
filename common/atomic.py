"""Atomic file writes: temp file in the same folder, fsync, rename, fsync the folder. A reader
(or a crash, or a concurrent writer) never sees half a file, and a finished write survives
a power cut."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], None],
                 keep_previous: Path | None = None) -> None:
    """Write ``path`` through ``write(file)``; with ``keep_previous``, the version it
    replaces is kept there first.

    Safe against concurrent writers of the same path (threads or processes): nothing is
    checked before it is acted on, so a version that vanishes in between is simply one
    that is not there to keep. At every moment ``path`` (once written) and
    ``keep_previous`` (once kept) each hold one complete version: the kept one is a hard
    link, renamed into place, so ``path`` never goes missing (where the file system has no
    hard links, ``path`` is moved there instead and is briefly absent, while the kept one is
    complete). After the renames the folder is fsynced, so they are durable, not only the
    bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None:
            _keep(path, keep_previous, f"{tmp}.prev")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    if keep_previous is not None and keep_previous.parent.resolve() != path.parent.resolve():
        _fsync_dir(keep_previous.parent)


def _keep(path: Path, keep_previous: Path, link: str) -> None:
    """Make ``keep_previous`` the version now at ``path``, if any: hard-link it under
    ``link`` (a name only this writer uses: its temp file's plus a suffix), then rename that
    over ``keep_previous`` (one complete version replaces another)."""
    try:
        os.link(path, link)
    except FileNotFoundError:
        return  # nothing written yet, or a concurrent writer's move took it: nothing to keep
    except OSError:  # no hard links on this file system (FAT, some network mounts)
        try:
            os.replace(path, keep_previous)
        except FileNotFoundError:
            pass
        return
    try:
        os.replace(link, keep_previous)
    finally:
        # gone if renamed; left if another writer had just kept the same version (renaming
        # one link of a file onto another is a no-op that succeeds, POSIX rename(2))
        Path(link).unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so the renames in it survive a crash (POSIX; Windows has no way to
    open a folder for this, and its renames are journalled by NTFS)."""
    if os.name != "posix":
        return
    try:
        dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:  # a write-only folder: the rename happened, durability unknowable
        return
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system without dir fsync
            raise
    finally:
        os.close(dir_fd)
