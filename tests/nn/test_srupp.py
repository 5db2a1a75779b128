import copy
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from srupp.nn import SRUpp, SRUppState
from srupp.ops.naive import sru_recurrence_naive

CONFIGS = {
    "attention-every-layer": dict(num_layers=2),
    "every-second-layer-two-heads": dict(num_layers=3, attention_every_n_layers=2, num_heads=2),
    "layer-norm-odd-sizes": dict(num_layers=2, layer_norm=True, hidden_size=9),
}


def make(input_size=6, hidden_size=8, proj_size=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = SRUpp(input_size, hidden_size, proj_size, **kwargs)
    with torch.no_grad():
        for layer in model.layers:
            if layer.has_attention:
                layer.transform.alpha.fill_(0.7)
    return model.eval()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_token_by_token_decoding_equals_forward(assert_close, config):
    model = make(**config)
    x = torch.randn(7, 2, 6)
    with torch.no_grad():
        expected, state = model(x, causal=True)
        cache = model.init_decode_state(2)
        outputs = []
        for t in range(7):
            out, cache = model.step(x[t : t + 1], cache)
            outputs.append(out)
    assert_close(torch.cat(outputs), expected, name="output")
    assert_close(cache.c, state.c, name="c")


@pytest.mark.parametrize("chunks", [[7], [3, 4], [1, 5, 1]], ids=["one-chunk", "3+4", "1+5+1"])
def test_chunked_prefill_equals_forward(assert_close, chunks):
    model = make(**CONFIGS["every-second-layer-two-heads"])
    x = torch.randn(7, 3, 6)
    with torch.no_grad():
        expected, _ = model(x, causal=True)
        cache, outputs, start = model.init_decode_state(3), [], 0
        for size in chunks:
            out, cache = model.step(x[start : start + size], cache)
            outputs.append(out)
            start += size
    assert_close(torch.cat(outputs), expected)


@pytest.mark.parametrize("max_context", [0, 2, 5])
def test_bounded_cache_equals_windowed_forward(assert_close, max_context):
    model = make(num_layers=2)
    x = torch.randn(9, 2, 6)
    with torch.no_grad():
        expected, _ = model(x, causal=True, attn_window=max_context)
        cache, outputs = model.init_decode_state(2, max_context=max_context), []
        for start, size in [(0, 4), (4, 1), (5, 1), (6, 3)]:
            out, cache = model.step(x[start : start + size], cache)
            outputs.append(out)
            assert cache.keys[0].shape[2] == min(max_context, start + size)
    assert_close(torch.cat(outputs), expected)


def test_window_larger_than_sequence_is_full_attention(assert_close):
    model = make()
    x = torch.randn(5, 2, 6)
    with torch.no_grad():
        assert_close(model(x, causal=True, attn_window=4)[0], model(x, causal=True)[0])
        assert_close(model(x, attn_window=4)[0], model(x)[0])


def test_memory_segments_equal_one_long_forward(assert_close):
    model = make(num_layers=3, attention_every_n_layers=2)
    x = torch.randn(9, 2, 6)
    with torch.no_grad():
        expected, full_state = model(x, causal=True)
        first, first_state = model(x[:4], causal=True)
        second, state = model(x[4:], first_state, causal=True)
        explicit, explicit_state = model(x[4:], first_state.c, causal=True, memory=first_state.memory)
    # One segment of memory covers everything earlier, so the split equals the whole.
    assert_close(torch.cat([first, second]), expected)
    assert_close(state.c, full_state.c)
    assert_close([explicit, explicit_state.c], [second, state.c], atol=0, rtol=0, name="memory= keyword")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional-attention"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
def test_padded_batch_equals_each_sequence_alone(assert_close, causal, bidirectional):
    model = make(num_layers=2, bidirectional=bidirectional, hidden_size=3 if bidirectional else 6)
    lengths = [5, 2, 4]
    x = torch.randn(5, 3, 6)
    mask_pad = torch.arange(5).unsqueeze(1) >= torch.tensor(lengths)
    c0 = torch.randn(2 * model.num_directions, 3, model.hidden_size)
    with torch.no_grad():
        padded, state = model(x, c0, mask_pad=mask_pad, causal=causal)
        for b, length in enumerate(lengths):
            alone, alone_state = model(x[:length, b : b + 1], c0[:, b : b + 1], causal=causal)
            assert_close(padded[:length, b : b + 1], alone, name=f"output of sequence {b}")
            assert_close(state.c[:, b : b + 1], alone_state.c, name=f"c of sequence {b}")
        assert padded[2:, 1].abs().max() == 0


def test_batch_first_equals_transposed_call(assert_close):
    model = make(num_layers=2)
    batch_first = make(num_layers=2, batch_first=True)
    x = torch.randn(5, 3, 6)
    mask_pad = torch.zeros(5, 3, dtype=torch.bool)
    mask_pad[3:, 0] = True
    with torch.no_grad():
        expected, state = model(x, mask_pad=mask_pad, causal=True)
        actual, state_bf = batch_first(x.transpose(0, 1), mask_pad=mask_pad.t(), causal=True)
        assert_close(actual, expected.transpose(0, 1))
        assert_close(state_bf.c, state.c)
        cache = batch_first.init_decode_state(3)
        stepped, _ = batch_first.step(x.transpose(0, 1), cache)
        assert_close(stepped, model(x, causal=True)[0].transpose(0, 1))


def test_state_as_tensor_or_dataclass():
    model = make()
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        _, state = model(x)
        a, _ = model(x, state)
        b, _ = model(x, state.c, memory=state.memory)
    assert isinstance(state, SRUppState) and state.c.shape == (2, 2, 8)
    assert [m.shape[-1] for m in state.memory] == [6, 8]
    assert [m is None for m in make(num_layers=3, attention_every_n_layers=2)(x)[1].memory] == [True, False, True]
    assert torch.equal(a, b)


def test_bidirectional_output_and_state_order_match_the_spec(assert_close):
    model = make(bidirectional=True, num_layers=2, hidden_size=5)
    x = torch.randn(4, 2, 6)
    c0 = torch.randn(4, 2, 5)
    with torch.no_grad():
        output, state = model(x, c0)
        # Layer 0 from the spec: forward then reversed recurrence on U's per-direction blocks (the skip is
        # U's fourth block, as 6 != 2 * 5); nn.LSTM order: output [fwd | bwd], c rows layer-major, then direction.
        layer = model.layers[0]
        u = layer.transform(x, causal=False)  # a bidirectional layer attends both ways
        spec = [
            sru_recurrence_naive(u[..., 15 * d : 15 * (d + 1)], u[..., 30 + 5 * d : 35 + 5 * d],
                                 layer.gates.weight[d], layer.gates.bias[d], c0[d], reverse=d == 1)
            for d in range(2)
        ]  # fmt: skip
        h1, c1 = model.layers[1](torch.cat([spec[0][0], spec[1][0]], dim=-1), c0[2:4])
    assert output.shape == (4, 2, 10) and state.c.shape == (4, 2, 5)
    assert_close(state.c[0:2], torch.stack([spec[0][1], spec[1][1]]), name="layer 0 c")
    assert_close([output, state.c[2:4]], [h1, c1], name="layer 1")


def test_eval_is_deterministic_and_train_uses_dropout():
    model = make(dropout=0.3, attn_dropout=0.3)
    x = torch.randn(6, 2, 6)
    with torch.no_grad():
        assert torch.equal(model(x, causal=True)[0], model(x, causal=True)[0])
        model.train()
        assert not torch.equal(model(x, causal=True)[0], model(x, causal=True)[0])


def test_gradients_reach_every_parameter_and_the_memory():
    model = make(num_layers=2).train()
    memory = [torch.randn(3, 2, 6, requires_grad=True), torch.randn(3, 2, 8, requires_grad=True)]
    output, state = model(torch.randn(4, 2, 6), torch.randn(2, 2, 8), causal=True, memory=memory)
    (output.square().sum() + state.c.sum()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    kv = model.layers[0].transform.kv_proj.weight.grad
    assert kv[:4].abs().sum() > 0 and kv[4:].abs().sum() > 0  # Wk and Wv
    assert all(m.grad.abs().sum() > 0 for m in memory)
    assert state.detach().c.grad_fn is None


def test_initialisation():
    model = SRUpp(16, 16, 4, num_layers=2, highway_bias=-3.0, dropout=0.19)
    gates = model.layers[0].gates
    assert gates.weight.abs().max() <= 1 and gates.bias[:, 0].abs().max() == 0
    assert torch.all(gates.bias[:, 1] == -3.0)
    assert model.layers[1].transform.alpha.item() == 0
    assert model.attention_layers == (0, 1)
    assert SRUpp(8, 8, 4, num_layers=4, attention_every_n_layers=2).attention_layers == (1, 3)
    assert SRUpp(8, 8, 4, num_layers=4, attention_layers=[3, 0]).attention_layers == (0, 3)
    assert model.layers[0].dropout == 0.19 and model.layers[1].dropout == 0.0
    assert "highway_bias=-3.0" in repr(model) and "dropout=0.19" in repr(model)


def test_autocast_bfloat16_runs_in_low_precision_with_fp32_params(assert_close):
    model = make(num_layers=2)
    x = torch.randn(5, 2, 6)
    with torch.no_grad():
        expected, _ = model(x, causal=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual, state = model(x, causal=True)
    assert actual.dtype == torch.bfloat16
    assert_close(actual.float(), expected, atol=0.1, rtol=0.1)


def test_torch_compile_equals_eager(assert_close):
    model = make(num_layers=2).train()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(6, 2, 6)
    outputs, grads = [], []
    for run in (model, compiled):
        model.zero_grad()
        output, state = run(x, causal=True)
        (output.square().sum() + state.c.sum()).backward()
        outputs.append(output.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert_close(outputs[1], outputs[0], name="output")
    assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4, name="grad")


MEMORY = [torch.zeros(3, 2, 6), torch.zeros(3, 2, 8)]
BAD_CALLS = {
    "input-size": (lambda m: m(torch.randn(4, 2, 5)), ValueError, r"\[T, B, input_size\] = \[T, B, 6\]"),
    "input-dims": (lambda m: m(torch.randn(4, 6)), ValueError, "input"),
    "input-type": (lambda m: m([1.0]), TypeError, "torch.Tensor"),
    "state-shape": (lambda m: m(torch.randn(4, 2, 6), torch.zeros(2, 3, 8)), ValueError, r"\[2, 2, 8\]"),
    "mask-shape": (lambda m: m(torch.randn(4, 2, 6), mask_pad=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
                   r"\[T, B\] = \[4, 2\]"),
    "mask-dtype": (lambda m: m(torch.randn(4, 2, 6), mask_pad=torch.zeros(4, 2)), TypeError, "bool"),
    "memory-length": (lambda m: m(torch.randn(4, 2, 6), memory=[None]), ValueError, "one entry per layer"),
    "memory-batch": (lambda m: m(torch.randn(4, 2, 6), memory=[torch.randn(3, 5, 6), None]), ValueError,
                     "batch size B = 2"),
    "memory-width": (lambda m: m(torch.randn(4, 2, 6), memory=[None, torch.randn(3, 2, 6)]), ValueError,
                     r"\[M, B, 8\]"),
    "memory-type": (lambda m: m(torch.randn(4, 2, 6), memory=torch.randn(3, 2, 6)), TypeError, "list"),
    "window-type": (lambda m: m(torch.randn(4, 2, 6), attn_window=2.0), TypeError, "attn_window"),
    "decode-batch": (lambda m: m.step(torch.randn(1, 3, 6), m.init_decode_state(2)), ValueError, "state.c"),
    "decode-type": (lambda m: m.step(torch.randn(1, 2, 6), torch.zeros(2, 2, 8)), TypeError, "SRUppState"),
    "memory-twice": (lambda m: m(torch.randn(4, 2, 6), m(torch.randn(3, 2, 6))[1], memory=[None, None]),
                     ValueError, "memory once"),
    "cache-shape": (lambda m: m(torch.randn(4, 2, 6), SRUppState(torch.zeros(2, 2, 8), keys=[torch.zeros(2, 1, 3, 3),
                    None], values=[torch.zeros(2, 1, 3, 3), None])), ValueError, r"\[2, 1, S, 4\]"),
    "memory-and-cache": (lambda m: m.step(torch.randn(1, 2, 6), SRUppState(torch.zeros(2, 2, 8),
                         memory=[torch.zeros(3, 2, 6), None], keys=[torch.zeros(2, 1, 3, 4), None],
                         values=[torch.zeros(2, 1, 3, 4), None])), ValueError, "keep one"),
    "key-pad-length": (lambda m: m(torch.randn(4, 2, 6), SRUppState(torch.zeros(2, 2, 8), memory=MEMORY,
                       key_pad=torch.zeros(2, 4, dtype=torch.bool))), ValueError, r"\[B, S\] = \[2, \[3\]\]"),
    "key-pad-dtype": (lambda m: m.step(torch.randn(1, 2, 6), SRUppState(torch.zeros(2, 2, 8), memory=MEMORY,
                      key_pad=torch.zeros(2, 3))), TypeError, "bool"),
    "key-pad-alone": (lambda m: m.step(torch.randn(1, 2, 6), SRUppState(torch.zeros(2, 2, 8),
                      key_pad=torch.zeros(2, 3, dtype=torch.bool))), ValueError, "no memory or cache"),
    "decode-mask-shape": (lambda m: m.step(torch.randn(3, 2, 6), m.init_decode_state(2),
                          mask_pad=torch.zeros(2, 3, dtype=torch.bool)), ValueError, r"\[T, B\] = \[3, 2\]"),
}  # fmt: skip


@pytest.mark.parametrize("call,error,message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call(make())


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible by `num_heads`"):
        SRUpp(8, 8, 6, num_heads=4)
    with pytest.raises(ValueError, match="attention_layers"):
        SRUpp(8, 8, 4, num_layers=2, attention_layers=[2])
    with pytest.raises(ValueError, match="dropout"):
        SRUpp(8, 8, 4, dropout=1.0)
    bidirectional = SRUpp(8, 4, 4, bidirectional=True)
    with pytest.raises(NotImplementedError, match="unidirectional"):
        bidirectional.init_decode_state(1)
    with pytest.raises(NotImplementedError, match="unidirectional"):
        bidirectional.step(torch.randn(1, 1, 8), SRUppState(torch.zeros(2, 1, 4)))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
def test_fast_backend_equals_naive_with_every_gradient(assert_close, bidirectional):
    kwargs = dict(num_layers=2, bidirectional=bidirectional, hidden_size=3 if bidirectional else 6, num_heads=2)
    fast, naive = make(**kwargs), make(**kwargs, backend="naive")
    x = torch.randn(5, 2, 6)
    mask_pad = torch.tensor([[False] * 2] * 3 + [[False, True]] * 2)
    memory = [torch.randn(2, 2, 6), torch.randn(2, 2, 6)]
    c0 = torch.randn(2 * fast.num_directions, 2, fast.hidden_size)
    results = []
    for model in (fast, naive):
        inputs = x.clone().requires_grad_()
        output, state = model(inputs, c0, mask_pad=mask_pad, causal=not bidirectional, memory=memory)
        (output.square().sum() + state.c.sum()).backward()
        results.append([output, state.c, inputs.grad] + [p.grad for p in model.parameters()])
    assert_close(results[0], results[1], name="output, c, grads")


def test_forward_reads_the_memory_of_its_state(assert_close):
    model = make(num_layers=2)
    x = torch.randn(8, 2, 6)
    with torch.no_grad():
        _, first_state = model(x[:4], causal=True)
        with_memory, _ = model(x[4:], first_state, causal=True)
        c_only, _ = model(x[4:], first_state.c, causal=True)
    assert not torch.allclose(with_memory, c_only, atol=1e-3)


@pytest.mark.parametrize("order", ["forward-then-step", "step-then-forward"])
def test_forward_and_step_continue_each_other(assert_close, order):
    model = make(**CONFIGS["every-second-layer-two-heads"])
    x = torch.randn(7, 2, 6)
    with torch.no_grad():
        expected, full_state = model(x, causal=True)
        if order == "forward-then-step":
            first, state = model(x[:3], causal=True)
            second, state = model.step(x[3:5], state)
            third, state = model.step(x[5:], state)
        else:
            first, state = model.step(x[:3], model.init_decode_state(2))
            second, state = model.step(x[3:5], state)
            third, state = model(x[5:], state, causal=True)
    assert_close(torch.cat([first, second, third]), expected, name="output")
    assert_close(state.c, full_state.c, name="c")


def test_state_round_trips_through_tensors(assert_close, tmp_path):
    model = make(num_layers=3, attention_every_n_layers=2)
    x = torch.randn(6, 2, 6)
    with torch.no_grad():
        _, forward_state = model(x[:3], causal=True)
        _, step_state = model.step(x[:3], model.init_decode_state(2, max_context=4))
        for state in (forward_state, step_state):
            tensors = state.to_tensors("carry/")
            assert all(key.startswith("carry/") and value.is_contiguous() for key, value in tensors.items())
            # A decoding state's keys and values are views of one shared buffer; what to_tensors gives is not.
            save_file(tensors, str(tmp_path / "state.safetensors"))
            assert len({value.untyped_storage().data_ptr() for value in tensors.values()}) == len(tensors)
            assert all(value.untyped_storage().nbytes() == value.nbytes for value in tensors.values())
            restored = SRUppState.from_tensors({**tensors, "model/other": torch.zeros(1)}, prefix="carry/")
            assert restored.max_context == state.max_context
            for name in ("memory", "keys", "values"):
                original, back = getattr(state, name), getattr(restored, name)
                assert (original is None) == (back is None), name
                if original is not None:
                    assert [t is None for t in original] == [t is None for t in back], name
            expected, _ = model(x[3:], state, causal=True)
            actual, _ = model(x[3:], restored, causal=True)
            assert_close(actual, expected, atol=0, rtol=0)
    with torch.no_grad():  # batch 1, one head: the cache views are contiguous but live in a larger buffer
        _, single = model.step(x[:3, :1], model.init_decode_state(1))
    assert all(value.untyped_storage().nbytes() == value.nbytes for value in single.to_tensors().values())
    assert forward_state.to_tensors().keys() == {"c", "num_layers", "memory/1"}
    assert step_state.to_tensors().keys() == {"c", "num_layers", "max_context", "keys/1", "values/1"}


def test_state_from_tensors_reads_the_old_carry_format_and_rejects_bad_keys():
    # srupp 0.1 checkpoints hold `c` and the memory of every layer, no `num_layers`.
    old = {"c": torch.zeros(2, 1, 8), "memory/0": torch.zeros(3, 1, 6), "memory/1": torch.zeros(3, 1, 8)}
    state = SRUppState.from_tensors(old)
    assert [m.shape[-1] for m in state.memory] == [6, 8] and state.keys is None
    make()(torch.randn(2, 1, 6), state)
    with pytest.raises(ValueError, match="num_layers = 2"):
        SRUppState.from_tensors({**old, "num_layers": torch.tensor([2]), "memory/2": torch.zeros(3, 1, 8)})
    with pytest.raises(ValueError, match="'x/c'"):
        SRUppState.from_tensors(old, prefix="x/")
    # A file's layer count is bounded by the rows of c before any per-layer list is built.
    with pytest.raises(ValueError, match=r"num_layers` must be in \[0, 2\]"):
        SRUppState.from_tensors({**old, "num_layers": torch.tensor([10**12])})
    with pytest.raises(ValueError, match=r"must be in \[0, 2\]"):
        SRUppState.from_tensors({"c": torch.zeros(2, 1, 8), "memory/99999999999": torch.zeros(1)})


def test_state_detach_and_to():
    model = make(num_layers=2).train()
    _, state = model(torch.randn(4, 2, 6), causal=True)
    assert state.c.requires_grad and state.memory[1].requires_grad
    detached = state.detach()
    assert not detached.c.requires_grad and not any(m.requires_grad for m in detached.memory)
    moved = state.to("cpu", torch.float64)
    assert moved.c.dtype == torch.float64 and all(m.dtype == torch.float64 for m in moved.memory)


CONTAMINATED = {
    "causal": dict(causal=True),
    "bidirectional-attention": dict(causal=False),
    "bidirectional-recurrence": dict(causal=False, bidirectional=True, hidden_size=3),
    "memory-layer-norm-every-second": dict(causal=True, memory=True, layer_norm=True, num_layers=3,
                                           attention_every_n_layers=2),
}  # fmt: skip


@pytest.mark.parametrize("case", CONTAMINATED.values(), ids=CONTAMINATED.keys())
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_padding_cannot_reach_real_outputs(assert_close, case, poison):
    case = dict(case)
    causal, use_memory = case.pop("causal"), case.pop("memory", False)
    model = make(**{"num_layers": 2, **case})
    x = torch.randn(5, 3, 6)
    mask_pad = torch.arange(5).unsqueeze(1) >= torch.tensor([5, 2, 4])
    memory = [torch.randn(2, 3, model.layer_input_size(i)) for i in range(model.num_layers)] if use_memory else None
    poisoned = x.masked_fill(mask_pad.unsqueeze(-1), poison)
    results = []
    for inputs in (x, poisoned):
        inputs = inputs.clone().requires_grad_()
        output, state = model(inputs, mask_pad=mask_pad, causal=causal, memory=memory)
        output[~mask_pad].sum().backward()
        results.append((output, state, inputs.grad))
    (clean, clean_state, clean_grad), (dirty, dirty_state, dirty_grad) = results
    assert torch.isfinite(dirty).all() and torch.isfinite(dirty_state.c).all()
    assert_close([dirty, dirty_state.c, dirty_grad], [clean, clean_state.c, clean_grad], atol=0, rtol=0)
    assert all(torch.isfinite(m).all() for m in dirty_state.memory if m is not None)


def test_set_backend_reaches_every_layer(assert_close):
    model = make(num_layers=3)
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        expected, _ = model(x, causal=True)
        model.set_backend("naive")
        assert model.backend == "naive" and all(layer.backend == "naive" for layer in model.layers)
        assert_close(model(x, causal=True)[0], expected)
    with pytest.raises(TypeError, match="backend name"):
        model.set_backend(None)


@pytest.fixture
def token_path_calls(monkeypatch):
    """Counts the one-token steps that took ``SRUpp._step_token`` (the fast path)."""
    calls = []
    original = SRUpp._step_token

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(SRUpp, "_step_token", counting)
    return calls


TOKEN_PATH_CONFIGS = {
    "two-layers": dict(num_layers=2),
    "every-second-layer-two-heads": dict(num_layers=3, attention_every_n_layers=2, num_heads=2),
    "layer-norm-projected-skip-odd": dict(num_layers=2, layer_norm=True, hidden_size=9),
    "batch-first": dict(num_layers=2, batch_first=True),
}


@pytest.mark.parametrize("max_context", [None, 0, 3], ids=["all", "window-0", "window-3"])
@pytest.mark.parametrize("config", TOKEN_PATH_CONFIGS.values(), ids=TOKEN_PATH_CONFIGS.keys())
def test_one_token_path_after_prefill_equals_causal_forward(assert_close, token_path_calls, config, max_context):
    # 40 tokens after a prefill of 4: the buffers (16 positions at first) fill and move several times.
    model = make(**config)
    steps, batch = 44, 3
    x = torch.randn(steps, batch, 6)

    def layout(tensor):  # time-major <-> the model's layout
        return tensor.transpose(0, 1) if model.batch_first else tensor

    with torch.no_grad():
        expected, _ = model(layout(x), causal=True, attn_window=max_context)
        expected_state = model.step(layout(x[:4]), model.init_decode_state(batch, max_context))[1]
        for t in range(4, steps):  # the general path: replace() drops the buffers, so no step appends in place
            expected_state = model.step(layout(x[t : t + 1]), replace(expected_state))[1]
        outputs, state = [], model.init_decode_state(batch, max_context)
        for start, size in [(0, 4)] + [(t, 1) for t in range(4, steps)]:
            out, state = model.step(layout(x[start : start + size]), state)
            outputs.append(layout(out))
    assert len(token_path_calls) == steps - 4
    assert_close(torch.cat(outputs), layout(expected), name="output")
    assert_close(state.c, expected_state.c, name="c")
    for name in ("keys", "values"):
        for i, (actual, reference) in enumerate(zip(getattr(state, name), getattr(expected_state, name), strict=True)):
            assert (actual is None) == (reference is None)
            if actual is not None:
                assert actual.shape[2] == (steps if max_context is None else max_context)
                assert_close(actual, reference, name=f"{name}[{i}]")


def test_one_token_path_keeps_older_states_and_branches(assert_close, token_path_calls):
    model = make(num_layers=2)
    x, a, b = torch.randn(5, 2, 6), torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    with torch.no_grad():
        _, state = model.step(x, model.init_decode_state(2))
        keys_before = [k.clone() for k in state.keys]
        out_a, after_a = model.step(a, state)  # appends in place
        out_b, after_b = model.step(b, state)  # state is no longer the newest: the general path, which copies
        for before, now in zip(keys_before, state.keys, strict=True):
            assert_close(now, before, name="older state's keys")
        out_a2, _ = model.step(x[:1], after_a)  # the first branch still appends in place
        out_b2, _ = model.step(x[:1], after_b)
    assert len(token_path_calls) == 3
    for prefix, outs in ((a, (out_a, out_a2)), (b, (out_b, out_b2))):
        expected, _ = model(torch.cat([x, prefix, x[:1]]), causal=True)
        assert_close(torch.cat(outs), expected[5:], name="branch")


def test_one_token_path_falls_back_whenever_the_run_changes(assert_close, token_path_calls):
    model = make(num_layers=2)
    x = torch.randn(6, 2, 6)
    expected, _ = model(x, causal=True)
    with torch.no_grad():
        _, state = model.step(x[:3], model.init_decode_state(2))
        with pytest.raises(ValueError, match=r"\[T, B, input_size\]"):
            model.step(torch.randn(1, 2, 5), state)  # a bad input is still checked
        with pytest.raises(ValueError, match="state.c"):
            model.step(torch.randn(1, 3, 6), state)
        state_c = SRUppState(state.c.clone(), keys=list(state.keys), values=list(state.values))
        out3, _ = model.step(x[3:4], state_c)  # a state built by the user: checked, general path
        model.train()  # dropout could be on: the general path
        out3_train, _ = model.step(x[3:4], state)
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.step(x[3:4], state)
        out3_fast, state = model.step(x[3:4], state)
    assert token_path_calls == [1]
    for out in (out3, out3_train, out3_fast):
        assert_close(out, expected[3:4])


def test_one_token_step_with_gradients_is_correct(assert_close, token_path_calls):
    model = make(num_layers=2)
    x = torch.randn(6, 2, 6, requires_grad=True)
    expected, _ = model(x, causal=True)
    with torch.no_grad():
        _, state = model.step(x[:3], model.init_decode_state(2))
    outputs = [model(x[:3], causal=True)[0]]
    for t in range(3, 6):  # with grad enabled a step takes the general path, whose cache is out of place
        out, state = model.step(x[t : t + 1], state)
        outputs.append(out)
    assert not token_path_calls
    output = torch.cat(outputs)
    assert_close(output, expected)
    # The prefill ran without gradients; the stepped tokens' inputs get theirs through the steps.
    (grad,) = torch.autograd.grad(output[3:].square().sum(), x)
    (grad_expected,) = torch.autograd.grad(expected[3:].square().sum(), x)
    assert_close(grad[3:], grad_expected[3:], name="grad of the stepped inputs")


def test_inference_mode_run_continues_outside_it(assert_close, token_path_calls):
    model = make(num_layers=2)
    x = torch.randn(6, 2, 6)
    expected, _ = model(x, causal=True)
    with torch.inference_mode():
        _, state = model.step(x[:3], model.init_decode_state(2))
        out3, state = model.step(x[3:4], state)
    with torch.no_grad():  # inference tensors cannot be written outside inference mode: the general path copies
        out4, state = model.step(x[4:5], state)
        out5, state = model.step(x[5:6], state)
    assert len(token_path_calls) == 2
    assert_close(torch.cat([out3, out4, out5]), expected[3:])
    with torch.no_grad():
        state = model.init_decode_state(2)
    with torch.inference_mode():  # and buffers made outside it are written inside it
        outputs = []
        for t in range(6):
            out, state = model.step(x[t : t + 1], state)
            outputs.append(out)
    assert len(token_path_calls) == 8
    assert_close(torch.cat(outputs), expected)


def test_copies_of_a_state_leave_the_buffers_behind(assert_close, token_path_calls):
    model = make(num_layers=2)
    x = torch.randn(5, 2, 6)
    expected, _ = model(x, causal=True)
    with torch.no_grad():
        _, state = model.step(x[:3], model.init_decode_state(2))
        for copied in (copy.copy(state), copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
            assert copied._buffers is None
            out, after = model.step(x[3:4], copied)
            assert_close(out, expected[3:4])
            out, _ = model.step(x[4:5], after)  # the general path gave the copy buffers of its own
            assert_close(out, expected[4:5])
    assert len(token_path_calls) == 3


def test_bidirectional_decoding_is_refused_clearly():
    model = SRUpp(8, 4, 4, bidirectional=True)
    with pytest.raises(NotImplementedError, match="step-by-step decoding needs a unidirectional SRUpp"):
        model.init_decode_state(1)
    with pytest.raises(NotImplementedError, match="step-by-step decoding needs a unidirectional SRUpp"):
        model.step(torch.randn(1, 1, 8), SRUppState(torch.zeros(4, 1, 4)))


@pytest.mark.parametrize("update", ["out_proj", "gate-bias", "kv_proj"])
def test_one_token_path_sees_parameters_updated_in_place(assert_close, token_path_calls, update):
    model = make(num_layers=2)
    x = torch.randn(5, 2, 6)
    with torch.no_grad():
        _, state = model.step(x[:3], model.init_decode_state(2))
        _, state = model.step(x[3:4], state)
        layer = model.layers[1]
        {"out_proj": layer.transform.out_proj.weight, "gate-bias": layer.gates.bias,
         "kv_proj": layer.transform.kv_proj.weight}[update].mul_(-1.5)  # fmt: skip
        expected, general = model.step(x[4:5], replace(state))  # the general path reads the parameters afresh
        out, state = model.step(x[4:5], state)
        assert_close(out, expected)
        # The next token takes the one-token path on weights gathered again (the layer's copy was stale).
        expected, _ = model.step(x[:1], replace(general))
        out, _ = model.step(x[:1], state)
    assert len(token_path_calls) == 2
    assert_close(out, expected)


@pytest.mark.parametrize("how", ["data", "replaced"])
def test_a_new_decoding_run_sees_weights_changed_without_a_version_bump(assert_close, token_path_calls, how):
    model = make(num_layers=2)
    keys = model.state_dict().keys()
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        state = model.init_decode_state(2)
        for t in range(2):
            _, state = model.step(x[t : t + 1], state)
        layer = model.layers[1].transform
        if how == "data":  # e.g. an EMA update: no version counter moves
            layer.out_proj.weight.data.mul_(-1.5)
        else:
            layer.out_proj.weight = torch.nn.Parameter(layer.out_proj.weight * -1.5)
        expected, _ = model(x, causal=True)
        state, outputs = model.init_decode_state(2), []
        for t in range(4):
            out, state = model.step(x[t : t + 1], state)
            outputs.append(out)
    assert len(token_path_calls) == 2 + 4
    assert_close(torch.cat(outputs), expected)
    assert model.state_dict().keys() == keys  # the gathered copies are no parameters or buffers


def test_first_token_from_an_empty_state_takes_the_one_token_path(assert_close, token_path_calls):
    model = make(num_layers=3, attention_every_n_layers=2)
    x = torch.randn(4, 2, 6)
    expected, _ = model(x, causal=True)
    with torch.no_grad():
        state = model.init_decode_state(2)
        assert [None if k is None else k.shape[2] for k in state.keys] == [None, 0, None]
        outputs = []
        for t in range(4):
            out, state = model.step(x[t : t + 1], state)
            outputs.append(out)
    assert len(token_path_calls) == 4
    assert_close(torch.cat(outputs), expected)
    assert model.init_decode_state(2, dtype=torch.float64).keys is None  # not the parameters' dtype: no buffers


LEFT_PADDED = {"step-chunks": "step", "forward-then-step": "forward"}


@pytest.mark.parametrize("prefill", LEFT_PADDED.values(), ids=LEFT_PADDED.keys())
def test_left_padded_decoding_equals_each_sequence_alone(assert_close, token_path_calls, prefill):
    # Batched prompts padded on the left, then decoding: padding must neither move c nor be attended to later.
    model = make(**CONFIGS["every-second-layer-two-heads"])
    lengths, steps = [5, 2, 4], 5
    mask_pad = torch.arange(steps).unsqueeze(1) < steps - torch.tensor(lengths)
    prompt = torch.randn(steps, 3, 6).masked_fill(mask_pad.unsqueeze(-1), float("nan"))
    more = torch.randn(3, 3, 6)
    with torch.no_grad():
        if prefill == "step":
            first, state = model.step(prompt[:2], model.init_decode_state(3), mask_pad=mask_pad[:2])
            second, state = model.step(prompt[2:], state, mask_pad=mask_pad[2:])
            prompt_out = torch.cat([first, second])
        else:
            prompt_out, state = model(prompt, mask_pad=mask_pad, causal=True)
        assert state.key_pad.tolist() == mask_pad.t().tolist()
        continued, _ = model(more, state, causal=True)  # forward continues the padded state the same way
        outputs = [prompt_out]
        for t in range(3):
            out, state = model.step(more[t : t + 1], state)
            outputs.append(out)
    # After a step prefill every token takes the one-token path; a forward's memory first becomes a cache.
    assert len(token_path_calls) == (3 if prefill == "step" else 2)
    padded = torch.cat(outputs)
    for b, length in enumerate(lengths):
        alone, _ = model(torch.cat([prompt[steps - length :, b : b + 1], more[:, b : b + 1]]), causal=True)
        assert_close(padded[steps - length :, b : b + 1], alone, name=f"sequence {b}")
        assert_close(continued[:, b : b + 1], alone[length:], name=f"forward after the cache, sequence {b}")
    assert padded[: steps - 2, 1].abs().max() == 0
    assert torch.isfinite(padded).all()


def test_forward_hides_padded_memory_from_the_next_segment(assert_close):
    model = make(num_layers=2)
    x, nxt = torch.randn(4, 2, 6), torch.randn(3, 2, 6)
    mask_pad = torch.tensor([[True, False], [True, False], [False, False], [False, False]])
    with torch.no_grad():
        _, state = model(x, mask_pad=mask_pad, causal=True)
        out, _ = model(nxt, state, causal=True)
        alone, _ = model(torch.cat([x[2:, :1], nxt[:, :1]]), causal=True)
        unmasked, _ = model(nxt, SRUppState(state.c, state.memory), causal=True)
    assert_close(out[:, :1], alone[2:])
    assert not torch.allclose(unmasked[:, :1], alone[2:], atol=1e-4)  # without key_pad the padding leaks


def test_state_keeps_key_pad_through_tensors_and_to():
    model = make(num_layers=2)
    mask_pad = torch.tensor([[True, False], [False, False], [False, False]])
    _, state = model.step(torch.randn(3, 2, 6), model.init_decode_state(2, max_context=2), mask_pad=mask_pad)
    assert state.key_pad.tolist() == [[False, False], [False, False]]  # trimmed to max_context with the cache
    _, state = model(torch.randn(3, 2, 6), mask_pad=mask_pad, causal=True)
    restored = SRUppState.from_tensors(state.to_tensors("carry/"), prefix="carry/")
    assert torch.equal(restored.key_pad, mask_pad.t())
    moved = state.to("cpu", torch.float64)
    assert moved.key_pad.dtype == torch.bool and moved.c.dtype == torch.float64


def test_one_token_path_with_key_pad_and_a_window_equals_the_general_path(assert_close, token_path_calls):
    model = make(**CONFIGS["every-second-layer-two-heads"])
    mask_pad = torch.arange(4).unsqueeze(1) < 4 - torch.tensor([4, 1, 3])
    prompt, more = torch.randn(4, 3, 6), torch.randn(30, 3, 6)
    with torch.no_grad():
        _, fast = model.step(prompt, model.init_decode_state(3, max_context=3), mask_pad=mask_pad)
        general, outputs, expected = fast, [], []
        for t in range(30):
            out, fast = model.step(more[t : t + 1], fast)
            outputs.append(out)
            out, general = model.step(more[t : t + 1], replace(general))  # replace() drops the buffers
            expected.append(out)
    assert len(token_path_calls) == 30
    assert_close(torch.cat(outputs), torch.cat(expected))
    assert torch.equal(fast.key_pad, general.key_pad) and fast.key_pad.shape == (3, 3)


COMPILED_CONFIGS = {
    **TOKEN_PATH_CONFIGS,
    "no-attention-layer": dict(num_layers=2, attention_every_n_layers=3),
    "four-heads-wide": dict(input_size=16, hidden_size=16, proj_size=8, num_layers=2, num_heads=4),
}


ISA_CHECKS = [(name, "every-second-layer-two-heads", True) for name in ("baseline", "avx2", "avx512")]
COMPILED_CASES = [("default", name, padded) for name in COMPILED_CONFIGS for padded in (False, True)] + ISA_CHECKS


@pytest.mark.parametrize("isa, config, padded", COMPILED_CASES, ids=["-".join(map(str, c)) for c in COMPILED_CASES])
def test_compiled_one_token_step_equals_its_torch_ops(assert_close, monkeypatch, isa, config, padded):
    """The CPU kernel's one-token layer step against the torch ops it replaces (``step_token`` with no kernel),
    over 30 steps that outgrow and move the buffers, with a left-padding mask or none; on this CPU's default
    instruction-set variant, and one case on every variant it can run."""
    import srupp.nn.layer as layer_module
    from srupp.ops import decode_kernel, library

    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    if isa != "default":
        if isa not in library.cpu_kernel_info()["available"]:
            pytest.skip(f"this CPU cannot run the {isa} variant")
        monkeypatch.setenv("SRUPP_CPU_ISA", isa)
        monkeypatch.setattr(library, "_KERNEL", None)  # monkeypatch restores the default kernel after
        assert library.cpu_kernel_info()["isa"] == isa
    config = COMPILED_CONFIGS[config]
    config = dict(config)
    size = config.pop("input_size", 6)
    model = make(input_size=size, **config)
    batch, prompt_len = 3, 4
    mask_pad = None
    if padded:
        mask_pad = torch.arange(prompt_len).unsqueeze(1) < prompt_len - torch.tensor([4, 1, 3])
    x = torch.randn(prompt_len + 30, batch, size)
    if model.batch_first:
        x = x.transpose(0, 1)
        mask_pad = None if mask_pad is None else mask_pad.t()

    def decode():
        calls = []
        original = decode_kernel.TokenRun.__call__

        def counting(self, *args):
            calls.append(1)
            return original(self, *args)

        monkeypatch.setattr(decode_kernel.TokenRun, "__call__", counting)
        with torch.no_grad():
            prompt = x[:, :prompt_len] if model.batch_first else x[:prompt_len]
            out, state = model.step(prompt, model.init_decode_state(batch), mask_pad=mask_pad)
            outputs = [out]
            for t in range(prompt_len, prompt_len + 30):
                out, state = model.step(x[:, t : t + 1] if model.batch_first else x[t : t + 1], state)
                outputs.append(out)
        return torch.cat(outputs, 1 if model.batch_first else 0), state, len(calls)

    compiled, compiled_state, calls = decode()
    assert calls == 30  # one call per token for the whole stack
    monkeypatch.setattr(layer_module, "token_kernel", lambda **kwargs: None)
    reference, reference_state, calls = decode()
    assert calls == 0
    assert_close(compiled, reference, name="output")
    assert_close(compiled_state.c, reference_state.c, name="c")
    for name in ("keys", "values"):
        for actual, expected in zip(getattr(compiled_state, name), getattr(reference_state, name), strict=True):
            assert (actual is None) == (expected is None)
            if actual is not None:
                assert_close(actual, expected, name=name)


def test_states_of_the_compiled_path_read_copy_and_change_like_any_state(assert_close, monkeypatch):
    """The compiled path's states make their keys, values and key_pad when first read: what they read equals the
    general path's, reading keeps the run on the compiled path, an older state's views keep their values while the
    run goes on, copies and pickles are plain states, and a state whose fields were replaced takes the general
    path."""
    from srupp.ops import decode_kernel, library

    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    calls = []
    original = decode_kernel.TokenRun.__call__
    monkeypatch.setattr(decode_kernel.TokenRun, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    model = make(**TOKEN_PATH_CONFIGS["every-second-layer-two-heads"])
    mask_pad = torch.tensor([[True, False], [False, False], [False, False]])
    x = torch.randn(9, 2, 6)

    def general(prefix_len, upto):  # the general path from a prefill of prefix_len, stepped to upto
        _, state = model.step(x[:prefix_len], model.init_decode_state(2, max_context=4), mask_pad=mask_pad)
        for t in range(prefix_len, upto):
            out, state = model.step(x[t : t + 1], replace(state))  # replace() drops the buffers
        return out, state

    with torch.no_grad():
        _, state = model.step(x[:3], model.init_decode_state(2, max_context=4), mask_pad=mask_pad)
        _, s4 = model.step(x[3:4], state)
        _, s5 = model.step(x[4:5], s4)
        assert len(calls) == 2 and type(s5) is not SRUppState and isinstance(s5, SRUppState)
        s4_keys = [None if k is None else k.clone() for k in s4.keys]  # read while s5 exists: made now
        out6, s6 = model.step(x[5:6], s5)
        assert len(calls) == 3
        _, s5_key_pad = s5.values, s5.key_pad  # read, not changed: s6 is newest, s5 general
        out7, s7 = model.step(x[6:7], s6)
        assert len(calls) == 4  # reading s6's fields after the step did not change them
        _ = s7.keys
        out8, s8 = model.step(x[7:8], s7)  # read before stepping: still the compiled path
        assert len(calls) == 5
        ref8, ref_state = general(3, 8)
        assert_close(out8, ref8)
        for name in ("keys", "values"):
            for got, want in zip(getattr(s8, name), getattr(ref_state, name), strict=True):
                assert (got is None) == (want is None)
                if got is not None:
                    assert_close(got, want, name=name)
        assert torch.equal(s8.key_pad, ref_state.key_pad) and torch.equal(s5_key_pad, general(3, 5)[1].key_pad)
        for before, now in zip(s4_keys, s4.keys, strict=True):
            assert (before is None and now is None) or torch.equal(before, now)
        for copied in (copy.copy(s8), copy.deepcopy(s8), pickle.loads(pickle.dumps(s8))):
            assert type(copied) is SRUppState and copied._buffers is None
            assert torch.equal(copied.c, s8.c) and torch.equal(copied.key_pad, s8.key_pad)
            assert all(a is b is None or torch.equal(a, b) for a, b in zip(copied.keys, s8.keys, strict=True))
        s8.keys = list(s8.keys)  # replaced (the same views in a new list): no longer trusted to append in place
        out9, _ = model.step(x[8:9], s8)
        assert len(calls) == 5
        assert_close(out9, general(3, 9)[0])
        assert_close(model.step(x[8:9], replace(s8))[0], out9)


def test_compiled_one_token_step_is_not_used_for_the_naive_backend_or_float64():
    for model in (make(num_layers=2, backend="naive"), make(num_layers=2).double()):
        weights = model.layers[0].token_weights()
        assert weights.kernel is None


CAUSALITY = {
    "unidirectional-default": (dict(), {}, True),
    "unidirectional-explicit-non-causal": (dict(), {"causal": False}, False),
    "bidirectional-default": (dict(bidirectional=True), {}, False),
    "batch-first-two-heads": (dict(batch_first=True, num_heads=2, num_layers=3), {}, True),
}


@pytest.mark.parametrize(("config", "call", "causal"), CAUSALITY.values(), ids=CAUSALITY.keys())
def test_default_causality_with_trained_attention(config, call, causal):
    # alpha = 0.7 (make): attention reaches the output, so a look at later positions would show.
    model = make(**config)
    x = torch.randn(12, 2, 6)
    changed = x.clone()
    changed[8:] = torch.randn(4, 2, 6)
    flip = (lambda t: t.transpose(0, 1)) if model.batch_first else (lambda t: t)
    with torch.no_grad():
        before, _ = model(flip(x), **call)
        after, _ = model(flip(changed), **call)
    past_moved = (flip(after)[:8] - flip(before)[:8]).abs().max().item()
    if causal:
        assert past_moved == 0.0
    else:
        assert past_moved > 1e-3
    layer = model.layers[0]
    with torch.no_grad():
        u_before = layer.transform(layer._norm(x), **({} if causal else {"causal": False}))
        u_after = layer.transform(layer._norm(changed), **({} if causal else {"causal": False}))
    assert ((u_after[:8] - u_before[:8]).abs().max().item() == 0.0) == causal
