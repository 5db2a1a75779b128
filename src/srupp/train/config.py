"""The training configuration: presets in ``configs/``, JSON files and ``--key value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srupp.errors import ConfigError, ConfigTypeError
from srupp.models.config import LMConfig, check_number
from srupp.ops import BACKENDS

OPTIMIZERS = ("radam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "mixed")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("off", "default", "reduce-overhead")
CHOICES = {
    "optimizer": OPTIMIZERS,
    "precision": PRECISIONS,
    "device": DEVICES,
    "backend": BACKENDS,
    "compile_mode": COMPILE_MODES,
}
# A resume continues the same stream of data and the same model: these cannot change on the way (nor the
# optimizer, whose saved state another one cannot read). Its hyper-parameters (betas, weight_decay) may change:
# the resumed optimizer takes the new values (see srupp.train.loop.optimizer_settings).
FIXED_ON_RESUME = ("data", "batch_size", "unroll_size", "grad_accum", "seed", "optimizer")


def presets_dir() -> Path:
    """The presets shipped in the package, ``srupp/configs/`` (``SRUPP_CONFIGS`` overrides it)."""
    return Path(os.environ.get("SRUPP_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


@dataclass
class TrainConfig:
    """Everything ``train`` needs. ``batch_size`` is global: each of N DDP ranks gets ``batch_size / N`` streams.

    Args:
        model: the architecture.
        data: a directory written by ``srupp data prepare``, or ``"stdlib"`` for the embedded demo corpus
            (prepared into ``<out_dir>/data``).
            The vocabulary size of ``model`` must equal the corpus's.
        out_dir: run directory (config, metrics, learning curve, checkpoints).
        batch_size: streams B per update over all ranks; ``unroll_size``: segment length M.
        grad_accum: consecutive segments per update (tokens per update = batch_size * unroll_size * grad_accum).
        max_steps: updates to run; ``schedule_steps``: cosine length (None = max_steps), so a run can stop
            early and be resumed on the same schedule.
        time_limit_s: also stop (saving a checkpoint) after this many seconds of training; None or 0: no limit.
        anneal_by_time: the cosine follows ``max(step / schedule, elapsed / time_limit_s)`` so a time-limited run
            (the demo) ends its schedule on any machine; such a run is not exactly resumable. Without a time limit
            there is no time to follow: it is set to false and the cosine follows the steps.
        lr, warmup_steps, weight_decay, optimizer, betas, clip_grad: the optimisation recipe (the authors' LM scripts).
        precision: ``"fp32"``; ``"bf16"`` (bf16 autocast, no loss scaling); ``"mixed"``: bf16 autocast on the CPU
            and on GPUs of compute capability 8.0+, fp16 autocast with a GradScaler on older GPUs; ``"auto"``:
            on the CPU bf16 where it has AMX-BF16 or AVX512-BF16 (``srupp.ops.cpu_kernel_info()["bf16_matmul"]``)
            and fp32 elsewhere, on a GPU ``"mixed"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        eval_every: evaluate on the valid split every N updates (and at the end), writing checkpoints.
        eval_batch_size, eval_unroll_size (None = unroll_size), eval_tokens (cap per evaluation, None = all).
        checkpoint_every: also write the last checkpoint every N updates (None = only at evaluations).
        log_every: train-loss records in ``metrics.jsonl``; ``progress``: show a tqdm bar.
        stop_check_every: under DDP the ranks agree whether to stop (a SIGTERM or SIGINT to any rank,
            ``time_limit_s`` on rank 0's clock) every N updates, so a signal is answered, and the time limit
            overshot, within N updates; in between no update waits for the other ranks or the device. One process
            checks at every update (that costs nothing).
        num_threads: torch CPU threads (None leaves torch's default).
        backend: the recurrence backend (``"auto"``, ``"naive"``, ``"cpu"``, ``"triton"``), a runtime choice of
            this run: checkpoints do not carry it into evaluation.
        compile_mode: ``"off"``, or run the model's forward and backward through ``torch.compile`` in this mode;
            ``"reduce-overhead"`` captures them in CUDA graphs on a GPU (the optimizer step stays eager).
        description, paper: documentation only (a preset's purpose and the paper's reported numbers).
    """

    model: LMConfig = field(default_factory=LMConfig)
    data: str = "stdlib"
    out_dir: str = "runs/default"
    batch_size: int = 16
    unroll_size: int = 128
    grad_accum: int = 1
    max_steps: int = 1000
    schedule_steps: int | None = None
    time_limit_s: float | None = None
    anneal_by_time: bool = False
    lr: float = 3e-4
    warmup_steps: int = 0
    weight_decay: float = 0.1
    optimizer: str = "radam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 1.0
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 1234
    eval_every: int = 200
    eval_batch_size: int = 8
    eval_unroll_size: int | None = None
    eval_tokens: int | None = None
    checkpoint_every: int | None = None
    log_every: int = 1
    stop_check_every: int = 10
    progress: bool = True
    num_threads: int | None = None
    backend: str = "auto"
    compile_mode: str = "off"
    description: str = ""
    paper: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            try:
                self.model = LMConfig.from_dict(self.model)
            except ConfigTypeError as err:
                raise ConfigTypeError(f"`model`: {err}") from err
            except (TypeError, ValueError) as err:
                raise ConfigError(f"`model`: {err}") from err
        if not isinstance(self.model, LMConfig):
            raise ConfigError(f"`model` must be an LMConfig or a dict, got {type(self.model).__name__}")
        counts = ("batch_size", "unroll_size", "grad_accum", "eval_every", "eval_batch_size", "log_every")
        for name in (*counts, "stop_check_every"):
            check_number(name, getattr(self, name), integer=True, low=1)
        for name in ("schedule_steps", "eval_unroll_size", "eval_tokens", "checkpoint_every", "num_threads"):
            check_number(name, getattr(self, name), integer=True, low=1, optional=True)
        for name in ("max_steps", "warmup_steps", "seed"):
            check_number(name, getattr(self, name), integer=True, low=0)
        check_number("lr", self.lr, low=0.0, strict=True)
        check_number("clip_grad", self.clip_grad, low=0.0, strict=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("time_limit_s", self.time_limit_s, low=0.0, optional=True)
        if self.time_limit_s == 0:
            self.time_limit_s = None  # 0 reads as "no limit", as none does
        if self.time_limit_s is None and isinstance(self.anneal_by_time, bool):
            self.anneal_by_time = False
        if not isinstance(self.betas, list | tuple) or len(self.betas) != 2:
            raise ConfigError(f"`betas` must be two numbers in [0, 1), got {self.betas!r}")
        for value in self.betas:
            check_number("betas", value, low=0.0, high=1.0)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("anneal_by_time", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigTypeError(f"`{name}` must be true or false, got {getattr(self, name)!r}")
        for name in ("data", "out_dir", "description"):
            if not isinstance(getattr(self, name), str):
                raise ConfigTypeError(f"`{name}` must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.paper, dict):
            raise ConfigTypeError(f"`paper` must be an object, got {self.paper!r}")

    @property
    def total_schedule_steps(self) -> int:
        return self.schedule_steps or self.max_steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.unroll_size * self.grad_accum

    @property
    def resolved_eval_unroll(self) -> int:
        return self.eval_unroll_size or self.unroll_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            values = json.loads(text)
        except (ValueError, RecursionError) as err:  # RecursionError: nested deeper than the parser goes
            raise ConfigError(f"invalid JSON ({err})") from err
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(values).__name__}")
        return cls.from_dict(values)


def load_preset(name_or_path: str) -> TrainConfig:
    """A JSON config file, or the name of a preset in ``configs/`` (``enwik8-base``, ``demo``, ``tiny``, ...)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = presets_dir() / f"{name_or_path}.json"
    if not path.is_file():
        available = sorted(p.stem for p in presets_dir().glob("*.json"))
        raise FileNotFoundError(f"no config file or preset named {name_or_path!r}; presets: {available}")
    try:
        return TrainConfig.from_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ConfigError, ConfigTypeError) as err:
        raise ConfigError(f"config file {path}: {err}") from err


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, text: str, kind: Any) -> Any:
    """Turn the command-line string ``text`` into a value of the field type ``kind``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        return _coerce(key, text, args[0])
    origin = typing.get_origin(kind) or kind
    try:
        if origin is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if origin is int:
            return int(text)
        if origin is float:
            return float(text)
        if origin is str:
            return text
        if origin in (list, dict):
            value = json.loads(text) if text.strip()[:1] in "[{" else [json.loads(v) for v in text.split(",")]
            if not isinstance(value, origin):
                raise ValueError(text)
            return value
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"`--{key}` must be a {getattr(kind, '__name__', kind)}, got {text!r}") from err
    raise NotImplementedError(f"`--{key}`: overriding fields of type {kind} is not supported")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Return ``cfg`` with ``{"key": "value"}`` overrides coerced to each field's type.

    Keys are TrainConfig fields, ``model.<field>``, or a bare LMConfig field name (``hidden_size``).
    Unknown keys raise ValueError naming them.
    """
    train_types, model_types = _field_types(TrainConfig), _field_types(LMConfig)
    train_values, model_values = cfg.to_dict(), cfg.model.to_dict()
    for raw_key, text in overrides.items():
        key = raw_key.replace("-", "_")
        if key.startswith("model."):
            key = key[len("model.") :]
            if key not in model_types:
                raise ConfigError(f"unknown config key {raw_key!r}; model keys: {sorted(model_types)}")
            model_values[key] = _coerce(raw_key, text, model_types[key])
        elif key in train_types and key != "model":
            train_values[key] = _coerce(raw_key, text, train_types[key])
        elif key in model_types:
            model_values[key] = _coerce(raw_key, text, model_types[key])
        else:
            known = sorted(set(train_types) - {"model"} | set(model_types))
            raise ConfigError(f"unknown config key {raw_key!r}; known keys: {known}")
    train_values["model"] = model_values
    return TrainConfig.from_dict(train_values)


def check_threads(name: str, count: int) -> int:
    """``count`` if it is a thread count this machine can run (1 to its CPU count), else ConfigError: torch's
    thread pool crashes the process on absurd counts."""
    cpus = os.cpu_count() or 1
    check_number(name, count, integer=True, low=1, at_most=cpus)
    return count


def check_resume(cfg: TrainConfig, saved: dict[str, Any], source: str | os.PathLike) -> None:
    """Raise ConfigError if ``cfg`` changes a setting that a resume of the run saved as ``saved`` must keep."""
    for name in FIXED_ON_RESUME:
        if saved.get(name) != getattr(cfg, name):
            raise ConfigError(
                f"`{name}` cannot change when resuming {source}: the run used {saved.get(name)!r}, got "
                f"{getattr(cfg, name)!r}; start a new run (another --out_dir) to change it"
            )
