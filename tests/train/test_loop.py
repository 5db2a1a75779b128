import json
import math
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from srupp.models import SRUppLM, generate
from srupp.train import evaluate, load_checkpoint, load_model, loop, train
from srupp.train.distributed import DistInfo

from .host_sync import host_reads_per_update


def test_end_to_end_train_eval_generate(tiny_cfg, tmp_path):
    cfg = tiny_cfg(max_steps=6, eval_every=3)
    result = train(cfg)
    run = tmp_path / "run"
    assert result.step == 6 and len(result.losses) == 6 and len(result.valid) == 2
    assert all(math.isfinite(x) for x in result.losses)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert "valid_bpc" in records[-1]
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert json.loads((run / "config.json").read_text())["max_steps"] == 6
    model, loaded_cfg, vocab, ckpt = load_model(run / "checkpoints" / "last.safetensors")
    assert ckpt.trainer["step"] == 6 and (run / "checkpoints" / "best.safetensors").is_file()
    from srupp.data import open_corpus

    nats = evaluate(model, open_corpus(cfg.data).split("valid"), batch_size=2, unroll=16, attn_window=32)
    assert math.isfinite(nats)
    text = vocab.decode(list(generate(model, vocab.encode("def "), 10, top_k=5)))
    assert isinstance(text, str)


@pytest.mark.parametrize("accum", [pytest.param(1, id="accum1"), pytest.param(2, id="accum2")])
def test_resume_gives_the_same_losses(tiny_cfg, tmp_path, accum):
    common = {"schedule_steps": 8, "eval_every": 4, "grad_accum": accum, "dropout": 0.1}
    full = train(tiny_cfg(**common, max_steps=8, out_dir=tmp_path / "full"))
    first = train(tiny_cfg(**common, max_steps=5, out_dir=tmp_path / "split"))
    resumed = train(tiny_cfg(**common, max_steps=8, out_dir=tmp_path / "split"), resume=True)
    # Bitwise equal here; the tolerance only absorbs CPU reductions whose order depends on memory alignment.
    assert first.losses + resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=0)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.safetensors").prefixed("model/")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors").prefixed("model/")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-8) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == sorted(s for s in steps if s)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(max_steps=6, eval_every=2)
    original = SRUppLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        nll, state = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                nll = nll * float("nan")
        return nll, state

    monkeypatch.setattr(SRUppLM, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 3: the loss is nan.*last good checkpoint.*step 2"):
        train(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").trainer["step"] == 2


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        pytest.param({"data": "/nonexistent/corpus"}, FileNotFoundError, "srupp data prepare", id="missing-data"),
        pytest.param({"batch_size": 64, "unroll_size": 512}, ValueError, "smaller than one batch", id="too-small"),
        pytest.param({"device": "cuda"}, RuntimeError, "no CUDA GPU", id="no-cuda"),
    ],
)
def test_clear_errors(tiny_cfg, overrides, error, match):
    if overrides.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(error, match=match):
        train(tiny_cfg(**overrides))


def test_empty_split_is_a_clear_error(tiny_corpus, tiny_cfg, tmp_path):
    import numpy as np

    from srupp.data import Vocab
    from srupp.data.corpus import write_corpus

    data = write_corpus(tmp_path / "d", {"train": np.arange(500) % 256, "valid": np.zeros(0)}, Vocab("byte"), "t")
    with pytest.raises(ValueError, match="split 'valid' .* is empty"):
        train(tiny_cfg(data=data.path, max_steps=2, eval_every=1))


@pytest.mark.parametrize("precision", ["mixed", "bf16", "auto"])
def test_mixed_precision_bf16_on_cpu(tiny_cfg, precision):
    result = train(tiny_cfg(max_steps=2, eval_every=2, precision=precision))
    assert all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize(
    ("found", "expected"), [("amx", torch.bfloat16), ("avx512_bf16", torch.bfloat16), (None, None)]
)
def test_precision_auto_is_bf16_where_the_cpu_multiplies_in_bf16(monkeypatch, found, expected):
    monkeypatch.setattr(loop, "bf16_matmul", lambda: found)
    cpu = torch.device("cpu")
    assert loop.autocast_dtype("auto", cpu) == expected
    assert (loop.autocast_dtype("fp32", cpu), loop.autocast_dtype("bf16", cpu)) == (None, torch.bfloat16)
    assert loop.autocast_dtype("mixed", cpu) == torch.bfloat16


def test_word_level_adaptive_run_reports_perplexity(tiny_cfg, tmp_path):
    from srupp.data import prepare_wikitext103

    (tmp_path / "wt").mkdir()
    for split, lines in (("train", 300), ("valid", 40), ("test", 40)):
        text = "".join(f" the cat {'sat' if i % 3 else 'ran'} on mat {i % 7} \n" for i in range(lines))
        (tmp_path / "wt" / f"wiki.{split}.tokens").write_text(text)
    corpus = prepare_wikitext103(tmp_path / "wt", tmp_path / "wt-data")
    cfg = tiny_cfg(
        data=corpus.path,
        max_steps=3,
        eval_every=3,
        cutoffs="[4, 8]",
        embed_size=16,
        div_value=2.0,
        vocab_size=corpus.vocab.size,
    )
    result = train(cfg)
    assert "valid_ppl" in result.valid[-1] and result.model.config.vocab_size == corpus.vocab.size
    model, _, vocab, _ = load_model(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert vocab.words == corpus.vocab.words
    assert len(list(generate(model, vocab.encode("the cat"), 5))) == 5


@pytest.mark.parametrize("accum", [1, 2])
def test_no_host_sync_between_log_steps(tiny_cfg, accum):
    """Between log and eval intervals an update never waits for the device: the loss and the gradient norm stay
    on it until a log step reads them. Counted per loop iteration (update, logging, stop checks)."""
    with host_reads_per_update(loop) as per_step:
        train(tiny_cfg(max_steps=8, eval_every=100, log_every=4, grad_accum=accum, precision="mixed"))
    quiet = [counts for step, counts in enumerate(per_step, 1) if step % 4]
    logged = [counts for step, counts in enumerate(per_step, 1) if step % 4 == 0]
    assert len(per_step) == 8 and quiet == [(0, 0)] * 6, per_step
    # A log step reads them all with one ``tolist()``, which the counters see.
    assert all(dispatch + function > 0 for dispatch, function in logged), per_step


def test_ddp_ranks_agree_on_stopping_only_every_stop_check_every_updates(tiny_cfg, monkeypatch):
    """Rank 1 of 2: no collective between checks; at a check, rank 0's clock decides the time limit (this rank
    sends 0 for it) and any rank's signal stops all; a signal after the last check is agreed on after the loop."""
    sent = []

    def with_rank_0(values, info):  # rank 0 has trained 100 s and has no signal
        sent.append(values)
        return [max(values[0], 0.0), max(values[1], 100.0)]

    monkeypatch.setattr(loop.distributed, "max_over_ranks", with_rank_0)
    cfg = tiny_cfg(stop_check_every=3, time_limit_s=50)
    run = SimpleNamespace(cfg=cfg, dist=DistInfo(1, 2, torch.device("cpu")), start=time.perf_counter())
    state, stops = loop.RunState(), SimpleNamespace(signum=None)
    seen = []
    for step in range(1, 6):
        state.step = step
        stops.signum = signal.SIGTERM if step == 4 else stops.signum
        loop.check_stops(run, state, stops)
        seen.append((len(sent), state.stopped, state.elapsed_s, state.signum))
    assert seen == [(0, False, 0.0, None)] * 2 + [(1, True, 100.0, None)] * 3
    assert sent == [[0.0, 0.0]]
    loop.check_stops(run, state, stops, final=True)
    assert sent[1] == [float(signal.SIGTERM), 0.0] and state.signum == signal.SIGTERM


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_train_as_eager_does(tiny_cfg, tmp_path):
    """``compile_mode="reduce-overhead"`` (the forward and backward in CUDA graphs) follows eager training,
    carried state and memory included, and resumes into the same run."""
    common = {"device": "cuda", "max_steps": 4, "eval_every": 4, "backend": "triton", "precision": "fp32"}
    eager = train(tiny_cfg(out_dir=tmp_path / "eager", **common))
    graphed = train(tiny_cfg(out_dir=tmp_path / "graphed", compile_mode="reduce-overhead", **common))
    assert graphed.losses == pytest.approx(eager.losses, rel=1e-3)
    assert graphed.valid[-1]["valid_loss"] == pytest.approx(eager.valid[-1]["valid_loss"], rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_precision_on_a_recent_gpu_is_bf16_without_a_loss_scale(tiny_cfg):
    from srupp.train.loop import mixed_dtype

    device = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    assert mixed_dtype(device) == expected
    result = train(tiny_cfg(device="cuda", max_steps=3, eval_every=3, precision="mixed"))
    assert all(math.isfinite(x) for x in result.losses)
