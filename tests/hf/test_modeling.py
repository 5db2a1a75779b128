import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402

import srupp.hf  # noqa: E402
from srupp.hf import SRUppCache, SRUppConfig, SRUppForCausalLM, SRUppForSequenceClassification  # noqa: E402
from srupp.hf.modeling import CACHE_NAME  # noqa: E402
from srupp.models import generate  # noqa: E402
from srupp.nn.decode import SRUppDecoder  # noqa: E402
from srupp.ops import library  # noqa: E402
from tests.hf.conftest import LM_CONFIGS, TINY, make_lm  # noqa: E402


def make(name="bytes", seed=0):
    lm = make_lm(seed, **LM_CONFIGS[name])
    return lm, SRUppForCausalLM.from_lm(lm).eval()


@pytest.mark.parametrize("name", LM_CONFIGS.keys())
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached-path", "forward-path"])
def test_logits_equal_srupplm(assert_close, name, use_cache):
    lm, model = make(name)
    ids = torch.randint(0, lm.config.vocab_size, (3, 11))
    with torch.no_grad():
        expected, _ = lm(ids.t())
        logits = model(ids, use_cache=use_cache).logits
    assert logits.shape == (3, 11, lm.config.vocab_size)
    assert_close(logits.log_softmax(-1), expected.transpose(0, 1), name="log-probs")
    if lm.config.adaptive:
        assert_close(logits, expected.transpose(0, 1), name="adaptive logits are the log-probs")


def test_state_dict_is_srupplm_under_a_prefix():
    lm, model = make()
    assert model.state_dict().keys() == {f"model.{key}" for key in lm.state_dict()}


@pytest.mark.parametrize("name", ["bytes", "adaptive"])
def test_greedy_generate_equals_srupp_generate(name):
    lm, model = make(name, seed=1)
    prompt = torch.randint(0, lm.config.vocab_size, (6,))
    expected = list(generate(lm, prompt, 12, temperature=0))
    out = model.generate(prompt[None], max_new_tokens=12, do_sample=False)
    assert out[0, :6].tolist() == prompt.tolist()
    assert out[0, 6:].tolist() == expected


def test_generate_with_and_without_the_cache_agree():
    _, model = make(seed=4)
    prompts = torch.randint(0, 256, (2, 5))
    greedy = model.generate(prompts, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompts, max_new_tokens=8, do_sample=False, use_cache=False), greedy)
    # Beam search reorders the cache's batch every step.
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(prompts, **beams), model.generate(prompts, **beams, use_cache=False))
    # A returned cache continues generation: the prompt's state is not fed again nor dropped.
    first = model.generate(prompts, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    continued = model.generate(first.sequences, max_new_tokens=4, do_sample=False, **{CACHE_NAME: first[CACHE_NAME]})
    assert torch.equal(continued, greedy[:, :13])


def test_batched_left_padded_generation_equals_each_prompt_alone(assert_close):
    lm, model = make("every-second-layer-two-heads-layer-norm", seed=2)
    prompts = [torch.randint(1, 256, (n,)) for n in (5, 2, 7)]
    width = max(len(p) for p in prompts)
    # Padding id 0 is an ordinary token of the model: only the attention mask can keep it out.
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :], mask[b, width - len(p) :] = p, 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)
        assert batched.sequences[b, width:].tolist() == alone.sequences[0, len(p) :].tolist(), f"prompt {b}"
        for t, (step_batched, step_alone) in enumerate(zip(batched.logits, alone.logits, strict=True)):
            assert_close(step_batched[b], step_alone[0], name=f"prompt {b}, step {t}")
    unmasked = model.generate(ids, **{**kwargs, "pad_token_id": None})
    differs = any(
        not torch.allclose(a[1], b[1], atol=1e-4) for a, b in zip(unmasked.logits, batched.logits, strict=True)
    )
    assert differs, "the padding should matter without the attention mask"


@pytest.mark.parametrize("k", [1, 2, 7])
def test_prefill_then_steps_equals_full_forward(assert_close, k):
    _, model = make("every-second-layer-two-heads-layer-norm", seed=3)
    ids = torch.randint(0, 256, (2, 14))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        out = model(ids[:, :k], use_cache=True)
        cache, pieces = out[CACHE_NAME], [out.logits]
        assert isinstance(cache, SRUppCache) and cache.get_seq_length() == k
        # Single steps, then a chunk of three fed at once into the running cache, then steps again.
        t = k
        for size in [1, 1, 3, 1]:
            mask = torch.ones(2, t + size, dtype=torch.long)  # as generate passes it: the whole length
            out = model(ids[:, t : t + size], attention_mask=mask, **{CACHE_NAME: cache})
            assert out[CACHE_NAME] is cache and cache.get_seq_length() == t + size
            pieces.append(out.logits)
            t += size
    assert_close(torch.cat(pieces, dim=1), expected[:, :t])


def test_past_key_values_is_the_cache_too(assert_close):
    _, model = make()
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits[:, 4:]
        cache = model(ids[:, :4])[CACHE_NAME]
        actual = model(ids[:, 4:], past_key_values=cache).logits
    assert_close(actual, expected)


def test_cache_reorders_and_repeats_its_batch(assert_close):
    _, model = make()
    ids = torch.randint(0, 256, (3, 6))
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        expected = model(ids[order]).logits[:, 4:]
        cache = model(ids[:, :4])[CACHE_NAME]
        cache.reorder_cache(order)
        assert_close(model(ids[order, 4:], **{CACHE_NAME: cache}).logits, expected, name="reordered")
        cache = model(ids[:, :4])[CACHE_NAME]
        cache.batch_repeat_interleave(2)
        repeated = model(ids[:, 4:].repeat_interleave(2, dim=0), **{CACHE_NAME: cache}).logits
    assert_close(repeated, model(ids).logits[:, 4:].repeat_interleave(2, dim=0), name="repeated")
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


def test_labels_give_the_shifted_cross_entropy(assert_close):
    lm, model = make()
    ids = torch.randint(0, 256, (2, 9))
    labels = ids.clone()
    labels[0, 5:] = -100
    with torch.no_grad():
        loss = model(ids, labels=labels).loss
        nll, _ = lm(ids[:, :-1].t(), targets=ids[:, 1:].t())
    keep = labels[:, 1:].t() != -100
    assert_close(loss, nll[keep].mean(), name="loss")


def test_trainer_lowers_the_loss(tmp_path):
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = SRUppForCausalLM(SRUppConfig(**TINY))
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 12))
    rows = [{"input_ids": row, "labels": row} for row in (text[i : i + 32] for i in range(0, 320, 10))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=4,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5, (before, after)


def test_auto_classes_build_the_srupp_models():
    config = transformers.AutoConfig.for_model("srupp", **TINY)
    assert isinstance(config, SRUppConfig)
    assert isinstance(transformers.AutoModelForCausalLM.from_config(config), SRUppForCausalLM)
    assert isinstance(
        transformers.AutoModelForSequenceClassification.from_config(config), SRUppForSequenceClassification
    )
    assert srupp.hf.SRUppConfig is SRUppConfig


def test_save_and_from_pretrained_round_trip(tmp_path):
    _, model = make("adaptive")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


POOLINGS = {
    "bidirectional-mean": dict(bidirectional=True),
    "causal-last": dict(bidirectional=False),
    "causal-mean": dict(classifier_pooling="mean"),
}


@pytest.mark.parametrize("options", POOLINGS.values(), ids=POOLINGS.keys())
def test_sequence_classification_pads_and_trains(assert_close, options):
    torch.manual_seed(0)
    model = SRUppForSequenceClassification(SRUppConfig(**TINY, num_labels=3, **options)).eval()
    with torch.no_grad():
        for layer in model.model.rnn.layers:
            layer.transform.alpha.fill_(0.8)
    lengths = [6, 3, 5, 2]
    ids = torch.randint(1, 256, (4, 6))
    mask = (torch.arange(6) < torch.tensor(lengths)[:, None]).long()  # right padding
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for b, length in enumerate(lengths):
            assert_close(logits[b], model(ids[b : b + 1, :length]).logits[0], name=f"sequence {b}")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_sequence_classifier_loads_the_causal_lm_weights(assert_close, tmp_path):
    lm, model = make()
    model.save_pretrained(tmp_path)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2).eval()
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(classifier.model.embedding.weight, lm.embedding.weight)
        hidden, _ = lm.rnn(lm.embed(ids.t()), causal=True)
        assert_close(classifier.model(ids, None), hidden.transpose(0, 1))
    assert torch.isfinite(classifier.score.weight).all() and classifier.score.weight.abs().sum() > 0


BAD_CALLS = {
    "ids-and-embeds": (
        lambda m: m(torch.zeros(1, 2, dtype=torch.long), inputs_embeds=torch.zeros(1, 2, 32)),
        ValueError,
        "exactly one",
    ),
    "ids-shape": (lambda m: m(torch.zeros(3, dtype=torch.long)), ValueError, r"\[B, T\]"),
    "mask-shape": (
        lambda m: m(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 2)),
        ValueError,
        "L >= T = 3",
    ),
    "cache-type": (lambda m: m(torch.zeros(1, 2, dtype=torch.long), cache=(1, 2)), TypeError, "SRUppCache"),
    "labels-shape": (
        lambda m: m(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 2, dtype=torch.long)),
        ValueError,
        r"\[B, T\] = \[1, 3\]",
    ),
}


@pytest.mark.parametrize("call,error,message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call(make()[1])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resize_token_embeddings_resizes_both_ends_and_a_new_id_trains(tied):
    torch.manual_seed(0)
    model = SRUppForCausalLM(SRUppConfig(**TINY, vocab_size=40, tie_word_embeddings=tied)).train()
    old_output = model.model.output.weight.detach().clone()
    model.resize_token_embeddings(43, mean_resizing=False)
    lm = model.model
    assert model.config.vocab_size == lm.config.vocab_size == 43
    assert lm.embedding.weight.shape == lm.output.weight.shape == (43, 32) and lm.output.bias.shape == (43,)
    assert (lm.output.weight is lm.embedding.weight) == tied
    if not tied:
        assert torch.equal(lm.output.weight[:40], old_output)  # the old rows are kept
    ids = torch.randint(0, 40, (2, 9))
    ids[:, 4] = 42  # the new id, as input and as label
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model(ids, labels=ids, use_cache=False)
    before.loss.backward()
    assert lm.embedding.weight.grad[42].abs().sum() > 0 and lm.output.weight.grad[42].abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        after = model.eval()(ids, use_cache=False).logits.log_softmax(-1)[:, 3, 42]
        before_new = before.logits.log_softmax(-1)[:, 3, 42]
    assert bool((after > before_new).all())  # the label 42 at position 4 made its log-probability rise


def test_output_hidden_states_are_every_layers_output(assert_close):
    lm, model = make("every-second-layer-two-heads-layer-norm")
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
        # The reference: the embedding, then each layer applied in turn to the previous one's output.
        x = lm.embedding.weight[ids.t()]
        expected = [x]
        for layer in lm.rnn.layers:
            x, _ = layer(x)
            expected.append(x)
    assert len(out.hidden_states) == lm.config.num_layers + 1
    for i, (got, want) in enumerate(zip(out.hidden_states, expected, strict=True)):
        assert_close(got, want.transpose(0, 1), name=f"hidden_states[{i}]")
    assert_close(out.logits, lm.output(out.hidden_states[-1]), name="logits of the last hidden state")
    assert model(ids, use_cache=False).hidden_states is None


def test_gradient_checkpointing_gives_the_same_gradients():
    # Training mode with dropout: the recomputation must replay the same dropout masks.
    config = SRUppConfig(**{**TINY, "dropout": 0.2, "attn_dropout": 0.2, "num_layers": 3})
    torch.manual_seed(0)
    model = SRUppForCausalLM(config).train()
    with torch.no_grad():
        for layer in model.model.rnn.layers:
            layer.transform.alpha.fill_(0.6)
    ids = torch.randint(0, 256, (2, 10))

    def gradients():
        model.zero_grad()
        torch.manual_seed(1)
        out = model(ids, labels=ids, output_hidden_states=True, use_cache=False)
        (out.loss + sum(h.square().mean() for h in out.hidden_states)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    # (transformers 5 renamed the method; 4.x has only the old name.)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    recomputed = []
    hook = model.model.rnn.layers[1].register_forward_pre_hook(lambda *args: recomputed.append(1))
    checkpointed = gradients()
    hook.remove()
    assert model.model.rnn.gradient_checkpointing and len(recomputed) == 2  # forward, then again in backward
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0, msg=name)


def test_cache_feed_returns_the_layers_outputs(assert_close):
    """``SRUppCache.feed`` returns a tuple either way: ``(output,)``, or every layer's output ending in it; the
    output is the stack's causal forward."""
    lm, _ = make()
    lm.eval()
    x = torch.randn(3, 2, lm.config.hidden_size)
    with torch.no_grad():
        (output,) = SRUppCache().feed(lm.rnn, x, None)
        layers = SRUppCache().feed(lm.rnn, x, None, all_layers=True)
        expected, _ = lm.rnn(x, causal=True)
    assert len(layers) == lm.config.num_layers and torch.equal(layers[-1], output)
    assert_close(output, expected)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of ``prompts`` padded on the left with id 0 (an ordinary token of the model)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :], mask[b, width - len(p) :] = torch.tensor(p), 1
    return ids, mask


# Greedy or beam generation of a fixed length from left-padded prompts, returning a dict.
PADDED_GENERATION = dict(do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)


def make_on(path: str, seed: int):
    """``make``'s three-layer model whose decoding session runs the compiled kernel ("kernel": skipped where it is
    not built, as tests/nn/test_decode.py's sessions) or, with the naive spec's layers, the torch ops
    ("torch-ops")."""
    lm, model = make("every-second-layer-two-heads-layer-norm", seed=seed)
    if path == "torch-ops":
        model.model.set_backend("naive")
    elif model.model.rnn.decoder(1).kernel is None:
        pytest.skip(library.unavailable_reason() if not library.is_available() else "no kernel for this model")
    return lm, model


def test_kernel_cases_skip_where_the_library_is_unavailable(monkeypatch):
    monkeypatch.setattr(library, "_KERNEL", None)
    monkeypatch.setattr(library, "_LOAD_ERROR", "the compiled kernel is missing (a test)")
    with pytest.raises(pytest.skip.Exception, match="'cpu' backend is unavailable: the compiled kernel is missing"):
        make_on("kernel", seed=0)
    make_on("torch-ops", seed=0)


@pytest.fixture
def session_calls(monkeypatch):
    """Counts the session's one-token steps and its general-path steps."""
    calls = {"token": 0, "general": 0}
    for name, key in (("_step_token", "token"), ("_step_general", "general")):
        original = getattr(SRUppDecoder, name)

        def counted(self, *args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(SRUppDecoder, name, counted)
    return calls


@pytest.mark.parametrize("new_tokens", [1, 4, 11])
@pytest.mark.parametrize("path", ["kernel", "torch-ops"])
def test_beam_search_with_the_cache_equals_beam_search_without(assert_close, session_calls, path, new_tokens):
    """Beam search (3 beams, a left-padded batch of two) through the cache, whose session reorders its buffers in
    place after every token, against beam search recomputing every position (no cache): the same sequences and
    scores; every token after the prompt takes the session's one-token path."""
    _, model = make_on(path, seed=5)
    ids, mask = left_padded([[7, 8, 9, 10, 11], [42, 43]])
    kwargs = dict(
        PADDED_GENERATION,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        num_beams=3,
        num_return_sequences=2,
        output_scores=True,
    )
    cached = model.generate(ids, **kwargs)
    assert session_calls == {"token": new_tokens - 1, "general": 1}
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert_close(cached.sequences_scores, uncached.sequences_scores, name="sequence scores")
    for t, (got, want) in enumerate(zip(cached.scores, uncached.scores, strict=True)):
        assert_close(got, want, atol=1e-4, name=f"scores of token {t}")
    session = cached[CACHE_NAME].session
    assert (session.kernel is not None) == (path == "kernel")
    assert session.kernel is None or session.kernel._held[0] is session.buffers


@pytest.mark.parametrize("path", ["kernel", "torch-ops"])
def test_cached_hidden_states_are_the_full_forwards(assert_close, path):
    """``output_hidden_states`` with a cache: a left-padded prompt, single steps and a chunk give the embedding
    and every layer's output for their positions, as the forward without a cache over the whole sequence; and
    greedy ``generate`` returns them per step."""
    lm, model = make_on(path, seed=6)
    ids, mask = left_padded([[5, 6, 7, 8], [9, 10]])
    more = torch.randint(1, 256, (2, 5))
    full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    with torch.no_grad():
        expected = model(full_ids, attention_mask=full_mask, output_hidden_states=True, use_cache=False)
        out = model(ids, attention_mask=mask, output_hidden_states=True, use_cache=True)
        pieces, cache, t = [out.hidden_states], out[CACHE_NAME], ids.shape[1]
        for size in (1, 1, 2, 1):
            piece = model(full_ids[:, t : t + size], output_hidden_states=True, **{CACHE_NAME: cache})
            assert piece.hidden_states[-1].shape == (2, size, lm.config.hidden_size)
            pieces.append(piece.hidden_states)
            t += size
    assert len(out.hidden_states) == lm.config.num_layers + 1
    for i, want in enumerate(expected.hidden_states):
        assert_close(torch.cat([layers[i] for layers in pieces], 1), want, name=f"hidden_states[{i}]")
    generated = model.generate(
        ids, attention_mask=mask, max_new_tokens=4, output_hidden_states=True, **PADDED_GENERATION
    )
    with torch.no_grad():
        whole = model(
            generated.sequences[:, :-1],
            output_hidden_states=True,
            use_cache=False,
            attention_mask=torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1),
        )
    steps = torch.cat([torch.stack(layers) for layers in generated.hidden_states], dim=2)
    assert_close(steps, torch.stack(whole.hidden_states), name="generate's hidden states")
