"""The result types: what they derive, and JSON round trips that lose nothing (NaN and infinity
travel as null and come back as they were)."""

from __future__ import annotations

import dataclasses
import json
import math

from keraslm.scores import CorpusScore, TextScore, perplexity


def corpus(**changes) -> CorpusScore:
    base = CorpusScore("a.txt", "bundles/x", "p", "CPUExecutionProvider", batch_size=2, bptt=3,
                       num_stream_tokens=12, num_tokens=10, num_oov=3, num_unk=4, nll_sum=25.0,
                       nll_sum_unk=13.0, seconds=2.0)
    return dataclasses.replace(base, **changes)


def test_corpus_figures_are_derived_from_the_sums():
    r = corpus()
    assert r.perplexity == math.exp(2.5) and r.avg_nll == 2.5
    assert r.perplexity_excl_unk == math.exp(12.0 / 6)
    assert r.oov_rate == 3 / 12  # over the text's tokens, not the 10 targets
    assert r.tokens_per_second == 5.0


def test_corpus_score_round_trips_through_json():
    for r in (corpus(), corpus(nll_sum=math.inf, nll_sum_unk=math.inf),
              corpus(num_unk=None, nll_sum_unk=None, cache={"size": 5})):
        d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
        assert CorpusScore.from_dict(d) == r


def test_text_score_round_trips_through_json():
    for s in (TextScore(4, 1, -9.5), TextScore(0, 0, 0.0), TextScore(3, 0, -math.inf)):
        d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
        assert TextScore.from_dict(d) == s
    assert TextScore(4, 1, -9.5).to_dict()["perplexity"] == math.exp(9.5 / 4)
    assert TextScore(0, 0, 0.0).to_dict()["perplexity"] is None


def test_perplexity_of_nothing_is_nan_and_overflow_is_inf():
    assert math.isnan(perplexity(0.0, 0))
    assert perplexity(1e6, 1) == math.inf
