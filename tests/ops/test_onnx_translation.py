"""The ONNX translation of the fused recurrence op: onnxruntime against the naive spec."""

import pytest
import torch

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from srupp.ops import library, sru_recurrence_naive  # noqa: E402
from srupp.ops.onnx_translation import translation_table  # noqa: E402
from tests.ops.test_recurrence import make_inputs, make_mask_pad  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not library.is_available(), reason="the fused CPU kernel is not built"),
]
D = 5
CASES = [
    pytest.param(False, False, False, False, id="plain"),
    pytest.param(True, False, False, False, id="reverse"),
    pytest.param(False, True, True, False, id="mask_pad-mask_c"),
    pytest.param(True, True, True, True, id="reverse-masks-save_c"),
    pytest.param(False, True, False, True, id="mask_pad-save_c"),
]


class OneOp(torch.nn.Module):
    def __init__(self, reverse: bool, save_c: bool) -> None:
        super().__init__()
        self.reverse, self.save_c = reverse, save_c

    def forward(self, u, x, v, b, c0, mask_pad=None, mask_c=None):
        h, c_last, c_all = torch.ops.srupp.sru_cpu_forward(u, x, v, b, c0, mask_pad, mask_c, self.reverse, self.save_c)
        return (h, c_last, c_all) if self.save_c else (h, c_last)


def spec_c_all(u, x, v, b, c0, mask_pad, mask_c, reverse):
    """Every step's c from the spec: the final state of the prefix (suffix when reversed) ending there."""
    steps = u.shape[0]
    out = []
    for t in range(steps):
        part = slice(t, steps) if reverse else slice(0, t + 1)
        pad = None if mask_pad is None else mask_pad[part]
        out.append(sru_recurrence_naive(u[part], x[part], v, b, c0, mask_pad=pad, mask_c=mask_c, reverse=reverse)[1])
    return torch.stack(out)


@pytest.mark.parametrize("reverse, use_pad, use_mask_c, save_c", CASES)
def test_scan_matches_the_spec(tmp_path, reverse, use_pad, use_mask_c, save_c):
    u, x, v, b, c0 = make_inputs(6, 3, D)
    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    example = {"u": u, "x": x, "v": v, "b": b, "c0": c0}
    dynamic = {"u": {0: T, 1: B}, "x": {0: T, 1: B}, "v": None, "b": None, "c0": {0: B}}
    if use_pad:
        example["mask_pad"], dynamic["mask_pad"] = make_mask_pad(6, 3), {0: T, 1: B}
    if use_mask_c:
        example["mask_c"], dynamic["mask_c"] = (torch.rand(3, D) > 0.3).float() / 0.7, {0: B}
    names = list(example)
    path = tmp_path / "op.onnx"
    torch.onnx.export(
        OneOp(reverse, save_c).eval(),
        (),
        str(path),
        kwargs=example,
        dynamic_shapes=dynamic,
        input_names=names,
        custom_translation_table=translation_table(),
        dynamo=True,
        verbose=False,
    )
    session = ort.InferenceSession(str(path))
    for steps, batch, seed in [(9, 2, 1), (1, 4, 2), (4, 1, 3)]:
        u, x, v, b, c0 = make_inputs(steps, batch, D, seed=seed)
        mask_pad = make_mask_pad(steps, batch, seed=seed) if use_pad else None
        mask_c = (torch.rand(batch, D) > 0.3).float() / 0.7 if use_mask_c else None
        feed = {"u": u, "x": x, "v": v, "b": b, "c0": c0, "mask_pad": mask_pad, "mask_c": mask_c}
        got = session.run(None, {k: t.numpy() for k, t in feed.items() if k in names})
        h, c_last = sru_recurrence_naive(u, x, v, b, c0, mask_pad=mask_pad, mask_c=mask_c, reverse=reverse)
        expected = [h, c_last]
        if save_c:
            expected.append(spec_c_all(u, x, v, b, c0, mask_pad, mask_c, reverse))
        assert len(got) == len(expected)
        for name, out, ref in zip(["h", "c_last", "c_all"], got, expected, strict=False):
            err = float((torch.from_numpy(out) - ref).abs().max())
            assert out.shape == ref.shape and err < 1e-5, f"{name}: max abs error {err:.2e} at T={steps}, B={batch}"
