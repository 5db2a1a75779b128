"""Decoding sessions (``SRUpp.decoder``): the compiled kernel and the torch ops of ``token_step`` against each
other, and both against the full causal forward and the functional ``SRUpp.step``."""

import copy
import pickle
from dataclasses import replace

import pytest
import torch

from srupp.nn import SRUpp, SRUppState
from srupp.nn.decode import SRUppDecoder
from srupp.ops import library
from tests.nn.test_srupp import make

CONFIGS = {
    "two-layers": dict(num_layers=2),
    "every-second-layer-two-heads": dict(num_layers=3, attention_every_n_layers=2, num_heads=2),
    "layer-norm-projected-skip-odd": dict(num_layers=2, layer_norm=True, hidden_size=9),
    "batch-first": dict(num_layers=2, batch_first=True),
    "no-attention-layer": dict(num_layers=2, attention_every_n_layers=3),
    "four-heads-wide": dict(input_size=16, hidden_size=16, proj_size=8, num_layers=2, num_heads=4),
}
PATHS = ["kernel", "torch-ops"]


@pytest.fixture
def token_calls(monkeypatch):
    """Counts the steps that took the session's one-token path."""
    calls = []
    original = SRUppDecoder._step_token
    monkeypatch.setattr(SRUppDecoder, "_step_token", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    return calls


def session(model, batch, max_context=None, path="kernel", state=None):
    decoder = model.decoder(batch, max_context, state)
    if path == "kernel" and decoder.kernel is None:
        pytest.skip(library.unavailable_reason() if not library.is_available() else "no kernel for this model")
    if path == "torch-ops":
        decoder.kernel = None
    return decoder


def layout(model, tensor):
    """Time-major <-> the model's layout."""
    return tensor.transpose(0, 1) if model.batch_first else tensor


def assert_states_close(assert_close, actual: SRUppState, expected: SRUppState):
    assert_close(actual.c, expected.c, name="c")
    assert actual.max_context == expected.max_context
    for name in ("keys", "values"):
        for i, (got, want) in enumerate(zip(getattr(actual, name), getattr(expected, name), strict=True)):
            assert (got is None) == (want is None)
            if got is not None:
                assert_close(got, want, name=f"{name}[{i}]")
    assert (actual.key_pad is None) == (expected.key_pad is None)
    if actual.key_pad is not None:
        assert torch.equal(actual.key_pad, expected.key_pad)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("max_context", [None, 0, 3], ids=["all", "window-0", "window-3"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_session_equals_causal_forward_and_step(assert_close, token_calls, config, max_context, path):
    # 40 tokens after a prefill of 4: the buffers (16 positions at first) fill and grow or move several times.
    model = make(**config)
    size = config.get("input_size", 6)
    steps, batch = 44, 3
    x = torch.randn(steps, batch, size)
    with torch.no_grad():
        expected, _ = model(layout(model, x), causal=True, attn_window=max_context)
        _, expected_state = model.step(layout(model, x), model.init_decode_state(batch, max_context))
        decoder = session(model, batch, max_context, path)
        outputs = [decoder.step(layout(model, x[:4]))]
        outputs += [decoder.step(layout(model, x[t : t + 1])) for t in range(4, steps)]
    assert len(token_calls) == steps - 4
    assert_close(layout(model, torch.cat(outputs, 1 if model.batch_first else 0)), layout(model, expected))
    assert_states_close(assert_close, decoder.state, expected_state)
    if max_context is not None:
        assert decoder.capacity == max(16, 2 * (max_context + 1))  # the buffers never grew: only moved back


COMPILED_CASES = [("default", name, padded) for name in CONFIGS for padded in (False, True)]
COMPILED_CASES += [(isa, "every-second-layer-two-heads", True) for isa in ("baseline", "avx2", "avx512")]


@pytest.mark.parametrize("isa, config, padded", COMPILED_CASES, ids=["-".join(map(str, c)) for c in COMPILED_CASES])
def test_compiled_kernel_equals_token_ops(assert_close, monkeypatch, isa, config, padded):
    """The compiled one-token step of the whole stack against ``token_step`` per layer, over 30 tokens that
    outgrow the buffers and slide a window of 7, after a prefill with a left-padding mask or none; on this CPU's
    default instruction-set variant, and one case on every variant it can run."""
    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    if isa != "default":
        if isa not in library.cpu_kernel_info()["available"]:
            pytest.skip(f"this CPU cannot run the {isa} variant")
        monkeypatch.setenv("SRUPP_CPU_ISA", isa)
        monkeypatch.setattr(library, "_KERNEL", None)  # monkeypatch restores the default kernel after
    config = dict(CONFIGS[config])
    size = config.pop("input_size", 6)
    model = make(input_size=size, **config)
    batch, prompt_len = 3, 4
    mask_pad = torch.arange(prompt_len).unsqueeze(1) < prompt_len - torch.tensor([4, 1, 3]) if padded else None
    x = torch.randn(prompt_len + 30, batch, size)
    results = {}
    for path in PATHS:
        with torch.no_grad():
            decoder = session(model, batch, 7, path)
            mask = None if mask_pad is None else layout(model, mask_pad)
            outputs = [decoder.step(layout(model, x[:prompt_len]), mask)]
            outputs += [decoder.step(layout(model, x[t : t + 1])) for t in range(prompt_len, prompt_len + 30)]
        results[path] = (torch.cat(outputs, 1 if model.batch_first else 0), decoder.state)
    assert_close(results["kernel"][0], results["torch-ops"][0], name="output")
    assert_states_close(assert_close, results["kernel"][1], results["torch-ops"][1])


@pytest.mark.parametrize("path", PATHS)
def test_left_padded_prefill_chunks_equal_each_sequence_alone(assert_close, token_calls, path):
    # Batched prompts padded on the left, fed in two chunks, then tokens: padding neither moves c nor is attended.
    model = make(**CONFIGS["every-second-layer-two-heads"])
    lengths, steps = [5, 2, 4], 5
    mask_pad = torch.arange(steps).unsqueeze(1) < steps - torch.tensor(lengths)
    prompt = torch.randn(steps, 3, 6).masked_fill(mask_pad.unsqueeze(-1), float("nan"))
    more = torch.randn(20, 3, 6)
    with torch.no_grad():
        decoder = session(model, 3, None, path)
        outputs = [decoder.step(prompt[:2], mask_pad[:2]), decoder.step(prompt[2:], mask_pad[2:])]
        assert decoder.state.key_pad.tolist() == mask_pad.t().tolist()
        outputs += [decoder.step(more[t : t + 1]) for t in range(20)]
    assert len(token_calls) == 20
    padded = torch.cat(outputs)
    for b, length in enumerate(lengths):
        alone, _ = model(torch.cat([prompt[steps - length :, b : b + 1], more[:, b : b + 1]]), causal=True)
        assert_close(padded[steps - length :, b : b + 1], alone, name=f"sequence {b}")
    assert padded[: steps - 2, 1].abs().max() == 0 and torch.isfinite(padded).all()


def test_session_continues_a_state_and_its_state_is_a_plain_copy(assert_close):
    """A session continues a forward's state (memory) or a step's; its ``state`` is a plain ``SRUppState`` whose
    tensors later steps do not change, and which copies, pickles and ``replace`` as any dataclass."""
    model = make(**CONFIGS["every-second-layer-two-heads"])
    x = torch.randn(12, 2, 6)
    with torch.no_grad():
        expected, _ = model(x, causal=True)
        _, memory_state = model(x[:5], causal=True)
        decoder = model.decoder(2, state=memory_state)
        outputs = [decoder.step(x[t : t + 1]) for t in range(5, 9)]
        snapshot = decoder.state
        kept = copy.deepcopy(snapshot)
        outputs += [decoder.step(x[t : t + 1]) for t in range(9, 12)]
        assert_states_close(assert_close, snapshot, kept)  # unchanged by the steps after it
        for twin in (copy.copy(snapshot), pickle.loads(pickle.dumps(snapshot)), replace(snapshot)):
            assert type(twin) is SRUppState
            assert_states_close(assert_close, twin, snapshot)
        again = model.decoder(2, state=snapshot)
        resumed = [again.step(x[t : t + 1]) for t in range(9, 12)]
        decoder.load(snapshot)
        reloaded = [decoder.step(x[t : t + 1]) for t in range(9, 12)]
    assert_close(torch.cat(outputs), expected[5:])
    assert_close(torch.cat(resumed), expected[9:], name="a new session from the state")
    assert_close(torch.cat(reloaded), expected[9:], name="load")


def test_gradients_training_and_autocast_take_the_general_path(assert_close, token_calls):
    model = make(num_layers=2)
    x = torch.randn(6, 2, 6)
    with torch.no_grad():
        expected, _ = model(x, causal=True)
    decoder = model.decoder(2)
    decoder.step(x[:3])
    out = decoder.step(x[3:4])  # gradients on: SRUpp.step, differentiable
    assert out.grad_fn is not None and not token_calls
    out.sum().backward()
    assert all(p.grad is not None for p in model.layers[0].transform.in_proj.parameters())
    model.train()
    with torch.no_grad():
        train_out = decoder.step(x[4:5])
        model.eval()
        eval_out = decoder.step(x[5:6])
    assert len(token_calls) == 1
    assert_close(torch.cat([out.detach(), train_out, eval_out]), expected[3:])  # dropout 0: train equals eval


def test_inference_mode_session_continues_outside_it(assert_close, token_calls):
    model = make(num_layers=2)
    x = torch.randn(40, 2, 6)
    with torch.no_grad():
        expected, _ = model(x, causal=True)
    with torch.inference_mode():
        decoder = model.decoder(2)
        outputs = [decoder.step(x[:3]), decoder.step(x[3:4])]
    with torch.no_grad():  # buffers made in inference mode cannot be written outside it: the session moves them
        outputs += [decoder.step(x[t : t + 1]) for t in range(4, 40)]
    assert len(token_calls) == 36
    assert_close(torch.cat(outputs), expected)


def test_naive_backend_and_float64_use_the_torch_ops():
    for model in (make(num_layers=2, backend="naive"), make(num_layers=2).double()):
        assert model.decoder(1).kernel is None


def test_bidirectional_decoding_is_refused_clearly():
    model = SRUpp(8, 4, 4, bidirectional=True)
    with pytest.raises(NotImplementedError, match="step-by-step decoding needs a unidirectional SRUpp"):
        model.init_decode_state(1)
    with pytest.raises(NotImplementedError, match="step-by-step decoding needs a unidirectional SRUpp"):
        model.step(torch.randn(1, 1, 8), SRUppState(torch.zeros(4, 1, 4)))
    with pytest.raises(NotImplementedError, match="step-by-step decoding needs a unidirectional SRUpp"):
        model.decoder(1)


def to_float32(state: SRUppState) -> SRUppState:
    def cast(items):
        return [None if item is None else item.float() for item in items]

    return replace(state, c=state.c.float(), keys=cast(state.keys), values=cast(state.values))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_session_runs_the_kernel_on_float32_copies(assert_close, dtype):
    """A bfloat16 (float16) model's compiled session (float32 copies of its weights, float32 caches) over 20
    tokens after a left-padded prefill, with a window of 7: against (a) the same session through the torch ops in
    its dtype (bfloat16 tolerance), (b) a float32 copy of the model's compiled session continued from the same prefill
    state (the same float32 arithmetic on the same rounded weights: its caches agree to float32 rounding, its
    outputs to one rounding to its dtype); its ``state`` has its dtype and ``SRUpp.step`` continues it."""
    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    model = make(num_layers=3, attention_every_n_layers=2, num_heads=2).to(dtype)
    batch, prompt_len, steps = 3, 4, 20
    mask_pad = torch.arange(prompt_len).unsqueeze(1) < prompt_len - torch.tensor([4, 1, 3])
    x = torch.randn(prompt_len + steps, batch, 6).to(dtype)
    with torch.no_grad():
        compiled, ops = model.decoder(batch, 7), model.decoder(batch, 7)
        assert compiled.kernel is not None and compiled.cache_dtype == torch.float32
        for each in (compiled, ops):
            each.step(x[:prompt_len], mask_pad)
        ops.kernel = None  # converts its float32 caches to dtype (exactly: they hold the prefill in dtype)
        assert ops.cache_dtype == dtype and ops.c.dtype == dtype
        with pytest.raises(ValueError, match="float32 caches"):
            ops.kernel = compiled.kernel
        reference = copy.deepcopy(model).float().decoder(batch, state=to_float32(compiled.state))
        outputs = {"compiled": [], "ops": [], "float32": []}
        for t in range(prompt_len, prompt_len + steps):
            before = compiled.state  # in dtype: what SRUpp.step takes
            for name, session in (("compiled", compiled), ("ops", ops), ("float32", reference)):
                outputs[name].append(session.step(x[t : t + 1].float() if name == "float32" else x[t : t + 1]))
        last, _ = model.step(x[-1:], before)
    got, ops_out, want = (torch.cat(outputs[name]).float() for name in ("compiled", "ops", "float32"))
    assert outputs["compiled"][0].dtype == dtype and compiled.state.c.dtype == dtype
    assert_close(got, ops_out, atol=1e-2, rtol=1e-2, name="compiled vs torch ops")
    assert_close(got, want, atol=1e-6, rtol=2**-7, name="compiled vs float32 copy")
    assert_close(compiled.c, reference.c, atol=1e-5, rtol=1e-5, name="c")
    for mine, theirs in zip(compiled._views()[0], reference._views()[0], strict=True):
        assert (mine is None) == (theirs is None) and (mine is None or torch.allclose(mine, theirs, atol=1e-5))
    assert_close(compiled.state.c.float(), ops.state.c.float(), atol=3e-2, rtol=3e-2, name="state c")
    assert_close(last.float(), got[-1:], atol=3e-2, rtol=3e-2, name="SRUpp.step from the state")


def test_a_kernel_set_again_runs_on_the_buffers_of_now(assert_close):
    """A session's kernel turned off, then on again after the torch ops grew (reallocated) the buffers: it must
    read and write the new buffers, and the session go on as one that never had a kernel."""
    model = make(num_layers=2)
    with torch.no_grad():
        decoder, reference = session(model, 2), session(model, 2, path="torch-ops")
        kernel = decoder.kernel
        x = torch.randn(40, 2, 6)
        outputs = {"session": [], "reference": []}
        for t in range(40):
            if t == 2:
                decoder.kernel = None
            if t == 30:
                decoder.kernel = kernel
                assert kernel._held[0] is decoder.buffers
            outputs["session"].append(decoder.step(x[t : t + 1]))
            outputs["reference"].append(reference.step(x[t : t + 1]))
    assert_close(torch.cat(outputs["session"]), torch.cat(outputs["reference"]), name="h")


SELECT_SCHEDULES = {
    # per token after the prefill: None (no select) or the streams to keep (of the batch of that moment)
    "beams-with-repeats": [None, [2, 2, 0], [1, 0, 2], None, [0, 0, 0]] * 8,
    "shrink-and-grow": [None, [2, 0], None, [1, 1, 0, 0], [3, 0, 2]] * 8,
}


def hand_picked(state: SRUppState, rows: list[int]) -> SRUppState:
    """``state`` with its streams indexed by hand (the reference of ``select``)."""
    return SRUppState(
        state.c[:, rows],
        keys=[None if k is None else k[rows] for k in state.keys],
        values=[None if v is None else v[rows] for v in state.values],
        max_context=state.max_context,
        key_pad=None if state.key_pad is None else state.key_pad[rows],
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("max_context", [None, 5], ids=["all", "window-5"])
@pytest.mark.parametrize("schedule", SELECT_SCHEDULES.keys())
def test_select_continues_the_chosen_streams(assert_close, token_calls, path, max_context, schedule):
    """``select`` between the tokens of a left-padded batch (its buffers outgrow their 16 positions, or slide a
    window): every output equals the causal forward over the history of the stream it continues, and the final
    state equals the functional ``SRUpp.step`` over those histories."""
    model = make(**CONFIGS["every-second-layer-two-heads"])
    mask_pad = torch.arange(4).unsqueeze(1) < 4 - torch.tensor([4, 1, 3])
    history = torch.randn(4, 3, 6).masked_fill(mask_pad.unsqueeze(-1), float("nan"))
    with torch.no_grad():
        decoder = session(model, 3, max_context, path)
        decoder.step(history, mask_pad)
        for t, rows in enumerate(SELECT_SCHEDULES[schedule]):
            if rows is not None:
                decoder.select(torch.tensor(rows))
                history, mask_pad = history[:, rows], mask_pad[:, rows]
                assert decoder.kernel is None or decoder.kernel._held[0] is decoder.buffers
                assert (decoder.kernel is None) == (path == "torch-ops")  # the user's choice survives a new size
            token = torch.randn(1, len(history[0]), 6)
            history = torch.cat([history, token])
            mask_pad = torch.cat([mask_pad, torch.zeros(1, mask_pad.shape[1], dtype=torch.bool)])
            expected, _ = model(history, mask_pad=mask_pad, causal=True, attn_window=max_context)
            assert_close(decoder.step(token), expected[-1:], name=f"token {t}")
        _, expected_state = model.step(
            history, model.init_decode_state(history.shape[1], max_context), mask_pad=mask_pad
        )
    assert len(token_calls) == len(SELECT_SCHEDULES[schedule])
    assert_states_close(assert_close, decoder.state, expected_state)


def test_torch_ops_chosen_by_the_user_stay_after_loading_another_batch_size(assert_close):
    """``kernel = None`` holds for a loaded state of another batch size too."""
    model = make(num_layers=2)
    x = torch.randn(3, 2, 6)
    with torch.no_grad():
        decoder = session(model, 3, path="torch-ops")
        decoder.load(model.init_decode_state(2))
        out = decoder.step(x[:1])
        assert decoder.kernel is None
        assert_close(torch.cat([out, decoder.step(x[1:2])]), model(x[:2], causal=True)[0])


def test_select_gathers_into_two_alternating_buffer_sets_and_equals_indexing(assert_close):
    """A select of as many streams as the session has allocates nothing after the first (it swaps between two
    sets of buffers); ``state.select`` and the session's select both equal indexing the state by hand, also on
    a loaded (pending) state and on a session made in inference mode, selected outside it."""
    model = make(**CONFIGS["every-second-layer-two-heads"])
    x = torch.randn(9, 3, 6)
    rows = [1, 1, 0]
    with torch.no_grad():
        decoder = session(model, 3)
        decoder.step(x[:4])
        decoder.step(x[4:5])
        first = [b.data_ptr() if b is not None else None for b in decoder.buffers]
        before = decoder.state
        decoder.select(torch.tensor(rows))
        assert_states_close(assert_close, decoder.state, hand_picked(before, rows))
        assert_states_close(assert_close, before.select(torch.tensor(rows, dtype=torch.int32)), decoder.state)
        decoder.select(torch.tensor([0, 1, 2]))
        assert [b.data_ptr() if b is not None else None for b in decoder.buffers] == first
        decoder.load(before)
        decoder.select(torch.tensor(rows))  # on the pending state
        assert_states_close(assert_close, decoder.state, hand_picked(before, rows))
        with torch.inference_mode():
            made_inside = session(model, 3)
            made_inside.step(x[:5])
    made_inside.select(torch.tensor(rows))  # buffers of inference mode: new ones
    with torch.no_grad():
        out = made_inside.step(x[5:6, rows])
        expected = model(x[:6, rows], causal=True)[0][-1:]
    assert_close(out, expected, name="after an inference-mode session's select")


INFERENCE_USES = {
    "select-same-size": lambda decoder, x: decoder.select(torch.tensor([2, 0, 1])),
    "select-other-size": lambda decoder, x: decoder.select(torch.tensor([2, 0])),
    "token": lambda decoder, x: decoder.step(x[3:4]),
    "chunk": lambda decoder, x: decoder.step(x[3:5]),
}


@pytest.mark.parametrize("use", INFERENCE_USES.keys())
def test_a_step_with_gradients_follows_a_use_in_inference_mode(assert_close, use):
    """A session made outside inference mode and selected or stepped inside it (its ``c``, even its buffers, are
    then inference tensors) takes a step with gradients after: its output and every parameter's gradient equal
    ``SRUpp.step``'s from the session's state."""
    model = make(num_layers=2)
    x = torch.randn(6, 3, 6)
    with torch.no_grad():
        decoder = model.decoder(3)
        decoder.step(x[:3])
    with torch.inference_mode():
        INFERENCE_USES[use](decoder, x)
    token = x[5:6, : decoder.batch_size]
    expected, _ = model.step(token, decoder.state)
    out = decoder.step(token)
    params = list(model.parameters())
    assert_close(out, expected)
    got, want = (torch.autograd.grad(y.square().sum(), params) for y in (out, expected))
    assert_close(list(got), list(want), name="gradients")


@pytest.mark.parametrize(
    "indices, error, message",
    [
        ([0, 3], ValueError, r"`indices` must lie in \[0, 3\) \(the streams\), got values in \[0, 3\]"),
        ([-1], ValueError, r"must lie in \[0, 3\)"),
        ([[0, 1]], ValueError, r"`indices` must have shape \[N\] \(1 dim\), got \[1, 2\]"),
        ([0.0, 1.0], TypeError, "`indices` must be an integer tensor of stream numbers, got torch.float32"),
    ],
    ids=["too-high", "negative", "two-dims", "floats"],
)
def test_select_refuses_bad_indices_clearly(indices, error, message):
    decoder = make(num_layers=2).decoder(3)
    with pytest.raises(error, match=message):
        decoder.select(torch.tensor(indices))


LAYERS_CASES = [(path, dtype) for dtype in ("float32", "bfloat16") for path in PATHS]


@pytest.mark.parametrize("path, dtype", LAYERS_CASES, ids=["-".join(case) for case in LAYERS_CASES])
def test_step_layers_are_every_layers_output(assert_close, token_calls, path, dtype):
    """``step_layers`` over a left-padded chunk and single tokens against the layers' outputs in the full causal
    forward (forward hooks; in bfloat16 to its tolerance, the session computing in float32 where its kernel would);
    every token takes the one-token path, its last layer is ``step``'s output and its state ``step``'s (float32
    caches are not rounded to bfloat16)."""
    model = make(**CONFIGS["every-second-layer-two-heads"]).to(getattr(torch, dtype))
    mask_pad = torch.cat([torch.arange(4).unsqueeze(1) < 4 - torch.tensor([4, 1, 3]), torch.zeros(6, 3, dtype=bool)])
    x = torch.randn(10, 3, 6).to(model.layers[0].gates.weight.dtype)
    expected = []
    hooks = [layer.register_forward_hook(lambda m, args, out: expected.append(out[0])) for layer in model.layers]
    with torch.no_grad():
        model(x, mask_pad=mask_pad, causal=True)
        for hook in hooks:
            hook.remove()
        decoder, twin = session(model, 3, path=path), session(model, 3, path=path)
        got = [decoder.step_layers(x[:4], mask_pad[:4])]
        got += [decoder.step_layers(x[t : t + 1]) for t in range(4, 10)]
        twin.step(x[:4], mask_pad[:4])
        plain = [twin.step(x[t : t + 1]) for t in range(4, 10)]
    assert len(token_calls) == 12
    tolerance = {"atol": 3e-2, "rtol": 3e-2} if dtype == "bfloat16" else {}
    for i, want in enumerate(expected):
        layer = torch.cat([layers[i] for layers in got])
        assert layer.dtype == want.dtype
        assert_close(layer.float(), want.float(), name=f"layer {i}", **tolerance)
    step_tolerance = {"atol": 1e-2, "rtol": 2**-7} if dtype == "bfloat16" else {}  # one rounding to bfloat16
    assert_close(torch.cat([layers[-1] for layers in got[1:]]).float(), torch.cat(plain).float(), **step_tolerance)
    assert decoder.cache_dtype == twin.cache_dtype
    assert_close(decoder.c, twin.c, name="c")
    for mine, theirs in zip(decoder._views()[0], twin._views()[0], strict=True):
        assert (mine is None) == (theirs is None) and (mine is None or torch.allclose(mine, theirs, atol=1e-5))
