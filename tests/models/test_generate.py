import copy

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


def greedy_by_full_forward(model, prompt, count, max_context=None):
    """The reference: every new id is the argmax of a full causal forward over everything so far."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            log_probs, _ = model(torch.tensor(ids)[:, None], attn_window=max_context)
            ids.append(int(log_probs[-1, 0].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("max_context", [None, 5], ids=["all", "window-5"])
def test_greedy_generation_equals_full_forward(max_context):
    torch.manual_seed(0)
    model = SRUppLM(LMConfig(hidden_size=32, proj_size=8, num_layers=2, dropout=0.0, attn_dropout=0.0)).eval()
    with torch.no_grad():
        for layer in model.rnn.layers:
            layer.transform.alpha.fill_(0.7)  # alpha = 0 would hide the attention and its cache
    prompt = [5, 17, 250, 3]
    generated = list(generate(model, prompt, 24, temperature=0, max_context=max_context))
    assert generated == greedy_by_full_forward(model, prompt, 24, max_context)


def test_lm_one_token_steps_equal_forward_in_a_batch(monkeypatch):
    from srupp.nn.decode import SRUppDecoder

    calls = []  # the session's one-token path: torch ops, or the whole model as one compiled call
    original = SRUppDecoder._step_token
    monkeypatch.setattr(SRUppDecoder, "_step_token", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    torch.manual_seed(0)
    model = SRUppLM(LMConfig(hidden_size=32, proj_size=8, num_layers=3, attention_every_n_layers=2)).eval()
    with torch.no_grad():
        model.rnn.layers[1].transform.alpha.fill_(0.7)
        tokens = torch.randint(0, 256, (30, 3))
        full, _ = model(tokens, attn_window=6)
        session = model.decoder(3, max_context=6)
        stepped = [session.step(tokens[:5])]
        for t in range(5, 30):
            stepped.append(session.step(tokens[t : t + 1]))
    assert len(calls) == 25
    torch.testing.assert_close(torch.stack(stepped), full[4:], atol=1e-5, rtol=1e-4)


def test_greedy_generate_with_bfloat16_weights_runs_the_kernel_on_float32_copies():
    """bfloat16 weights decode through the compiled kernel on float32 copies: greedy ``generate`` gives the
    tokens of a float32 copy of the model (the same arithmetic on the same rounded weights). The prompt is one
    token, so that both runs take the compiled path from the first token on (a longer prompt is prefilled in
    each model's own dtype)."""
    from srupp.ops import library

    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, hidden_size=32, proj_size=8, num_layers=3, num_heads=2, attention_every_n_layers=2)
    model = SRUppLM(cfg).bfloat16().eval()
    with torch.no_grad():
        for layer in model.rnn.layers:
            if layer.has_attention:
                layer.transform.alpha.fill_(0.7)  # alpha starts at 0, where attention has no effect
    session = model.decoder(1)
    assert session.stack.kernel is not None and session.ends_kernel is session.stack.kernel
    reference = list(generate(copy.deepcopy(model).float(), [5], 24, temperature=0, max_context=6))
    assert list(generate(model, [5], 24, temperature=0, max_context=6)) == reference
    assert len(set(reference)) > 1
