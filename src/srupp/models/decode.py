"""A decoding session of an ``SRUppLM``: token ids in, log-probabilities out, around the stack's session."""

from __future__ import annotations

import torch
from torch import Tensor

from srupp.nn.decode import KERNEL_DTYPES, SRUppDecoder
from srupp.nn.srupp import PREFILL_CHUNK
from srupp.nn.state import SRUppState


def check_token_ids(tokens: object) -> Tensor:
    """``tokens`` if it is an integer tensor ``[T, B]`` of token ids (TypeError, ValueError otherwise)."""
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex():
        kind = tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__
        raise TypeError(f"`input` must be an integer tensor of token ids, got {kind}")
    if tokens.dim() != 2:
        raise ValueError(f"`input` must have shape [T, B] (2 dims), got {list(tokens.shape)}")
    return tokens


class SRUppLMDecoder:
    """A decoding session of an ``SRUppLM`` over ``batch_size`` streams (see ``SRUppLM.decoder``): the stack's
    session (``stack``, an :class:`srupp.nn.decode.SRUppDecoder`) between the model's embedding and output layer.

    Where the stack runs as one compiled call and the softmax is plain, one token per stream runs embedding,
    stack, output layer and log-softmax in that one call, on float32 copies of the embedding and output weights
    made when the session starts (for a bfloat16 or float16 model, like the stack's: see ``SRUppDecoder``); the
    log-probabilities are float32 on either path.
    """

    def __init__(self, model, batch_size: int, max_context: int | None = None, state: SRUppState | None = None) -> None:
        self.model = model
        self.stack = SRUppDecoder(model.rnn, batch_size, max_context, state)
        # The kernel holding the ends: the stack makes a new one (without them) when a loaded state changes B.
        self.ends_kernel = None
        params = [] if model.config.adaptive else [model.embedding.weight, model.output.weight, model.output.bias]
        if self.stack.kernel is not None and params and all(p is None or p.dtype in KERNEL_DTYPES for p in params):
            with torch.no_grad():
                bias = None if model.output.bias is None else model.output.bias.detach().to(torch.float32, copy=True)
                head_t = model.output.weight.detach().float().t().contiguous()
                embedding = model.embedding.weight.detach().to(torch.float32, copy=True)
                self.stack.kernel.set_ends(embedding, head_t, bias)
            self.ends_kernel = self.stack.kernel

    @property
    def state(self) -> SRUppState:
        """The session's state (a copy; see ``SRUppDecoder.state``)."""
        return self.stack.state

    def select(self, indices: Tensor) -> None:
        """Keep the streams ``indices`` ``[N]`` (repeats allowed): see ``SRUppDecoder.select``. Kept at the same
        batch size, the stack's kernel stays the one holding the ends."""
        self.stack.select(indices)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed ``[T, B]`` token ids (a chunk, or one token per stream); returns the log-probabilities ``[B, V]``
        of the next token after the last position, equal to ``SRUppLM.step``'s."""
        stack = self.stack
        if (
            stack.kernel is not None
            and stack.kernel is self.ends_kernel
            and isinstance(tokens, Tensor)
            and tokens.shape == (1, stack.batch_size)
            and tokens.dtype == torch.int64
            and tokens.device == stack.device
            and stack.ready_for_token()
        ):
            return stack.step_ids(tokens)
        check_token_ids(tokens)
        # A long prompt is embedded and fed a piece at a time, so that with ``max_context`` memory stays bounded.
        for start in range(0, max(tokens.shape[0], 1), PREFILL_CHUNK):  # (T = 0: step names the error)
            hidden = stack.step(self.model.embed(tokens[start : start + PREFILL_CHUNK]))
        return self.model.log_probs(hidden[-1])
