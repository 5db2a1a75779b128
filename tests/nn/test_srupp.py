import math

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

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
            sru_recurrence_naive(
                u[..., 15 * d : 15 * (d + 1)],
                u[..., 30 + 5 * d : 35 + 5 * d],
                layer.gates.weight[d],
                layer.gates.bias[d],
                c0[d],
                reverse=d == 1,
            )
            for d in range(2)
        ]
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


class DtypeConversions(TorchDispatchMode):
    """Records every dtype conversion (``aten::_to_copy``, and ``aten::copy_`` between dtypes) an op makes."""

    def __init__(self) -> None:
        super().__init__()
        self.converted: list[tuple[tuple[int, ...], torch.dtype, torch.dtype]] = []  # (shape, from, to)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_"):
            source, target = (args[0], out) if name == "_to_copy" else (args[1], args[0])
            if source.dtype != target.dtype:
                self.converted.append((tuple(source.shape), source.dtype, target.dtype))
        return out


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32], ids=["bf16-input", "fp32-input"])
def test_bfloat16_autocast_step_converts_no_activation(input_dtype):
    """A training step (forward and backward) of a 2-layer SRUpp under bf16 autocast converts the weights (each
    to bf16 on the way in, its gradient back to float32) and nothing else: no activation between dtypes around
    the recurrence, the attention or the skip, whose kernels read and write bf16 themselves. Bytes counted on
    the 16-bit side: 2 + 2 per parameter, the weights' float32 size. A float32 input is converted once, at the
    stack's entry (and its gradient once back)."""
    model = make(input_size=64, hidden_size=64, proj_size=16, num_layers=2, num_heads=2).train()
    x = torch.randn(32, 4, 64).to(input_dtype).requires_grad_()
    upstream = torch.randn(32, 4, 64).bfloat16()
    with DtypeConversions() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, state = model(x, causal=True)
        output.backward(upstream)
    assert output.dtype == torch.bfloat16 and x.grad.dtype == input_dtype
    # each layer's final state c [B, hidden] (float32 in the kernel) comes back in the input's dtype too
    small = {tuple(p.shape) for p in model.parameters()} | {(4, 64)}
    activations = [entry for entry in mode.converted if entry[0] not in small]
    entry = [((32, 4, 64), torch.float32, torch.bfloat16), ((32, 4, 64), torch.bfloat16, torch.float32)]  # grad
    assert activations == ([] if input_dtype == torch.bfloat16 else entry)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    converted = sum(math.prod(shape) * 2 for shape, *_ in mode.converted if shape in small)
    assert 0 < converted <= weight_bytes


def test_bfloat16_layer_norm_computes_in_float32():
    """Under bf16 autocast the attention's LayerNorm reads and writes bf16 (no conversion around it) but computes
    in float32 (torch's CPU kernel accumulates in float32): its output is the float32 LayerNorm of the same values,
    rounded once. The values sit far from zero, where a bf16 mean and variance would be badly off."""
    norm = make(input_size=64, hidden_size=64, proj_size=16, num_layers=1).layers[0].transform.norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        query = (torch.randn(32, 4, 16) * 3 + 200).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = norm(query)
        want = torch.nn.functional.layer_norm(query.float(), (16,), norm.weight, norm.bias, norm.eps)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=2**-8)


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
    "mask-shape": (
        lambda m: m(torch.randn(4, 2, 6), mask_pad=torch.zeros(2, 4, dtype=torch.bool)),
        ValueError,
        r"\[T, B\] = \[4, 2\]",
    ),
    "mask-dtype": (lambda m: m(torch.randn(4, 2, 6), mask_pad=torch.zeros(4, 2)), TypeError, "bool"),
    "memory-length": (lambda m: m(torch.randn(4, 2, 6), memory=[None]), ValueError, "one entry per layer"),
    "memory-batch": (
        lambda m: m(torch.randn(4, 2, 6), memory=[torch.randn(3, 5, 6), None]),
        ValueError,
        "batch size B = 2",
    ),
    "memory-width": (
        lambda m: m(torch.randn(4, 2, 6), memory=[None, torch.randn(3, 2, 6)]),
        ValueError,
        r"\[M, B, 8\]",
    ),
    "memory-type": (lambda m: m(torch.randn(4, 2, 6), memory=torch.randn(3, 2, 6)), TypeError, "list"),
    "window-type": (lambda m: m(torch.randn(4, 2, 6), attn_window=2.0), TypeError, "attn_window"),
    "decode-batch": (lambda m: m.step(torch.randn(1, 3, 6), m.init_decode_state(2)), ValueError, "state.c"),
    "decode-type": (lambda m: m.step(torch.randn(1, 2, 6), torch.zeros(2, 2, 8)), TypeError, "SRUppState"),
    "memory-twice": (
        lambda m: m(torch.randn(4, 2, 6), m(torch.randn(3, 2, 6))[1], memory=[None, None]),
        ValueError,
        "memory once",
    ),
    "cache-shape": (
        lambda m: m(
            torch.randn(4, 2, 6),
            SRUppState(
                torch.zeros(2, 2, 8), keys=[torch.zeros(2, 1, 3, 3), None], values=[torch.zeros(2, 1, 3, 3), None]
            ),
        ),
        ValueError,
        r"\[2, 1, S, 4\]",
    ),
    "memory-and-cache": (
        lambda m: m.step(
            torch.randn(1, 2, 6),
            SRUppState(
                torch.zeros(2, 2, 8),
                memory=[torch.zeros(3, 2, 6), None],
                keys=[torch.zeros(2, 1, 3, 4), None],
                values=[torch.zeros(2, 1, 3, 4), None],
            ),
        ),
        ValueError,
        "keep one",
    ),
    "key-pad-length": (
        lambda m: m(
            torch.randn(4, 2, 6),
            SRUppState(torch.zeros(2, 2, 8), memory=MEMORY, key_pad=torch.zeros(2, 4, dtype=torch.bool)),
        ),
        ValueError,
        r"\[B, S\] = \[2, \[3\]\]",
    ),
    "key-pad-dtype": (
        lambda m: m.step(
            torch.randn(1, 2, 6), SRUppState(torch.zeros(2, 2, 8), memory=MEMORY, key_pad=torch.zeros(2, 3))
        ),
        TypeError,
        "bool",
    ),
    "key-pad-alone": (
        lambda m: m.step(
            torch.randn(1, 2, 6), SRUppState(torch.zeros(2, 2, 8), key_pad=torch.zeros(2, 3, dtype=torch.bool))
        ),
        ValueError,
        "no memory or cache",
    ),
    "decode-mask-shape": (
        lambda m: m.step(torch.randn(3, 2, 6), m.init_decode_state(2), mask_pad=torch.zeros(2, 3, dtype=torch.bool)),
        ValueError,
        r"\[T, B\] = \[3, 2\]",
    ),
}


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
    "memory-layer-norm-every-second": dict(
        causal=True, memory=True, layer_norm=True, num_layers=3, attention_every_n_layers=2
    ),
}


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


LEFT_PADDED = {"step-chunks": "step", "forward-then-step": "forward"}


@pytest.mark.parametrize("prefill", LEFT_PADDED.values(), ids=LEFT_PADDED.keys())
def test_left_padded_decoding_equals_each_sequence_alone(assert_close, prefill):
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
    padded = torch.cat(outputs)
    for b, length in enumerate(lengths):
        alone, _ = model(torch.cat([prompt[steps - length :, b : b + 1], more[:, b : b + 1]]), causal=True)
        assert_close(padded[steps - length :, b : b + 1], alone, name=f"sequence {b}")
        assert_close(continued[:, b : b + 1], alone[length:], name=f"forward after the cache, sequence {b}")
    assert padded[: steps - 2, 1].abs().max() == 0
    assert torch.isfinite(padded).all()


@pytest.mark.parametrize("max_context", [None, 5], ids=["all", "window-5"])
def test_step_runs_long_inputs_in_pieces_equal_to_one(assert_close, monkeypatch, max_context):
    """``step`` feeds an input longer than ``PREFILL_CHUNK`` in pieces (so that memory grows linearly with it):
    the result equals the causal forward, with left padding across the pieces' borders; ``step_layers`` joins
    every layer's pieces (against the forward's layers, by hooks) and returns ``step``'s state."""
    import srupp.nn.srupp as srupp_module

    monkeypatch.setattr(srupp_module, "PREFILL_CHUNK", 4)
    model = make(**CONFIGS["every-second-layer-two-heads"])
    x = torch.randn(15, 2, 6)
    mask_pad = torch.arange(15).unsqueeze(1) < torch.tensor([6, 0])
    hooked = []
    hooks = [layer.register_forward_hook(lambda m, args, out: hooked.append(out[0])) for layer in model.layers]
    with torch.no_grad():
        expected, _ = model(x, mask_pad=mask_pad, causal=True, attn_window=max_context)
        for hook in hooks:
            hook.remove()
        out, state = model.step(x, model.init_decode_state(2, max_context), mask_pad=mask_pad)
        layers, layers_state = model.step_layers(x, model.init_decode_state(2, max_context), mask_pad=mask_pad)
    assert_close(out[6:, :1], expected[6:, :1])
    assert_close(out[:, 1:], expected[:, 1:])
    assert state.keys[1].shape[2] == (15 if max_context is None else max_context)
    assert len(layers) == len(hooked) == 3 and torch.equal(layers[-1], out)
    for i, (got, want) in enumerate(zip(layers, hooked, strict=True)):
        assert_close([got[6:, :1], got[:, 1:]], [want[6:, :1], want[:, 1:]], name=f"layer {i}")
    assert torch.equal(layers_state.c, state.c) and torch.equal(layers_state.keys[1], state.keys[1])


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



def test_state_tensors_are_every_field_it_holds():
    """``tensors()`` lists each tensor field, so a check over it (inference tensors) misses none."""
    model = make(num_layers=2)
    mask_pad = torch.tensor([[True, False], [False, False], [False, False]])
    _, state = model.step(torch.randn(3, 2, 6), model.init_decode_state(2), mask_pad=mask_pad)
    expected = [state.c, state.key_pad, *[t for t in (*state.keys, *state.values) if t is not None]]
    assert sorted(map(id, state.tensors())) == sorted(map(id, expected))
    _, state = model(torch.randn(3, 2, 6), causal=True)
    assert sorted(map(id, state.tensors())) == sorted(map(id, [state.c, *[m for m in state.memory if m is not None]]))


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
