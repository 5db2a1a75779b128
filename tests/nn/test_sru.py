import pytest
import torch

from srupp.nn import SRU, SRULayer
from srupp.nn.layer import linear_transform


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"input_size": 6, "hidden_size": 6, **kwargs}
    return SRU(**kwargs).eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(bidirectional=True, hidden_size=3),
        dict(input_size=5, hidden_size=7, projection_size=3),
        dict(layer_norm=True, num_layers=3),
    ],
    ids=["plain", "bidirectional", "skip-projection-low-rank", "layer-norm"],
)
def test_fast_backend_equals_naive(assert_close, kwargs):
    fast, naive = make(**kwargs), make(**kwargs, backend="naive")
    x = torch.randn(5, 2, kwargs.get("input_size", 6))
    c0 = torch.randn(fast.num_layers * fast.num_directions, 2, fast.hidden_size)
    results = []
    for model in (fast, naive):
        inputs = x.clone().requires_grad_()
        output, c = model(inputs, c0)
        (output.square().sum() + c.sum()).backward()
        results.append([output, c, inputs.grad] + [p.grad for p in model.parameters()])
    assert_close(results[0], results[1])


def test_layer_equals_equations(assert_close):
    torch.manual_seed(0)
    cell = SRULayer(4, 4, linear_transform, highway_bias=-1.0)
    x = torch.randn(3, 1, 4)
    with torch.no_grad():
        h, c = cell(x)
        u_c, u_f, u_r = (x @ cell.transform.weight.T).chunk(3, dim=-1)
        (v_f, v_r), (b_f, b_r) = cell.gates.weight[0], cell.gates.bias[0]
        state = torch.zeros(1, 4)
        for t in range(3):
            f = torch.sigmoid(u_f[t] + v_f * state + b_f)
            r = torch.sigmoid(u_r[t] + v_r * state + b_r)
            state = f * state + (1 - f) * u_c[t]
            assert_close(h[t], r * state + (1 - r) * x[t])
    assert_close(c[0], state)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
def test_padded_batch_equals_each_sequence_alone(assert_close, bidirectional):
    model = make(num_layers=2, bidirectional=bidirectional, hidden_size=3 if bidirectional else 6)
    lengths = [4, 1, 3]
    x = torch.randn(4, 3, 6)
    mask_pad = torch.arange(4).unsqueeze(1) >= torch.tensor(lengths)
    with torch.no_grad():
        padded, c = model(x, mask_pad=mask_pad)
        for b, length in enumerate(lengths):
            alone, alone_c = model(x[:length, b : b + 1])
            assert_close(padded[:length, b : b + 1], alone)
            assert_close(c[:, b : b + 1], alone_c)


def test_batch_first_and_dropout(assert_close):
    model, batch_first = make(dropout=0.4), make(dropout=0.4, batch_first=True)
    x = torch.randn(5, 2, 6)
    with torch.no_grad():
        assert_close(batch_first(x.transpose(0, 1))[0], model(x)[0].transpose(0, 1))
        model.train()
        assert not torch.equal(model(x)[0], model(x)[0])
    assert model.layers[0].dropout == 0.4 and model.layers[1].dropout == 0.0


def test_init_repr_and_errors():
    model = SRU(4, 8, num_layers=2, bidirectional=True)
    assert model.layers[0].gates.bias[:, 1].eq(-2.0).all() and model.layers[0].gates.weight.abs().max() <= 1
    assert model.layers[0].project_skip and not model.layers[1].project_skip
    assert "bidirectional=True" in repr(model)
    with pytest.raises(ValueError, match=r"\[T, B, input_size\] = \[T, B, 4\]"):
        model(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match=r"\[4, 2, 8\]"):
        model(torch.randn(3, 2, 4), torch.zeros(2, 2, 8))
    with pytest.raises(ValueError, match=r"\[T, B\] = \[3, 2\]"):
        model(torch.randn(3, 2, 4), mask_pad=torch.zeros(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
def test_nan_padding_cannot_reach_real_outputs(bidirectional):
    model = make(num_layers=2, bidirectional=bidirectional, hidden_size=3 if bidirectional else 6)
    x = torch.randn(4, 3, 6)
    mask_pad = torch.arange(4).unsqueeze(1) >= torch.tensor([4, 1, 3])
    with torch.no_grad():
        clean, clean_c = model(x, mask_pad=mask_pad)
        dirty, dirty_c = model(x.masked_fill(mask_pad.unsqueeze(-1), float("nan")), mask_pad=mask_pad)
    assert torch.equal(dirty, clean) and torch.equal(dirty_c, clean_c)


def test_set_backend_and_state_dict_keys():
    model = SRU(4, 8, num_layers=2, projection_size=3, layer_norm=True)
    model.set_backend("naive")
    assert [layer.backend for layer in model.layers] == ["naive", "naive"]
    # The keys of srupp 0.1's SRUCell layers, so saved SRU weights still load.
    assert sorted(model.state_dict()) == sorted(
        f"layers.{i}.{name}"
        for i in range(2)
        for name in (
            "transform.0.weight",
            "transform.1.weight",
            "input_norm.weight",
            "input_norm.bias",
            "gates.weight",
            "gates.bias",
        )
    )
