"""bench/common.py's pure helpers: the FLOPs an adaptive softmax costs a token, and the share of
targets each of its tails sees."""

from __future__ import annotations

import numpy as np
import pytest

from bench.common import adaptive_flops_per_token, flops_per_token, layer_sizes, tail_shares
from keraslm.config import LMConfig

MODEL = {"nhid": 200, "emsize": 200, "nlayers": 2, "vocab_size": 33_278}
LSTM = 4 * 200 * 400 * 2  # multiply-adds of two 200-unit LSTM layers on a 200-wide input


def test_tail_shares_count_each_cluster_by_its_bounds():
    targets = np.array([[0, 1_999, 2_000], [9_999, 10_000, 33_277]])
    assert tail_shares(targets, (2_000, 10_000)) == pytest.approx([2 / 6, 2 / 6])
    assert tail_shares(targets, ()) == []


def test_adaptive_flops_count_the_head_always_and_each_tail_by_its_share():
    # head: 2,000 words + 2 cluster logits; tail 1: 200 -> 50 units -> 8,000 words;
    # tail 2: 200 -> 12 units -> 23,278 words.
    head, tail1, tail2 = 200 * 2_002, 50 * 200 + 50 * 8_000, 12 * 200 + 12 * 23_278
    got = adaptive_flops_per_token(MODEL, (2_000, 10_000), 4.0, (0.5, 0.25))
    assert got == pytest.approx(2 * (LSTM + head + 0.5 * tail1 + 0.25 * tail2))


def test_adaptive_flops_without_cutoffs_are_the_full_softmax():
    assert adaptive_flops_per_token(MODEL, (), 4.0, ()) == flops_per_token(MODEL)


def test_tied_tails_add_their_output_matrices_once_a_step():
    untied = adaptive_flops_per_token(MODEL, (2_000, 10_000), 4.0, (0.5, 0.25))
    tied = adaptive_flops_per_token(MODEL, (2_000, 10_000), 4.0, (0.5, 0.25), tied_step_tokens=700)
    assert tied - untied == pytest.approx(2 * (8_000 * 200 * 50 + 23_278 * 200 * 12) / 700)


def test_flops_follow_each_layers_width_on_the_awd_shape():
    """awd_lstm_lm_600: 200 -> 600 -> 600 -> 200 units, the decoder reading the last 200."""
    awd = {"nhid": 600, "emsize": 200, "nlayers": 3, "vocab_size": 33_278, "tied": True,
           "last_layer_emsize": True}
    lstm = 4 * 600 * (200 + 600) + 4 * 600 * (600 + 600) + 4 * 200 * (600 + 200)
    assert flops_per_token(awd) == pytest.approx(2 * (lstm + 200 * 33_278))
    config = LMConfig(vocab_size=33_278, emsize=200, nhid=600, nlayers=3, last_layer_emsize=True)
    assert layer_sizes(awd) == list(config.layer_sizes())
    assert layer_sizes({**awd, "tied": False}) == [600, 600, 600]
