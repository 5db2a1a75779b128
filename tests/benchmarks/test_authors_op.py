"""The benchmarks time the authors' recurrence op beside ours: both must be fed so they compute the same thing."""

import warnings

import pytest
import torch
from benchmarks.common import authors_u, require_agreement

from srupp.ops import sru_recurrence


def test_authors_u_interleaves_the_streams_per_feature():
    u = torch.arange(2 * 3 * 12, dtype=torch.float32).view(2, 3, 12)  # D = 4: c 0-3, f 4-7, r 8-11 per row
    got = authors_u(u)
    assert got.shape == u.shape and got.is_contiguous()
    assert got[1, 2, :6].tolist() == [u[1, 2, i].item() for i in (0, 4, 8, 1, 5, 9)]


@pytest.mark.parametrize("steps, batch, hidden", [(9, 3, 5), (4, 2, 64)])
def test_the_authors_cpu_op_agrees_with_the_spec_on_that_layout(steps, batch, hidden):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its CUDA build is not there
        sru = pytest.importorskip("sru")
    gen = torch.Generator().manual_seed(0)
    u, x = torch.randn(steps, batch, 3 * hidden, generator=gen), torch.randn(steps, batch, hidden, generator=gen)
    v, b = torch.rand(2, hidden, generator=gen) - 0.5, torch.randn(2, hidden, generator=gen)
    c0 = torch.randn(batch, hidden, generator=gen)

    def theirs(u_layout):
        return sru.ops.elementwise_recurrence_inference(
            u_layout, x, v.reshape(-1), b.reshape(-1), c0, 0, hidden, False, True
        )

    h_spec, c_spec = sru_recurrence(u, x, v, b, c0, backend="naive")
    h, c = theirs(authors_u(u))
    assert require_agreement(h, h_spec, "h", 1e-5) <= 1e-5
    torch.testing.assert_close(c, c_spec, rtol=1e-5, atol=1e-5)
    # The layout the benchmarks once passed ([T, B, D, 3]) reads as no streams at all: the check catches it.
    wrong = u.view(steps, batch, 3, hidden).transpose(2, 3).contiguous()
    with pytest.raises(RuntimeError, match="differ by up to"):
        require_agreement(theirs(wrong)[0], h_spec, "h", 1e-5)


def test_require_agreement_rejects_nan():
    with pytest.raises(RuntimeError):
        require_agreement(torch.tensor([float("nan")]), torch.tensor([0.0]), "h", 1.0)
