import pytest
import torch

from srupp.nn import SRUpp, c_from_sru, srupp_from_sru

pytestmark = pytest.mark.sru_package

PARITY = {
    "every-layer": dict(input_size=12, hidden_size=12, num_layers=3),
    "every-second-layer": dict(input_size=12, hidden_size=12, num_layers=4, attention_every_n_layers=2),
    "two-heads": dict(input_size=12, hidden_size=12, num_layers=2, num_heads=2),
    "bidirectional": dict(input_size=12, hidden_size=6, num_layers=2, bidirectional=True),
    "bidirectional-skip-projection": dict(input_size=10, hidden_size=7, num_layers=2, bidirectional=True),
    "input-size-differs": dict(input_size=9, hidden_size=12, num_layers=2),
    "layer-norm": dict(input_size=12, hidden_size=12, num_layers=2, layer_norm=True),
}


def authors_model(sru_package, input_size, hidden_size, proj_size=8, **kwargs):
    torch.manual_seed(0)
    model = sru_package.SRUpp(input_size, hidden_size, proj_size, **kwargs).eval()
    # Random alpha, norms and biases, so that every mapped tensor matters.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def causal_mask(length, memory_len=0):
    """The authors' LM mask: additive -1e4 above the diagonal shifted by the memory length."""
    return torch.ones(length, memory_len + length).triu(memory_len + 1) * -1e4


def run_both(theirs, ours, x, *, c0=None, causal=False, mask_pad=None, memory=None):
    their_mask = causal_mask(x.shape[0], 0 if memory is None else memory[0].shape[0]) if causal else None
    with torch.no_grad():
        h_theirs, c_theirs, saved = theirs(x, c0, mask_pad=mask_pad, attn_mask=their_mask, memory=memory)
        our_c0 = None if c0 is None else c_from_sru(c0, theirs.num_directions)
        h_ours, state = ours(x, our_c0, mask_pad=mask_pad, causal=causal, memory=memory)
    return (h_theirs, c_from_sru(c_theirs, theirs.num_directions), saved["saved_inputs"]), (
        h_ours,
        state.c,
        state.memory,
    )


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional-attention", "causal"])
@pytest.mark.parametrize("config", PARITY.values(), ids=PARITY.keys())
def test_parity_with_authors(sru_package, assert_close, config, causal):
    theirs = authors_model(sru_package, **config)
    ours = srupp_from_sru(theirs).eval()
    x = torch.randn(7, 3, config["input_size"])
    c0 = torch.randn(config["num_layers"], 3, theirs.output_size)
    expected, actual = run_both(theirs, ours, x, c0=c0, causal=causal)
    assert_close(actual[0], expected[0], atol=1e-4, rtol=0, name="output")
    assert_close(actual[1], expected[1], atol=1e-4, rtol=0, name="c")
    # Ours keeps memory only where attention reads it; theirs saves every layer's input.
    attention = list(ours.attention_layers)
    assert [m is not None for m in actual[2]] == [i in attention for i in range(ours.num_layers)]
    memory = [(actual[2][i], expected[2][i]) for i in attention]
    assert_close([a for a, _ in memory], [e for _, e in memory], atol=1e-4, rtol=0, name="memory")


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional-attention", "causal"])
@pytest.mark.parametrize("name", ["every-layer", "bidirectional", "every-second-layer"])
def test_parity_with_padding(sru_package, assert_close, name, causal):
    config = PARITY[name]
    theirs = authors_model(sru_package, **config)
    ours = srupp_from_sru(theirs).eval()
    x = torch.randn(6, 3, config["input_size"])
    mask_pad = torch.arange(6).unsqueeze(1) >= torch.tensor([6, 4, 1])
    expected, actual = run_both(theirs, ours, x, causal=causal, mask_pad=mask_pad)
    assert_close(actual[0], expected[0], atol=1e-4, rtol=0, name="output")
    assert_close(actual[1], expected[1], atol=1e-4, rtol=0, name="c")


@pytest.mark.parametrize("name", ["every-layer", "every-second-layer", "two-heads", "input-size-differs"])
def test_parity_with_memory(sru_package, assert_close, name):
    config = PARITY[name]
    theirs = authors_model(sru_package, **config)
    ours = srupp_from_sru(theirs).eval()
    first, second = torch.randn(5, 2, config["input_size"]), torch.randn(4, 2, config["input_size"])
    with torch.no_grad():
        _, c_theirs, saved = theirs(first, attn_mask=causal_mask(5))
    expected, actual = run_both(theirs, ours, second, c0=c_theirs, causal=True, memory=saved["saved_inputs"])
    assert_close(actual[0], expected[0], atol=1e-4, rtol=0, name="output")
    assert_close(actual[1], expected[1], atol=1e-4, rtol=0, name="c")


def test_state_dict_with_sizes_equals_module(sru_package, assert_close):
    theirs = authors_model(sru_package, **PARITY["bidirectional"], num_heads=2)
    from_module = srupp_from_sru(theirs).eval()
    from_dict = srupp_from_sru(theirs.state_dict(), num_heads=2, hidden_size=6).eval()
    assert from_dict.bidirectional and from_dict.attention_layers == (0, 1)
    x = torch.randn(5, 2, 12)
    with torch.no_grad():
        assert_close(from_dict(x)[0], from_module(x)[0], atol=0, rtol=0)


def test_converted_keeps_hyperparameters(sru_package):
    theirs = sru_package.SRUpp(8, 8, 4, num_layers=3, dropout=0.2, attn_dropout=0.1, attention_every_n_layers=3)
    ours = srupp_from_sru(theirs)
    assert (ours.dropout, ours.attn_dropout, ours.highway_bias) == (0.2, 0.1, -2.0)
    assert ours.attention_layers == (2,)


def test_errors(sru_package):
    theirs = sru_package.SRUpp(8, 8, 4, num_layers=2)
    with pytest.raises(ValueError, match="proj_size"):
        srupp_from_sru(theirs, proj_size=5)
    with pytest.raises(ValueError, match="no sru.SRUpp layers"):
        srupp_from_sru({"weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="state_dict"):
        srupp_from_sru(42)
    with pytest.raises(ValueError, match="cannot be bidirectional"):
        srupp_from_sru(sru_package.SRUpp(8, 5, 4).state_dict(), bidirectional=True)
    with pytest.raises(ValueError, match="hidden_size"):
        srupp_from_sru(theirs, hidden_size=4)


def test_c_from_sru_order():
    c = torch.arange(2 * 1 * 6.0).reshape(2, 1, 6)
    ours = c_from_sru(c, 2)
    assert ours[:, 0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert isinstance(SRUpp(4, 3, 2, bidirectional=True)(torch.randn(2, 1, 4))[1].c, torch.Tensor)


REFUSED = {
    "rescale": (dict(rescale=True), "rescale=True"),
    "post-norm": (dict(layer_norm=True, normalize_after=True), "normalize_after=True"),
    "no-attention-layer-norm": (dict(attn_layer_norm=False), "attn_layer_norm=False"),
    "input-to-hidden-first": (dict(proj_input_to_hidden_first=True), "proj_input_to_hidden_first=True"),
}


@pytest.mark.parametrize("source", ["module", "state_dict"])
@pytest.mark.parametrize("options,message", REFUSED.values(), ids=REFUSED.keys())
def test_refuses_what_it_cannot_represent(sru_package, options, message, source):
    # Input size 6 != output size 8 lets a state_dict show post-norm cells (their LayerNorm has 8 features).
    theirs = sru_package.SRUpp(6, 8, 4, num_layers=2, **options)
    with pytest.raises(NotImplementedError, match=message):
        srupp_from_sru(theirs if source == "module" else theirs.state_dict())


def test_rescale_state_dict_would_compute_another_function(sru_package):
    # Why rescale=True must be refused: the same weights without the rescaled skip give other outputs.
    theirs = authors_model(sru_package, 8, 8, num_layers=2, rescale=True)
    plain = authors_model(sru_package, 8, 8, num_layers=2)
    plain.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 2, 8)
    with torch.no_grad():
        assert not torch.allclose(theirs(x)[0], plain(x)[0], atol=1e-3)
        state = theirs.state_dict()
    assert any(key.endswith("scale_x") and value.item() != 1 for key, value in state.items())
