"""BPTT batches: GluonNLP's CorpusBPTTBatchify layout, column continuity, targets, padding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keraslm.batching import PAD_INPUT, PAD_TARGET, BPTTBatches
from keraslm.errors import UserError

sizes = st.integers(min_value=1, max_value=9)
lengths = st.integers(min_value=0, max_value=400)


def stream(n: int) -> np.ndarray:
    """Ids that name their own position (plus one, so no id is the input pad 0)."""
    return np.arange(1, n + 1, dtype=np.int32)


def gluonnlp_discard(ids: np.ndarray, batch_size: int, bptt: int) -> list[tuple]:
    """CorpusBPTTBatchify(last_batch='discard') as GluonNLP computes it, transposed to
    batch-major: reshape(batch_size, -1).T, then slices of bptt + 1 steps overlapping by one."""
    sample_len = len(ids) // batch_size
    data = ids[:sample_len * batch_size].reshape(batch_size, -1).T
    count = (len(data) - (bptt + 1)) // bptt + 1
    slices = [data[i * bptt:(i + 1) * (bptt + 1) - i] for i in range(count)]
    return [(s[:-1].T, s[1:].T) for s in slices]


def make(n: int, batch_size: int, bptt: int, last_batch: str) -> BPTTBatches | None:
    try:
        return BPTTBatches(stream(n), batch_size, bptt, last_batch)
    except UserError:
        return None


@settings(max_examples=150, deadline=None)
@given(n=lengths, batch_size=sizes, bptt=sizes)
def test_discard_matches_gluonnlp_exactly(n, batch_size, bptt):
    expected = gluonnlp_discard(stream(n), batch_size, bptt)
    batches = make(n, batch_size, bptt, "discard")
    if not expected:
        assert batches is None
        return
    assert len(batches) == len(expected)
    for (x, y), (ex, ey) in zip(batches, expected):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    assert batches.num_targets == len(expected) * bptt * batch_size


@settings(max_examples=150, deadline=None)
@given(n=lengths, batch_size=sizes, bptt=sizes, last_batch=st.sampled_from(["keep", "discard"]))
def test_columns_are_contiguous_segments_continued_batch_to_batch(n, batch_size, bptt, last_batch):
    batches = make(n, batch_size, bptt, last_batch)
    if batches is None:
        return
    ids = stream(n)
    inputs = np.concatenate([x for x, _ in batches], axis=1)
    targets = np.concatenate([y for _, y in batches], axis=1)
    assert inputs.shape == targets.shape == (batch_size, len(batches) * bptt)
    assert inputs.dtype == targets.dtype == np.int32
    length = batches.column_length
    for j in range(batch_size):
        # Column j read across all batches is the j-th segment of the stream (padding aside).
        column = np.append(inputs[j], targets[j, -1])
        real = column[(column != PAD_INPUT) & (column != PAD_TARGET)]
        segment = ids[j * length:(j + 1) * length]
        if last_batch == "discard":
            segment = segment[:len(batches) * bptt + 1]
        np.testing.assert_array_equal(real, segment)
    # Targets are the inputs shifted by one step, across batch boundaries too.
    real = targets != PAD_TARGET
    np.testing.assert_array_equal(targets[:, :-1][real[:, :-1]], inputs[:, 1:][real[:, :-1]])


@settings(max_examples=150, deadline=None)
@given(n=lengths, batch_size=sizes, bptt=sizes)
def test_keep_targets_every_token_with_a_predecessor_exactly_once(n, batch_size, bptt):
    batches = make(n, batch_size, bptt, "keep")
    if batches is None:
        assert n <= batch_size
        return
    got = np.concatenate([y[y != PAD_TARGET] for _, y in batches])
    length = batches.column_length
    column_starts = set(range(1, n + 1, length))  # ids of the first token of every column
    expected = [i for i in range(1, n + 1) if i not in column_starts]
    assert sorted(got.tolist()) == expected
    assert batches.num_targets == len(expected)
    assert sum(batches.num_targets_in(i) for i in range(len(batches))) == len(expected)
    # Padding only ever sits where the target is padding too.
    for x, y in batches:
        assert x.shape == y.shape == (batch_size, bptt)
        assert np.all(y[x == PAD_INPUT] == PAD_TARGET)


def test_small_example_by_hand():
    batches = BPTTBatches(np.arange(1, 12), batch_size=3, bptt=2, last_batch="keep")
    assert len(batches) == 2 and batches.num_targets == 8
    (x0, y0), (x1, y1) = batches
    assert x0.tolist() == [[1, 2], [5, 6], [9, 10]]
    assert y0.tolist() == [[2, 3], [6, 7], [10, 11]]
    assert x1.tolist() == [[3, 4], [7, 8], [11, 0]]
    assert y1.tolist() == [[4, -1], [8, -1], [-1, -1]]
    discard = BPTTBatches(np.arange(1, 12), batch_size=3, bptt=2, last_batch="discard")
    assert len(discard) == 1 and discard.num_targets == 6
    assert discard[0][0].tolist() == [[1, 2], [4, 5], [7, 8]]


def test_resume_from_any_batch_and_index_like_a_sequence():
    batches = BPTTBatches(np.arange(100), batch_size=4, bptt=5)
    all_batches = list(batches)
    resumed = list(batches.iter_from(3))
    assert len(resumed) == len(batches) - 3
    for (x, y), (ex, ey) in zip(resumed, all_batches[3:]):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    np.testing.assert_array_equal(batches[-1][0], all_batches[-1][0])
    assert list(batches.iter_from(len(batches))) == []
    with pytest.raises(UserError, match="cannot start at batch 99"):
        batches.iter_from(99)
    with pytest.raises(IndexError):
        batches[len(batches)]


def test_batches_are_fresh_arrays_over_one_shared_stream():
    ids = np.arange(1000, dtype=np.int32)
    batches = BPTTBatches(ids, batch_size=4, bptt=5)
    assert np.shares_memory(batches._ids, ids)  # the stream itself is not copied
    x, _ = batches[0]
    x[:] = -7
    assert batches[0][0][0, 0] == 0 and ids[0] == 0


@pytest.mark.parametrize(("n", "last_batch", "needed"), [(20, "discard", 24), (4, "keep", 5)])
def test_too_short_stream_says_how_many_tokens_are_needed(n, last_batch, needed):
    with pytest.raises(UserError, match=rf"has {n} tokens, too few.*need at least {needed}"):
        BPTTBatches(np.arange(n), batch_size=4, bptt=5, last_batch=last_batch)


def test_invalid_arguments_are_user_errors():
    with pytest.raises(UserError, match="last_batch"):
        BPTTBatches(np.arange(100), 4, 5, last_batch="rollover")
    with pytest.raises(UserError, match="batch size"):
        BPTTBatches(np.arange(100), 0, 5)
    with pytest.raises(UserError, match="bptt"):
        BPTTBatches(np.arange(100), 4, 0)
    with pytest.raises(UserError, match="one-dimensional"):
        BPTTBatches(np.zeros((10, 10)), 4, 5)
    with pytest.raises(UserError, match="negative"):
        BPTTBatches(np.full(100, -1), 4, 5)
