import pytest
import torch
from benchmarks.baselines import MODELS, build, count_parameters, size_to_match


def assert_close(actual, expected, atol=1e-5, rtol=1e-4):
    error = (actual - expected).abs().max().item()
    relative = error / max(expected.abs().max().item(), 1e-12)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max abs {error:.3g}, rel {relative:.3g}"


@pytest.mark.parametrize(
    "chunks", [[1] * 9, [4, 1, 1, 3], [9]], ids=["token_by_token", "prefill_then_steps", "one_chunk"]
)
@pytest.mark.parametrize("kind", MODELS)
def test_cached_decoding_equals_full_forward(kind, chunks):
    torch.manual_seed(0)
    model = build(kind, width=32, layers=2, num_heads=4).eval()
    tokens = torch.randint(0, 256, (sum(chunks), 3))
    with torch.no_grad():
        full, _ = model(tokens)
        cache, pieces, start = model.init_decode(3), [], 0
        for size in chunks:
            logits, cache = model.step(tokens[start : start + size], cache)
            pieces.append(logits)
            start += size
    assert_close(torch.cat(pieces), full)


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = build("transformer", width=32, layers=2, num_heads=4).eval()
    tokens = torch.randint(0, 256, (10, 2))
    changed = tokens.clone()
    changed[6:] = (changed[6:] + 1) % 256
    with torch.no_grad():
        assert_close(model(changed)[0][:6], model(tokens)[0][:6])


@pytest.mark.parametrize("kind", ["srupp", "lstm"], ids=["srupp", "lstm"])
def test_carried_state_equals_one_long_segment_for_recurrent_models(kind):
    torch.manual_seed(0)
    model = build(kind, width=32, layers=2).eval()
    tokens = torch.randint(0, 256, (12, 2))
    with torch.no_grad():
        full, _ = model(tokens)
        first, state = model(tokens[:6])
        second, _ = model(tokens[6:], model.detach_state(state))
    # SRU++ memory is one segment: the second half attends to the first, as in the full pass.
    assert_close(torch.cat([first, second]), full)


def test_size_to_match_lands_near_target():
    sized = size_to_match(MODELS, target=150_000, layers=2)
    for kind, (model, width) in sized.items():
        assert abs(count_parameters(model) - 150_000) / 150_000 < 0.1, (kind, width, count_parameters(model))
