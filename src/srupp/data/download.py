"""Download a corpus archive over HTTP(S) with sha256 verification, written atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from srupp.errors import ConfigError, CorpusError, DownloadError, name_path

# Public addresses of the standard corpora. Known sizes are checked after extraction by the prepare
# functions; pass ``sha256`` to pin an archive's digest (the digest of every download is printed).
URLS = {
    "enwik8": "http://mattmahoney.net/dc/enwik8.zip",
    "text8": "http://mattmahoney.net/dc/text8.zip",
    "wt103": "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
}


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) addresses only (urllib's default also follows ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise DownloadError(f"{req.full_url} redirected to {newurl!r}; only http:// and https:// are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` unless a file with the right digest is already there.

    Args:
        url: an ``http://`` or ``https://`` address.
        dest: the file to write; the download goes to a temporary file beside it and is renamed into place
            only after the digest matches, so an interrupted download never leaves a partial file.
        sha256: the expected hex digest; None skips verification (the digest is still returned in the log).

    Returns:
        ``dest`` as a Path.

    Raises:
        ConfigError (a ValueError): ``url`` is not http(s).
        CorpusError (a ValueError): the downloaded file's digest differs from ``sha256``.
        DownloadError (an OSError): no connection, an HTTP error, or a redirect to another scheme.
    """
    dest = Path(dest)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"`url` must start with http:// or https://, got {url!r}")
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    opener = urllib.request.build_opener(_HTTPOnlyRedirects)
    try:
        try:
            with os.fdopen(fd, "wb") as out, opener.open(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out, length=1 << 20)
        except urllib.error.URLError as err:  # HTTPError included; its reason names the status
            raise DownloadError(f"cannot download {url}: {err.reason}") from err
        except (TimeoutError, ConnectionError) as err:
            raise DownloadError(f"cannot download {url}: {err}") from err
        except OSError as err:
            raise name_path(err, dest) from err
        actual = sha256_file(tmp)
        if sha256 is not None and actual != sha256.lower():
            raise CorpusError(f"sha256 of {url} must be {sha256.lower()}, got {actual}; the download was discarded")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
