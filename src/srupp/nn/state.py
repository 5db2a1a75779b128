"""The recurrent state of an ``SRUpp`` stack: what one call hands to the next."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter

import torch
from torch import Tensor

from srupp.ops.decode_kernel import TokenRun

_VERSION = attrgetter("_version")


def param_versions(params: Iterable[Tensor]) -> list[int]:
    """The version counters of ``params`` (an in-place update bumps one): a decoding run compares them with those
    it recorded when it copied the parameters, to know its copies are current."""
    return list(map(_VERSION, params))


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
    # Set by ``SRUpp.step`` on the states it returns; not copied by ``dataclasses.replace``, ``detach`` or ``to``.
    _buffers: DecodeBuffers | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # Copies and pickles leave the decoding buffers behind (they hold the model): the copy steps on the
        # general path, which gives it buffers of its own.
        return {**self.__dict__, "_buffers": None}

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

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SRUppState:
        """The same state on ``device`` and/or with floating-point ``dtype``."""
        return self._apply(lambda tensor: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None))

    def _apply(self, fn) -> SRUppState:
        key_pad = None if self.key_pad is None else fn(self.key_pad)
        return SRUppState(
            fn(self.c), _map(self.memory, fn), _map(self.keys, fn), _map(self.values, fn), self.max_context, key_pad
        )

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """A flat ``{name: tensor}`` form for checkpoints (e.g. safetensors): ``{prefix}c``,
        ``{prefix}memory/{i}``, ``{prefix}keys/{i}``, ``{prefix}values/{i}`` for the layers that have them,
        ``{prefix}num_layers``, and when set ``{prefix}max_context`` (int64, shape [1]) and ``{prefix}key_pad``.
        Tensors are detached, contiguous copies (a decoding state's caches are views of larger buffers, which
        ``torch.save`` would write whole and which the run keeps writing past their end); ``from_tensors``
        inverts it."""
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


def _views(
    buffers: list[Tensor | None], pad: Tensor | None, start: int, end: int
) -> tuple[list[Tensor | None], list[Tensor | None], Tensor | None]:
    """Per layer the keys and values ``[B, heads, end - start, head_size]`` of positions ``start..end-1`` of its
    buffer (None without attention), and the ``key_pad`` ``[B, end - start]`` of those (None without ``pad``)."""
    keys: list[Tensor | None] = []
    values: list[Tensor | None] = []
    for buffer in buffers:
        pair = (None, None) if buffer is None else buffer.narrow(3, start, end - start).unbind(1)
        keys.append(pair[0])
        values.append(pair[1])
    return keys, values, None if pad is None else pad.narrow(1, start, end - start)


class _RunState(SRUppState):
    """A state made by the compiled one-token path (internal): its ``keys``, ``values`` and ``key_pad`` are views
    of the run's buffers made when first read, since making them (three tensor views per attention layer) would
    cost more than the rest of a step, and a decoding loop rarely reads them. In every other way it is an
    ``SRUppState``; its copies and pickles are plain ones."""

    def _fields(self) -> list:
        made = self.__dict__.get("_lazy")
        if made is None:
            span = self.__dict__.get("_span")  # (buffers, pad, start, end) of the run when it was made
            made = [None, None, None] if span is None else list(_views(*span))
            self.__dict__["_lazy"] = made
            if span is not None:
                self.__dict__["_made"] = (made[0], made[1], made[2], tuple(made[0]), tuple(made[1]))
        return made

    keys = property(lambda self: self._fields()[0], lambda self, value: self._fields().__setitem__(0, value))
    values = property(lambda self: self._fields()[1], lambda self, value: self._fields().__setitem__(1, value))
    key_pad = property(lambda self: self._fields()[2], lambda self, value: self._fields().__setitem__(2, value))

    def intact(self) -> bool:
        """Whether ``keys``, ``values`` and ``key_pad`` are still the views this state was made with (unread, or
        read and neither replaced nor their lists changed)."""
        fields, made = self.__dict__.get("_lazy"), self.__dict__.get("_made")
        if fields is None:
            return "_span" in self.__dict__
        return (
            made is not None
            and fields[0] is made[0]
            and fields[1] is made[1]
            and fields[2] is made[2]
            and len(made[0]) == len(made[3])
            and all(a is b for a, b in zip(made[0], made[3], strict=True))
            and len(made[1]) == len(made[4])
            and all(a is b for a, b in zip(made[1], made[4], strict=True))
        )

    def __reduce__(self):
        return SRUppState, (self.c, self.memory, self.keys, self.values, self.max_context, self.key_pad)


class DecodeBuffers:
    """Preallocated key/value storage behind the caches of the successive states of one ``SRUpp.step`` run
    (internal).

    Each attention layer keeps its keys and values in one ``[B, 2, heads, capacity, head_size]`` buffer, and a
    state's ``keys[i]``/``values[i]`` are views of positions ``start..end-1`` of it (and its ``key_pad`` a view
    of a ``[B, capacity]`` buffer, when the run has one). Only the newest state of a run
    (the one whose ``c``, ``keys`` and ``values`` objects are recorded here) may append, in place at ``end``: no
    state sees a position at or past its own end, so every view stays as it was, and stepping again from an
    older state takes the general path, which copies. When ``end`` reaches the capacity the live positions move
    to fresh buffers of twice their count, so appending costs amortised O(1) and never touches older views.
    """

    __slots__ = ("model", "weights", "buffers", "pad", "capacity", "start", "end", "max_context", "inference",
                 "input_shape", "output_shape", "dtype", "device", "c", "key_views", "value_views",
                 "key_pad_view", "native", "seq", "params", "versions", "device_type", "ends", "batch")  # fmt: skip

    def __init__(
        self, model: object, weights: list, keys: list[Tensor | None], values: list[Tensor | None],
        key_pad: Tensor | None, length: int, max_context: int | None, input_shape: tuple[int, ...],
        output_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        self.model = model
        # Per layer the parameters the one-token path reads (the Parameter objects: in-place updates show).
        self.weights = weights
        # The parameters copied into ``weights`` and their version counters then (an in-place update ends the run).
        self.params = [param for layer in weights for param, _ in layer.derived]
        self.versions = [version for layer in weights for _, version in layer.derived]
        self.max_context = max_context
        self.inference = torch.is_inference_mode_enabled()
        self.input_shape, self.output_shape = input_shape, output_shape
        self.dtype, self.device, self.device_type = dtype, device, device.type
        # The compiled step of the whole stack, where every layer has one (float32 on the CPU).
        kernels = [layer.kernel for layer in weights]
        self.batch = input_shape[0] * input_shape[1]
        self.native = None if None in kernels or not kernels else TokenRun(kernels, self.batch, output_shape[-1])
        self.seq = 0  # how many states this run has recorded as its newest
        self.ends: tuple | None = None  # (model, its parameters, their versions) whose ends ``native`` has
        self._allocate(keys, values, key_pad, length)

    def _allocate(
        self, keys: list[Tensor | None], values: list[Tensor | None], key_pad: Tensor | None, length: int
    ) -> None:
        """Fresh buffers of twice ``length + 1`` positions (at least 16) holding the ``length`` given ones."""
        capacity = max(16, 2 * (length + 1))
        self.pad = None
        if key_pad is not None:
            self.pad = key_pad.new_empty(key_pad.shape[0], capacity)
            self.pad[:, :length] = key_pad
        self.buffers: list[Tensor | None] = []
        for layer_keys, layer_values in zip(keys, values, strict=True):
            if layer_keys is None:
                self.buffers.append(None)
                continue
            batch, heads, _, head_size = layer_keys.shape
            buffer = layer_keys.new_empty(batch, 2, heads, capacity, head_size)
            buffer[:, 0, :, :length] = layer_keys
            buffer[:, 1, :, :length] = layer_values
            self.buffers.append(buffer)
        self.capacity = capacity if any(buffer is not None for buffer in self.buffers) else 1 << 62
        self.start, self.end = 0, length
        if self.native is not None:
            self.native.bind(self.buffers, self.pad)

    def _grow(self) -> None:
        """Move the live positions into fresh buffers of twice their count (older views keep the old ones)."""
        keys, values, pad = _views(self.buffers, self.pad, self.start, self.end)
        self._allocate(keys, values, pad, self.end - self.start)

    def open_position(self) -> tuple[list[tuple[Tensor, Tensor, Tensor] | None], Tensor | None]:
        """Per layer None (no attention) or ``(window [B, 2, heads, L, head_size], keys, values)``: views of
        positions ``start..end``, the last not written yet (moving the live positions first when full); and,
        when the run has a ``key_pad``, the attention mask ``[B, 1, 1, L]`` (True = may attend) of those."""
        if self.end == self.capacity:
            self._grow()
        start, length = self.start, self.end + 1 - self.start
        windows: list[tuple[Tensor, Tensor, Tensor] | None] = []
        for buffer in self.buffers:
            if buffer is None:
                windows.append(None)
            else:
                window = buffer.narrow(3, start, length)
                windows.append((window, *window.unbind(1)))
        if self.pad is None:
            return windows, None
        self.pad.select(1, self.end).fill_(False)
        return windows, self.pad.narrow(1, start, length).logical_not().view(-1, 1, 1, length)

    def commit(self, c: Tensor, windows: list[tuple[Tensor, Tensor, Tensor] | None]) -> SRUppState:
        """The state after the position opened by ``open_position`` was written, recorded as the newest."""
        self.end += 1
        drop = 0
        if self.max_context is not None and self.end - self.start > self.max_context:
            drop = self.end - self.start - self.max_context
            self.start += drop
        keys: list[Tensor | None] = []
        values: list[Tensor | None] = []
        for window in windows:
            if window is None:
                keys.append(None)
                values.append(None)
            elif drop:
                keys.append(window[1].narrow(2, drop, window[1].shape[2] - drop))
                values.append(window[2].narrow(2, drop, window[2].shape[2] - drop))
            else:
                keys.append(window[1])
                values.append(window[2])
        key_pad = None if self.pad is None else self.pad.narrow(1, self.start, self.end - self.start)
        return self.adopt(SRUppState(c, keys=keys, values=values, max_context=self.max_context, key_pad=key_pad))

    def views(self) -> tuple[list[Tensor | None], list[Tensor | None], Tensor | None]:
        """Per layer the live keys and values ``[B, heads, end - start, head_size]`` (None without attention), and
        the live ``key_pad`` ``[B, end - start]`` (None when the run has none)."""
        return _views(self.buffers, self.pad, self.start, self.end)

    def adopt(self, state: SRUppState) -> SRUppState:
        """Record ``state`` (whose ``keys``/``values`` are this run's views) as the newest state of the run."""
        self.c, self.key_views, self.value_views = state.c, tuple(state.keys), tuple(state.values)
        self.key_pad_view = state.key_pad
        self.seq += 1
        state._buffers = self
        return state

    def step_native(self, input: Tensor, c: Tensor, ends: bool = False) -> tuple[Tensor, SRUppState]:
        """One token through the compiled step of the whole stack (``native``), from the newest state's ``c``:
        the output ``output_shape`` (with ``ends``: token ids in, and out the log-probabilities ``[B, vocab]``
        of the language model's ends set on ``native``) and the next state, recorded as the newest."""
        if self.end == self.capacity:
            self._grow()
        c = c.contiguous()
        c_next = torch.empty_like(c)
        # (sizes as arguments, not a tuple: half the microsecond torch takes to parse a tuple of them)
        output = c.new_empty(self.batch, self.native.vocab_out) if ends else c.new_empty(*self.output_shape)
        self.native(input.contiguous(), c, c_next, output, self.start, self.end, ends)
        self.end += 1
        if self.max_context is not None and self.end - self.start > self.max_context:
            self.start = self.end - self.max_context
        state = _RunState.__new__(_RunState)
        self.c = c_next
        self.seq += 1
        state.__dict__.update(c=c_next, memory=None, max_context=self.max_context, _buffers=self, _seq=self.seq,
                              _span=(self.buffers, self.pad, self.start, self.end))  # fmt: skip
        return output, state

    def is_newest(self, state: SRUppState) -> bool:
        """Whether ``state`` is, unchanged, the newest state of the run (so it may append in place)."""
        if type(state) is _RunState:
            fields = state.__dict__
            return (
                fields.get("_seq") == self.seq
                and fields["c"] is self.c
                and fields["memory"] is None
                and fields["max_context"] == self.max_context
                and state.intact()
            )
        if (
            state.c is not self.c
            or state.memory is not None
            or state.max_context != self.max_context
            or state.key_pad is not self.key_pad_view
        ):
            return False
        keys, values = state.keys, state.values
        if keys is None or values is None or len(keys) != len(self.key_views) or len(values) != len(self.value_views):
            return False
        return all(a is b for a, b in zip(keys, self.key_views, strict=True)) and all(
            a is b for a, b in zip(values, self.value_views, strict=True)
        )
