"""A run folder belongs to one run: a lock while training, no silent replacement, atomic small files."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import filelock

from srupp.errors import RunDirError, name_path

LOCK = ".srupp.lock"
# What makes a folder "a run": any of these means another run's results live there.
RUN_FILES = ("config.json", "metrics.jsonl", "learning_curve.png", "checkpoints")


def create_temp_beside(path: Path) -> tuple[int, str]:
    """A new, empty file of this process beside ``path`` to be renamed over it: ``(fd, name)``.

    The pid in the name: another process's temporary files are never this one's to remove. Created with mode
    0666, which the operating system narrows by the user's umask, so the renamed file gets the permissions
    any new file of the user would (``tempfile.mkstemp`` makes 0600, and reading the umask means setting it,
    process-wide)."""
    while True:
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file of this process beside ``path`` and rename it over ``path``."""
    path = Path(path)
    try:
        fd, tmp = create_temp_beside(path)
    except OSError as err:
        raise name_path(err, path) from err
    try:
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise name_path(err, path) from err
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RunFolder:
    """Claim ``path`` for one training run (a context manager; only DDP rank 0 should enter it).

    On entering: takes an exclusive lock (a second trainer on the folder gets RunDirError at once); with
    ``resume`` requires a last checkpoint; otherwise refuses a folder holding another run unless
    ``overwrite``, which moves that run's files into ``replaced/<UTC time>/`` (nothing is deleted).
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.moved_to: Path | None = None
        self._lock: filelock.BaseFileLock | None = None

    def __enter__(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(self.path / LOCK, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout as err:
            raise RunDirError(
                f"{self.path} is in use by another `srupp train` (lock {self.path / LOCK}); wait for it to finish "
                f"or choose another --out_dir"
            ) from err
        self._lock = lock
        try:
            self._claim()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _claim(self) -> None:
        last = self.path / "checkpoints" / "last.safetensors"
        if self.resume:
            if not last.is_file():
                raise RunDirError(f"cannot resume {self.path}: it has no checkpoint {last}")
            return
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return
        if not self.overwrite:
            raise RunDirError(
                f"{self.path} holds another run ({', '.join(present)}); pass --resume {self.path} to continue it, "
                f"--overwrite to move its files aside, or choose another --out_dir"
            )
        target = self.path / "replaced" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
        target.mkdir(parents=True)
        for name in present:
            os.replace(self.path / name, target / name)
        self.moved_to = target

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
