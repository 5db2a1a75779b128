"""The training loop: one function, read top to bottom."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from srupp.data import Corpus, StreamBatcher, open_corpus, prepare_stdlib
from srupp.models import SRUppLM
from srupp.nn import SRUppState
from srupp.train import distributed
from srupp.train.checkpoint import (
    load_checkpoint,
    load_weights,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from srupp.train.config import TrainConfig
from srupp.train.evaluate import bpc, evaluate, ppl
from srupp.train.metrics import MetricsLog, plot_curve


@dataclass
class TrainResult:
    """What a run did: final ``step``, per-step train ``losses`` (nats, mean over ranks), valid records."""

    step: int
    losses: list[float] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    best_valid_loss: float = math.inf
    model: SRUppLM | None = None
    run_dir: Path | None = None


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
        prepare_stdlib(target)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return open_corpus(target)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on all parameters, decoupled, as the authors' RAdam runs do.
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(model.parameters(), decoupled_weight_decay=True, **kwargs)
    return torch.optim.AdamW(model.parameters(), **kwargs)


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision != "mixed":
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _carry_tensors(state, prefix: str) -> dict[str, torch.Tensor]:
    if state is None:
        return {}
    tensors = {f"{prefix}c": state.c}
    for i, memory in enumerate(state.memory or []):
        if memory is not None:
            tensors[f"{prefix}memory/{i}"] = memory
    return tensors


def _restore_carry(model: SRUppLM, tensors: dict[str, torch.Tensor], device: torch.device):
    if "c" not in tensors:
        return None
    layers = model.config.num_layers
    memory = [tensors.get(f"memory/{i}") for i in range(layers)]
    memory = [None if m is None else m.to(device) for m in memory]
    return SRUppState(c=tensors["c"].to(device), memory=memory)


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``, writing ``config.json``, ``metrics.jsonl``, ``learning_curve.png``
    and ``checkpoints/{last,best}.safetensors`` under ``cfg.out_dir``.

    Run under ``torchrun --nproc_per_node=N`` for DDP: each rank reads its own contiguous shard of the global
    ``batch_size`` streams. With ``resume`` the run continues exactly from ``checkpoints/last.safetensors``
    (weights, optimizer, RNG, data position, carried state and memory).

    Raises:
        FloatingPointError: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    dist = distributed.setup(cfg.device)
    device = dist.device
    try:
        return _train(cfg, dist, device, resume)
    finally:
        distributed.teardown(dist)


def _train(cfg: TrainConfig, dist: distributed.DistInfo, device: torch.device, resume: bool) -> TrainResult:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"`batch_size` ({cfg.batch_size}) must be divisible by the world size ({dist.world_size})")
    run_dir = Path(cfg.out_dir)
    last_path, best_path = run_dir / "checkpoints" / "last.safetensors", run_dir / "checkpoints" / "best.safetensors"

    # Data: this rank's contiguous shard of the training streams, and the valid split.
    corpus = resolve_corpus(cfg.data, run_dir, dist.is_main)
    if corpus.vocab.size != cfg.model.vocab_size:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=corpus.vocab.size))
    metric = "bpc" if corpus.vocab.kind == "byte" else "ppl"
    to_metric = bpc if metric == "bpc" else ppl
    batcher = StreamBatcher(
        corpus.split("train"), cfg.batch_size // dist.world_size, cfg.unroll_size, rank=dist.rank,
        world_size=dist.world_size,
    )  # fmt: skip
    valid_tokens = corpus.split("valid")
    vocab = {"kind": corpus.vocab.kind, "words": list(corpus.vocab.words)}

    # Model, optimizer, mixed precision.
    torch.manual_seed(cfg.seed)
    model = SRUppLM(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "mixed" and device.type == "cuda")
    autocast = _autocast(cfg, device)
    # Different dropout masks per rank; the same model init everywhere (seeded above).
    torch.manual_seed(cfg.seed + 1 + dist.rank)

    step, best, carry = 0, math.inf, None
    if resume:
        ckpt = load_checkpoint(last_path)
        load_weights(model, ckpt.prefixed("model/"), last_path)
        optimizer_from_tensors(optimizer, ckpt.prefixed("optim/"), ckpt.trainer["optimizer"])
        if scaler.is_enabled():
            scaler.load_state_dict(ckpt.trainer["scaler"])
        step, best = ckpt.trainer["step"], ckpt.trainer["best_valid_loss"]
        batcher.load_state_dict(ckpt.trainer["data"])
        if ckpt.trainer["world_size"] != dist.world_size:
            raise ValueError(
                f"{last_path} was written by {ckpt.trainer['world_size']} ranks; resume with the same number "
                f"(got {dist.world_size}) so every rank finds its data position and carried state"
            )
        mine = ckpt.prefixed(f"rank{dist.rank}/")
        torch.set_rng_state(mine["rng/cpu"])
        if device.type == "cuda" and "rng/cuda" in mine:
            torch.cuda.set_rng_state(mine["rng/cuda"], device)
        carry = _restore_carry(
            model, {k[len("carry/") :]: v for k, v in mine.items() if k.startswith("carry/")}, device
        )
    result = TrainResult(step=step, best_valid_loss=best, run_dir=run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if resume else None)
    net = model
    if dist.enabled:
        # Adaptive-softmax clusters that no target hits in a batch get no gradient.
        net = DistributedDataParallel(model, find_unused_parameters=cfg.model.adaptive)

    def checkpoint(path: Path, valid_loss: float | None) -> None:
        # Every rank contributes its RNG and carried state; rank 0 writes the one file.
        rank_tensors = {"rng/cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rank_tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
        rank_tensors.update(_carry_tensors(carry, "carry/"))
        tensors = {}
        for name in sorted(rank_tensors):
            for rank, value in enumerate(distributed.gather_tensor(rank_tensors[name], dist)):
                tensors[f"rank{rank}/{name}"] = value
        if not dist.is_main:
            return
        tensors.update({f"model/{k}": v for k, v in model.state_dict().items()})
        optim_tensors, optim_json = optimizer_to_tensors(optimizer)
        tensors.update({f"optim/{k}": v for k, v in optim_tensors.items()})
        trainer = {
            "step": step,
            "best_valid_loss": best,
            "valid_loss": valid_loss,
            "data": batcher.state_dict(),
            "world_size": dist.world_size,
            "optimizer": optim_json,
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        }
        save_checkpoint(path, tensors, config=cfg.to_dict(), vocab=vocab, trainer=trainer)

    data = iter(batcher)
    model.train()
    # A time-limited schedule has no meaningful step total: the bar then counts steps without an ETA.
    total = None if cfg.anneal_by_time else cfg.max_steps
    bar = tqdm(total=total, initial=step, disable=not (cfg.progress and dist.is_main), unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    tokens_per_s = 0.0

    def out_of_time() -> bool:
        # Rank 0's clock decides, so every rank stops (and checkpoints) at the same step.
        if cfg.time_limit_s is None:
            return False
        return distributed.broadcast_float(float(time.perf_counter() - start > cfg.time_limit_s), dist) > 0

    stopped, saved_step = False, step if resume else None
    while step < cfg.max_steps and not stopped:
        tick = time.perf_counter()
        elapsed = time.perf_counter() - start
        if cfg.anneal_by_time:
            elapsed = distributed.broadcast_float(elapsed, dist)
        lr = learning_rate(step, cfg, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Forward/backward over grad_accum consecutive segments, carrying state and memory (detached).
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            segment = next(data)
            if segment.first:
                carry = None
            sync = micro == cfg.grad_accum - 1 or not dist.enabled
            with contextlib.nullcontext() if sync else net.no_sync(), autocast:
                nll, carry = net(segment.input.to(device), carry, targets=segment.target.to(device))
                loss = nll.mean()
            scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        loss_value = float(distributed.mean_over_ranks(loss_sum / cfg.grad_accum, dist))
        if not math.isfinite(loss_value):
            bar.close()
            kept = f"The last good checkpoint is {last_path} (step {saved_step}); " if saved_step is not None else ""
            raise FloatingPointError(
                f"training stopped at step {step + 1}: the loss is {loss_value}. "
                + (kept or "No checkpoint was written yet; ")
                + "lower --lr or raise --warmup_steps, then resume or restart."
            )

        # Clip the global gradient norm (unscaled first under fp16), step, update the loss scale.
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad))
        scaler.step(optimizer)
        scaler.update()
        step += 1
        result.losses.append(loss_value)

        step_rate = cfg.tokens_per_step / (time.perf_counter() - tick)
        tokens_per_s = step_rate if tokens_per_s == 0 else 0.9 * tokens_per_s + 0.1 * step_rate
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
        if dist.is_main and (step % cfg.log_every == 0 or step == cfg.max_steps):
            record = {"step": step, "loss": loss_value, f"train_{metric}": to_metric(loss_value), "lr": lr}
            log.write({**record, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s})

        # Evaluate, keep the best checkpoint, write the last one.
        stopped = out_of_time()
        finished = step == cfg.max_steps or stopped
        if step % cfg.eval_every == 0 or finished:
            valid_loss = math.nan
            if dist.is_main:
                valid_loss = evaluate(
                    model,
                    valid_tokens,
                    batch_size=cfg.eval_batch_size,
                    unroll=cfg.resolved_eval_unroll,
                    max_tokens=cfg.eval_tokens,
                    device=device,
                    autocast=_autocast(cfg, device),
                )
            valid_loss = distributed.broadcast_float(valid_loss, dist)
            improved = valid_loss < best
            best = min(best, valid_loss)
            record = {"step": step, "valid_loss": valid_loss, f"valid_{metric}": to_metric(valid_loss)}
            result.valid.append(record)
            if dist.is_main:
                log.write(record)
                bar.write(f"step {step:>6}  train {metric} {to_metric(loss_value):.3f}  valid {metric} "
                          f"{to_metric(valid_loss):.3f}  ({tokens_per_s:,.0f} tok/s)")  # fmt: skip
                plot_curve(log.records, run_dir / "learning_curve.png", metric=metric)
            if improved:
                checkpoint(best_path, valid_loss)
            checkpoint(last_path, valid_loss)
            saved_step = step
        elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint(last_path, None)
            saved_step = step
    if step > 0 and (not result.valid or result.valid[-1]["step"] != step):
        checkpoint(last_path, None)
    bar.close()
    result.step, result.best_valid_loss, result.model = step, best, model
    return result
