import pytest
import torch

from benchmarks import overhead
from srupp.ops import cpu, sru_recurrence
from tests.benchmarks import assert_provenance, read_json, run_benchmark

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=cpu.unavailable_reason())


def test_overhead_benchmark_quick_run_writes_json(tmp_path):
    args = ("--rounds", "1", "--calls", "3", "--out", tmp_path)
    run_benchmark("overhead", *args)
    report = read_json(tmp_path / "overhead.json")
    assert_provenance(report, "overhead", *args)
    assert [row["backend"] for row in report["rows"]] == ["cpu", "floor", "autograd", "naive"]
    for row in report["rows"]:
        assert (row["T"], row["B"], row["D"]) == (1, 1, 8)
        assert row["op_us"] > 0 and row["ratio"] == pytest.approx(row["op_us"] / row["two_elementwise_us"])


@pytest.mark.parametrize("shape", [(1, 1, 8), (5, 3, 7)])
def test_the_floor_computes_the_public_ops_gradients(shape):
    """The floor is a lower bound only if it does the op's work: its gradients are the public op's."""
    floor_grads = overhead.bare_step(*shape)()
    leaves = overhead.random_leaves(*shape)
    outputs = sru_recurrence(*leaves, backend="naive")
    expected = torch.autograd.grad(outputs, leaves, overhead.random_output_grads(*shape))
    for got, want in zip(floor_grads, expected, strict=True):
        torch.testing.assert_close(got, want)
