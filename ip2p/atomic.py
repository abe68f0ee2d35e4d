"""Writing files and folders so that a kill never leaves a half-written one, and leftovers do not pile up.

Every writer here puts the new data in a hidden sibling of the target, ``.<name>.tmp-<pid>-<host>-<random>``, flushes
it to disk, then renames it over the target: readers see the old version or the new one, never half of either. A
folder that already exists is first renamed aside (``.<name>.old-...``) and deleted only once the new one is in
place. A writer killed midway leaves its sibling behind; the next write of the same target deletes the siblings of
processes on this machine that are gone, and puts the previous version back if the kill fell between the two renames
(the only moment the target is missing). Siblings of live processes, or of other machines sharing the filesystem, are
never touched.

Files get the mode the umask gives (``0o666 & ~umask``, as ``open`` does): safetensors and ``tempfile`` write
owner-only files, which would keep other users and tools (a shared ComfyUI server, a container) from reading them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["chmod_tree", "fsync_file", "fsync_tree", "output_folder", "remove_stale", "remove_stale_under", "sibling",
           "swap_in", "write_bytes", "write_json", "write_text", "writing_file", "writing_folder"]

logger = logging.getLogger(__name__)

_KINDS = ("tmp", "old")


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def sibling(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A new hidden name beside ``path`` for a writer of this process: ``.<name>.<kind>-<pid>-<host>-<random>``."""
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} must be one of {_KINDS}")
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or a number no process has: leave its files alone
    return True


def _is_stale(name: str, prefix: str) -> bool:
    """Whether ``name`` (after ``prefix``) is a sibling left by a process of this machine that no longer runs."""
    parts = name[len(prefix):].split("-")
    if not parts[0].isdigit():
        return False
    if len(parts) >= 3 and parts[1] != _host_tag():  # written on another machine: it may still be running there
        return False
    return not _pid_alive(int(parts[0]))


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(path: str | os.PathLike) -> None:
    """Delete what killed writers of ``path`` left beside it; restore the previous version if ``path`` is missing.

    A writer killed between moving the old version aside and renaming the new one in leaves no ``path`` but a complete
    ``.old`` sibling: that one is renamed back (the newest, if several), and the others deleted.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    restorable = []
    for kind in _KINDS:
        prefix = f".{path.name}.{kind}-"
        for found in path.parent.glob(glob.escape(prefix) + "*"):
            if not _is_stale(found.name, prefix):
                continue
            if kind == "old" and not os.path.lexists(path):
                restorable.append(found)
            else:
                _delete(found)
    if restorable:
        try:
            newest = max(restorable, key=lambda p: p.stat().st_mtime)
            os.rename(newest, path)
        except OSError:  # another process cleaning up at the same moment got there first
            return
        logger.warning("restored %s from %s: a save was killed after moving it aside", path, newest.name)
        for found in restorable:
            if found != newest:
                _delete(found)


def remove_stale_under(folder: str | os.PathLike) -> None:
    """:func:`remove_stale` for every target anywhere under ``folder`` that a killed writer left a sibling of.

    For folders of many files written with ``writing_file(clean=False)``: one sweep (e.g. when a run starts) instead
    of a folder listing at each write.
    """
    targets = set()
    for kind in _KINDS:
        for found in Path(folder).rglob(f".*.{kind}-*"):
            targets.add(found.parent / found.name[1:].rsplit(f".{kind}-", 1)[0])
    for target in sorted(targets):
        remove_stale(target)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def chmod_tree(folder: str | os.PathLike, mode: int) -> None:
    """Give every file under ``folder`` ``mode`` (safetensors writes weights owner-only)."""
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder`` to disk, so that a crash after a rename never leaves a complete-looking
    folder of empty or partial files."""
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            fsync_file(p)


def swap_in(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the folder ``new`` to ``target``; an existing ``target`` is moved aside first and deleted afterwards.

    A kill between the two renames leaves no ``target`` and the previous version whole at ``.<name>.old-*``, which the
    next :func:`remove_stale` (every writer here calls it) puts back.
    """
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    old = sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _delete(old)


@contextlib.contextmanager
def writing_file(path: str | os.PathLike, *, clean: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path`` atomically.

    The temporary file already exists (empty, with the umask's mode) when the body runs; a writer may also replace it.
    On an exception (or a kill's KeyboardInterrupt/SystemExit) it is deleted and ``path`` is left as it was.
    ``clean=False`` skips :func:`remove_stale`, which lists the folder: for many small files written once each into
    one folder (edited images), where that listing would make writing them all quadratic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        remove_stale(path)
    tmp = sibling(path)
    # os.open with 0o666 honours the umask, unlike tempfile.mkstemp's 0o600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def writing_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder to build ``path``'s new content in; on success it replaces ``path``.

    Its files get the umask's mode and are flushed to disk before the rename (:func:`swap_in`); on an exception the
    temporary folder is deleted and ``path`` is left as it was. Callers check that an existing ``path`` may be
    replaced before they call this.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = sibling(path)
    tmp.mkdir()  # mkdir honours the umask (tempfile.mkdtemp would make the folder owner-only)
    try:
        yield tmp
        chmod_tree(tmp, tmp.stat().st_mode & 0o666)
        fsync_tree(tmp)
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_folder(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Create the output folder ``path`` (parents too) before any work, or raise a ValueError saying why not."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {str(out)!r} is a file; pass a folder (new or existing) for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {str(out)!r} cannot be created ({error.strerror}); pass a folder you can write "
                         "to") from None
    return out


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`writing_file`); returns the path."""
    with writing_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, **dumps: Any) -> Path:
    """Write ``value`` as JSON (``dumps`` go to :func:`json.dumps`) to ``path`` atomically, with a final newline."""
    return write_text(path, json.dumps(value, **dumps) + "\n")
