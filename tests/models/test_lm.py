import pytest
import torch

from srupp.models import LMConfig, SRUppLM
from srupp.nn import SRUppState
from tests.helpers import assert_all_close

CONFIGS = [
    pytest.param(LMConfig(hidden_size=32, proj_size=8, num_layers=2, dropout=0.0, attn_dropout=0.0), id="byte"),
    pytest.param(
        LMConfig(
            vocab_size=120,
            hidden_size=32,
            proj_size=8,
            num_layers=3,
            attention_every_n_layers=2,
            cutoffs=[20, 60],
            div_value=2.0,
            dropout=0.0,
            attn_dropout=0.0,
        ),
        id="adaptive",
    ),
    pytest.param(
        LMConfig(
            vocab_size=120,
            hidden_size=32,
            proj_size=8,
            num_layers=2,
            cutoffs=[20, 60],
            embed_size=16,
            div_value=2.0,
            dropout=0.0,
            attn_dropout=0.0,
        ),
        id="adaptive-projected",
    ),
]


def with_attention(model: SRUppLM) -> SRUppLM:
    """alpha starts at 0, where attention (cache, memory, window) has no effect on the output: move it."""
    with torch.no_grad():
        for layer in model.rnn.layers:
            if layer.has_attention:
                layer.transform.alpha.fill_(0.7)
    return model


@pytest.mark.parametrize("cfg", CONFIGS)
def test_step_decoding_equals_forward(cfg):
    torch.manual_seed(0)
    model = with_attention(SRUppLM(cfg)).eval()
    tokens = torch.randint(0, cfg.vocab_size, (9, 2))
    full, _ = model(tokens)
    state = model.init_decode_state(2)
    last, state = model.step(tokens[:4], state)
    stepped = [last]
    for t in range(4, 9):
        last, state = model.step(tokens[t : t + 1], state)
        stepped.append(last)
    assert_all_close(["prefill+steps"], [torch.stack(stepped)], [full[3:]], atol=1e-5, rtol=1e-4)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The ``ends`` flag of every call into the compiled one-token kernel (skips where it is not built)."""
    from srupp.ops import decode_kernel, library

    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    calls = []
    original = decode_kernel.TokenRun.__call__
    monkeypatch.setattr(decode_kernel.TokenRun, "__call__", lambda self, *a: calls.append(a[-1]) or original(self, *a))
    return calls


def test_compiled_lm_session_equals_its_torch_path(kernel_calls):
    """``SRUppLM.decoder``'s one compiled call per token (embedding, stack, output layer and log-softmax) against
    the same session through torch ops, and both against the functional ``SRUppLM.step``: a batch of 3 over 30
    tokens that outgrow the buffers and slide a window; an out-of-range id fails without touching the session;
    float64 keeps the torch path."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=200, hidden_size=24, proj_size=8, num_layers=3, num_heads=2, attention_every_n_layers=2)
    model = with_attention(SRUppLM(cfg)).eval()
    tokens = torch.randint(0, 200, (34, 3))

    def decode(compiled: bool):
        with torch.no_grad():
            session = model.decoder(3, max_context=7)
            if not compiled:
                session.stack.kernel = None
            outputs = [session.step(tokens[:4])]
            for t in range(4, 34):
                if t == 20:
                    with pytest.raises(IndexError, match="out of range"):  # torch's message or the kernel's
                        session.step(torch.tensor([[1, 200, 2]]))
                outputs.append(session.step(tokens[t : t + 1]))
        return torch.stack(outputs), session.state

    compiled, compiled_state = decode(True)
    assert kernel_calls == [True] * 31  # the failed id included: it was refused before anything was written
    with torch.no_grad():  # a state of another batch size: the stack's new kernel has no ends, so the stack runs
        session = model.decoder(3)
        session.stack.load(model.init_decode_state(2))
        got = [session.step(tokens[t : t + 1, :2]) for t in range(2)]
        want, state = model.step(tokens[:1, :2], model.init_decode_state(2))
        torch.testing.assert_close(torch.stack(got), torch.stack([want, model.step(tokens[1:2, :2], state)[0]]))
    assert kernel_calls == [True] * 31 + [False]
    kernel_calls.clear()
    reference, reference_state = decode(False)
    assert not kernel_calls
    with torch.no_grad():
        last, state = model.step(tokens[:4], model.init_decode_state(3, max_context=7))
        functional = [last]
        for t in range(4, 34):
            last, state = model.step(tokens[t : t + 1], state)
            functional.append(last)
    for name, (got, got_state) in {
        "compiled": (compiled, compiled_state),
        "torch": (reference, reference_state),
    }.items():
        assert_all_close(
            [f"{name} log_probs", f"{name} c"],
            [got, got_state.c],
            [torch.stack(functional), state.c],
            atol=1e-5,
            rtol=1e-4,
        )
        for have, want in zip(got_state.keys, state.keys, strict=True):
            assert (have is None) == (want is None) and (have is None or torch.allclose(have, want, atol=1e-5))
    kernel_calls.clear()
    with torch.no_grad():
        session = model.double().decoder(3)
        session.step(tokens[:4])
        session.step(tokens[4:5])
    assert not kernel_calls and session.stack.kernel is None


@pytest.mark.parametrize("cfg", CONFIGS)
def test_nll_matches_log_probs_and_normalises(cfg):
    torch.manual_seed(0)
    model = SRUppLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (7, 3))
    log_probs, _ = model(tokens[:-1])
    nll, _ = model(tokens[:-1], targets=tokens[1:])
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(6, 3), atol=1e-5)
    assert torch.allclose(nll, -log_probs.gather(-1, tokens[1:, :, None])[..., 0], atol=1e-5)


def test_segment_recurrence_carries_detached_state_and_memory():
    cfg = CONFIGS[0].values[0]
    model = with_attention(SRUppLM(cfg))
    tokens = torch.randint(0, 256, (17, 2))
    nll, state = model(tokens[:8], targets=tokens[1:9])
    assert not state.c.requires_grad and all(not m.requires_grad for m in state.memory)
    with_memory, _ = model(tokens[8:16], state, targets=tokens[9:17])
    without, _ = model(tokens[8:16], targets=tokens[9:17])
    assert not torch.allclose(with_memory, without)
    c_only, _ = model(tokens[8:16], SRUppState(state.c, [None] * cfg.num_layers), targets=tokens[9:17])
    assert not torch.allclose(with_memory, c_only)
    with_memory.mean().backward()


def test_longer_window_changes_only_late_positions():
    model = with_attention(SRUppLM(CONFIGS[0].values[0])).eval()
    tokens = torch.randint(0, 256, (12, 1))
    full, _ = model(tokens)
    windowed, _ = model(tokens, attn_window=4)
    assert torch.allclose(full[:5], windowed[:5], atol=1e-6)
    assert not torch.allclose(full[5:], windowed[5:], atol=1e-6)


def test_adaptive_input_is_tied():
    cfg = CONFIGS[1].values[0]
    model = SRUppLM(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("embedding") for n in names)
    tokens = torch.tensor([[5], [30], [100]])
    model.embed(tokens).sum().backward()
    assert model.softmax.head.weight.grad[5].abs().sum() > 0
    assert model.softmax.tail[0][1].weight.grad[10].abs().sum() > 0  # token 30 = cluster 1 row 10
    assert model.softmax.tail[1][0].weight.grad.abs().sum() > 0


def test_adaptive_projection_is_tied():
    model = SRUppLM(CONFIGS[2].values[0])
    model.embed(torch.tensor([[3]])).sum().backward()
    assert model.projection.weight.grad.abs().sum() > 0
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters


def test_rejects_bad_input():
    model = SRUppLM(CONFIGS[0].values[0])
    with pytest.raises(ValueError, match=r"\[T, B\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="LMConfig"):
        SRUppLM({"hidden_size": 3})
    with pytest.raises(TypeError, match="integer tensor of token ids, got torch.float32"):
        model(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="`state` must be the SRUppState"):
        model(torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 2, 32))


def test_backend_is_a_runtime_choice():
    cfg = CONFIGS[0].values[0]
    torch.manual_seed(0)
    model = with_attention(SRUppLM(cfg, backend="naive")).eval()
    assert {layer.backend for layer in model.rnn.layers} == {"naive"}
    tokens = torch.randint(0, 256, (6, 2))
    expected, _ = model(tokens)
    model.set_backend("auto")
    assert {layer.backend for layer in model.rnn.layers} == {"auto"}
    assert_all_close(["log_probs"], [model(tokens)[0]], [expected], atol=1e-5, rtol=1e-5)
    assert not any("backend" in key for key in model.state_dict())


def test_decoding_continues_a_forward_segment():
    cfg = CONFIGS[1].values[0]
    torch.manual_seed(0)
    model = with_attention(SRUppLM(cfg)).eval()
    tokens = torch.randint(0, cfg.vocab_size, (8, 2))
    full, _ = model(tokens)
    _, state = model(tokens[:5])
    stepped = []
    for t in range(5, 8):
        last, state = model.step(tokens[t : t + 1], state)
        stepped.append(last)
    assert_all_close(["steps after forward"], [torch.stack(stepped)], [full[5:]], atol=1e-5, rtol=1e-4)


def test_lm_session_select_continues_the_chosen_streams(kernel_calls):
    """``SRUppLM.decoder``'s select between tokens (beam search's reordering, with repeats): each token's
    log-probabilities equal the forward over the history of the stream it continues, and every token keeps the
    one compiled call with the embedding and output layer."""
    torch.manual_seed(0)
    model = with_attention(SRUppLM(CONFIGS[0].values[0])).eval()
    history = torch.randint(0, 256, (4, 3))
    with torch.no_grad():
        session = model.decoder(3)
        session.step(history)
        for t, rows in enumerate([[2, 2, 0], [1, 0, 0], [0, 1, 2], [2, 1, 1]] * 5):
            session.select(torch.tensor(rows))
            token = torch.randint(0, 256, (1, 3))
            history = torch.cat([history[:, rows], token])
            expected, _ = model(history)
            assert_all_close([f"token {t}"], [session.step(token)], [expected[-1]], atol=1e-5, rtol=1e-4)
    assert kernel_calls == [True] * 20
