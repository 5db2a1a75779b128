"""The recurrent state of an ``SRUpp`` stack: what one call hands to the next."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from srupp.nn.checks import check_stream_indices


def _map(items: list[Tensor | None] | None, fn) -> list[Tensor | None] | None:
    return None if items is None else [None if item is None else fn(item) for item in items]


@dataclass
class SRUppState:
    """The whole recurrent state of an ``SRUpp``: ``forward`` reads it and returns the next one, ``step``
    extends it, and either may continue the other's.

    Each attention layer sees its earlier positions in one of two forms: ``memory``, the layer's inputs of the
    previous segment (what ``forward`` returns; the keys and values are recomputed, so training reaches
    ``Wq``, ``Wk`` and ``Wv`` through them), or ``keys``/``values``, the cache that ``step`` grows one chunk
    at a time. A layer holds at most one of the two.

    Attributes:
        c: ``[num_layers*dirs, B, hidden_size]`` last recurrent state of every layer and direction.
        memory: None, or per layer None or ``[M, B, d_layer_in]`` (time-major; None for layers without
            attention).
        keys, values: None, or per layer None or ``[B, num_heads, S, proj_size/num_heads]``.
        max_context: how many earlier positions ``step`` lets each new token attend to (None: all).
        key_pad: None, or ``[B, S]`` bool marking (True) which earlier positions were padding, S the length of
            the memory or cache: they stay hidden from every later token (left-padded batched decoding).

    Example:
        >>> out, state = model(x1)
        >>> out, state = model(x2, state.detach())   # x2 attends to x1
        >>> y, state = model.step(x3, state)                     # decoding continues from there
    """

    c: Tensor
    memory: list[Tensor | None] | None = None
    keys: list[Tensor | None] | None = None
    values: list[Tensor | None] | None = None
    max_context: int | None = None
    key_pad: Tensor | None = None

    def layer_context(self, index: int) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
        """Layer ``index``'s ``(memory, (keys, values))``, each None when absent."""
        memory = None if self.memory is None else self.memory[index]
        keys = None if self.keys is None else self.keys[index]
        values = None if self.values is None else self.values[index]
        return memory, None if keys is None else (keys, values)

    def detach(self) -> SRUppState:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return self._apply(Tensor.detach)

    def clone(self) -> SRUppState:
        """The same state in new memory (e.g. from the outputs of a CUDA-graph replay, which the next replay
        overwrites)."""
        return self._apply(Tensor.clone)

    def select(self, indices: Tensor) -> SRUppState:
        """The state of the streams ``indices`` ``[N]`` (integers in ``[0, B)``, repeats allowed): stream i of
        the result is stream ``indices[i]`` of this one (beam search's reordering, a subset, a repetition)."""
        indices = check_stream_indices(indices, self.c.shape[1]).to(self.c.device)

        def rows(dim: int):
            return lambda tensor: tensor.index_select(dim, indices)

        key_pad = None if self.key_pad is None else self.key_pad.index_select(0, indices)
        keys, values = _map(self.keys, rows(0)), _map(self.values, rows(0))
        return SRUppState(rows(1)(self.c), _map(self.memory, rows(1)), keys, values, self.max_context, key_pad)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SRUppState:
        """The same state on ``device`` and/or with floating-point ``dtype``."""
        return self._apply(lambda tensor: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None))

    def tensors(self) -> list[Tensor]:
        """Every tensor the state holds (c, memory, keys, values, key_pad), in no particular order."""
        items = [self.c, self.key_pad, *(self.memory or ()), *(self.keys or ()), *(self.values or ())]
        return [tensor for tensor in items if tensor is not None]

    def _apply(self, fn) -> SRUppState:
        key_pad = None if self.key_pad is None else fn(self.key_pad)
        return SRUppState(
            fn(self.c), _map(self.memory, fn), _map(self.keys, fn), _map(self.values, fn), self.max_context, key_pad
        )

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """A flat ``{name: tensor}`` form for checkpoints (e.g. safetensors): ``{prefix}c``,
        ``{prefix}memory/{i}``, ``{prefix}keys/{i}``, ``{prefix}values/{i}`` for the layers that have them,
        ``{prefix}num_layers``, and when set ``{prefix}max_context`` (int64, shape [1]) and ``{prefix}key_pad``.
        Tensors are detached, contiguous copies (a cache may be a view of a larger tensor, which ``torch.save``
        would write whole); ``from_tensors`` inverts it."""
        lists = {"memory": self.memory, "keys": self.keys, "values": self.values}
        num_layers = max((len(items) for items in lists.values() if items is not None), default=0)
        tensors = {f"{prefix}c": self.c.detach().clone(), f"{prefix}num_layers": torch.tensor([num_layers])}
        if self.max_context is not None:
            tensors[f"{prefix}max_context"] = torch.tensor([self.max_context])
        if self.key_pad is not None:
            tensors[f"{prefix}key_pad"] = self.key_pad.clone(memory_format=torch.contiguous_format)
        for name, items in lists.items():
            for i, item in enumerate(items or []):
                if item is not None:
                    tensors[f"{prefix}{name}/{i}"] = item.detach().clone(memory_format=torch.contiguous_format)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], prefix: str = "") -> SRUppState:
        """The state that ``to_tensors(prefix)`` wrote into ``tensors`` (other keys are ignored).

        Raises:
            ValueError: ``tensors`` holds no ``{prefix}c``, or names a layer beyond ``{prefix}num_layers``
                (without that key, as written by srupp 0.1, the highest layer named sets the count).
        """
        if f"{prefix}c" not in tensors:
            raise ValueError(f"`tensors` must hold an SRUppState under {prefix + 'c'!r}, found no such key")
        found: dict[str, dict[str, Tensor]] = {}
        for name in ("memory", "keys", "values"):
            start = f"{prefix}{name}/"
            found[name] = {key[len(start) :]: value for key, value in tensors.items() if key.startswith(start)}
            for index in found[name]:
                if not index.isdigit():
                    raise ValueError(f"`tensors` key {start + index!r} must end in a layer index")
        indices = [int(index) for items in found.values() for index in items]
        if f"{prefix}num_layers" in tensors:
            num_layers = int(tensors[f"{prefix}num_layers"].reshape(-1)[0])
        else:  # written before num_layers was saved: every layer had its memory
            num_layers = max(indices, default=-1) + 1
        if indices and max(indices) >= num_layers:
            raise ValueError(f"`tensors` names layer {max(indices)}, beyond {prefix}num_layers = {num_layers}")
        rows = tensors[f"{prefix}c"].shape[0] if tensors[f"{prefix}c"].dim() > 0 else 0
        if not 0 <= num_layers <= rows:  # c has a row per layer and direction: bound a file's claim before lists
            raise ValueError(f"`{prefix}num_layers` must be in [0, {rows}] (the rows of c), got {num_layers}")
        lists: dict[str, list[Tensor | None] | None] = {}
        for name, items in found.items():
            lists[name] = [None] * num_layers if items else None
            for index, value in items.items():
                lists[name][int(index)] = value
        max_context = tensors.get(f"{prefix}max_context")
        return cls(
            tensors[f"{prefix}c"],
            lists["memory"],
            lists["keys"],
            lists["values"],
            None if max_context is None else int(max_context.reshape(-1)[0]),
            tensors.get(f"{prefix}key_pad"),
        )
