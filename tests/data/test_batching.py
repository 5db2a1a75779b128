import numpy as np
import pytest

from srupp.data import StreamBatcher

TOKENS = np.arange(1000, dtype=np.int64) % 251


def test_rows_are_contiguous_streams():
    batcher = StreamBatcher(TOKENS, batch_size=4, unroll=10)
    row_len = 999 // 4
    segments = [next(iter_) for iter_ in [iter(batcher)] for _ in range(3)]
    x = np.concatenate([s.input.numpy() for s in segments])  # [30, 4]
    for b in range(4):
        np.testing.assert_array_equal(x[:, b], TOKENS[b * row_len : b * row_len + 30])
    np.testing.assert_array_equal(segments[0].target.numpy()[:-1], segments[0].input.numpy()[1:])
    assert segments[0].first and not segments[1].first


def test_ranks_read_the_single_process_rows():
    single = StreamBatcher(TOKENS, batch_size=4, unroll=8).segment(3)[0]
    ranks = [StreamBatcher(TOKENS, batch_size=2, unroll=8, rank=r, world_size=2).segment(3)[0] for r in range(2)]
    assert np.array_equal(np.concatenate(ranks, axis=1), single.numpy())


def test_resume_position_and_epochs():
    batcher = StreamBatcher(TOKENS, batch_size=4, unroll=100)
    assert batcher.segments_per_epoch == 2
    it = iter(batcher)
    seen = [next(it) for _ in range(3)]
    assert [s.epoch for s in seen] == [0, 0, 1] and seen[2].first
    resumed = StreamBatcher(TOKENS, batch_size=4, unroll=100)
    resumed.load_state_dict(batcher.state_dict())
    assert np.array_equal(next(iter(resumed)).input, next(it).input)


def test_corpus_smaller_than_one_batch():
    with pytest.raises(ValueError, match="smaller than one batch"):
        StreamBatcher(TOKENS[:50], batch_size=4, unroll=16)
