"""Counting the host's reads of tensor values per training update: the proof that an update never waits for the
device. Used in-process by test_loop and by each rank of a DDP run in test_distributed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


def optimizer_steps(optimizer: torch.optim.Optimizer | None) -> set[int]:
    """Addresses of the optimizer's step counters: torch keeps them on the host on a GPU too (unless
    ``capturable``), so reading them is no device sync."""
    if optimizer is None:
        return set()
    return {state["step"].data_ptr() for state in optimizer.state.values() if "step" in state}


class HostSyncCounter(TorchDispatchMode):
    """Counts reads of a tensor's value by the host, ``aten::_local_scalar_dense`` (what ``.item()``, ``float()``
    and ``bool()`` of a tensor dispatch to), other than of the optimizer's step counters, and ``aten::nonzero``
    (boolean indexing: its output's size is read from the device)."""

    SYNCS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self) -> None:
        super().__init__()
        self.optimizer: torch.optim.Optimizer | None = None
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.count += args[0].data_ptr() not in optimizer_steps(self.optimizer)
        return func(*args, **(kwargs or {}))


class ItemCounter(TorchFunctionMode):
    """Counts ``.item()``, ``.tolist()``, ``float()``, ``int()`` and ``bool()`` of tensors, as called from Python."""

    NAMES = {"item", "tolist", "__float__", "__int__", "__bool__"}

    def __init__(self) -> None:
        super().__init__()
        self.optimizer: torch.optim.Optimizer | None = None
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += args[0].data_ptr() not in optimizer_steps(self.optimizer)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads_per_update(loop: ModuleType) -> Iterator[list[tuple[int, int]]]:
    """Within the block, count the host's reads from each ``loop.one_update`` to the next (the update, its
    logging, stop checks, evaluation and checkpoint; the last one's until the block ends). The list yielded is
    filled at the end with one ``(aten::_local_scalar_dense, item/tolist/float/int/bool)`` pair per update."""
    dispatch, function = HostSyncCounter(), ItemCounter()
    marks: list[tuple[int, int]] = []
    per_update: list[tuple[int, int]] = []
    original = loop.one_update

    def counted(run, state) -> None:
        if not marks:  # from the first update on: setup reads values, and DDP's setup broadcasts the weights
            dispatch.optimizer = function.optimizer = run.optimizer
            dispatch.__enter__()
            function.__enter__()
        marks.append((dispatch.count, function.count))
        original(run, state)

    loop.one_update = counted
    try:
        yield per_update
    finally:
        loop.one_update = original
        if marks:
            marks.append((dispatch.count, function.count))
            function.__exit__(None, None, None)
            dispatch.__exit__(None, None, None)
    per_update += [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks[:-1], marks[1:], strict=True)]
