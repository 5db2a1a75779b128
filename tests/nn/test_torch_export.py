"""torch.export of SRUpp with dynamic time and batch axes: the exported program equals eager."""

import pytest
import torch

from srupp.nn import SRUpp

pytestmark = pytest.mark.slow  # tracing takes a few seconds per case
SHAPES = [(9, 2), (4, 5), (1, 1)]  # (T, B), none of them the traced example (7, 3)


class WithState(torch.nn.Module):
    """SRUpp returning its final c as a tensor (its state object is not a registered pytree)."""

    def __init__(self, layer: SRUpp, causal: bool) -> None:
        super().__init__()
        self.layer, self.causal = layer, causal

    def forward(self, input, c0):
        output, state = self.layer(input, c0, causal=self.causal)
        return output, state.c


@pytest.mark.parametrize(
    "bidirectional, causal, backend",
    # (The "naive" backend is a Python loop over time: torch.export specialises T there.)
    [
        pytest.param(False, True, "auto", id="causal-fused"),
        pytest.param(True, False, "auto", id="bidirectional-fused"),
    ],
)
def test_export_with_dynamic_time_and_batch_equals_eager(bidirectional, causal, backend):
    torch.manual_seed(0)
    layer = SRUpp(10, 12, proj_size=6, num_layers=2, bidirectional=bidirectional, backend=backend).eval()
    with torch.no_grad():
        for sub in layer.layers:
            if sub.has_attention:
                sub.transform.alpha.fill_(0.7)  # at 0 attention would not reach the output
    dirs = 2 if bidirectional else 1
    module = WithState(layer, causal)
    time, batch = torch.export.Dim("T"), torch.export.Dim("B")
    program = torch.export.export(
        module,
        (torch.randn(7, 3, 10), torch.randn(2 * dirs, 3, 12)),
        dynamic_shapes=({0: time, 1: batch}, {1: batch}),
        strict=False,
    )
    exported = program.module()
    for steps, size in SHAPES:
        x, c0 = torch.randn(steps, size, 10), torch.randn(2 * dirs, size, 12)
        with torch.no_grad():
            expected = module(x, c0)
            got = exported(x, c0)
        for name, out, ref in zip(("output", "c"), got, expected, strict=True):
            assert out.shape == ref.shape, name
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
