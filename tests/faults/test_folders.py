"""Issue 24, item 8: run-folder symlinks, orphaned temporary files, and the hint for a run with no checkpoint."""

import subprocess
import sys

import pytest

from srupp.cli import main
from srupp.files import remove_orphans, temp_path_beside

from .conftest import snapshot


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphaned_temporary_files_of_dead_processes_are_removed_at_the_next_start(train_args, tmp_path):
    assert main(train_args()) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    ours = temp_path_beside(checkpoints / "last.safetensors")  # this process: alive
    dead = ours.name.replace(f".{ours.name.split('.')[-3].split('-')[0]}-", f".{_dead_pid()}-", 1)
    other_host = dead.replace(dead.split("-")[1][:8], "00000000", 1)
    foreign = ".last.safetensors.12345.tmp"  # not an srupp name of this version: never touched
    for name in (ours.name, dead, other_host, foreign):
        (checkpoints / name).write_bytes(b"half a checkpoint")
    (tmp_path / "run" / dead.replace("last.safetensors", "config.json")).mkdir()  # a staging folder
    assert main(["train", "--resume", str(tmp_path / "run"), "--max_steps", "3", "--progress", "false"]) == 0
    left = {p.name for p in checkpoints.iterdir()} | {p.name for p in (tmp_path / "run").iterdir()}
    assert {ours.name, other_host, foreign} <= left and dead not in left
    assert dead.replace("last.safetensors", "config.json") not in left


def test_remove_orphans_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    link = tmp_path / "folder" / f".x.{_dead_pid()}-{temp_path_beside(tmp_path).name.split('-')[1]}"
    link.parent.mkdir()
    link.symlink_to(victim)
    assert remove_orphans(link.parent) == [link] and (victim / "keep").read_text() == "mine"


@pytest.mark.parametrize("entry", ["data", "replaced"])
def test_a_symlinked_data_or_replaced_entry_is_never_followed(corpus, tmp_path, capsys, entry):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("the user's")
    run = tmp_path / "run"
    common = ["--config", "tiny", "--out_dir", str(run), "--progress", "false", "--max_steps", "1", "--eval_every", "1"]
    data = [] if entry == "data" else ["--data", str(corpus)]
    if entry == "replaced":
        assert main(["train", *common, *data]) == 0
    run.mkdir(exist_ok=True)
    (run / entry).symlink_to(elsewhere)
    before = snapshot(tmp_path)
    assert main(["train", *common, *data, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[-1] and str(run / entry) in err[-1]
    assert snapshot(tmp_path) == before


def test_a_run_stopped_before_its_first_checkpoint_gets_a_hint_that_leads_somewhere(train_args, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert main(train_args()) == 2
    first = capsys.readouterr().err.strip()
    assert "--resume" not in first and "--overwrite" in first
    assert main(["train", "--resume", str(run)]) == 2
    second = capsys.readouterr().err.strip()
    assert "no checkpoint" in second and "--overwrite" in second
    assert main(train_args("--overwrite")) == 0
