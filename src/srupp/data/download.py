"""Download a corpus archive over HTTPS: bounded, resumable, checked before it is renamed into place.

The body goes to ``.<name>.part`` beside the target. It is renamed to the target only when it is complete: as
long as the server declared (``Content-Length``, ``Content-Range``), the archive's published size where one
is known, and the expected sha256 where one is known (``--sha256``, or the digest recorded by the first
complete download, ``<name>.sha256``: trust on first use). A cut connection leaves the ``.part`` file, and
the next run asks the server for the rest (an HTTP range request). A body longer than it should be (or than
``max_bytes``) is cut off there and discarded, so an endless body never fills the disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from srupp.errors import ConfigError, CorpusError, DownloadError, UnavailableError, name_path
from srupp.files import replacing


@dataclass(frozen=True)
class Archive:
    """A corpus archive's address and what is published about it (None: nothing that could be verified)."""

    url: str
    size: int | None = None


# Sizes as published with the archives (Matt Mahoney's pages; the TensorFlow word2vec tutorial checks text8's).
# Their sha256 digests are not published there and could not be verified when this was written, so none is
# pinned: the first complete download records its digest and every later use checks it. enwik8's content is
# also checked after extraction against the SHA-1 its author publishes (srupp.data.corpus.CONTENT_SHA1).
ARCHIVES = {
    "enwik8": Archive("https://mattmahoney.net/dc/enwik8.zip", size=36_445_475),
    "text8": Archive("https://mattmahoney.net/dc/text8.zip", size=31_344_016),
}
URLS = {name: archive.url for name, archive in ARCHIVES.items()}
# A corpus archive of unknown size is refused beyond this (the largest standard one, enwik9.zip, is 0.3 GB).
MAX_DOWNLOAD_BYTES = 4 << 30
_CHUNK = 1 << 20


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


def _digest_record(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _expected_sha256(dest: Path, sha256: str | None) -> str | None:
    """``sha256`` if given, else the digest the first complete download of ``dest`` recorded."""
    if sha256 is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise ConfigError(f"`sha256` must be 64 hexadecimal digits, got {sha256!r}")
        return sha256.lower()
    record = _digest_record(dest)
    if record.is_file() and record.stat().st_size < 1024:
        text = record.read_text(encoding="ascii", errors="replace").split()
        if text and re.fullmatch(r"[0-9a-f]{64}", text[0]):
            return text[0]
    return None


def _verify(path: Path, url: str, size: int | None, sha256: str | None) -> str:
    """The file's sha256, after checking its size and digest against what is expected (CorpusError if not)."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise CorpusError(f"{url} must have {size:,} bytes, got {actual_size:,}")
    actual = sha256_file(path)
    if sha256 is not None and actual != sha256:
        raise CorpusError(f"sha256 of {url} must be {sha256}, got {actual}")
    return actual


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    size: int | None = None,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` to ``dest`` unless a verified file is already there (see the module's docstring).

    Args:
        url: an ``http://`` or ``https://`` address.
        dest: the file to write.
        sha256: the expected hex digest (default: the one recorded by an earlier complete download, if any).
        size: the expected size in bytes (a published size), checked as the body arrives and at the end.
        max_bytes: refuse a larger body (a declared or an actual one).

    Returns:
        ``dest`` as a Path.

    Raises:
        ConfigError (a ValueError): ``url`` is not http(s), or ``sha256`` is not a hex digest.
        CorpusError (a ValueError): the complete file has the wrong size or digest (it is discarded).
        DownloadError (an OSError): no connection, an HTTP error, a redirect to another scheme, a body cut
            short (kept for resuming) or longer than declared or allowed (discarded).
    """
    dest = Path(dest)
    if not url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"`url` must start with http:// or https://, got {url!r}")
    expected = _expected_sha256(dest, sha256)
    if dest.is_file() and not dest.is_symlink():
        try:
            _verify(dest, url, size, expected)
            if expected is not None or size is not None:
                return dest
        except CorpusError:
            pass  # a truncated or different file from an older version: fetched again, never reused
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # one downloader per file; released with the fd
        except BlockingIOError as err:
            raise DownloadError(f"another process is downloading {dest}; wait for it to finish") from err
        _fetch(url, part, size=size, max_bytes=max_bytes if size is None else min(size, max_bytes), timeout=timeout)
        try:
            actual = _verify(part, url, size, expected)
        except CorpusError as err:
            part.unlink(missing_ok=True)
            raise CorpusError(f"{err}; the download was discarded") from None
        os.replace(part, dest)
        _digest_record(dest).write_text(f"{actual}  {dest.name}\n", encoding="ascii")
    finally:
        if part.is_file() and part.stat().st_size == 0:
            part.unlink()  # nothing arrived: nothing to resume
        os.close(fd)
    return dest


def _open(url: str, start: int, timeout: float):
    """The response for ``url`` from byte ``start`` (a range request when resuming)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    opener = urllib.request.build_opener(_HTTPOnlyRedirects)
    try:
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # the part on disk is as long as the file, or longer: start again
            return None
        raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise DownloadError(f"cannot download {url}: {err.reason}") from err
    except (TimeoutError, ConnectionError) as err:
        raise DownloadError(f"cannot download {url}: {err}") from err


def _declared_total(response, start: int) -> tuple[int, int | None]:
    """``(offset, total)``: where the body starts in the file (0 unless the server honoured the range) and the
    file's declared length (None if the server declares none)."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.strip().isdigit() else None
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (response.headers.get("Content-Range") or "").strip())
        if match and int(match.group(1)) == start:
            total = match.group(3)
            return start, int(total) if total != "*" else (None if length is None else start + length)
        raise DownloadError(f"the server answered a range request with {response.headers.get('Content-Range')!r}")
    return 0, length


def _fetch(url: str, part: Path, *, size: int | None, max_bytes: int, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (from scratch when the server ignores the range)."""
    start = part.stat().st_size if part.is_file() else 0
    response = _open(url, start, timeout)
    if response is None:
        part.unlink(missing_ok=True)
        start, response = 0, _open(url, 0, timeout)
    with response:
        offset, total = _declared_total(response, start)
        limit = max_bytes if total is None else total
        if total is not None and (total > max_bytes or (size is not None and total != size)):
            part.unlink(missing_ok=True)
            expected = f"{size:,}" if size is not None else f"at most {max_bytes:,}"
            raise DownloadError(f"{url} declares {total:,} bytes, expected {expected}; nothing was kept")
        received = offset
        try:
            with (
                open(part, "r+b" if offset else "wb") as out,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    desc=part.name[1:-5],
                    disable=None,
                    file=sys.stderr,
                ) as bar,
            ):
                out.seek(offset)
                out.truncate()
                while chunk := response.read(min(_CHUNK, limit + 1 - received)):
                    received += len(chunk)
                    if received > limit:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
        except (TimeoutError, ConnectionError, http.client.HTTPException) as err:  # the part is kept to resume
            raise DownloadError(
                f"download of {url} stopped at {received:,} bytes ({err}); run again to resume"
            ) from err
        except OSError as err:  # a full disk: name the file the user asked for, not the .part
            raise name_path(err, part.with_name(part.name[1:-5]), replace=True) from err
    if received > limit:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url} sent more than the {limit:,} bytes it should have; the download was discarded")
    if total is not None and received < total:
        raise DownloadError(f"download of {url} stopped at {received:,} of {total:,} bytes; run again to resume")


# WikiText-103's original address has answered 403 since 2024; the Hugging Face Hub keeps the dataset (as
# parquet files of the original lines), and checks each file's sha256 as it downloads it.
WT103_REPO, WT103_CONFIG = "Salesforce/wikitext", "wikitext-103-v1"
_WT103_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def download_wikitext103(folder: str | os.PathLike) -> Path:
    """WikiText-103 from the Hugging Face Hub as ``wiki.{train,valid,test}.tokens`` in ``folder`` (each written
    whole, then renamed into place; one already there is kept). Needs ``pip install 'srupp[wt103]'``.

    Returns:
        ``folder`` as a Path (what :func:`srupp.data.prepare_wikitext103` reads).
    """
    try:
        import huggingface_hub
        import pyarrow.parquet as parquet
    except ImportError as err:
        raise UnavailableError(f"downloading WikiText-103 needs `pip install 'srupp[wt103]'` ({err})") from err
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        files = huggingface_hub.list_repo_files(WT103_REPO, repo_type="dataset")
        for split, prefix in _WT103_SPLITS.items():
            target = folder / f"wiki.{split}.tokens"
            shards = sorted(f for f in files if f.startswith(f"{WT103_CONFIG}/{prefix}-") and f.endswith(".parquet"))
            if not shards:
                raise DownloadError(f"the Hub dataset {WT103_REPO} has no {WT103_CONFIG}/{prefix}-*.parquet files")
            if target.is_file():
                continue
            local = [huggingface_hub.hf_hub_download(WT103_REPO, shard, repo_type="dataset") for shard in shards]
            with replacing(target) as (fd, _), open(fd, "w", encoding="utf-8", closefd=True) as out:
                for path in local:
                    for batch in parquet.ParquetFile(path).iter_batches(columns=["text"]):
                        out.writelines(batch.column(0).to_pylist())  # each row is one line, "\n" included
    except (OSError, *huggingface_hub.errors.HfHubHTTPError.__bases__) as err:  # the HTTP library's errors too
        raise DownloadError(f"cannot download WikiText-103 from the Hugging Face Hub ({err})") from err
    return folder
