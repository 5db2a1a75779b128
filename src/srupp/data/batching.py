"""Batching a token stream into B contiguous streams of unroll-length segments, sharded by rank."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Segment:
    """One training segment: ``input`` and ``target`` ``[T, B]`` (int64), ``first`` True at the start of an
    epoch (carried recurrent state and memory must be reset), and the batcher position *after* it."""

    input: Tensor
    target: Tensor
    first: bool
    epoch: int
    index: int


class StreamBatcher:
    """Cut ``tokens`` into ``world_size * batch_size`` equal contiguous rows; this rank owns the rows
    ``[rank * batch_size, (rank + 1) * batch_size)`` (a contiguous shard of the corpus, as in the paper) and
    reads them in order, ``unroll`` tokens at a time, so row b of consecutive segments is one running text.

    The global batch is ``world_size * batch_size`` rows whatever the number of ranks, so a run on N ranks
    reads exactly the rows a single process with ``batch_size * N`` reads.

    Args:
        tokens: ``[N]`` token ids (an ``np.memmap`` is read lazily).
        batch_size: rows per rank (B).
        unroll: segment length (T).
        rank, world_size: this process's place under DDP.
        drop_last: skip a final segment shorter than ``unroll`` (training keeps shapes fixed; eval keeps it).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        unroll: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1 or unroll < 1:
            raise ValueError(f"`batch_size` and `unroll` must be >= 1, got {batch_size} and {unroll}")
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, {world_size}), got {rank}")
        rows = batch_size * world_size
        self.row_len = (len(tokens) - 1) // rows if len(tokens) > 0 else 0
        need = rows * unroll + 1 if drop_last else rows + 1
        if self.row_len < (unroll if drop_last else 1):
            raise ValueError(
                f"corpus of {len(tokens):,} tokens is smaller than one batch: {rows} rows "
                f"(batch_size {batch_size} x world_size {world_size}) x unroll {unroll} + 1 = {need:,} tokens"
            )
        self.tokens = tokens
        self.batch_size, self.unroll, self.drop_last = batch_size, unroll, drop_last
        self.first_row = rank * batch_size
        steps = self.row_len // unroll if drop_last else -(-self.row_len // unroll)
        self.segments_per_epoch = steps
        self.epoch, self.index = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def segment(self, index: int) -> tuple[Tensor, Tensor]:
        """Segment ``index`` of this rank's rows: ``(input [T, B], target [T, B])``."""
        start = index * self.unroll
        length = min(self.unroll, self.row_len - start)
        rows = []
        for b in range(self.batch_size):
            offset = (self.first_row + b) * self.row_len + start
            rows.append(np.asarray(self.tokens[offset : offset + length + 1], dtype=np.int64))
        block = torch.from_numpy(np.stack(rows)).t().contiguous()
        return block[:-1], block[1:]

    def __iter__(self) -> Iterator[Segment]:
        """Yield segments forever, from the saved position onward, starting a new epoch after the last one."""
        while True:
            if self.index >= self.segments_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
            first = self.index == 0
            x, y = self.segment(self.index)
            self.index += 1
            yield Segment(x, y, first, self.epoch, self.index)

    def epoch_segments(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over all segments in order (for evaluation), independent of the saved position."""
        for index in range(self.segments_per_epoch):
            yield self.segment(index)
