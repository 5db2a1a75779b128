"""Issue 24 item 5 and issue 23's downloads: declared length, size bound, digest, resume; a local HTTP server on
127.0.0.1, no network."""

import hashlib
import http.server
import io
import threading
import zipfile

import pytest

from srupp.cli import main
from srupp.data import download
from srupp.errors import CorpusError, DownloadError

BODY = bytes(range(256)) * 4000  # 1,024,000 bytes


class _Server(http.server.BaseHTTPRequestHandler):
    """``/full``: the body with its length and range support; ``/short``: declares 1,000,000 bytes, sends 10;
    ``/endless``: no length, never ends; ``/cut``: the first half, then the connection closes (once)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.server.requests.append((self.path, self.headers.get("Range")))
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
        if self.path == "/short":
            self._head(200, {"Content-Length": "1000000"})
            self.wfile.write(b"0123456789")
        elif self.path == "/endless":
            self._head(200, {"Connection": "close"})
            try:
                while True:
                    self.wfile.write(b"x" * 65536)
            except OSError:
                pass
        elif self.path == "/cut" and not start and not self.server.cut_done:
            self.server.cut_done = True
            self._head(200, {"Content-Length": str(len(BODY))})
            self.wfile.write(BODY[: len(BODY) // 2])
        else:
            body = self.server.body
            if start:
                self._head(
                    206,
                    {
                        "Content-Length": str(len(body) - start),
                        "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                    },
                )
            else:
                self._head(200, {"Content-Length": str(len(body))})
            self.wfile.write(body[start:])
        self.close_connection = True

    def _head(self, code, headers):
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    httpd.requests, httpd.cut_done, httpd.body = [], False, BODY
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()


def test_a_body_shorter_than_declared_is_never_accepted_or_reused(server, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["data", "prepare", "text8", "--download", "--url", f"{server.url}/short", "--out", str(out)]
    for _ in range(2):  # the second run does not take the first's 10 bytes for the archive
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "stopped at 10 of 1,000,000 bytes" in err[-1]
    assert not (out / "download" / "short").exists() and not (out / "meta.json").exists()


def test_an_endless_body_is_cut_off_at_the_bound(server, tmp_path):
    with pytest.raises(DownloadError, match="sent more than the 3,000,000 bytes"):
        download(f"{server.url}/endless", tmp_path / "x.zip", max_bytes=3_000_000)
    assert list(tmp_path.iterdir()) == []


def test_a_declared_length_beyond_the_published_size_is_refused_before_reading(server, tmp_path):
    with pytest.raises(DownloadError, match="declares 1,024,000 bytes, expected 1,000"):
        download(f"{server.url}/full", tmp_path / "x.zip", size=1000)
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / ".x.zip.part").exists()


def test_a_cut_download_resumes_where_it_stopped(server, tmp_path):
    dest = tmp_path / "x.zip"
    with pytest.raises(DownloadError, match="run again to resume"):
        download(f"{server.url}/cut", dest)
    assert (tmp_path / ".x.zip.part").stat().st_size == len(BODY) // 2 and not dest.exists()
    download(f"{server.url}/cut", dest)
    assert dest.read_bytes() == BODY and server.requests[-1] == ("/cut", f"bytes={len(BODY) // 2}-")
    assert (tmp_path / "x.zip.sha256").read_text().split()[0] == hashlib.sha256(BODY).hexdigest()


def test_the_digest_is_checked_before_renaming_and_recorded_for_later_uses(server, tmp_path):
    dest = tmp_path / "x.zip"
    with pytest.raises(CorpusError, match="sha256 of .* must be 0{64}"):
        download(f"{server.url}/full", dest, sha256="0" * 64)
    assert not dest.exists() and not (tmp_path / ".x.zip.part").exists()
    download(f"{server.url}/full", dest, sha256=hashlib.sha256(BODY).hexdigest())
    requests = len(server.requests)
    download(f"{server.url}/full", dest)  # verified against the record: not fetched again
    assert len(server.requests) == requests
    dest.write_bytes(BODY[:100])  # damaged later: fetched again, never reused
    download(f"{server.url}/full", dest)
    assert dest.read_bytes() == BODY and len(server.requests) == requests + 1
    server.body = b"another file"  # the server now serves something else: refused against the record
    dest.unlink()
    with pytest.raises(CorpusError, match="must be " + hashlib.sha256(BODY).hexdigest()):
        download(f"{server.url}/full", dest)


def test_the_published_sizes_are_pinned_and_addresses_are_https():
    for name, archive in download.__globals__["ARCHIVES"].items():
        assert archive.url.startswith("https://") and archive.size, name
    assert download.__globals__["ARCHIVES"]["text8"].size == 31_344_016


def test_enwik8_content_is_checked_against_its_published_sha1(tmp_path, capsys):
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("enwik8", b"\0" * 100_000_000)
    assert main(["data", "prepare", "enwik8", "--source", str(archive), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "57b8363b814821dc9d47aa4d41f58733519076b2" in err[0]


def test_wikitext103_comes_from_the_hub(tmp_path, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    lines = {
        "train": [" = A = \n", " the cat sat \n", "\n"] * 5,
        "validation": [" the cat \n"],
        "test": [" cat sat \n"],
    }
    shards = {}
    for split, rows in lines.items():
        buffer = io.BytesIO()
        parquet.write_table(pyarrow.table({"text": rows}), buffer)
        shards[f"wikitext-103-v1/{split}-00000-of-00001.parquet"] = buffer.getvalue()
    hub = tmp_path / "hub"
    hub.mkdir()

    def fetch(repo, name, repo_type):
        assert (repo, repo_type) == ("Salesforce/wikitext", "dataset")
        (hub / name.replace("/", "_")).write_bytes(shards[name])
        return str(hub / name.replace("/", "_"))

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, repo_type: ["README.md", *shards])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    assert main(["data", "prepare", "wt103", "--download", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "download" / "wikitext-103" / "wiki.valid.tokens").read_text() == " the cat \n"
    assert "word-level" in capsys.readouterr().out
