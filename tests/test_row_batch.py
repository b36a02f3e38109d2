"""Continuous batching (issue 14, goal 3): rows that join and leave a batch between onnxruntime
calls get the numbers they get alone, calls take the width worth the most, and the service's
batcher lets a new request into the next call and answers each request as soon as it is done."""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers_runs import build_bundle

from keraslm.contract import PAD_INPUT, PAD_TARGET
from serve.row_batch import CallCost, RowBatch, best_width, calibrate
from serve.scorer import Scorer
from serve.web.batcher import Batcher

WORDS = ("the game began in 1998 , and a much longer text followed it , longer than several "
         "bptt chunks , on two lines . " * 4).split()


@pytest.fixture(scope="module")
def scorer(tiny_bundle) -> Scorer:
    return Scorer(tiny_bundle.bundle, device="cpu", threads=1, bptt=5, spin=False)


def alone(scorer: Scorer, ids: np.ndarray) -> np.ndarray:
    inputs = np.concatenate([[scorer.context_id], ids[:-1]]).astype(np.int32)
    logprobs, _ = scorer.step(inputs[None], ids[None], scorer.zero_state(1))
    return logprobs[0]


def test_rows_joining_and_leaving_score_as_each_alone(scorer):
    ids = scorer.vocab.encode(WORDS)
    texts = {"long": ids, "short": ids[3:5], "one": ids[7:8], "mid": ids[10:31], "late": ids[:13]}
    batch = RowBatch(scorer, max_rows=3, cost=CallCost(0.0, 1.0))  # every call ends at a row
    batch.add("long", texts["long"])
    batch.add("short", texts["short"])
    finished = {row.key: row.logprobs for row in batch.step()}
    calls, waiting = [2], ["one", "mid", "late"]
    while batch.rows or waiting:
        while batch.free and waiting:
            key = waiting.pop(0)
            batch.add(key, texts[key])
        calls.append(len(batch.rows))
        finished.update((row.key, row.logprobs) for row in batch.step())
    assert set(finished) == set(texts)
    for key, lp in finished.items():
        assert lp.dtype == np.float32 and lp.size == texts[key].size
        np.testing.assert_allclose(lp, alone(scorer, texts[key]), rtol=1e-5, atol=1e-6)
    assert calls[:2] == [2, 3]  # "one" took the free row at the second call
    assert max(calls) == 3


def test_dropped_rows_leave_the_others_untouched(scorer):
    ids = scorer.vocab.encode(WORDS)
    batch = RowBatch(scorer, max_rows=4)
    for key, row in (("a", ids[:20]), ("b", ids[5:30]), ("c", ids[2:17])):
        batch.add(key, row)
    batch.step()
    assert batch.drop({"b", "nobody"}) == 1 and [r.key for r in batch.rows] == ["a", "c"]
    finished = {}
    while batch.rows:
        finished.update((row.key, row.logprobs) for row in batch.step())
    np.testing.assert_allclose(finished["a"], alone(scorer, ids[:20]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(finished["c"], alone(scorer, ids[2:17]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        batch.add("empty", ids[:0])


def test_a_call_is_as_wide_as_is_worth_it():
    rng = np.random.default_rng(0)
    for _ in range(200):
        remaining = rng.integers(1, 90, rng.integers(1, 33))
        bptt = int(rng.integers(1, 40))
        cost = CallCost(float(rng.uniform(0, 60)), float(rng.uniform(0, 1)))
        value = []
        for w in range(1, bptt + 1):
            scored = np.minimum(remaining, w).sum()
            value.append(scored / (cost.overhead + scored
                                   + cost.padding * (remaining.size * w - scored)))
        chosen = best_width(remaining, bptt, cost)
        assert 1 <= chosen <= bptt
        assert value[chosen - 1] == pytest.approx(max(value), rel=1e-12)
    # no fixed cost and costly padding: a call never pads; a large fixed cost or free padding:
    # it never stops short of bptt
    assert best_width(np.array([3, 80, 80]), 35, CallCost(0.0, 1.0)) == 3
    assert best_width(np.array([3, 80, 80]), 35, CallCost(1000.0, 1.0)) == 35
    assert best_width(np.array([3, 80, 80]), 35, CallCost(5.0, 0.0)) == 35


# ---- calibrate, against the bundle's real calls ---------------------------------------------------
# Timing on a shared machine is noisy: every figure below is a minimum or a median of several,
# and every check compares things that differ several-fold.

@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory):
    """A bundle whose decoder dwarfs its LSTM: 1 layer of 16 under a 4002-token decoder."""
    return build_bundle(tmp_path_factory.mktemp("wide"), "wide", words=60_000, vocab=4000,
                        nlayers=1)


def bptt_scorer(bundle) -> Scorer:
    return Scorer(bundle.bundle, device="cpu", threads=1, bptt=35, spin=False)


def median_cost(scorer: Scorer, rows: int, times: int = 3) -> CallCost:
    costs = [calibrate(scorer, rows) for _ in range(times)]
    return CallCost(float(np.median([c.overhead for c in costs])),
                    float(np.median([c.padding for c in costs])))


def tokens_per_second(scorer: Scorer, remaining: np.ndarray, width: int) -> float:
    """What a real call `width` steps wide over rows with `remaining` tokens each scores a
    second (the best of 20 calls), padded past each row's end as RowBatch pads it."""
    rows = remaining.size
    tokens = (np.arange(rows * width).reshape(rows, width) % len(scorer.vocab)).astype(np.int32)
    targets = np.where(np.arange(width) < remaining[:, None], tokens, PAD_TARGET).astype(np.int32)
    tokens = np.where(targets == PAD_TARGET, PAD_INPUT, tokens).astype(np.int32)
    state = scorer.zero_state(rows)
    scorer.step(tokens, targets, state)
    best = math.inf
    for _ in range(20):
        started = time.perf_counter()
        scorer.step(tokens, targets, state)
        best = min(best, time.perf_counter() - started)
    return int(np.minimum(remaining, width).sum()) / best


def test_calibrate_measures_padding_cheap_where_the_decoder_dominates(tiny_bundle, wide_bundle):
    """The graph runs its decoder at targets only, so a padded position costs the LSTM alone:
    a small fraction of a scored position under a 4002-wide decoder over one small layer, a
    large one under a 202-wide decoder over two; and the fixed cost of a call, counted in
    positions, is the larger where positions are cheap. (A graph whose decoder ran everywhere
    would measure padding near 1; a calibrate that measured nothing, its defaults.)"""
    tiny = median_cost(bptt_scorer(tiny_bundle), rows=8)
    wide = median_cost(bptt_scorer(wide_bundle), rows=8)
    assert wide.padding < 0.3, wide
    assert tiny.padding > 2 * wide.padding, (tiny, wide)
    assert tiny.overhead > 3 * max(wide.overhead, 1.0), (tiny, wide)


@pytest.mark.parametrize("remaining", [[1, 80, 80, 80], [1, 1, 1, 1, 1, 1, 80, 80]],
                         ids=["one-short-row", "six-short-rows"])
def test_the_width_chosen_by_the_calibrated_cost_is_the_fastest_real_call(tiny_bundle,
                                                                          remaining):
    """Of the widths RowBatch weighs, the one best_width picks with calibrate's cost scores
    (about) the most tokens a second in real calls. On this bundle the wide call scores about
    10x (one short row) and 3x (six) as fast as the narrow one, margins noise does not close;
    CallCost(0, 1) (no fixed cost) picks the narrow call for both, CallCost() for six."""
    scorer = bptt_scorer(tiny_bundle)
    remaining = np.array(remaining)
    cost = median_cost(scorer, rows=remaining.size)
    speeds = {w: tokens_per_second(scorer, remaining, w) for w in (int(remaining.min()), 35)}
    chosen = best_width(remaining, scorer.bptt, cost)
    assert speeds[chosen] >= 0.7 * max(speeds.values()), (cost, chosen, speeds)


def test_the_batcher_lets_new_requests_into_the_next_call(scorer):
    ids = scorer.vocab.encode(WORDS)
    calls: list[tuple[int, int]] = []

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as model_thread:
            loop = asyncio.get_running_loop()
            never = loop.time() + 3600
            joined = {}

            def join_after_first_call(requests, texts, seconds):
                calls.append((requests, texts))
                if len(calls) == 1:
                    joined["short"] = batcher.submit([ids[:2]], never)
                    joined["expired"] = batcher.submit([ids[:4]], loop.time() - 1)
                    joined["withdrawn"] = batcher.submit([ids[:4]], never)
                    batcher.withdraw(joined["withdrawn"])

            batcher = Batcher(model_thread, max_batch=4, max_wait=0.0,
                              on_call=join_after_first_call)
            batcher.use(RowBatch(scorer, 4, CallCost(0.0, 1.0)))
            batcher.start()
            long = batcher.submit([ids[:40], ids[:12]], never)
            short = await asyncio.wait_for(_joined(joined, "short"), 60)
            assert not long.future.done()  # answered before the request it joined
            [got] = await asyncio.wait_for(short, 60)
            np.testing.assert_allclose(got, alone(scorer, ids[:2]), rtol=1e-5, atol=1e-6)
            assert not long.future.done()
            first, second = await asyncio.wait_for(long.future, 60)
            np.testing.assert_allclose(first, alone(scorer, ids[:40]), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(second, alone(scorer, ids[:12]), rtol=1e-5, atol=1e-6)
            with pytest.raises(asyncio.TimeoutError):
                await joined["expired"].future
            assert joined["withdrawn"].future.cancelled()
            assert batcher.running == 0 and batcher.depth == 0
            await batcher.stop()

    asyncio.run(scenario())
    assert calls[0] == (1, 2) and calls[1] == (2, 3)  # the short text joined the second call
    assert max(texts for _, texts in calls) == 3  # the expired and withdrawn never did


async def _joined(joined: dict, key: str) -> asyncio.Future:
    while key not in joined:
        await asyncio.sleep(0.001)
    return joined[key].future
