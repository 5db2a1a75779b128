"""A run folder belongs to one run: a lock while training, no silent replacement, atomic small files."""

from __future__ import annotations

import os
from pathlib import Path

import filelock

from srupp.errors import RunDirError
from srupp.files import create_temp_beside, move_aside, remove_orphans, write_text_atomic

__all__ = ["LOCK", "RUN_FILES", "RunFolder", "create_temp_beside", "nothing_to_resume", "write_text_atomic"]

LOCK = ".srupp.lock"
# What makes a folder "a run": any of these means another run's results live there.
RUN_FILES = ("config.json", "metrics.jsonl", "learning_curve.png", "checkpoints")


def nothing_to_resume(path: str | os.PathLike) -> RunDirError:
    """The error for ``--resume`` of a folder without a last checkpoint, with a way forward."""
    path = Path(path)
    last = path / "checkpoints" / "last.safetensors"
    if any((path / name).exists() for name in RUN_FILES):
        hint = "; the run stopped before its first checkpoint: start it again with --overwrite"
    else:
        hint = "; start a run there without --resume"
    return RunDirError(f"cannot resume {path}: it has no checkpoint {last}{hint}")


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
            for folder in (self.path, self.path / "checkpoints"):
                if not folder.is_symlink():
                    remove_orphans(folder)  # of runs killed while writing: the lock says none is writing now
            self._claim()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _claim(self) -> None:
        last = self.path / "checkpoints" / "last.safetensors"
        for name in ("data", "replaced"):
            if (self.path / name).is_symlink():  # what it points to lies outside the run folder: not this run's
                raise RunDirError(
                    f"{self.path / name} is a symbolic link; a run folder's {name} must be a folder in it"
                )
        if self.resume:
            if not last.is_file():
                raise nothing_to_resume(self.path)
            return
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return
        if not self.overwrite:
            resume = (
                f"pass --resume {self.path} to continue it, "
                if last.is_file()
                else "it has no checkpoint to resume; pass "
            )
            raise RunDirError(
                f"{self.path} holds another run ({', '.join(present)}); {resume}--overwrite to move its files aside, "
                f"or choose another --out_dir"
            )
        self.moved_to = move_aside([self.path / name for name in present], self.path / "replaced")

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
