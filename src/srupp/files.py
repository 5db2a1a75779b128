"""Files that belong to the user: temporary names of this process, atomic replacement, moving old files aside.

Every temporary file or folder srupp writes is named ``.<target>.<pid>-<host>.<random>.tmp`` beside its
target, so a later process can tell whose it is: :func:`remove_orphans` removes those of processes that no
longer run on this machine (a run killed by ``kill -9`` or a power cut) and never touches a live process's
files, another machine's (a folder shared over the network) or anything not named this way. This module
imports nothing from srupp but its errors, so every tier may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from srupp.errors import ConfigError, name_path

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\..+\.(\d{1,10})-([0-9a-f]{8})\.[0-9a-f]{8}\.tmp$")


def temp_path_beside(path: str | os.PathLike) -> Path:
    """A fresh temporary name of this process in ``path``'s folder (nothing is created)."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}-{_HOST}.{secrets.token_hex(4)}.tmp"


def create_temp_beside(path: Path) -> tuple[int, str]:
    """A new, empty file of this process beside ``path`` to be renamed over it: ``(fd, name)``.

    Created with mode 0666, which the operating system narrows by the user's umask, so the renamed file gets
    the permissions any new file of the user would (``tempfile.mkstemp`` makes 0600, and reading the umask
    means setting it, process-wide)."""
    while True:
        tmp = str(temp_path_beside(path))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def make_temp_dir_beside(path: Path) -> Path:
    """A new, empty folder of this process beside ``path`` (mode 0777 less the umask)."""
    while True:
        tmp = temp_path_beside(path)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove this machine's temporary files and folders in ``folder`` whose process has died; returns them.

    Symlinks are never followed, and a name that is not an srupp temporary name is never touched."""
    folder, removed = Path(folder), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or match.group(2) != _HOST or _alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue  # removed meanwhile by another process cleaning up, or not ours to remove after all
    return removed


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """A new temporary file of this process beside ``path``, ``(fd, name)``, renamed over ``path`` when the block
    ends and removed if it raises; an OSError names ``path``, not the temporary file."""
    path = Path(path)
    try:
        fd, tmp = create_temp_beside(path)
    except OSError as err:
        raise name_path(err, path) from err
    try:
        try:
            yield fd, tmp
        except OSError as err:
            raise name_path(err, path) from err
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file of this process beside ``path`` and rename it over ``path``."""
    with replacing(path) as (fd, _), os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def move_aside(paths: list[Path], holder: Path) -> Path:
    """Move ``paths`` into a new folder ``holder/<UTC time>[.N]/`` (nothing is deleted); returns that folder."""
    target = holder / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir(parents=True)
    for path in paths:
        os.replace(path, target / path.name)
    return target


def refuse_inside(out: str | os.PathLike, source: str | os.PathLike) -> None:
    """Raise ConfigError if the output ``out`` is ``source`` or a folder that holds it (its run folder, a parent)."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise ConfigError(f"`out` {out} holds {source}, which is being exported; choose a new path")
