"""Issue 11, item 4: untrusted files are bounded before use; eval and generate write nowhere unasked."""

import http.server
import resource
import threading
import zipfile

import pytest

from srupp.cli import main
from srupp.data import corpus as corpus_module
from srupp.data import download
from srupp.errors import CheckpointError, CorpusError, DownloadError
from srupp.models import LMConfig, SRUppLM
from srupp.train import TrainConfig, load_checkpoint, load_model, save_checkpoint

from .conftest import snapshot


def test_a_checkpoint_claiming_a_huge_model_is_refused_before_allocating(tmp_path):
    small = LMConfig(hidden_size=16, proj_size=4, num_layers=2)
    tensors = {f"model/{k}": v for k, v in SRUppLM(small).state_dict().items()}
    huge = TrainConfig(model=LMConfig(hidden_size=8192, proj_size=2048, num_layers=4))  # 1 GB of fp32 weights
    path = save_checkpoint(
        tmp_path / "x.safetensors", tensors, config=huge.to_dict(), vocab={"kind": "byte", "words": []}, trainer={}
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="different architecture"):
        load_model(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # KB


def test_eval_writes_nowhere_the_checkpoint_names(tmp_path, capsys):
    victim = tmp_path / "victim"
    (victim / "data").mkdir(parents=True)
    (victim / "data" / "train.bin").write_bytes(b"the user's own data")
    cfg = TrainConfig(model=LMConfig(hidden_size=16, proj_size=4, num_layers=2), data="stdlib", out_dir=str(victim))
    tensors = {f"model/{k}": v for k, v in SRUppLM(cfg.model).state_dict().items()}
    crafted = tmp_path / "elsewhere" / "crafted.safetensors"
    save_checkpoint(crafted, tensors, config=cfg.to_dict(), vocab={"kind": "byte", "words": []}, trainer={})
    before, around = snapshot(victim), snapshot(tmp_path)
    assert main(["eval", "--checkpoint", str(crafted), "--max-tokens", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0] and "stdlib" in err[0]
    assert snapshot(victim) == before and snapshot(tmp_path) == around


def test_a_checkpoint_trained_with_triton_evaluates_on_cpu(corpus, tmp_path, capsys):
    model = SRUppLM(LMConfig(hidden_size=16, proj_size=4, num_layers=2))
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    config = TrainConfig(model=model.config, backend="triton", data=str(corpus)).to_dict()
    config["model"]["backend"] = "triton"  # what older checkpoints saved inside the architecture
    path = save_checkpoint(
        tmp_path / "t.safetensors", tensors, config=config, vocab={"kind": "byte", "words": []}, trainer={}
    )
    assert main(["eval", "--checkpoint", str(path), "--device", "cpu", "--max-tokens", "64", "--context", "16"]) == 0
    assert "bpc" in capsys.readouterr().out
    assert load_checkpoint(path).config["backend"] == "triton"


@pytest.mark.parametrize("corpus_name", ["enwik8", "other"])
def test_zip_members_are_size_checked_before_reading(tmp_path, monkeypatch, corpus_name):
    archive = tmp_path / f"{corpus_name}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(corpus_name, b"\0" * (3 << 20))  # 3 MB of zeros, a few KB compressed
    monkeypatch.setattr(corpus_module, "MAX_MEMBER_BYTES", 1 << 20)

    def never(*args, **kwargs):
        raise AssertionError("the member was read before its size was checked")

    monkeypatch.setattr(zipfile.ZipFile, "read", never)
    expected = corpus_module._ENWIK8_BYTES if corpus_name == "enwik8" else None
    with pytest.raises(CorpusError, match="100,000,000 bytes" if expected else "more than the 1,048,576"):
        corpus_module._read_bytes(archive, corpus_name, expected)


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(302)
        self.send_header("Location", self.server.target)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/enwik8.zip", "file:///etc/passwd"])
def test_redirects_to_other_schemes_are_refused(tmp_path, target, capsys):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    httpd.target = target
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/enwik8.zip"
        with pytest.raises(DownloadError):
            download(url, tmp_path / "dl" / "enwik8.zip")
        assert main(["data", "prepare", "enwik8", "--download", "--url", url, "--out", str(tmp_path / "o")]) == 2
    finally:
        httpd.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    # urllib itself refuses file://; ftp:// it would follow, so that refusal is srupp's.
    assert (
        len(err) == 1
        and target in err[0]
        and ("only http:// and https:// are followed" in err[0] or "not allowed" in err[0])
    )
    assert list((tmp_path / "dl").iterdir()) == []


def test_no_network_is_one_line(tmp_path, capsys):
    url = "http://127.0.0.1:9/enwik8.zip"  # the discard port: nothing listens there
    assert main(["data", "prepare", "enwik8", "--download", "--url", url, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot download" in err[0] and url in err[0]
