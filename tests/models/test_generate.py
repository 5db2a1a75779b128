import pytest
import torch

from srupp.models import LMConfig, SRUppLM, generate, sample_next


def test_sampling_filters():
    log_probs = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), -1)
    g = torch.Generator().manual_seed(0)
    assert int(sample_next(log_probs, temperature=0)) == 1
    assert all(int(sample_next(log_probs, top_k=1, generator=g)) == 1 for _ in range(20))
    assert all(int(sample_next(log_probs, top_p=0.1, generator=g)) == 1 for _ in range(20))
    draws = {int(sample_next(log_probs, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 3}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"temperature": -1.0}, "temperature", id="temperature"),
        pytest.param({"top_k": 0}, "top_k", id="top_k"),
        pytest.param({"top_p": 0.0}, "top_p", id="top_p"),
    ],
)
def test_sampling_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_next(torch.zeros(1, 4), **kwargs)


def test_generate_streams_reproducibly():
    model = SRUppLM(LMConfig(hidden_size=32, proj_size=8, num_layers=2))
    first = list(generate(model, [1, 2, 3], 12, top_p=0.9, generator=torch.Generator().manual_seed(1)))
    again = generate(model, [1, 2, 3], 12, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert next(again) == first[0] and len(first) == 12
    assert list(again) == first[1:]
    greedy = list(generate(model, [1, 2, 3], 6, temperature=0))
    log_probs, _ = model.eval()(torch.tensor([[1], [2], [3]]))
    assert greedy[0] == int(log_probs[-1, 0].argmax())
    with pytest.raises(ValueError, match="prompt"):
        next(generate(model, [], 3))
