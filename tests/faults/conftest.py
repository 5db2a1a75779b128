import hashlib
from pathlib import Path

import pytest

from srupp.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path: compares a folder byte for byte."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".srupp.lock"
    }


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    (root / "a.txt").write_text("".join(f"print({i} * {i})  # square\n" for i in range(800)))
    assert main(["data", "prepare", "text", "--source", str(root / "a.txt"), "--out", str(root / "data")]) == 0
    return root / "data"


@pytest.fixture
def train_args(corpus, tmp_path):
    """``srupp train`` arguments for a 2-step tiny run in ``tmp_path / "run"``."""

    def make(*extra: str, run: Path | None = None) -> list[str]:
        run = run or tmp_path / "run"
        common = ["--config", "tiny", "--data", str(corpus), "--out_dir", str(run), "--progress", "false"]
        return ["train", *common, "--max_steps", "2", "--eval_every", "2", *extra]

    return make
