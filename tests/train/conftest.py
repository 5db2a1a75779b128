import random

import pytest

from srupp.data import prepare_text
from srupp.train import apply_overrides, load_preset


def _text(seed: int, size: int) -> str:
    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "None", "(", ")", ":"]
    out = []
    while sum(map(len, out)) < size:
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) + "\n")
    return "".join(out)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text(_text(0, 24_000))
    return prepare_text(root / "text.txt", root / "data", valid_ratio=0.1, test_ratio=0.1).path


@pytest.fixture
def tiny_cfg(tiny_corpus, tmp_path):
    """The ``tiny`` preset on the test corpus, writing into this test's tmp dir."""

    def make(**overrides):
        values = {"data": str(tiny_corpus), "out_dir": str(tmp_path / "run"), "progress": "false"}
        values.update({k: str(v) for k, v in overrides.items()})
        return apply_overrides(load_preset("tiny"), values)

    return make
