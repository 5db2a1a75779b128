"""Issue 24, items 1 and 7: an export writes only into a folder it created or an earlier export, moves an old
export aside, and a full disk is one line naming the user's path."""

import errno

import pytest

from srupp.cli import main

from .conftest import snapshot

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A folder of two runs and a user's notes (a tiny 2-step run, copied)."""
    import shutil

    root = tmp_path_factory.mktemp("exports") / "runs"
    argv = ["train", "--config", "tiny", "--data", str(corpus), "--progress", "false", "--max_steps", "1"]
    assert main([*argv, "--eval_every", "1", "--out_dir", str(root / "a")]) == 0
    shutil.copytree(root / "a", root / "b")
    (root / "notes.txt").write_text("the user's notes")
    return root


@pytest.mark.parametrize("fmt", ["hf", "onnx"])
@pytest.mark.parametrize("target", ["run-folder", "parent", "checkpoint"])
def test_export_into_the_run_or_its_parent_is_one_line_and_touches_nothing(runs, capsys, fmt, target):
    out = {"run-folder": runs / "a", "parent": runs, "checkpoint": runs / "a" / "checkpoints" / "best.safetensors"}
    before = snapshot(runs)
    assert main(["export", fmt, str(runs / "a"), str(out[target]), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds" in err[0] and "choose a new path" in err[0]
    assert snapshot(runs) == before


@pytest.mark.parametrize("content", ["notes", "another-run", "file"])
def test_export_hf_never_replaces_a_folder_that_is_not_an_export(runs, tmp_path, capsys, content):
    out = tmp_path / "out"
    if content == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        if content == "another-run":
            (out / "checkpoints").mkdir()
            (out / "config.json").write_text('{"model_type": "srupp"}')
    before = snapshot(tmp_path)
    assert main(["export", "hf", str(runs / "a"), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and ("not an srupp export" in err[0] or "not a folder" in err[0])
    assert snapshot(tmp_path) == before


def test_export_hf_overwrite_moves_an_earlier_export_aside(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "hf", str(runs / "a"), str(out)]) == 0
    first = snapshot(out)
    assert main(["export", "hf", str(runs / "b"), str(out)]) == 2  # not asked to replace it
    assert "--overwrite" in capsys.readouterr().err and snapshot(out) == first
    assert main(["export", "hf", str(runs / "b"), str(out), "--overwrite"]) == 0
    (moved,) = (tmp_path / "hf.replaced").iterdir()
    assert snapshot(moved / "hf") == first and "moved the previous export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.replaced"]  # no staging folder left


def test_export_onnx_overwrite_moves_only_an_earlier_export_aside(runs, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    out.write_text("the user's file, not a model")
    assert main(["export", "onnx", str(runs / "a"), str(out), "--overwrite"]) == 2
    assert "never replaces" in capsys.readouterr().err and out.read_text() == "the user's file, not a model"
    out.unlink()
    assert main(["export", "onnx", str(runs / "a"), str(out)]) == 0
    first = out.read_bytes()
    assert main(["export", "onnx", str(runs / "a"), str(out), "--overwrite"]) == 0
    (moved,) = (tmp_path / "m.onnx.replaced").iterdir()
    assert (moved / "m.onnx").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.replaced"]


def test_full_disk_during_export_hf_is_one_line_naming_the_folder(runs, tmp_path, monkeypatch, capsys):
    from srupp.hf.modeling import SRUppForCausalLM

    def disk_full(self, path, **kwargs):
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SRUppForCausalLM, "save_pretrained", disk_full)
    out = tmp_path / "hf"
    assert main(["export", "hf", str(runs / "a"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and f"'{out}'" in err[0] and ".tmp" not in err[0]
    assert list(tmp_path.iterdir()) == []
