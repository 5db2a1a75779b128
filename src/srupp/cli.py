"""Command line: argument parsing only; the work happens in srupp.data, srupp.train and srupp.models."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from srupp import __version__

EPILOG_OVERRIDES = (
    "Any config field can be overridden with --KEY VALUE: training fields (--lr 1e-3, --max_steps 500) and "
    "model fields (--hidden_size 256 or --model.hidden_size 256). Unknown keys are an error."
)


def _overrides(extra: list[str]) -> dict[str, str]:
    """``["--lr", "1e-3", "--x=2"]`` -> ``{"lr": "1e-3", "x": "2"}``."""
    out, i = {}, 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or len(item) == 2:
            raise ValueError(f"expected --KEY VALUE overrides, got {item!r}")
        if "=" in item:
            key, value = item[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ValueError(f"override {item} needs a value")
            key, value = item[2:], extra[i + 1]
            i += 2
        out[key] = value
    return out


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from srupp.train import TrainConfig, apply_overrides, load_checkpoint, load_preset, train

    overrides = _overrides(extra)
    if args.resume:
        ckpt = load_checkpoint(Path(args.resume) / "checkpoints" / "last.safetensors")
        cfg = apply_overrides(TrainConfig.from_dict(ckpt.config), {**overrides, "out_dir": args.resume})
    else:
        cfg = apply_overrides(load_preset(args.config), overrides)
    result = train(cfg, resume=bool(args.resume))
    if result.valid and os.environ.get("RANK", "0") == "0":
        last = result.valid[-1]
        metric = "valid_bpc" if "valid_bpc" in last else "valid_ppl"
        print(f"done: step {result.step}, {metric.replace('_', ' ')} {last[metric]:.4f}, run in {cfg.out_dir}")
    return 0


def _load(args: argparse.Namespace):
    from srupp.train import load_model
    from srupp.train.distributed import resolve_device

    device = resolve_device(args.device)
    model, cfg, vocab, _ = load_model(args.checkpoint, device)
    return model, cfg, vocab, device


def _cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from srupp.train import bpc, evaluate, ppl
    from srupp.train.loop import resolve_corpus

    model, cfg, vocab, device = _load(args)
    corpus = resolve_corpus(args.data or cfg.data, cfg.out_dir)
    if corpus.vocab != vocab:
        raise ValueError(f"corpus {corpus.path} has a different vocabulary from checkpoint {args.checkpoint}")
    context = args.context or cfg.resolved_eval_unroll
    tokens = corpus.split(args.split)
    start = time.perf_counter()
    nats = evaluate(
        model, tokens, batch_size=args.batch_size, unroll=context, max_tokens=args.max_tokens, device=device
    )
    seconds = time.perf_counter() - start
    count = min(len(tokens) - 1, args.max_tokens or len(tokens))
    value = f"bpc {bpc(nats):.4f}" if vocab.kind == "byte" else f"ppl {ppl(nats):.3f}"
    print(f"{args.split}: {value} (loss {nats:.4f} nats, context {context}, ~{count:,} tokens, {seconds:.1f}s)")
    return 0


def _cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from srupp.data.corpus import EOS
    from srupp.models import generate

    torch.set_num_threads(args.threads)
    model, cfg, vocab, device = _load(args)
    # An empty prompt starts at a line break; word vocabularies spell it <eos> (encode drops newlines).
    prompt = vocab.encode(args.prompt) or vocab.encode("\n" if vocab.kind == "byte" else EOS)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stream = generate(
        model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_context=args.context, generator=generator,
    )  # fmt: skip
    print(args.prompt, end="", flush=True)
    start, count, pending = time.perf_counter(), 0, []
    for token in stream:
        count += 1
        pending.append(token)
        text = vocab.decode(pending)
        if vocab.kind == "word" or "\ufffd" not in text or len(pending) > 4:
            sys.stdout.write(text if vocab.kind == "byte" else " " + text)
            sys.stdout.flush()
            pending = []
    seconds = time.perf_counter() - start
    print(f"\n[{count} tokens in {seconds:.2f}s: {count / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _cmd_data_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from srupp import data

    source = args.source
    if args.download:
        if args.corpus not in data.URLS and not args.url:
            raise ValueError(f"--download needs --url for corpus {args.corpus!r}")
        url = args.url or data.URLS[args.corpus]
        archive = Path(args.out) / "download" / Path(url).name
        print(f"downloading {url} -> {archive}")
        data.download(url, archive, sha256=args.sha256)
        print(f"sha256 {data.sha256_file(archive)}")
        source = archive
    if source is None and args.corpus != "stdlib":
        raise ValueError(f"`--source` (a file or folder) or --download is needed for corpus {args.corpus!r}")
    if args.corpus == "enwik8":
        corpus = data.prepare_enwik8(source, args.out, check_size=not args.no_size_check)
    elif args.corpus == "text8":
        corpus = data.prepare_text8(source, args.out, check_size=not args.no_size_check)
    elif args.corpus == "wt103":
        corpus = data.prepare_wikitext103(source, args.out)
    elif args.corpus == "stdlib":
        corpus = data.prepare_stdlib(args.out)
    else:
        corpus = data.prepare_text(source, args.out, valid_ratio=args.valid_ratio, test_ratio=args.test_ratio)
    sizes = ", ".join(f"{k} {v:,}" for k, v in corpus.lengths.items())
    print(f"prepared {args.corpus} in {corpus.path}: {corpus.vocab.kind}-level, vocab {corpus.vocab.size:,}; {sizes}")
    return 0


def _cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from srupp.models import generate
    from srupp.train import apply_overrides, load_preset, train

    overrides = {"out_dir": args.out, **_overrides(extra)}
    if args.time_limit is not None:
        overrides["time_limit_s"] = str(args.time_limit)
    cfg = apply_overrides(load_preset("demo"), overrides)
    print(
        f"srupp demo: a byte-level SRU++ LM ({cfg.model.num_parameters / 1e6:.2f}M parameters, "
        f"{cfg.model.num_layers} layers, d={cfg.model.hidden_size}, d'={cfg.model.proj_size}) on the Python "
        f"standard library's source, for {cfg.time_limit_s or float('inf'):.0f}s (at most {cfg.max_steps} steps)"
    )
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    best = min(r["valid_bpc"] for r in result.valid)
    print(f"\ntrained {result.step} steps in {minutes:.1f} min; valid bpc {result.valid[-1]['valid_bpc']:.3f} "
          f"(best {best:.3f}); learning curve: {Path(cfg.out_dir) / 'learning_curve.png'}")  # fmt: skip
    print("sample (temperature 0.8, top-p 0.95):\n")
    prompt = "def "
    print(prompt, end="", flush=True)
    generator = torch.Generator().manual_seed(0)
    torch.set_num_threads(1)  # sampling is latency-bound: see the --threads default of `srupp generate`
    model = result.model.eval()
    pending: list[int] = []
    for token in generate(model, list(prompt.encode()), args.sample_bytes, temperature=0.8, top_p=0.95,
                          generator=generator):  # fmt: skip
        pending.append(token)
        text = bytes(pending).decode("utf-8", errors="replace")
        if "\ufffd" not in text or len(pending) > 4:
            print(text, end="", flush=True)
            pending = []
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srupp", description="Train, evaluate and sample SRU++ language models.")
    parser.add_argument("--version", action="version", version=f"srupp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a language model (DDP under torchrun)", epilog=EPILOG_OVERRIDES)
    p.add_argument("--config", default="demo", help="a preset in configs/ (enwik8-base, ...) or a JSON file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly from its last checkpoint")
    p.set_defaults(func=_cmd_train)

    for name, helptext in (("eval", "bits per character or perplexity"), ("generate", "sample text")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint written by srupp train")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        if name == "eval":
            p.add_argument("--data", help="prepared corpus directory (default: the one the model was trained on)")
            p.add_argument("--split", default="test", choices=("train", "valid", "test"))
            p.add_argument("--context", type=int, help="segment length and attention window (paper: 3072 enwik8)")
            p.add_argument("--batch-size", type=int, default=1)
            p.add_argument("--max-tokens", type=int, help="score only the first N tokens")
            p.set_defaults(func=_cmd_eval)
        else:
            p.add_argument("--prompt", default="")
            p.add_argument("--max-new-tokens", type=int, default=300)
            p.add_argument("--temperature", type=float, default=0.8)
            p.add_argument("--top-k", type=int)
            p.add_argument("--top-p", type=float, default=0.95)
            p.add_argument("--context", type=int, help="attention cache length (default: unlimited)")
            p.add_argument("--seed", type=int, default=0)
            # One token at a time is a chain of tiny ops: extra CPU threads only add synchronisation
            # (demo model, 2 cores, 1000 tokens: 318 tokens/s with 2 threads, 353 with 1).
            p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for sampling)")
            p.set_defaults(func=_cmd_generate)

    data = sub.add_parser("data", help="corpus preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="write memory-mapped token files for a corpus")
    p.add_argument("corpus", choices=("enwik8", "text8", "wt103", "text", "stdlib"))
    p.add_argument("--source", help="the archive, file or folder to read")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--download", action="store_true", help="fetch the corpus from its public address first")
    p.add_argument("--url", help="download from this address instead")
    p.add_argument("--sha256", help="expected sha256 of the downloaded archive")
    p.add_argument("--valid-ratio", type=float, default=0.05)
    p.add_argument("--test-ratio", type=float, default=0.05)
    p.add_argument("--no-size-check", action="store_true", help="accept enwik8/text8 files of any size")
    p.set_defaults(func=_cmd_data_prepare)

    p = sub.add_parser("demo", help="train a small byte-level model on CPU for a few minutes", epilog=EPILOG_OVERRIDES)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--time-limit", type=float, help="stop training after this many seconds")
    p.add_argument("--sample-bytes", type=int, default=400)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "demo"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, NotImplementedError) as err:
        print(f"srupp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"srupp {args.command}: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"srupp {args.command}: interrupted", file=sys.stderr)
        return 130
