"""Issue 11, item 3: corpora are written atomically and never replaced unasked."""

import errno

import numpy as np

from srupp.cli import main
from srupp.data import corpus as corpus_module
from srupp.data import open_corpus

from .conftest import snapshot


def _prepare(source, out, *extra):
    return main(["data", "prepare", "text", "--source", str(source), "--out", str(out), *extra])


def _texts(tmp_path):
    (tmp_path / "old.txt").write_text("old corpus line\n" * 300)
    (tmp_path / "new.txt").write_text("the new corpus, longer\n" * 600)
    return tmp_path / "old.txt", tmp_path / "new.txt"


def test_prepare_refuses_to_replace_a_corpus(tmp_path, capsys):
    old, new = _texts(tmp_path)
    assert _prepare(old, tmp_path / "data") == 0
    before = snapshot(tmp_path / "data")
    assert _prepare(new, tmp_path / "data") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a corpus" in err[0] and "--overwrite" in err[0]
    assert snapshot(tmp_path / "data") == before


def test_a_reader_keeps_its_files_while_the_corpus_is_replaced(tmp_path):
    old, new = _texts(tmp_path)
    assert _prepare(old, tmp_path / "data") == 0
    reading = open_corpus(tmp_path / "data").split("train")  # a trainer's memory map
    expected = bytes(np.array(reading))
    assert _prepare(new, tmp_path / "data", "--overwrite") == 0
    # Rewriting in place would change these bytes under the reader (or kill it with SIGBUS when shorter).
    assert bytes(np.array(reading)) == expected
    assert bytes(open_corpus(tmp_path / "data").split("train")).startswith(b"the new corpus")


def test_full_disk_while_preparing_leaves_the_old_corpus_whole(tmp_path, monkeypatch, capsys):
    old, new = _texts(tmp_path)
    assert _prepare(old, tmp_path / "data") == 0
    before = snapshot(tmp_path / "data")
    real, calls = corpus_module._write_file, {"n": 0}

    def disk_fills_up(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_bytes(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(corpus_module, "_write_file", disk_fills_up)
    assert _prepare(new, tmp_path / "data", "--overwrite") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(tmp_path / "data") in err[0]
    assert snapshot(tmp_path / "data") == before  # no temporary files either
    assert bytes(open_corpus(tmp_path / "data").split("train")).startswith(b"old corpus line")
