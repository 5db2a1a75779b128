"""ONNX export of whole models: onnxruntime against PyTorch, two (T, B) shapes from one file."""

import pytest
import torch

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from srupp.models import LMConfig, SRUppLM  # noqa: E402
from srupp.nn import SRUpp  # noqa: E402
from srupp.onnx import export_onnx  # noqa: E402

pytestmark = pytest.mark.slow  # each export takes a few seconds
TOL = 1e-4
SHAPES = [(9, 2), (4, 5), (1, 1)]  # (T, B), none of them the traced example (7, 3)


def with_attention(layers) -> None:
    """alpha starts at 0, where attention has no effect on the output: move it so attention is exported too."""
    with torch.no_grad():
        for layer in layers:
            if layer.has_attention:
                layer.transform.alpha.fill_(0.7)


def run(session, **inputs):
    return [torch.from_numpy(out) for out in session.run(None, {k: v.numpy() for k, v in inputs.items()})]


def max_err(got, ref):
    return float((got - ref).abs().max())


@pytest.fixture(scope="module")
def lm_file(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=50, hidden_size=24, proj_size=8, num_layers=3, num_heads=2, dropout=0.1)
    model = SRUppLM(cfg)
    with_attention(model.rnn.layers)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "lm.onnx", with_state=True)
    return model, ort.InferenceSession(str(path))


@pytest.mark.parametrize("steps, batch", SHAPES, ids=[f"T{t}-B{b}" for t, b in SHAPES])
def test_causal_lm_matches_pytorch(lm_file, steps, batch):
    model, session = lm_file
    assert model.training  # export leaves the model's mode alone
    model.eval()
    ids = torch.randint(0, 50, (steps, batch))
    zero = torch.zeros(3, batch, 24)
    with torch.no_grad():
        log_probs, state = model(ids)
    got_log_probs, got_state = run(session, input_ids=ids, state=zero)
    assert got_log_probs.shape == (steps, batch, 50) and got_state.shape == (3, batch, 24)
    assert max_err(got_log_probs, log_probs) < TOL and max_err(got_state, state.c) < TOL
    # A carried state (streaming): the second segment starts from the first one's c.
    c0 = torch.randn(3, batch, 24)
    with torch.no_grad():
        hidden, state = model.rnn(model.embed(ids), c0, causal=True)
        log_probs = model.log_probs(hidden)
    got_log_probs, got_state = run(session, input_ids=ids, state=c0)
    assert max_err(got_log_probs, log_probs) < TOL and max_err(got_state, state.c) < TOL
    model.train()


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
def test_bidirectional_srupp_matches_pytorch(tmp_path, batch_first):
    torch.manual_seed(1)
    layer = SRUpp(10, 12, proj_size=6, num_layers=2, bidirectional=True, batch_first=batch_first).eval()
    with_attention(layer.layers)
    session = ort.InferenceSession(str(export_onnx(layer, tmp_path / "bi.onnx", with_state=True)))
    for steps, batch in SHAPES:
        x = torch.randn(batch, steps, 10) if batch_first else torch.randn(steps, batch, 10)
        c0 = torch.randn(4, batch, 12)
        with torch.no_grad():
            out, state = layer(x, c0)
        got_out, got_state = run(session, input=x, state=c0)
        assert got_out.shape == out.shape == ((batch, steps, 24) if batch_first else (steps, batch, 24))
        assert max_err(got_out, out) < TOL and max_err(got_state, state.c) < TOL


def test_causal_srupp_without_state_input(tmp_path):
    torch.manual_seed(2)
    layer = SRUpp(8, 8, proj_size=4, num_layers=2).eval()
    with_attention(layer.layers)
    session = ort.InferenceSession(str(export_onnx(layer, tmp_path / "causal.onnx", causal=True)))
    assert [i.name for i in session.get_inputs()] == ["input"]
    for steps, batch in SHAPES[:2]:
        x = torch.randn(steps, batch, 8)
        with torch.no_grad():
            out, _ = layer(x, causal=True)
        (got,) = run(session, input=x)
        assert max_err(got, out) < TOL


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="`model` must be an SRUpp or an SRUppLM, got Linear"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(NotImplementedError, match="causal=False"):
        export_onnx(SRUpp(4, 4, 2, bidirectional=True), tmp_path / "x.onnx", causal=True)
    adaptive = SRUppLM(LMConfig(vocab_size=120, hidden_size=16, proj_size=4, num_layers=1, cutoffs=[20, 60]))
    with pytest.raises(NotImplementedError, match="adaptive input"):
        export_onnx(adaptive, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="must be >= 2 and differ"):
        export_onnx(SRUpp(4, 4, 2), tmp_path / "x.onnx", example_length=3, example_batch=3)
    assert not (tmp_path / "x.onnx").exists()


def test_external_data_file_is_never_replaced_unasked(tmp_path, monkeypatch):
    """A large model's weights go to a file beside the .onnx; a file of the user's is never touched, and with
    overwrite an earlier export's two files are moved aside together."""
    save = torch.onnx.ONNXProgram.save
    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", lambda self, dest, **kw: save(self, dest, external_data=True))
    layer = SRUpp(8, 8, proj_size=4, num_layers=1).eval()
    out = tmp_path / "m.onnx"
    export_onnx(layer, out)
    sidecars = sorted(p.name for p in tmp_path.iterdir() if p.name != "m.onnx")
    assert sidecars == ["m.onnx.data"]  # what this exporter writes beside the graph
    out.unlink()
    user = tmp_path / "m.onnx.data"
    user.write_bytes(b"the user's weights")
    with pytest.raises(FileExistsError, match=r"m\.onnx\.data already exist"):
        export_onnx(layer, out, overwrite=False)
    with pytest.raises(FileExistsError, match="not part of an earlier ONNX export"):  # no graph: not an export
        export_onnx(layer, out, overwrite=True)
    assert user.read_bytes() == b"the user's weights" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]  # no temporary folder left
    user.unlink()
    export_onnx(layer, out)
    earlier = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    export_onnx(layer, out, overwrite=True)  # an earlier export is moved aside whole, both files
    (moved,) = (tmp_path / "m.onnx.replaced").iterdir()
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == earlier
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        expected, _ = layer(x)
    (got,) = run(ort.InferenceSession(str(out)), input=x)
    assert max_err(got, expected) < TOL
