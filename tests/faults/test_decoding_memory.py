"""Issue 24, item 2: decoding memory grew with the square of the prompt (one attention over the whole prompt at
once), and ``max_context`` did not bound it; ``SRUpp.step`` on a long chunk had the same cause. Now a prompt runs
in pieces and the cache keeps at most ``max_context`` positions: the largest tensor any op allocates grows
linearly with the prompt, and not at all with a context limit."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from srupp.models import LMConfig, SRUppLM
from srupp.models.generate import generate


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any torch op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.bytes = max(self.bytes, item.numel() * item.element_size())
        return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SRUppLM(LMConfig(hidden_size=16, proj_size=8, num_layers=2)).eval()


def largest(model, prompt_length: int, max_context: int | None) -> int:
    prompt = torch.randint(0, 256, (prompt_length,), generator=torch.Generator().manual_seed(1))
    with LargestTensor() as mode:
        list(generate(model, prompt, 3, temperature=0, max_context=max_context))
    return mode.bytes


def test_generate_memory_is_linear_in_the_prompt_and_bounded_by_the_context(model):
    short, long = largest(model, 1000, None), largest(model, 2000, None)
    # Before: a [2000, 2000] float32 score matrix (16 MB) per head; now pieces of 256 queries.
    assert long < 1.1 * 2 * short and long < 4 * 2000 * 256 * 1.2
    bounded = [largest(model, length, 16) for length in (1000, 2000)]
    assert bounded[1] <= 1.05 * bounded[0], bounded


def test_step_on_a_long_chunk_is_linear_in_its_length(model):
    def step(length: int) -> int:
        tokens = torch.randint(0, 256, (length, 1))
        with torch.no_grad(), LargestTensor() as mode:
            model.step(tokens, model.init_decode_state(1))
        return mode.bytes

    assert step(2000) < 1.1 * 2 * step(1000)
