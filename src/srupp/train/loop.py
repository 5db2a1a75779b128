"""The training loop: :func:`train` reads top to bottom as named steps over one explicit state object.

``setup`` builds what stays fixed for the run (:class:`Run`: data, model, optimizer, outputs) and the state
that changes every update (:class:`RunState`: step, best loss, carried recurrent state), restored from the
last checkpoint on resume. Each step below takes both and says what it changes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from srupp.data import Corpus, Segment, StreamBatcher, open_corpus, prepare_stdlib
from srupp.errors import CheckpointError, ConfigError, CorpusError, DivergenceError, RunDirError
from srupp.models import LMConfig, SRUppLM
from srupp.models.config import check_number
from srupp.nn import SRUppState
from srupp.ops import bf16_matmul
from srupp.signals import Interrupted, StopRequests
from srupp.train import distributed
from srupp.train.checkpoint import (
    Checkpoint,
    build_model,
    carry_from_tensors,
    carry_to_tensors,
    load_checkpoint,
    load_weights,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from srupp.train.config import TrainConfig, check_resume, check_threads
from srupp.train.evaluate import bpc, evaluate, ppl
from srupp.train.metrics import MetricsLog, plot_curve
from srupp.train.rundir import RunFolder, write_text_atomic


@dataclass
class TrainResult:
    """What a run did: final ``step``, per-step train ``losses`` (nats, mean over ranks), valid records."""

    step: int
    losses: list[float] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    best_valid_loss: float = math.inf
    model: SRUppLM | None = None
    run_dir: Path | None = None
    is_main: bool = True


@dataclass
class Run:
    """What ``setup`` builds once for a run; the steps read it and never rebind its fields."""

    cfg: TrainConfig
    dist: distributed.DistInfo
    model: SRUppLM
    net: torch.nn.Module  # the model, wrapped in DistributedDataParallel under DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batcher: StreamBatcher
    data: Iterator[Segment]
    valid_tokens: np.ndarray
    vocab: dict
    metric: str  # "bpc" (bits per byte) for byte and BPE corpora, "ppl" for word corpora
    train_bytes_per_token: float  # 1 for bytes; BPE losses per token become bits per byte through these
    valid_bytes_per_token: float
    log: MetricsLog | None  # rank 0 only
    bar: tqdm
    start: float

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.safetensors"

    def to_metric(self, nats: float, bytes_per_token: float = 1.0) -> float:
        return bpc(nats, bytes_per_token) if self.metric == "bpc" else ppl(nats)


@dataclass
class RunState:
    """Everything that changes from one update to the next."""

    step: int = 0
    best: float = math.inf
    carry: SRUppState | None = None
    saved_step: int | None = None  # the step of checkpoints/last.safetensors, once it is this run's
    # Each update's (loss of this rank, gradient norm), left on the device until a log, eval or checkpoint step
    # reads them all at once (``read_metrics``): reading a value from a GPU waits for all the work queued before it.
    pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    elapsed_s: float = 0.0  # seconds of training on the run's clock (rank 0's) at the last stop check
    signum: int | None = None  # the SIGTERM or SIGINT that stops every rank, once a stop check agreed on it
    read_at: float = 0.0  # the clock when the values were last read (the span tokens_per_s is measured over)
    loss: float = math.nan
    grad_norm: float = math.nan
    lr: float = 0.0
    tokens_per_s: float = 0.0
    stopped: bool = False
    losses: list[float] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``, writing ``config.json``, ``metrics.jsonl``, ``learning_curve.png``
    and ``checkpoints/{last,best}.safetensors`` under ``cfg.out_dir``.

    Run under ``torchrun --nproc_per_node=N`` for DDP: each rank reads its own contiguous shard of the global
    ``batch_size`` streams. With ``resume`` the run continues exactly from ``checkpoints/last.safetensors``
    (weights, optimizer, RNG, data position, carried state and memory). A folder holding another run is
    refused unless ``overwrite``, which moves its files into ``replaced/``; a folder in use by another
    trainer is refused. A SIGTERM or SIGINT finishes the current update, writes the last checkpoint and raises
    :class:`srupp.signals.Interrupted` (a second signal raises at once).

    Raises:
        RunDirError: the folder holds another run, is locked, or has nothing to resume.
        ConfigError: the config does not fit the corpus, or a resume changes a fixed setting.
        DivergenceError: the loss, valid loss, gradient or parameters became NaN or infinite (the message
            names the last good checkpoint, which is kept).
    """
    dist = distributed.setup(cfg.device)
    try:
        with claim_run_dir(cfg.out_dir, dist, resume=resume, overwrite=overwrite), StopRequests() as stops:
            run, state = setup(cfg, dist, resume)
            with run.bar:
                while state.step < cfg.max_steps and not state.stopped:
                    one_update(run, state)
                    log_update(run, state)
                    check_stops(run, state, stops)
                    if state.signum is not None:  # checkpoint this step at once: pre-emption leaves seconds
                        break
                    if evaluation_due(run, state):
                        evaluate_and_checkpoint(run, state)
                    elif cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                        save(run, state, run.last_path, valid_loss=None)
                check_stops(run, state, stops, final=True)  # a signal since the last check stops every rank alike
                read_metrics(run, state)
                if state.step > 0 and state.saved_step != state.step:
                    save(run, state, run.last_path, valid_loss=None)
            stop_if_signalled(run, state)
        return TrainResult(state.step, state.losses, state.valid, state.best, run.model, run.run_dir, dist.is_main)
    finally:
        distributed.teardown(dist)


@contextlib.contextmanager
def claim_run_dir(out_dir: str, dist: distributed.DistInfo, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Rank 0 holds the run folder (lock, no silent replacement) for the whole run; the other ranks learn
    whether it succeeded, so a refusal stops every rank instead of leaving them waiting."""
    folder = RunFolder(out_dir, resume=resume, overwrite=overwrite)
    with contextlib.ExitStack() as stack:
        refused: RunDirError | OSError | None = None
        if dist.is_main:
            try:
                stack.enter_context(folder)
            except (RunDirError, OSError) as err:  # e.g. an unwritable out_dir: tell the other ranks too
                refused = err
        if distributed.broadcast_float(0.0 if refused else 1.0, dist) == 0.0:
            raise refused or RunDirError(f"rank 0 could not claim the run folder {out_dir}")
        if folder.moved_to is not None:
            print(f"srupp train: moved the previous run's files in {out_dir} to {folder.moved_to}", file=sys.stderr)
        yield


def with_corpus_vocab(cfg: TrainConfig, corpus: Corpus, resume: bool) -> TrainConfig:
    """``cfg`` with the corpus's vocabulary size where it kept the byte-level default; a ConfigError where it
    names another size."""
    byte_default = cfg.model.vocab_size == LMConfig.vocab_size and corpus.vocab.kind != "byte" and not resume
    if corpus.vocab.size != cfg.model.vocab_size and byte_default:
        # The presets are byte-level; on a BPE or word corpus they take that corpus's vocabulary.
        return replace(cfg, model=replace(cfg.model, vocab_size=corpus.vocab.size))
    if corpus.vocab.size != cfg.model.vocab_size:
        raise ConfigError(
            f"`vocab_size` must equal the vocabulary size of corpus {corpus.path} ({corpus.vocab.size:,} "
            f"{corpus.vocab.kind} tokens), got {cfg.model.vocab_size}; pass --vocab_size {corpus.vocab.size}"
        )
    return cfg


def train_batcher(cfg: TrainConfig, corpus: Corpus, dist: distributed.DistInfo) -> StreamBatcher:
    """This rank's share of the training split, in ``cfg.unroll_size`` steps."""
    try:
        return StreamBatcher(
            corpus.split("train"),
            cfg.batch_size // dist.world_size,
            cfg.unroll_size,
            rank=dist.rank,
            world_size=dist.world_size,
        )
    except ValueError as err:  # the corpus is too small for the batch: a problem of this input, said plainly
        raise CorpusError(f"{err} (corpus {corpus.path})") from err


def setup(cfg: TrainConfig, dist: distributed.DistInfo, resume: bool) -> tuple[Run, RunState]:
    """Data, model, optimizer and outputs for ``cfg``; the state restored from the last checkpoint on resume."""
    if cfg.num_threads:
        torch.set_num_threads(check_threads("num_threads", cfg.num_threads))
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"`batch_size` ({cfg.batch_size}) must be divisible by the world size ({dist.world_size})")
    saved = None
    if resume:  # checked before anything is prepared or written
        saved = load_checkpoint(Path(cfg.out_dir) / "checkpoints" / "last.safetensors")
        check_resume(cfg, saved.config, saved.path)
    corpus = resolve_corpus(cfg.data, cfg.out_dir, dist.is_main)
    cfg = with_corpus_vocab(cfg, corpus, resume)
    batcher = train_batcher(cfg, corpus, dist)
    torch.manual_seed(cfg.seed)  # the same model init on every rank
    model = build_model(cfg.model, backend=cfg.backend, device=dist.device)
    optimizer = build_optimizer(model, cfg)
    fp16 = autocast_dtype(cfg.precision, dist.device) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    torch.manual_seed(cfg.seed + 1 + dist.rank)  # different dropout masks per rank
    # Adaptive-softmax clusters that no target hits in a batch get no gradient.
    net = DistributedDataParallel(model, find_unused_parameters=cfg.model.adaptive) if dist.enabled else model
    if cfg.compile_mode != "off":
        net = torch.compile(net, mode=cfg.compile_mode)
    metric = "ppl" if corpus.vocab.kind == "word" else "bpc"
    train_bpt = corpus.bytes_per_token("train") if metric == "bpc" else 1.0
    valid_bpt = corpus.bytes_per_token("valid", cfg.eval_tokens) if metric == "bpc" else 1.0
    run = Run(
        cfg,
        dist,
        model,
        net,
        optimizer,
        scaler,
        batcher,
        iter(batcher),
        corpus.split("valid"),
        vocab=corpus.vocab.to_dict(),
        metric=metric,
        train_bytes_per_token=train_bpt,
        valid_bytes_per_token=valid_bpt,
        log=None,
        bar=None,
        start=0.0,
    )
    state = restore(run, saved) if saved is not None else RunState()
    if dist.is_main:
        write_text_atomic(run.run_dir / "config.json", cfg.to_json())
        run.log = MetricsLog(run.run_dir / "metrics.jsonl", resume_step=state.step if resume else None)
    # A time-limited schedule has no meaningful step total: the bar then counts steps without an ETA.
    run.bar = tqdm(
        total=None if cfg.anneal_by_time else cfg.max_steps,
        initial=state.step,
        unit="step",
        disable=not (cfg.progress and dist.is_main),
        dynamic_ncols=True,
    )
    run.model.train()
    run.start = state.read_at = time.perf_counter()
    return run, state


def restore(run: Run, ckpt: Checkpoint) -> RunState:
    """The state saved in ``ckpt`` (``checkpoints/last.safetensors``) and this rank's file beside it; loads
    the model, optimizer, loss scale, data position and RNG into ``run``."""
    path, dist = ckpt.path, run.dist
    load_weights(run.model, ckpt.prefixed("model/"), path)
    trainer = ckpt.trainer
    if trainer.get("world_size") != dist.world_size:
        raise ConfigError(
            f"{path} was written by {trainer.get('world_size')} ranks; resume with the same number (got "
            f"{dist.world_size}) so every rank finds its data position and carried state"
        )
    try:
        optimizer_from_tensors(run.optimizer, ckpt.prefixed("optim/"), trainer["optimizer"])
        for group in run.optimizer.param_groups:  # the rule for changed hyper-parameters: the new ones apply
            group.update(optimizer_settings(run.cfg))
        if run.scaler.is_enabled():
            run.scaler.load_state_dict(trainer["scaler"])
        run.batcher.load_state_dict(trainer["data"])
        step, best = trainer["step"], trainer["best_valid_loss"]
        check_number("step", step, integer=True, low=0)
        if not isinstance(best, int | float) or isinstance(best, bool):
            raise TypeError(f"best_valid_loss {best!r}")
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has incomplete trainer state ({err!r})") from err
    mine = load_checkpoint(path.parent / rank_file(step, dist.rank))
    if mine.trainer.get("step") != step:
        raise CheckpointError(f"{mine.path} is from step {mine.trainer.get('step')}, but {path} from step {step}")
    torch.set_rng_state(mine.tensors["rng/cpu"])
    if dist.device.type == "cuda" and "rng/cuda" in mine.tensors:
        torch.cuda.set_rng_state(mine.tensors["rng/cuda"], dist.device)
    return RunState(
        step=step, best=float(best), carry=carry_from_tensors(mine.prefixed("carry/"), dist.device), saved_step=step
    )


def one_update(run: Run, state: RunState) -> None:
    """Forward/backward over ``grad_accum`` consecutive segments (carrying state and memory), clip, step.

    Sets ``state.lr`` and ``carry``, queues the update's loss and gradient norm (on the device) in
    ``state.pending``, and advances ``state.step``. Nothing here waits for the device (except GradScaler's check
    for infinite gradients under fp16) or, beyond DDP's gradient all-reduce, for the other ranks.
    """
    cfg = run.cfg
    state.lr = learning_rate(state.step, cfg, state.elapsed_s)  # the clock of the last stop check: equal on all ranks
    for group in run.optimizer.param_groups:
        group["lr"] = state.lr
    run.optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(run, state)
    # Clip the global gradient norm (unscaled first under fp16), step, update the loss scale.
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    state.step += 1
    state.pending.append((loss, grad_norm.detach()))


def accumulate_gradients(run: Run, state: RunState) -> torch.Tensor:
    """Forward and backward over ``grad_accum`` segments, carrying ``state.carry``; returns the mean loss, on
    the device."""
    cfg, dist, device = run.cfg, run.dist, run.dist.device
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        segment = next(run.data)
        if segment.first:
            state.carry = None
        sync = micro == cfg.grad_accum - 1 or not dist.enabled
        graphed = cfg.compile_mode == "reduce-overhead"
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs may now be overwritten
        with contextlib.nullcontext() if sync else run.net.no_sync(), autocast(cfg, device):
            inputs, targets = to_device(segment.input, device), to_device(segment.target, device)
            nll, state.carry = run.net(inputs, state.carry, targets=targets)
            loss = nll.mean()
        if graphed:
            state.carry = state.carry.clone()  # carried past the next replay, which reuses the outputs' memory
        run.scaler.scale(loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
    return loss_sum / cfg.grad_accum


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; to a GPU through pinned memory, so the copy does not wait for the GPU's queue."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def read_metrics(run: Run, state: RunState) -> None:
    """Read the pending losses (averaged over the ranks in one collective) and gradient norms from the device (one
    wait), append them to ``state.losses``, set ``state.loss``, ``grad_norm`` and ``tokens_per_s``, and stop at the
    first that is not finite. Every rank calls it at the same steps."""
    if not state.pending:
        return
    losses, norms = (torch.stack(column).float() for column in zip(*state.pending, strict=True))
    # The gradient norm is the same on every rank (DDP averaged the gradients); only the loss is averaged.
    values = torch.stack([distributed.mean_over_ranks(losses, run.dist), norms], dim=1).tolist()
    first = state.step - len(values) + 1
    now = time.perf_counter()
    state.tokens_per_s = run.cfg.tokens_per_step * len(values) / max(now - state.read_at, 1e-9)
    state.pending, state.read_at = [], now
    for step, (loss, grad_norm) in enumerate(values, first):
        require_finite(run, state, "loss", loss, step)
        if not run.scaler.is_enabled():  # under fp16 an infinite norm only makes the scaler skip this step
            require_finite(run, state, "gradient norm", grad_norm, step)
        state.losses.append(loss)
    state.loss, state.grad_norm = values[-1]


def log_update(run: Run, state: RunState) -> None:
    """The progress bar, and every ``log_every`` steps its figures and a ``metrics.jsonl`` record (rank 0)."""
    run.bar.update(1)
    if state.step % run.cfg.log_every and state.step != run.cfg.max_steps:
        return
    read_metrics(run, state)
    run.bar.set_postfix(
        loss=f"{state.loss:.3f}", tok_s=f"{state.tokens_per_s:,.0f}", lr=f"{state.lr:.2e}", refresh=False
    )
    if run.log is not None:
        train_metric = run.to_metric(state.loss, run.train_bytes_per_token)
        run.log.write(
            {
                "step": state.step,
                "loss": state.loss,
                f"train_{run.metric}": train_metric,
                "lr": state.lr,
                "grad_norm": state.grad_norm,
                "tokens_per_s": state.tokens_per_s,
            }
        )


def check_stops(run: Run, state: RunState, stops: StopRequests, *, final: bool = False) -> None:
    """Set ``state.signum`` once a SIGTERM or SIGINT reached a rank, ``state.elapsed_s``, and ``state.stopped``
    once ``time_limit_s`` has passed.

    One process reads its own flag and clock after every update. Under DDP the ranks agree in one collective
    (any rank's signal, rank 0's clock) every ``stop_check_every`` updates and ``final``ly after the loop, so every
    rank stops at the same step, saves once and exits with the same code; the updates between checks wait neither
    for the other ranks nor for the device.
    """
    dist = run.dist
    if dist.enabled and not final and state.step % run.cfg.stop_check_every:
        return
    signum, elapsed = float(stops.signum or 0), time.perf_counter() - run.start
    if dist.enabled:
        signum, elapsed = distributed.max_over_ranks([signum, elapsed if dist.is_main else 0.0], dist)
    state.signum = state.signum or int(signum) or None
    state.elapsed_s = elapsed
    limit = run.cfg.time_limit_s
    state.stopped = state.stopped or (limit is not None and elapsed > limit)


def stop_if_signalled(run: Run, state: RunState) -> None:
    """Raise :class:`Interrupted` (exit code 128 + the signal number) after a signal stopped the run."""
    if state.signum is None:
        return
    name = signal.Signals(state.signum).name
    if state.saved_step is None:
        raise Interrupted(state.signum, f"stopped by {name} before the first update; nothing to save")
    raise Interrupted(
        state.signum,
        f"stopped by {name}: step {state.saved_step} saved in {run.last_path}; continue with "
        f"`srupp train --resume {run.run_dir}`",
    )


def evaluation_due(run: Run, state: RunState) -> bool:
    return state.step % run.cfg.eval_every == 0 or state.step == run.cfg.max_steps or state.stopped


def evaluate_and_checkpoint(run: Run, state: RunState) -> None:
    """Score the valid split (rank 0), log it, write ``best`` when it improved and ``last`` always."""
    cfg = run.cfg
    read_metrics(run, state)
    valid_loss = math.nan
    if run.dist.is_main:
        valid_loss = evaluate(
            run.model,
            run.valid_tokens,
            batch_size=cfg.eval_batch_size,
            unroll=cfg.resolved_eval_unroll,
            max_tokens=cfg.eval_tokens,
            device=run.dist.device,
            autocast=autocast(cfg, run.dist.device),
        )
    valid_loss = distributed.broadcast_float(valid_loss, run.dist)
    train_metric = run.to_metric(state.loss, run.train_bytes_per_token)
    valid_metric = run.to_metric(valid_loss, run.valid_bytes_per_token)
    record = {"step": state.step, "valid_loss": valid_loss, f"valid_{run.metric}": valid_metric}
    state.valid.append(record)
    if run.log is not None:
        run.log.write(record)
        run.bar.write(
            f"step {state.step:>6}  train {run.metric} {train_metric:.3f}  valid {run.metric} "
            f"{valid_metric:.3f}  ({state.tokens_per_s:,.0f} tok/s)"
        )
        plot_curve(run.log.records, run.run_dir / "learning_curve.png", metric=run.metric)
    require_finite(run, state, "valid loss", valid_loss, state.step)
    if valid_loss < state.best:
        state.best = valid_loss
        save(run, state, run.best_path, valid_loss)
    save(run, state, run.last_path, valid_loss)
    state.read_at = time.perf_counter()  # the next tokens/s measures training, not this evaluation


def save(run: Run, state: RunState, path: Path, valid_loss: float | None) -> None:
    """Write a checkpoint of the current state to ``path`` if every parameter is finite.

    For ``last``, every rank first writes its RNG and carried state to ``last.step<N>.rank<r>.safetensors``;
    rank 0 then writes the shared file naming them, and each rank removes its own older file. A crash at
    any point leaves a ``last`` whose rank files exist.
    """
    dist = run.dist
    read_metrics(run, state)
    bad = [name for name, p in run.model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        require_finite(run, state, f"parameter {bad[0]}", math.nan, state.step)
    pattern = None
    if path == run.last_path:
        pattern = f"last.step{state.step}.rank{{rank}}.safetensors"  # read by srupp <= 0.2; now always this name
        mine = {"rng/cpu": torch.get_rng_state()}
        if dist.device.type == "cuda":
            mine["rng/cuda"] = torch.cuda.get_rng_state(dist.device)
        mine.update({f"carry/{k}": v for k, v in carry_to_tensors(state.carry).items()})
        trainer = {"step": state.step, "rank": dist.rank}
        save_checkpoint(path.parent / rank_file(state.step, dist.rank), mine, config={}, vocab={}, trainer=trainer)
        distributed.barrier(dist)
    if dist.is_main:
        tensors = {f"model/{k}": v for k, v in run.model.state_dict().items()}
        optim_tensors, optim_json = optimizer_to_tensors(run.optimizer)
        tensors.update({f"optim/{k}": v for k, v in optim_tensors.items()})
        trainer = {
            "step": state.step,
            "best_valid_loss": state.best,
            "valid_loss": valid_loss,
            "data": run.batcher.state_dict(),
            "world_size": dist.world_size,
            "optimizer": optim_json,
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
            "rank_file": pattern,
        }
        save_checkpoint(path, tensors, config=run.cfg.to_dict(), vocab=run.vocab, trainer=trainer)
    if pattern is not None:
        distributed.barrier(dist)
        current = rank_file(state.step, dist.rank)
        for old in path.parent.glob(f"last.step*.rank{dist.rank}.safetensors"):
            if old.name != current:
                old.unlink(missing_ok=True)
        state.saved_step = state.step


def rank_file(step: int, rank: int) -> str:
    """The name of rank ``rank``'s file beside ``last.safetensors`` of step ``step``: a fixed pattern (a name
    read from a file could be any format string)."""
    return f"last.step{int(step)}.rank{int(rank)}.safetensors"


def require_finite(run: Run, state: RunState, what: str, value: float, step: int) -> None:
    """Raise DivergenceError naming the last good checkpoint unless ``value`` is finite."""
    if math.isfinite(value):
        return
    if state.saved_step is not None:
        kept = f"The last good checkpoint is {run.last_path} (step {state.saved_step}); "
    else:
        kept = "No checkpoint was written yet; "
    raise DivergenceError(
        f"training stopped at step {step}: the {what} is {value}. {kept}"
        "lower --lr or raise --warmup_steps, then resume or restart."
    )


def learning_rate(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup ``lr * (step + 1) / warmup`` overriding a cosine decay counted from step 0 to
    ``total_schedule_steps`` (the authors' LM scripts); with ``anneal_by_time`` the cosine also follows elapsed time."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(step, cfg.total_schedule_steps) / cfg.total_schedule_steps
    if cfg.anneal_by_time:
        progress = min(1.0, max(progress, elapsed_s / cfg.time_limit_s))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_corpus(data: str, out_dir: str | Path, is_main: bool = True) -> Corpus:
    """Open a prepared corpus; ``"stdlib"`` prepares the embedded one into ``<out_dir>/data`` the first time."""
    if data != "stdlib":
        return open_corpus(data)
    target = Path(out_dir) / "data"
    if is_main and not (target / "meta.json").is_file():
        prepare_stdlib(target, overwrite=True)  # no meta.json: no complete corpus there to keep
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return open_corpus(target)


def optimizer_settings(cfg: TrainConfig) -> dict:
    """The optimizer's hyper-parameters from ``cfg``: at construction, and again after a resume loads the saved
    state, so a resume with a new ``--betas`` or ``--weight_decay`` trains with it (``lr`` follows the schedule)."""
    return {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on all parameters, decoupled, as the authors' RAdam runs do.
    kwargs = optimizer_settings(cfg)
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(model.parameters(), decoupled_weight_decay=True, **kwargs)
    return torch.optim.AdamW(model.parameters(), **kwargs)


def mixed_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of ``precision="mixed"``: bfloat16 on the CPU and on GPUs with bf16 tensor cores
    (compute capability 8.0+), which needs no loss scaling; float16 with a GradScaler on older GPUs."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a ``precision`` setting trains in on ``device``, None for float32. ``"auto"``: on the
    CPU bfloat16 where its matrix units make bf16 faster (AMX-BF16, AVX512-BF16), else float32; on a GPU as
    ``"mixed"``."""
    if precision == "auto":
        precision = "mixed" if device.type == "cuda" else "bf16" if bf16_matmul() else "fp32"
    if precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else mixed_dtype(device)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(cfg.precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
