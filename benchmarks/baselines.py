"""Byte-level language models for the benchmarks: one interface for SRU++, SRU, LSTM and a Transformer.

Every model is ``embedding -> body -> linear head`` over the 256 byte values, time-major like
``nn.LSTM``: ``forward(tokens [T, B], state=None, *, attn_window=None) -> (logits [T, B, 256], state)``.
Recurrent bodies return a state to carry into the next segment (``detach_state`` cuts it for
truncated backpropagation); the Transformer returns None and trains on independent windows. Every
body also decodes with a cache: ``init_decode(batch)`` then ``step(tokens [T, B], cache)``.

The Transformer baseline is GPT-style and written here: pre-LayerNorm blocks, rotary positions,
causal ``F.scaled_dot_product_attention``, a GELU MLP, and a key/value cache for decoding. The authors'
``sru`` package is loaded by ``load_authors`` (None where it does not import) and its SRUpp wrapped by
``AuthorsSRUppBody``. Sizing: ``closest_width`` (a width grid searched for a parameter count), and
``size_to_match`` built on it.

    >>> model = build("transformer", width=64, layers=2)
    >>> logits, _ = model(torch.randint(0, 256, (16, 2)))
    >>> sized = size_to_match(["srupp", "lstm", "transformer"], target=200_000, layers=2)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srupp.nn import SRU, SRUpp, SRUppState

VOCAB = 256
MODELS = ("srupp", "srupp_one_attn", "sru", "lstm", "transformer")
LABELS = {
    "srupp": "SRU++ (attention in every layer)",
    "srupp_one_attn": "SRU++ (attention in the last layer only)",
    "sru": "SRU",
    "lstm": "LSTM",
    "transformer": "Transformer (GPT-style)",
}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rotary_tables(positions: Tensor, head_size: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin ``[T, head_size/2]`` of the rotary angles at integer ``positions`` ``[T]``."""
    inverse = base ** (-torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float32) / head_size)
    angles = positions.float()[:, None] * inverse[None, :]
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the last dim of ``x`` ``[B, H, T, head]`` by the angles."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


@dataclass
class TransformerCache:
    """Per layer keys and values ``[B, heads, S, head]`` (keys already rotated) and the next position."""

    keys: list[Tensor]
    values: list[Tensor]
    position: int = 0


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` with a GELU MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if width % num_heads != 0 or (width // num_heads) % 2 != 0:
            raise ValueError(f"`width` ({width}) must split into `num_heads` ({num_heads}) heads of even size")
        self.num_heads = num_heads
        self.head_size = width // num_heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.attn_out = nn.Linear(width, width, bias=False)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, mlp_ratio * width)
        self.mlp_out = nn.Linear(mlp_ratio * width, width)
        self.drop = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        batch, steps, _ = x.shape
        return x.view(batch, steps, self.num_heads, self.head_size).transpose(1, 2)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x ``[B, T, width]``; past keys/values ``[B, H, S, head]`` precede x. Returns (x, keys, values)."""
        batch, steps, width = x.shape
        query, key, value = (self._split(t) for t in self.qkv(self.attn_norm(x)).chunk(3, dim=-1))
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        mask, causal = None, True
        if past is not None and past[0].shape[2] > 0:
            key, value = torch.cat([past[0], key], dim=2), torch.cat([past[1], value], dim=2)
            causal = False
            if steps > 1:
                # SDPA's is_causal aligns to the top-left; with a cache the queries sit at the end.
                offset = key.shape[2] - steps
                mask = torch.ones(steps, key.shape[2], dtype=torch.bool, device=x.device).tril(offset)
        mixed = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            is_causal=causal and steps > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.drop(self.attn_out(mixed.transpose(1, 2).reshape(batch, steps, width)))
        x = x + self.drop(self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)))))
        return x, key, value


class TransformerBody(nn.Module):
    """A causal GPT-style stack with rotary positions; batch-major inside, time-major at its interface."""

    def __init__(self, width: int, num_layers: int, num_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.width = width
        self.num_heads = num_heads
        self.head_size = width // num_heads
        self.num_layers = num_layers
        self.blocks = nn.ModuleList(TransformerBlock(width, num_heads, dropout=dropout) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2's init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers).
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * self.num_layers)
                    if name.endswith(("attn_out.weight", "mlp_out.weight"))
                    else 0.02
                )
                nn.init.normal_(param, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(param)

    def _run(self, x: Tensor, start: int, cache: TransformerCache | None) -> tuple[Tensor, list, list]:
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        cos, sin = rotary_tables(positions, self.head_size)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            past = None if cache is None else (cache.keys[i], cache.values[i])
            x, key, value = block(x, cos, sin, past)
            keys.append(key)
            values.append(value)
        return self.final_norm(x), keys, values

    def forward(self, x: Tensor, state: None = None, attn_window: int | None = None) -> tuple[Tensor, None]:
        y, _, _ = self._run(x.transpose(0, 1), 0, None)
        return y.transpose(0, 1), None

    def init_decode(self, batch: int) -> TransformerCache:
        reference = next(self.parameters())
        empty = reference.new_zeros(batch, self.num_heads, 0, self.head_size)
        return TransformerCache([empty] * self.num_layers, [empty] * self.num_layers, 0)

    def step(self, x: Tensor, cache: TransformerCache) -> tuple[Tensor, TransformerCache]:
        y, keys, values = self._run(x.transpose(0, 1), cache.position, cache)
        return y.transpose(0, 1), TransformerCache(keys, values, cache.position + x.shape[0])


class SRUppBody(nn.Module):
    """``srupp.nn.SRUpp`` (causal); its state carries c and the previous segment as attention memory."""

    def __init__(
        self,
        width: int,
        num_layers: int,
        proj_size: int,
        attention_layers: Iterable[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.rnn = SRUpp(
            width,
            width,
            proj_size,
            num_layers,
            dropout=dropout,
            attn_dropout=dropout,
            attention_layers=attention_layers,
        )

    def forward(self, x: Tensor, state: SRUppState | None = None, attn_window: int | None = None):
        return self.rnn(x, state, causal=True, attn_window=attn_window)

    def init_decode(self, batch: int):
        return self.rnn.decoder(batch)

    def step(self, x: Tensor, cache):
        return cache.step(x), cache


class RecurrentBody(nn.Module):
    """``srupp.nn.SRU`` or ``nn.LSTM``: the state is the RNN's own; decoding just carries it."""

    def __init__(
        self, kind: str, width: int, num_layers: int, dropout: float = 0.0, input_size: int | None = None
    ) -> None:
        super().__init__()
        cls = SRU if kind == "sru" else nn.LSTM
        self.rnn = cls(input_size or width, width, num_layers=num_layers, dropout=dropout)
        if kind == "lstm":
            lstm_init(self.rnn)

    def forward(self, x: Tensor, state=None, attn_window: int | None = None):
        return self.rnn(x, state)

    def init_decode(self, batch: int):
        return None

    def step(self, x: Tensor, cache):
        return self.rnn(x, cache)


def lstm_init(lstm: nn.LSTM) -> None:
    """Per gate: Xavier-uniform input weights, orthogonal recurrent weights, zero biases but the forget
    gate's +1. torch's default U(+-1/sqrt(h)) shrinks the signal about 0.15x per layer at init (gates near
    0.5, pre-activations at ~0.6x the input's scale), so a 4-layer stack's output does not depend on its
    input and training sits at the unigram entropy (~4.6 bpc on text) for hundreds of steps."""
    hidden = lstm.hidden_size
    for name, param in lstm.named_parameters():
        with torch.no_grad():
            for gate in param.split(hidden):
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(gate)
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(gate)
                else:
                    gate.zero_()
            if name.startswith("bias_ih"):
                param[hidden : 2 * hidden] = 1.0  # gate order i, f, g, o


def load_authors():
    """The authors' ``sru`` package (with ``sru.ops``), or None, saying why, where it does not import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sru  # compiles its C++ (and CUDA) extension at first import
            import sru.ops  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure means "not available", reported as such
        print(f"the authors' package `sru` is not available ({type(err).__name__}: {err}); skipping it")
        return None
    warnings.filterwarnings("ignore", message="Running SRU on CPU with grad_enabled=True")
    return sru


class AuthorsSRUppBody(nn.Module):
    """The authors' ``sru.SRUpp`` behind the body interface (causal through an additive mask, as theirs)."""

    def __init__(self, sru, width: int, num_layers: int, proj_size: int) -> None:
        super().__init__()
        self.rnn = sru.SRUpp(width, width, proj_size, num_layers=num_layers)
        self.masks: dict[int, Tensor] = {}

    def forward(self, x: Tensor, state=None, attn_window: int | None = None):
        steps = x.shape[0]
        if steps not in self.masks:
            self.masks[steps] = torch.ones(steps, steps, device=x.device).triu(1) * -1e4
        output, c, _ = self.rnn(x, attn_mask=self.masks[steps])
        return output, c


def detach(state):
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(detach(s) for s in state)
    return state.detach()


class ByteLM(nn.Module):
    """``embedding -> body -> head`` over bytes; see the module docstring for the interface.

    Args:
        body: a body module (``SRUppBody``, ``RecurrentBody``, ``TransformerBody``) of this ``width``.
        width: embedding and body width.
        tie: share the embedding matrix with the output head.
    """

    def __init__(self, body: nn.Module, width: int, tie: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        self.body = body
        self.head = nn.Linear(width, VOCAB)
        if tie:
            self.head.weight = self.embedding.weight
        if isinstance(body, TransformerBody):
            nn.init.normal_(self.embedding.weight, std=0.02)
            nn.init.normal_(self.head.weight, std=0.02)
        elif isinstance(body, RecurrentBody) and isinstance(body.rnn, nn.LSTM):
            # Unit-scale inputs (torch's embedding default): the authors' U(+-sqrt(3/d)) is ~0.08 at d=160,
            # too small a signal for the LSTM's saturating gates.
            nn.init.normal_(self.embedding.weight)
            bound = math.sqrt(3.0 / width)
            nn.init.uniform_(self.head.weight, -bound, bound)
        else:
            # The authors' enwik8 LM init: U(+-sqrt(3/d)) for matrices, zeros for biases.
            bound = math.sqrt(3.0 / width)
            nn.init.uniform_(self.embedding.weight, -bound, bound)
            nn.init.uniform_(self.head.weight, -bound, bound)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: Tensor, state=None, *, attn_window: int | None = None):
        """Args: tokens ``[T, B]`` int64; state from the previous segment or None.

        Returns: ``(logits [T, B, 256], state)``."""
        hidden, state = self.body(self.embedding(tokens), state, attn_window=attn_window)
        return self.head(hidden), state

    def detach_state(self, state):
        return detach(state)

    def init_decode(self, batch: int):
        return self.body.init_decode(batch)

    def step(self, tokens: Tensor, cache):
        """Next-token logits ``[T, B, 256]`` for ``tokens`` ``[T, B]`` given the cache of all earlier ones."""
        hidden, cache = self.body.step(self.embedding(tokens), cache)
        return self.head(hidden), cache


def build(
    kind: str,
    width: int,
    layers: int,
    *,
    proj_ratio: int = 4,
    num_heads: int = 4,
    dropout: float = 0.0,
    tie: bool = False,
) -> ByteLM:
    """One of ``MODELS`` at a width and depth. SRU++ uses ``proj_size = width // proj_ratio`` (the
    paper's d:d' = 4:1); ``srupp_one_attn`` has attention only in its last layer (the paper's
    ``attention_every_n_layers = num_layers``)."""
    if kind in ("srupp", "srupp_one_attn"):
        attention = None if kind == "srupp" else [layers - 1]
        body: nn.Module = SRUppBody(width, layers, max(1, width // proj_ratio), attention, dropout)
    elif kind in ("sru", "lstm"):
        body = RecurrentBody(kind, width, layers, dropout)
    elif kind == "transformer":
        body = TransformerBody(width, layers, num_heads, dropout)
    else:
        raise ValueError(f"`kind` must be one of {MODELS}, got {kind!r}")
    return ByteLM(body, width, tie)


def width_grid(kind: str, limit: int, num_heads: int = 4, proj_ratio: int = 4) -> range:
    """Candidate widths: multiples of 2 * heads (Transformer: even head size), of 2 d:d' (SRU++), else of 8."""
    step = 2 * num_heads if kind == "transformer" else 2 * proj_ratio if kind.startswith("srupp") else 8
    return range(step, limit + 1, step)


def size_to_match(
    kinds: Iterable[str], target: int, layers: int | dict[str, int], *, max_width: int = 4096, **kwargs
) -> dict[str, tuple[ByteLM, int]]:
    """Each kind at the width (fixed depth) whose parameter count is closest to ``target``.

    Returns: ``{kind: (model, width)}``.
    """
    chosen = {}
    for kind in kinds:
        depth = layers[kind] if isinstance(layers, dict) else layers

        def params(width: int, kind: str = kind, depth: int = depth) -> int:
            return count_parameters(build(kind, width, depth, **kwargs))

        width = closest_width(
            params, target, width_grid(kind, max_width, kwargs.get("num_heads", 4), kwargs.get("proj_ratio", 4))
        )
        chosen[kind] = (build(kind, width, depth, **kwargs), width)
    return chosen


def closest_width(params: Callable[[int], int], target: int, grid: range) -> int:
    """Binary search of a width grid on which ``params`` increases, for the count nearest ``target``."""
    low, high = 0, len(grid) - 1
    while low < high:
        mid = (low + high) // 2
        if params(grid[mid]) < target:
            low = mid + 1
        else:
            high = mid
    candidates = [grid[i] for i in (low - 1, low) if 0 <= i < len(grid)]
    return min(candidates, key=lambda w: abs(params(w) - target))
