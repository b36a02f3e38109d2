"""The scorer on a real tiny bundle: texts alone or batched, and corpora in evaluate's layout."""

from __future__ import annotations

import itertools
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from test_serve_bundle import tiny_bundle  # noqa: F401 - the shared session fixture

from keraslm.batching import BPTTBatches
from keraslm.errors import UserError
from keraslm.text import RAW
from serve import scorer as scorer_module
from serve.scorer import Scorer, choose_providers

TEXTS = [
    "the game began in 1998 .",
    "",
    ("a much longer text , longer than several bptt chunks , with words like zyzzyva and "
     "flibbertigibbet that the vocabulary has never seen , on two\nlines"),
    "= Valkyria =",
    "\n\n",
    "one",
]


@pytest.fixture(scope="module")
def scorer(tiny_bundle) -> Scorer:  # noqa: F811
    return Scorer(tiny_bundle.bundle, device="cpu", threads=1, batch_size=4, bptt=5)


@pytest.fixture(scope="module")
def wiki_excerpt(tmp_path_factory, data_root) -> Path:
    """The first 120 lines of WikiText-2 valid (about 5,000 tokens, empty lines included)."""
    lines = (data_root / "wikitext-2" / "wiki.valid.tokens").open(encoding="utf-8")
    path = tmp_path_factory.mktemp("text") / "excerpt.tokens"
    path.write_text("".join(itertools.islice(lines, 120)), encoding="utf-8")
    return path


def reference(scorer: Scorer, path: Path, batch_size: int, bptt: int, pipeline=None):
    """NLL sums over keraslm.batching's own batches (whole id stream in memory), via the graph."""
    pipeline = pipeline or scorer.pipeline
    ids, oov = scorer.vocab.encode(pipeline.iter_tokens(path), return_oov=True)
    batches = BPTTBatches(ids, batch_size, bptt, "keep")
    state, nll, nll_unk, unk = scorer.zero_state(batch_size), 0.0, 0.0, 0
    for inputs, targets in batches:
        logprobs, state = scorer.step(inputs, targets, state)
        nll -= logprobs.sum(dtype=np.float64)
        is_unk = targets == scorer.vocab.unk_id
        nll_unk -= logprobs[is_unk].sum(dtype=np.float64)
        unk += int(is_unk.sum())
    return {"num_tokens": batches.num_targets, "num_oov": oov, "nll_sum": nll,
            "nll_sum_unk": nll_unk, "num_unk": unk, "num_stream_tokens": ids.size}


# ---- texts on their own --------------------------------------------------------------------------

def test_batched_texts_score_exactly_as_each_alone(scorer):
    together = scorer.score(TEXTS)
    alone = [scorer.score([text])[0] for text in TEXTS]
    assert [s.num_tokens for s in together] == [s.num_tokens for s in alone]
    assert [s.num_oov for s in together] == [s.num_oov for s in alone]
    np.testing.assert_allclose([s.log_likelihood for s in together],
                               [s.log_likelihood for s in alone], rtol=1e-6, atol=0)
    assert together[2].num_oov >= 2 and together[2].num_tokens > 4 * scorer.bptt
    assert together[1].num_tokens == 0 and math.isnan(together[1].perplexity)
    assert together[4].num_tokens == 2  # two empty lines: <eos> <eos>


def test_text_is_scored_from_eos_context_in_one_pass(scorer):
    """Chunked scoring with carried state equals one unchunked pass with <eos> as first input."""
    text = TEXTS[2]
    tokens = [t for sample in scorer.pipeline.process(text) for t in sample]
    ids = scorer.vocab.encode(tokens)
    inputs = np.concatenate([[scorer.vocab.token_to_id("<eos>")], ids[:-1]]).astype(np.int32)
    logprobs, _ = scorer.step(inputs[None], ids[None].astype(np.int32), scorer.zero_state(1))
    (score,) = scorer.score([text])
    assert score.num_tokens == len(tokens)
    assert score.log_likelihood == pytest.approx(float(logprobs.sum()), rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(-score.log_likelihood / len(tokens)))


# ---- corpora as carried streams ------------------------------------------------------------------

@pytest.mark.parametrize("batch_size, bptt", [(1, 35), (3, 5), (7, 35), (20, 35)])
def test_score_file_equals_keraslm_batching_layout(scorer, wiki_excerpt, batch_size, bptt):
    result = scorer.score_file(wiki_excerpt, batch_size, bptt)
    ref = reference(scorer, wiki_excerpt, batch_size, bptt)
    for key in ("num_tokens", "num_oov", "num_unk", "num_stream_tokens"):
        assert getattr(result, key) == ref[key], key
    assert result.nll_sum == pytest.approx(ref["nll_sum"], rel=1e-9)
    assert result.nll_sum_unk == pytest.approx(ref["nll_sum_unk"], rel=1e-9)
    assert (result.batch_size, result.bptt) == (batch_size, bptt)
    excl = math.exp((ref["nll_sum"] - ref["nll_sum_unk"]) / (ref["num_tokens"] - ref["num_unk"]))
    assert result.perplexity_excl_unk == pytest.approx(excl, rel=1e-9)
    assert result.perplexity == pytest.approx(math.exp(ref["nll_sum"] / ref["num_tokens"]))


def test_score_file_restarts_columns_from_thinned_restart_points(scorer, wiki_excerpt,
                                                                 monkeypatch):
    """With only a few restart points kept, each column skips forward from the one before it."""
    monkeypatch.setattr(scorer_module, "MAX_RESTART_POINTS", 3)
    result = scorer.score_file(wiki_excerpt, 6, 9)
    ref = reference(scorer, wiki_excerpt, 6, 9)
    assert result.num_tokens == ref["num_tokens"]
    assert result.nll_sum == pytest.approx(ref["nll_sum"], rel=1e-9)


def test_score_file_raw_text_in_sentences(tiny_bundle, data_root, tmp_path):  # noqa: F811
    """Punkt sentences, Moses tokens: columns restart by sentence count and agree exactly."""
    text = (data_root / "sherlockholmes" / "sherlockholmes.valid.txt").read_text("utf-8")
    path = tmp_path / "sherlock.txt"
    path.write_text(text[:6000], encoding="utf-8")
    raw = Scorer(tiny_bundle.bundle, device="cpu", pipeline=RAW)
    result = raw.score_file(path, 5, 12)
    ref = reference(raw, path, 5, 12, RAW)
    assert result.num_tokens == ref["num_tokens"] and result.num_oov == ref["num_oov"]
    assert result.nll_sum == pytest.approx(ref["nll_sum"], rel=1e-9)
    assert "punkt sentences" in result.pipeline


def test_score_file_scores_a_corpus_shorter_than_the_batch_as_one_stream(scorer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("the cat sat\n", encoding="utf-8")  # 4 tokens with <eos>
    result = scorer.score_file(path, 4, 35)
    assert result.batch_size == 1 and result.num_tokens == 3
    ref = reference(scorer, path, 1, 35)
    assert result.nll_sum == pytest.approx(ref["nll_sum"], rel=1e-9)


def test_score_file_memory_does_not_grow_with_the_corpus(scorer, wiki_excerpt, tmp_path,
                                                         monkeypatch):
    """Ten times the text, about the same peak of Python allocations (no list of all tokens).

    Restart points are capped (at 1,024 normally; 16 here, so both texts reach the cap).
    """
    monkeypatch.setattr(scorer_module, "MAX_RESTART_POINTS", 16)
    big = tmp_path / "big.tokens"
    big.write_text(wiki_excerpt.read_text(encoding="utf-8") * 10, encoding="utf-8")

    def peak(path: Path) -> int:
        tracemalloc.start()
        try:
            scorer.score_file(path, 4, 35)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small_peak, big_peak = peak(wiki_excerpt), peak(big)
    stream_bytes = 4 * 10 * scorer.score_file(wiki_excerpt, 4, 35).num_stream_tokens
    assert big_peak < small_peak + stream_bytes / 4, (small_peak, big_peak)


# ---- against Keras/TensorFlow ----------------------------------------------------------------------

def test_score_file_equals_keras_evaluate_on_wikitext2_valid(tiny_bundle, scorer,  # noqa: F811
                                                             data_root):
    """The whole WikiText-2 valid split: ONNX scorer vs keraslm.evaluate at the same batch size."""
    from keraslm.evaluation import evaluate_run

    valid = data_root / "wikitext-2" / "wiki.valid.tokens"
    expected = evaluate_run(tiny_bundle.run, str(valid), batch_size=20, bptt=35,
                            jit_compile=False)
    result = scorer.score_file(valid, 20, 35)
    assert result.num_stream_tokens == 217_646
    assert result.num_tokens == expected.num_tokens
    assert result.num_oov == expected.num_oov
    assert abs(result.perplexity / expected.perplexity - 1) <= 1e-4
    assert result.pipeline == expected.pipeline


# ---- devices and bad arguments ----------------------------------------------------------------------

def test_providers_ask_onnxruntime_first(monkeypatch):
    monkeypatch.setattr(scorer_module.ort, "get_available_providers",
                        lambda: ["CPUExecutionProvider"])
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="no CUDAExecutionProvider"):
        choose_providers("cuda")
    monkeypatch.setattr(scorer_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_providers("auto")[0] == "CUDAExecutionProvider"
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="unknown device"):
        choose_providers("tpu")


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"bptt": -1}, {"threads": 0}])
def test_scorer_rejects_non_positive_sizes(tiny_bundle, kwargs):  # noqa: F811
    with pytest.raises(UserError, match="must be a positive integer"):
        Scorer(tiny_bundle.bundle, **kwargs)
