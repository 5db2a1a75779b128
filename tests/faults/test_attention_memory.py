"""Attention over long inputs: what it allocates grows with the length, not with its square (issue 24)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from srupp.nn import SRUppAttention
from srupp.nn import attention as attention_module


class LargestTensor(TorchDispatchMode):
    """The most elements any op's result held."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.elements = max(self.elements, tensor.numel())
        return out


@pytest.mark.parametrize(
    "memory, window, padding",
    [(0, 64, False), (0, None, True), (1024, 64, True)],
    ids=["window", "padding", "memory-window-padding"],
)
def test_a_masked_attention_over_a_long_input_allocates_no_square_mask(memory, window, padding):
    steps, batch = 6144, 1
    module = SRUppAttention(8, 8, 8).eval()
    keys = memory + steps
    assert steps * keys >= 2 * attention_module.MASK_ELEMENTS  # a mask over every query would show
    mask_pad = torch.zeros(steps, batch, dtype=torch.bool) if padding else None
    if padding:
        mask_pad[-5:] = True
    largest = LargestTensor()
    with torch.no_grad(), largest:
        out = module(
            torch.randn(steps, batch, 8),
            causal=True,
            mask_pad=mask_pad,
            attn_window=window,
            memory=torch.randn(memory, batch, 8) if memory else None,
        )
    assert out.shape == (steps, batch, 8) and bool(torch.isfinite(out).all())
    assert largest.elements <= attention_module.MASK_ELEMENTS + keys, largest.elements


PEAK = """
import resource, sys, torch
from srupp.nn import SRUppAttention
steps, memory = int(sys.argv[1]), int(sys.argv[2])
module = SRUppAttention(8, 8, 8).eval()
x, old = torch.randn(steps, 1, 8), torch.randn(memory, 1, 8)
with torch.no_grad():
    module(x[:8], causal=True, memory=old[:8])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = module(x, causal=True, memory=old)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, bool(torch.isfinite(out).all()))
"""


@pytest.mark.slow
def test_causal_attention_over_long_memory_stays_within_blocks():
    """The lower-right causal bias is a boolean mask on the CPU (torch builds it inside SDPA): a block of queries
    at a time keeps it small. Peak memory measured in a process of its own."""
    steps, memory = 16384, 8192
    square_mb = steps * (steps + memory) / 2**20  # the whole mask, at one byte per element
    result = subprocess.run(
        [sys.executable, "-c", PEAK, str(steps), str(memory)], capture_output=True, text=True, timeout=300, check=True
    )
    growth_mb, finite = result.stdout.split()
    assert finite == "True"
    # One mask over all 16k queries took 1.9 GB here (5x the mask's bytes: SDPA converts it to floats).
    assert float(growth_mb) < square_mb * 2 / 3, (growth_mb, square_mb)
