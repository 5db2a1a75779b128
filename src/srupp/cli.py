"""Command line: argument parsing only; the work happens in srupp.data, srupp.train and srupp.models."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from srupp import __version__
from srupp.errors import ConfigError, DivergenceError, SRUppError
from srupp.ops import BACKENDS

DEFAULT_CONTEXT = 512  # eval of a model whose training config is unknown (an export of a bare model)
GRAMMAR = "Every option is spelled --a-b or --a_b alike; --KEY=VALUE works too."


def normalize_argv(argv: list[str]) -> list[str]:
    """One spelling for every option: ``--max_new_tokens`` and ``--max-new-tokens`` both become the latter
    (config overrides turn dashes back into underscores); values and ``--key=value`` values are left alone."""
    out = []
    for item in argv:
        if item.startswith("--") and len(item) > 2:
            name, sep, value = item.partition("=")
            item = name.replace("_", "-") + sep + value
        out.append(item)
    return out


def _type_name(kind) -> str:
    """``int | None`` -> ``INT|none``, ``list[float]`` -> ``LIST[FLOAT]``: how a field's type reads in help."""
    import types
    import typing

    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return "|".join("none" if a is type(None) else _type_name(a) for a in args)
    if kind is bool:
        return "true|false"
    name = getattr(typing.get_origin(kind) or kind, "__name__", str(kind)).upper()
    return f"{name}[{','.join(_type_name(a) for a in args)}]" if args else name


def _fields_help(cls, prefix: str = "") -> list[str]:
    import dataclasses
    import typing

    hints, lines = typing.get_type_hints(cls), []
    for item in dataclasses.fields(cls):
        if item.name in ("model", "paper", "description"):
            continue
        default = item.default_factory() if item.default is dataclasses.MISSING else item.default
        default = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
        lines.append(f"  --{prefix}{item.name} {_type_name(hints[item.name])}  (default {default})")
    return lines


def config_help() -> str:
    """The epilog of ``train`` and ``demo``: every config field with its type and default, and the presets."""
    from srupp.models import LMConfig
    from srupp.train import TrainConfig, load_preset
    from srupp.train.config import presets_dir

    lines = [GRAMMAR, "", "training fields (--KEY VALUE overrides the preset's value; none = unset):"]
    lines += _fields_help(TrainConfig)
    lines += ["", "model fields (--KEY VALUE or --model.KEY VALUE):", *_fields_help(LMConfig)]
    lines += ["", "presets (--config NAME, or a JSON file of these fields):"]
    for path in sorted(presets_dir().glob("*.json")):
        try:
            description = load_preset(str(path)).description
        except (SRUppError, OSError) as err:
            description = f"(unreadable: {err})"
        lines.append(f"  {path.stem}: {description}")
    return "\n".join(lines)


def _number(kind: type, low: float, *, strict: bool = False, high: float | None = None):
    """An argparse ``type`` accepting finite ``kind`` values >= ``low`` (> with ``strict``) and <= ``high``."""
    bound = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite {kind.__name__} {bound}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be a finite {kind.__name__} {bound}, got {text!r}")
        return value

    return parse


def _overrides(extra: list[str]) -> dict[str, str]:
    """``["--lr", "1e-3", "--x=2"]`` -> ``{"lr": "1e-3", "x": "2"}``."""
    out, i = {}, 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(f"expected --KEY VALUE overrides, got {item!r}")
        if "=" in item:
            key, value = item[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"override {item} needs a value")
            key, value = item[2:], extra[i + 1]
            i += 2
        out[key.replace("-", "_")] = value  # config fields are spelled with underscores
    return out


def _cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from srupp.train import TrainConfig, apply_overrides, load_preset, train
    from srupp.train.checkpoint import read_checkpoint_config
    from srupp.train.rundir import nothing_to_resume

    if args.backend:
        overrides["backend"] = args.backend
    if args.resume:
        last = Path(args.resume) / "checkpoints" / "last.safetensors"
        if not last.is_file():
            raise nothing_to_resume(args.resume)
        # The header alone: train() loads and verifies the whole checkpoint once, when it resumes.
        saved = read_checkpoint_config(last)
        cfg = apply_overrides(TrainConfig.from_dict(saved), {**overrides, "out_dir": args.resume})
    else:
        cfg = apply_overrides(load_preset(args.config), overrides)
    result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    if result.valid and result.is_main:
        last = result.valid[-1]
        metric = "valid_bpc" if "valid_bpc" in last else "valid_ppl"
        print(f"done: step {result.step}, {metric.replace('_', ' ')} {last[metric]:.4f}, run in {cfg.out_dir}")
    return 0


def _load(args: argparse.Namespace):
    """``(model, TrainConfig or None, Vocab, device, path)`` of MODEL: a run folder, a checkpoint file or an
    ``srupp export hf`` folder (a config.json beside a model.safetensors)."""
    from srupp.errors import UnavailableError
    from srupp.train import load_model, resolve_checkpoint
    from srupp.train.distributed import resolve_device

    if args.model is not None and args.checkpoint is not None:
        raise ConfigError("give the model once: MODEL or --checkpoint, not both")
    if args.model is None and args.checkpoint is None:
        raise ConfigError("MODEL is needed: a run folder, a .safetensors checkpoint or an `srupp export hf` folder")
    path, device = Path(args.model or args.checkpoint), resolve_device(args.device)
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        try:
            from srupp.hf import load_export
        except ImportError as err:
            raise UnavailableError(f"reading the Hugging Face folder {path} needs `pip install 'srupp[hf]'`") from err
        model, cfg, vocab = load_export(path, device, backend=args.backend)
        return model, cfg, vocab, device, path
    path = resolve_checkpoint(path)
    model, cfg, vocab, _ = load_model(path, device, backend=args.backend)
    return model, cfg, vocab, device, path


def _cmd_eval(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from srupp.train import bpc, evaluate, ppl
    from srupp.train.evaluate import evaluation_corpus

    model, cfg, vocab, device, path = _load(args)
    if cfg is None and args.data is None:
        raise ConfigError(f"{path} does not say which corpus it was trained on: pass --data DIR")
    corpus = evaluation_corpus(path, None if cfg is None else cfg.data, vocab, args.data)
    context = args.context or (cfg.resolved_eval_unroll if cfg is not None else DEFAULT_CONTEXT)
    tokens = corpus.split(args.split)
    start = time.perf_counter()
    nats = evaluate(
        model, tokens, batch_size=args.batch_size, unroll=context, max_tokens=args.max_tokens, device=device
    )
    seconds = time.perf_counter() - start
    count = min(len(tokens) - 1, args.max_tokens or len(tokens))
    if vocab.kind == "word":
        value = f"ppl {ppl(nats):.3f}"
    else:  # bits per byte of the scored text, for byte and BPE corpora alike
        value = f"bpc {bpc(nats, corpus.bytes_per_token(args.split, count)):.4f}"
    print(f"{args.split}: {value} (loss {nats:.4f} nats, context {context}, ~{count:,} tokens, {seconds:.1f}s)")
    return 0


def _cmd_generate(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import torch

    from srupp.train.sample import sample_text

    torch.set_num_threads(args.threads)
    model, _, vocab, device, _ = _load(args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pieces = sample_text(
        model,
        vocab,
        args.prompt,
        args.max_new_tokens,
        generator=generator,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_context=args.context,
    )
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    seconds = time.perf_counter() - start
    count = args.max_new_tokens
    print(f"\n[{count} tokens in {seconds:.2f}s: {count / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _download(args: argparse.Namespace) -> Path:
    """Fetch the corpus of ``prepare --download`` into ``<out>/download/``; returns what to prepare from."""
    from srupp import data
    from srupp.data.download import WT103_REPO

    folder = Path(args.out) / "download"
    if args.corpus == "wt103" and not args.url:
        print(f"downloading WikiText-103 from the Hugging Face Hub ({WT103_REPO}) -> {folder}")
        return data.download_wikitext103(folder / "wikitext-103")
    if args.corpus not in data.ARCHIVES and not args.url:
        raise ConfigError(f"--download needs --url for corpus {args.corpus!r}")
    known = data.ARCHIVES.get(args.corpus) if not args.url else None
    url = args.url or known.url
    archive = folder / Path(url).name
    print(f"downloading {url} -> {archive}")
    data.download(url, archive, sha256=args.sha256, size=known.size if known else None)
    print(f"sha256 {data.sha256_file(archive)} (recorded in {archive}.sha256 and checked on every later use)")
    return archive


def _cmd_data_prepare(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from srupp import data

    source, out, overwrite = args.source, args.out, args.overwrite
    if args.tokenizer != "bytes" and args.corpus != "text":
        raise ConfigError(f"--tokenizer applies to corpus 'text' only, got corpus {args.corpus!r}")
    if args.download:
        source = _download(args)
    if source is None and args.corpus != "stdlib":
        raise ConfigError(f"`--source` (a file or folder) or --download is needed for corpus {args.corpus!r}")
    if args.corpus in ("enwik8", "text8"):
        prepare = data.prepare_enwik8 if args.corpus == "enwik8" else data.prepare_text8
        corpus = prepare(source, out, check_size=not args.no_size_check, overwrite=overwrite)
    elif args.corpus == "wt103":
        corpus = data.prepare_wikitext103(source, out, overwrite=overwrite)
    elif args.corpus == "stdlib":
        corpus = data.prepare_stdlib(out, overwrite=overwrite)
    else:
        ratios = {"valid_ratio": args.valid_ratio, "test_ratio": args.test_ratio}
        corpus = data.prepare_text(source, out, **ratios, tokenizer=args.tokenizer, overwrite=overwrite)
    sizes = ", ".join(f"{k} {v:,}" for k, v in corpus.lengths.items())
    print(f"prepared {args.corpus} in {corpus.path}: {corpus.vocab.kind}-level, vocab {corpus.vocab.size:,}; {sizes}")
    return 0


def _cmd_demo(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import torch

    from srupp.train import apply_overrides, load_preset, train
    from srupp.train.sample import sample_text

    cfg = apply_overrides(load_preset("demo"), {"out_dir": args.out, **overrides})
    print(
        f"srupp demo: a byte-level SRU++ LM ({cfg.model.num_parameters / 1e6:.2f}M parameters, "
        f"{cfg.model.num_layers} layers, d={cfg.model.hidden_size}, d'={cfg.model.proj_size}) on the Python "
        f"standard library's source, {f'for {cfg.time_limit_s:.0f}s (at most ' if cfg.time_limit_s else 'for '}"
        f"{cfg.max_steps} steps{')' if cfg.time_limit_s else ''}"
    )
    start = time.perf_counter()
    result = train(cfg, overwrite=True)  # an earlier demo's files are moved into <out>/replaced/, not lost
    minutes = (time.perf_counter() - start) / 60
    best = min(r["valid_bpc"] for r in result.valid)
    curve = Path(cfg.out_dir) / "learning_curve.png"
    where = f"learning curve: {curve}" if curve.is_file() else f"metrics: {curve.parent / 'metrics.jsonl'}"
    print(
        f"\ntrained {result.step} steps in {minutes:.1f} min; valid bpc {result.valid[-1]['valid_bpc']:.3f} "
        f"(best {best:.3f}); {where}"
    )
    print("sample (temperature 0.8, top-p 0.95):\n")
    torch.set_num_threads(1)  # sampling is latency-bound: see the --threads default of `srupp generate`
    from srupp.data import Vocab

    print("def ", end="", flush=True)
    for piece in sample_text(
        result.model.eval(),
        Vocab("byte"),
        "def ",
        args.sample_bytes,
        temperature=0.8,
        top_p=0.95,
        generator=torch.Generator().manual_seed(0),
    ):
        print(piece, end="", flush=True)
    print()
    return 0


def _cmd_export(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from srupp.errors import UnavailableError
    from srupp.files import refuse_inside
    from srupp.train import load_model, resolve_checkpoint

    checkpoint, out = resolve_checkpoint(args.run), Path(args.out)
    refuse_inside(out, checkpoint)
    extra = "hf" if args.format == "hf" else "onnx"
    try:
        if args.format == "hf":
            from srupp.hf import export_checkpoint
        else:
            from srupp.onnx import export_onnx
    except ImportError as err:
        raise UnavailableError(f"`srupp export {args.format}` needs `pip install 'srupp[{extra}]'` ({err})") from err
    if args.format == "hf":
        export_checkpoint(checkpoint, out, overwrite=args.overwrite)
    else:
        if out.exists() and not args.overwrite:
            raise ConfigError(f"`out` {out} already exists; pass --overwrite to replace it")
        model, _, _, _ = load_model(checkpoint, "cpu", backend=args.backend)
        export_onnx(model, out, with_state=args.with_state, overwrite=args.overwrite)
    print(f"exported {checkpoint} -> {out}")
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    where = "a run folder (its best, else last checkpoint), a .safetensors checkpoint or an `srupp export hf` folder"
    p.add_argument("model", nargs="?", metavar="MODEL", help=where)
    p.add_argument("--checkpoint", metavar="MODEL", help="the same as MODEL")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="recurrence backend (a runtime choice)")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a language model (DDP under torchrun)",
        description=(
            "Train a language model (DDP under torchrun). SIGTERM or Ctrl-C finishes the update, writes\n"
            "checkpoints/last.safetensors and exits with 128 + the signal number. Under DDP the ranks agree on\n"
            "stopping every --stop_check_every updates (a signal to any rank; --time_limit_s on rank 0's clock):\n"
            "that many updates and a checkpoint write should fit in the scheduler's grace period."
        ),
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="demo", help="a preset in configs/ (enwik8-base, ...) or a JSON file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="move the files of a run already in --out_dir aside")
    p.add_argument("--backend", choices=BACKENDS, help="recurrence backend (default: the config's, auto)")
    p.set_defaults(func=_cmd_train)


def _add_eval(sub) -> None:
    count = _number(int, 1)
    p = sub.add_parser("eval", help="bits per character or perplexity")
    _add_model_options(p)
    p.add_argument("--data", help="prepared corpus directory (default: the one the model was trained on)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--context", type=count, help="segment length and attention window (paper: 3072 enwik8)")
    p.add_argument("--batch-size", type=count, default=1)
    p.add_argument("--max-tokens", type=count, help="score only the first N tokens")
    p.set_defaults(func=_cmd_eval)


def _add_generate(sub) -> None:
    count = _number(int, 1)
    p = sub.add_parser("generate", help="sample text")
    _add_model_options(p)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=_number(int, 0), default=300)
    p.add_argument("--temperature", type=_number(float, 0.0), default=0.8, help="0: greedy (the most likely token)")
    p.add_argument("--top-k", type=count)
    p.add_argument("--top-p", type=_number(float, 0.0, strict=True, high=1.0), default=0.95)
    p.add_argument("--context", type=count, help="attention cache length (default: unlimited)")
    p.add_argument("--seed", type=int, default=0)
    # One token at a time is a chain of tiny ops: extra CPU threads only add synchronisation.
    p.add_argument(
        "--threads",
        type=_number(int, 1, high=os.cpu_count() or 1),
        default=1,
        help="torch CPU threads, at most the CPU count (default 1: fastest for sampling)",
    )
    p.set_defaults(func=_cmd_generate)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="corpus preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="write memory-mapped token files for a corpus")
    p.add_argument("corpus", choices=("enwik8", "text8", "wt103", "text", "stdlib"))
    p.add_argument("--source", help="the archive, file or folder to read")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus already prepared in --out")
    p.add_argument("--download", action="store_true", help="fetch the corpus from its public address first")
    p.add_argument("--url", help="download from this address instead")
    p.add_argument("--sha256", help="expected sha256 of the downloaded archive")
    p.add_argument("--valid-ratio", type=_number(float, 0.0, high=0.5), default=0.05)
    p.add_argument("--test-ratio", type=_number(float, 0.0, high=0.5), default=0.05)
    p.add_argument("--no-size-check", action="store_true", help="accept enwik8/text8 files of any size")
    p.add_argument(
        "--tokenizer",
        default="bytes",
        metavar="bytes|bpe:VOCAB|PATH",
        help="text only: bytes (default), a byte-level BPE of VOCAB ids trained on the training split, "
        "or a byte-level tokenizer.json",
    )
    p.set_defaults(func=_cmd_data_prepare)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="convert a training checkpoint for Hugging Face or ONNX Runtime")
    p.add_argument("format", choices=("hf", "onnx"))
    p.add_argument("run", metavar="RUN_DIR", help="a run folder (its best, else last checkpoint) or a checkpoint file")
    p.add_argument("out", metavar="OUT", help="hf: the folder to create; onnx: the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--with-state", action="store_true", help="onnx: recurrent state as an input and an output")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="onnx: recurrence backend to trace")
    p.set_defaults(func=_cmd_export)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small byte-level model on CPU for a few minutes",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--sample-bytes", type=_number(int, 0), default=400)
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and its options, one function a subcommand, in the order of ``srupp --help``."""
    parser = argparse.ArgumentParser(
        prog="srupp", description="Train, evaluate and sample SRU++ language models.", epilog=GRAMMAR
    )
    parser.add_argument("--version", action="version", version=f"srupp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_generate, _add_data, _add_export, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``srupp`` command line. Errors in the input (options, configs, files) and ``OSError`` print
    one line and return 2 (3 for a diverged run, 128 + the signal number for SIGTERM (143) or Ctrl-C (130)); anything
    else is a bug and raises."""
    from srupp.signals import raising_on_signals

    parser = build_parser()
    args, extra = parser.parse_known_args(normalize_argv(sys.argv[1:] if argv is None else list(argv)))
    if extra and args.command not in ("train", "demo"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with raising_on_signals():  # temporary files are removed on the way out; training checkpoints first
            return args.func(args, _overrides(extra))
    except DivergenceError as err:
        print(f"srupp {args.command}: {err}", file=sys.stderr)
        return 3
    except (SRUppError, OSError) as err:
        print(f"srupp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # srupp.signals.Interrupted for SIGTERM; Ctrl-C outside any command
        print(f"srupp {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
