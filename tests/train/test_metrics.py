import sys

from srupp.train import metrics
from srupp.train.metrics import PLOT_HINT, plot_curve

RECORDS = [{"step": 1, "train_bpc": 5.0}, {"step": 2, "train_bpc": 4.0, "valid_bpc": 4.5}]


def test_learning_curve_png(tmp_path):
    assert plot_curve(RECORDS, tmp_path / "curve.png", metric="bpc")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_no_png_and_one_line_saying_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    metrics._say_once.cache_clear()
    for _ in range(3):
        assert not plot_curve(RECORDS, tmp_path / "curve.png", metric="bpc")
    assert not (tmp_path / "curve.png").exists()
    assert capsys.readouterr().err == f"srupp: {PLOT_HINT}\n" and "srupp[plot]" in PLOT_HINT
    metrics._say_once.cache_clear()
