"""The exceptions srupp raises for a user's mistakes and bad files, as opposed to its own bugs.

Every class derives from :class:`SRUppError` and also from the built-in exception of its kind (``ValueError``
for a bad value, ``RuntimeError`` for a missing backend, ...), so ``except ValueError`` keeps working. The
command line prints these (and ``OSError``) as one line and exits non-zero; anything else is a bug and
keeps its traceback. This module imports nothing from srupp, so every tier may use it.
"""

from __future__ import annotations


class SRUppError(Exception):
    """Base of the errors caused by input (options, configs, files), never by a bug in srupp."""


class ConfigError(SRUppError, ValueError):
    """An option, config file or argument has a wrong value."""


class ConfigTypeError(SRUppError, TypeError):
    """An option, config file or argument has a value of the wrong type (a string for a number or a bool)."""


class CheckpointError(SRUppError, ValueError):
    """A checkpoint is damaged, of another format, or does not match the model it should rebuild."""


class CorpusError(SRUppError, ValueError):
    """A prepared corpus or a corpus source is missing parts, empty, too large or would be overwritten."""


class RunDirError(SRUppError, RuntimeError):
    """A run folder holds another run, is in use by another trainer, or lacks what a resume needs."""


class UnavailableError(SRUppError, RuntimeError):
    """A device or backend that was asked for by name is not available here."""


class DownloadError(SRUppError, OSError):
    """A download failed or was redirected to a refused scheme."""


class DivergenceError(SRUppError, FloatingPointError):
    """Training produced a non-finite loss, gradient or parameter; the last good checkpoint is kept."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConfigTypeError",
    "CorpusError",
    "DivergenceError",
    "DownloadError",
    "RunDirError",
    "SRUppError",
    "UnavailableError",
    "name_path",
]


def name_path(err: OSError, path: object, replace: bool = False) -> OSError:
    """``err`` itself if it names a file, else an OSError of the same kind and errno that names ``path``
    (a failed ``write()`` on an open file says "No space left on device" but not where). ``replace``: name
    ``path`` even where ``err`` names a file (an internal temporary one the user never asked for)."""
    if not replace and (err.filename is not None or isinstance(err, SRUppError)):
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))
