import functools
import hashlib
import http.server
import threading
import zipfile

import pytest

from srupp.cli import main
from srupp.data import download, open_corpus


@pytest.fixture
def server(tmp_path):
    """A loopback-only HTTP server serving a small enwik8-style archive this test makes."""
    root = tmp_path / "www"
    root.mkdir()
    with zipfile.ZipFile(root / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", b"<page>some wiki text</page>\n" * 200)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    digest = hashlib.sha256((root / "enwik8.zip").read_bytes()).hexdigest()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/enwik8.zip", digest
    httpd.shutdown()


def test_download_verifies_sha256(server, tmp_path):
    url, digest = server
    path = download(url, tmp_path / "dl" / "enwik8.zip", sha256=digest)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    with pytest.raises(ValueError, match="sha256"):
        download(url, tmp_path / "bad" / "enwik8.zip", sha256="0" * 64)
    assert list((tmp_path / "bad").iterdir()) == []


def test_cli_prepare_with_download(server, tmp_path):
    url, digest = server
    out = tmp_path / "enwik8"
    args = ["data", "prepare", "enwik8", "--download", "--url", url, "--sha256", digest, "--out", str(out)]
    assert main([*args, "--no-size-check"]) == 0
    corpus = open_corpus(out)
    assert bytes(corpus.split("train")).startswith(b"<page>")
    assert main(["data", "prepare", "enwik8", "--download", "--url", url, "--sha256", "1" * 64, "--out", str(out)]) == 2
