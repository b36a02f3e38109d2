"""The scorer on a real tiny bundle: texts alone or batched, and corpora in evaluate's layout."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from keraslm import text as text_module
from keraslm.batching import BPTTBatches
from keraslm.errors import UserError
from keraslm.text import RAW
from serve import scorer as scorer_module
from serve import session as session_module
from serve.scorer import Scorer
from serve.session import choose_providers

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
def scorer(tiny_bundle) -> Scorer:
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


def test_score_rows_scores_each_row_alone_through_one_row_batch(scorer, monkeypatch):
    """Per-token log-probabilities as each row alone; at most `max_rows` rows a call, at most
    bptt steps, longest rows first, a row that ends making room for the next; every real token
    is computed exactly once."""
    ids = scorer.vocab.encode(" ".join(TEXTS).split())
    rows = [ids[:3], ids[:0], ids, ids[:11], ids[:1]]
    calls = []
    step = scorer.step
    monkeypatch.setattr(scorer, "step", lambda tokens, targets, state: calls.append(
        (tokens.shape, int((targets >= 0).sum()))) or step(tokens, targets, state))
    logprobs = scorer.score_rows(rows, max_rows=2)
    assert max(rows for (rows, _), _ in calls) == 2
    assert max(width for (_, width), _ in calls) <= scorer.bptt
    assert sum(scored for _, scored in calls) == sum(row.size for row in rows)
    assert calls[0][0][0] == 2 and calls[0][1] >= 2 * min(11, scorer.bptt) - 1  # the two longest
    assert [lp.size for lp in logprobs] == [row.size for row in rows]
    for row, lp in zip(rows, logprobs):
        assert lp.dtype == np.float32
        if row.size:
            inputs = np.concatenate([[scorer.context_id], row[:-1]]).astype(np.int32)
            alone, _ = step(inputs[None], row[None], scorer.zero_state(1))
            np.testing.assert_allclose(lp, alone[0], rtol=1e-5, atol=1e-6)


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


def test_score_file_reads_the_columns_in_blocks(scorer, wiki_excerpt, monkeypatch):
    """Blocks of one chunk, or a few, read from the id file give the same numbers."""
    ref = reference(scorer, wiki_excerpt, 6, 9)
    for block_ids in (1, 6 * 9 * 7):
        monkeypatch.setattr(scorer_module, "BLOCK_IDS", block_ids)
        result = scorer.score_file(wiki_excerpt, 6, 9)
        assert result.num_tokens == ref["num_tokens"] and result.num_unk == ref["num_unk"]
        assert result.nll_sum == pytest.approx(ref["nll_sum"], rel=1e-9)


def test_score_file_raw_text_in_sentences(tiny_bundle, data_root, tmp_path):
    """Punkt sentences, Moses tokens: the same numbers as keraslm.batching's layout."""
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

    The buffers are capped (1 MiB reads, 64 Ki tokens encoded and 1 Mi ids read at a time
    normally; smaller here, so both texts reach the caps).
    """
    monkeypatch.setattr(text_module, "READ_BYTES", 4096)
    monkeypatch.setattr(scorer_module, "ENCODE_TOKENS", 1024)
    monkeypatch.setattr(scorer_module, "BLOCK_IDS", 4 * 35 * 8)
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


# ---- input that is not text, and long lines ------------------------------------------------------

@pytest.mark.parametrize("method", ["score_file", "score_samples"])
def test_dev_zero_is_refused_at_once(scorer, method):
    """An endless stream of NUL bytes without a newline: refused at its first read."""
    score = {"score_file": scorer.score_file,
             "score_samples": lambda path: list(scorer.score_samples(path))}[method]
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        score("/dev/zero")
    assert str(err.value) == ("/dev/zero: binary file (NUL byte at byte 0, line 1); "
                              "expected UTF-8 text")
    assert time.perf_counter() - started < 5


def test_a_nul_byte_is_named_by_byte_and_line_across_reads(scorer, tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "READ_BYTES", 4)
    path = tmp_path / "nul.txt"
    path.write_bytes(b"one two\nthree\nfour \0 five\n")
    with pytest.raises(UserError, match=r"nul\.txt: binary file \(NUL byte at byte 19, line 3\)"):
        scorer.score_file(path)


LONG_LINE_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from serve.score import write_per_line
    from serve.scorer import Scorer

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    bundle, small, line, lines, out = sys.argv[1:6]
    scorer = Scorer(bundle, device="cpu", threads=1, batch_size=20, bptt=int(sys.argv[6]))
    scorer.score_file(small)
    write_per_line(scorer, Path(small), Path(out))
    base = peak()
    one_line = scorer.score_file(line)
    file_growth = peak() - base
    write_per_line(scorer, Path(line), Path(out))
    per_line_growth = peak() - base
    report = {"file": file_growth, "per_line": per_line_growth, "line": one_line.to_dict(),
              "lines": scorer.score_file(lines).to_dict()}
    print(json.dumps(report))
""")


def test_a_10_mb_line_is_scored_in_bounded_memory(tiny_bundle, scorer, tmp_path):
    """10 MB on one line, by score_file and by --per-line: peak RSS grows by less than 100 MB
    (one tokenized piece, a block of ids, and for --per-line the line's ids and log-
    probabilities). The same sentences one per line (a literal <eos> for each line end) are
    the same token stream, so they score the same."""
    words = [w for w in scorer.vocab.tokens if w.isalpha()][:48]
    # Two words and a long compound (unknown: fewer tokens to run through the model).
    sentences = [" ".join([*words[i % 48:][:2], "-".join((words * 2)[i:i + 20])])
                 for i in range(97)]
    repeats = (10 << 20) // sum(len(s) + 7 for s in sentences) + 1
    line, lines = tmp_path / "line.txt", tmp_path / "lines.txt"
    line.write_text(" <eos> ".join(sentences * repeats) + "\n", encoding="utf-8")
    lines.write_text("\n".join(sentences * repeats) + "\n", encoding="utf-8")
    assert line.stat().st_size > 10 << 20
    small = tmp_path / "small.txt"
    small.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out = tmp_path / "per_line.jsonl"
    run = subprocess.run([sys.executable, "-c", LONG_LINE_SCRIPT, str(tiny_bundle.bundle),
                          str(small), str(line), str(lines), str(out), "350"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["file"] < 100 << 20 and report["per_line"] < 100 << 20, report
    one, many = report["line"], report["lines"]
    assert one["num_stream_tokens"] == many["num_stream_tokens"] > 300_000
    assert (one["nll_sum"], one["num_oov"]) == (many["nll_sum"], many["num_oov"])
    (record,) = [json.loads(r) for r in out.read_text(encoding="utf-8").splitlines()]
    assert record["num_tokens"] == one["num_stream_tokens"]
    assert record["num_oov"] == one["num_oov"] and record["log_likelihood"] < 0


# ---- against Keras/TensorFlow ----------------------------------------------------------------------

def test_score_file_equals_keras_evaluate_on_wikitext2_valid(tiny_bundle, scorer,
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
    monkeypatch.setattr(session_module.ort, "get_available_providers",
                        lambda: ["CPUExecutionProvider"])
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="no CUDAExecutionProvider"):
        choose_providers("cuda")
    monkeypatch.setattr(session_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_providers("auto")[0] == "CUDAExecutionProvider"
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="unknown device"):
        choose_providers("tpu")


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"bptt": -1}, {"threads": 0}])
def test_scorer_rejects_non_positive_sizes(tiny_bundle, kwargs):
    with pytest.raises(UserError, match="must be a positive integer"):
        Scorer(tiny_bundle.bundle, **kwargs)
