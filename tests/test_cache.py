"""The continuous cache: its math by hand and against a token-by-token reference, carried across
chunks, reset per text, tuned, and through the scorer and score.py on the real tiny bundle."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_runs import edit_json

from keraslm.contract import PAD_TARGET
from keraslm.errors import UserError
from keraslm.text import TextPipeline
from serve import cache as cache_module
from serve import score as score_cli
from serve.cache import (
    CacheSettings,
    ContinuousCache,
    Recording,
    StreamCache,
    mix,
    plan,
    tune,
)
from serve.scorer import Scorer

SETTINGS = CacheSettings(size=40, theta=0.7, lam=0.3)


def reference_logprobs(hidden: np.ndarray, targets: np.ndarray, model: np.ndarray,
                       settings: CacheSettings) -> np.ndarray:
    """The definition, one stream, one token at a time (float64): the test's yardstick."""
    out = []
    for t in range(len(targets)):
        window = range(max(0, t - settings.size), t)
        if window:
            sims = settings.theta * np.array([hidden[t] @ hidden[i] for i in window], np.float64)
            weights = np.exp(sims - sims.max())
            p_cache = weights[targets[list(window)] == targets[t]].sum() / weights.sum()
        else:
            p_cache = 0.0
        p = (1 - settings.lam) * math.exp(model[t]) + settings.lam * p_cache
        out.append(math.log(p) if p > 0 else -math.inf)
    return np.array(out)


def run_cache(settings: CacheSettings, chunks, piece: int = 64, group: int = 1) -> np.ndarray:
    """Mixed log-probabilities of (hidden, targets, model) chunks through one ContinuousCache
    mixing `piece` positions at a time, `group` chunks together."""
    batch, nhid = chunks[0][0].shape[0], chunks[0][0].shape[-1]
    cache = ContinuousCache(settings, batch, nhid, piece)
    return np.concatenate([mixed for _, mixed in cache.mix_chunks(chunks, group)], axis=1)


# ---- the math --------------------------------------------------------------------------------

def test_a_hand_computed_three_position_example():
    """Vocabulary {0, 1, 2}, 2-d hidden states h = (1, 0), (0, 1), (2, 1), targets 1, 2, 1,
    model probabilities 0.2, 0.3, 0.1, λ = 0.5, θ = 1:
      position 0: empty window                     -> p = 0.5 * 0.2
      position 1: window {0}, which was followed by 1, not 2 -> p_cache = 0 -> p = 0.5 * 0.3
      position 2: window {0, 1}: similarities 2 and 1; only 0 was followed by 1
                  -> p_cache = e^2 / (e^2 + e^1) = e / (e + 1) -> p = 0.5 * 0.1 + 0.5 * e / (e + 1)
    With a window of 1, position 2 sees only position 1 (followed by 2): p = 0.5 * 0.1.
    With θ = 0 the window is uniform: p_cache = 1/2 at position 2."""
    hidden = np.array([[[1, 0], [0, 1], [2, 1]]], np.float32)
    targets = np.array([[1, 2, 1]], np.int32)
    model = np.log(np.array([[0.2, 0.3, 0.1]], np.float32))
    e = math.e
    expected = {
        (2, 1.0): [0.5 * 0.2, 0.5 * 0.3, 0.5 * 0.1 + 0.5 * e / (e + 1)],
        (1, 1.0): [0.5 * 0.2, 0.5 * 0.3, 0.5 * 0.1],
        (2, 0.0): [0.5 * 0.2, 0.5 * 0.3, 0.5 * 0.1 + 0.5 * 0.5],
    }
    for (size, theta), probs in expected.items():
        settings = CacheSettings(size, theta, 0.5)
        whole = run_cache(settings, [(hidden, targets, model)])
        np.testing.assert_allclose(np.exp(whole[0]), probs, rtol=1e-6)
        pieces = [(hidden[:, a:b], targets[:, a:b], model[:, a:b]) for a, b in ((0, 2), (2, 3))]
        np.testing.assert_allclose(run_cache(settings, pieces), whole, rtol=1e-6)


@pytest.mark.parametrize("piece, group, workers", [(64, 1, 1), (7, 1, 1), (256, 3, 1),
                                                    (64, 1, 4), (256, 3, 8)])
def test_random_streams_match_the_token_by_token_reference(piece, group, workers, monkeypatch):
    """Several streams, chunks of uneven length (some longer than a piece), chunks mixed alone
    or together, windows smaller and larger than a chunk (the ring wraps), a stream that ends
    early (padding), frequent repeats of words; streams mixed on one thread or several (a
    stream's piece then cut into bands)."""
    monkeypatch.setattr(cache_module, "_WORKERS", workers)
    rng = np.random.default_rng(0)
    batch, length, nhid = 3, 300, 8
    hidden = np.tanh(rng.normal(size=(batch, length, nhid)) * 2).astype(np.float32)
    targets = rng.integers(0, 6, (batch, length)).astype(np.int32)
    model = np.log(rng.uniform(0.01, 0.5, (batch, length))).astype(np.float32)
    ends = [length, length, 170]
    targets[2, ends[2]:] = PAD_TARGET
    cuts = [0, 35, 40, 134, 250, length]
    for settings in (CacheSettings(5, 1.3, 0.4), CacheSettings(100, 0.5, 0.2),
                     CacheSettings(1000, 2.0, 0.9)):
        chunks = [(hidden[:, a:b], targets[:, a:b], model[:, a:b])
                  for a, b in itertools.pairwise(cuts)]
        got = run_cache(settings, chunks, piece, group)
        assert (got[2, ends[2]:] == 0).all()  # padding scores 0
        for b in range(batch):
            want = reference_logprobs(hidden[b, :ends[b]], targets[b, :ends[b]],
                                      model[b, :ends[b]], settings)
            np.testing.assert_allclose(got[b, :ends[b]], want, rtol=1e-5, atol=1e-6)


def test_padding_never_enters_the_cache():
    """A chunk with padding in the middle, and the chunk after it, score their other positions
    as the same chunks without the padding (the window counts scored positions only)."""
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(1, 18, 4)).astype(np.float32)
    targets = rng.integers(0, 3, (1, 18)).astype(np.int32)
    model = np.full((1, 18), -2.0, np.float32)
    padded = targets.copy()
    padded[0, 3:6] = PAD_TARGET
    keep = padded[0] != PAD_TARGET
    settings = CacheSettings(4, 0.7, 0.3)
    with_padding = run_cache(settings, [(hidden[:, :12], padded[:, :12], model[:, :12]),
                                        (hidden[:, 12:], padded[:, 12:], model[:, 12:])])
    without = run_cache(settings, [(hidden[:, keep], targets[:, keep], model[:, keep])])
    assert (with_padding[0, ~keep] == 0).all()
    np.testing.assert_allclose(with_padding[0, keep], without[0], rtol=1e-6)


def test_lambda_zero_is_the_model_bit_for_bit_and_lambda_one_the_cache_alone():
    rng = np.random.default_rng(2)
    model = np.log(rng.uniform(1e-6, 1, (4, 9))).astype(np.float32)
    cache = np.log(rng.uniform(0, 1, (4, 9)))
    cache[0, :3] = -np.inf  # not in the cache
    scored = np.ones(model.shape, bool)
    assert np.array_equal(mix(model, cache, 0.0, scored), model)
    alone = mix(model, cache, 1.0, scored)
    assert np.array_equal(alone, cache.astype(np.float32)) and np.isneginf(alone[0, :3]).all()
    half = mix(model, cache, 0.5, scored)
    np.testing.assert_allclose(np.exp(half), 0.5 * np.exp(model) + 0.5 * np.exp(cache), rtol=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"size": 0}, {"size": 2.0}, {"size": True}, {"theta": -0.1}, {"theta": math.nan},
    {"theta": math.inf}, {"lam": -0.01}, {"lam": 1.01}, {"lam": math.nan}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(UserError, match="cache-"):
        CacheSettings(**{"size": 10, "theta": 0.5, "lam": 0.1, **kwargs})


def test_tune_finds_the_lowest_perplexity_it_tries():
    """On synthetic streams where the cache helps: the chosen (θ, λ) beats every θ tried and
    every λ near it, and the recording's NLL at it is the reported perplexity."""
    rng = np.random.default_rng(3)
    batch, length, nhid = 2, 400, 6
    words = rng.integers(0, 30, (batch, 40))
    targets = np.tile(words, (1, length // 40)).astype(np.int32)  # a repeated paragraph
    hidden = (np.eye(nhid)[targets % nhid] + rng.normal(0, 0.3, (batch, length, nhid))
              ).astype(np.float32)
    model = np.full((batch, length), math.log(1 / 30), np.float32)
    recording = Recording("synthetic", batch, 35, [
        (hidden[:, a:a + 35], targets[:, a:a + 35], model[:, a:a + 35])
        for a in range(0, length, 35)])
    result = tune(recording, 100)
    assert result.perplexity_off == pytest.approx(30, rel=1e-6) and result.perplexity < 15
    assert result.perplexity == min(g["perplexity"] for g in result.grid)
    best = result.settings
    assert result.perplexity == pytest.approx(
        math.exp(recording.nll(best) / recording.num_tokens), rel=1e-9)
    for lam in (best.lam * 0.9, min(best.lam * 1.1, 1.0)):
        worse = recording.nll(CacheSettings(100, best.theta, lam))
        assert math.exp(worse / recording.num_tokens) >= result.perplexity


def test_the_ring_buffer_keeps_chosen_streams_in_order_and_adds_empty_ones():
    buffer = StreamCache(3, 4, 2, piece=2)
    buffer.add(np.ones((3, 2, 2), np.float32), np.array([[1, 2], [3, 4], [5, 6]], np.int32),
               [1.0])
    buffer.keep([2, 0])  # streams 0 and 1 are now the old streams 2 and 0
    buffer.add_streams(1)  # stream 2 is new: an empty window
    assert buffer.batch == 3 and list(buffer.count[buffer.streams]) == [2, 2, 0]
    # theta 0: uniform over the window, so p_cache(target) = its share of the window's words
    (logp,) = buffer.add(np.ones((3, 1, 2), np.float32), np.array([[5], [1], [2]], np.int32),
                         [0.0])
    assert logp[:, 0].tolist() == [math.log(0.5), math.log(0.5), -math.inf]
    buffer.keep([2])  # the new stream alone: it has seen one word, 2
    (logp,) = buffer.add(np.ones((1, 1, 2), np.float32), np.array([[2]], np.int32), [0.0])
    assert logp[0, 0] == 0.0


# ---- through the scorer, on the tiny bundle -------------------------------------------------

@pytest.fixture(scope="module")
def scorer(tiny_bundle) -> Scorer:
    return Scorer(tiny_bundle.bundle, device="cpu", threads=1, batch_size=3, bptt=5)


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory, data_root) -> Path:
    """The first 60 lines of WikiText-2 valid (about 2,500 tokens)."""
    with (data_root / "wikitext-2" / "wiki.valid.tokens").open(encoding="utf-8") as f:
        text = "".join(next(f) for _ in range(60))
    path = tmp_path_factory.mktemp("cache") / "excerpt.tokens"
    path.write_text(text, encoding="utf-8")
    return path


def with_cache(scorer: Scorer, settings: CacheSettings | None) -> Scorer:
    """A scorer like `scorer` (same bundle, batch size and bptt) with the cache `settings`."""
    return Scorer(scorer.bundle.path, device="cpu", threads=1, batch_size=scorer.batch_size,
                  bptt=scorer.bptt, cache=settings)


def test_lambda_zero_scores_exactly_like_the_plain_scorer(scorer, excerpt):
    off, zero = scorer, with_cache(scorer, CacheSettings(50, 0.7, 0.0))
    a, b = off.score_file(excerpt), zero.score_file(excerpt)
    assert (a.nll_sum, a.nll_sum_unk, a.num_tokens) == (b.nll_sum, b.nll_sum_unk, b.num_tokens)
    assert a.cache is None and b.cache == {"size": 50, "theta": 0.7, "lambda": 0.0}
    texts = ["the game began in 1998 .", "a b c a b c a b c the the the", "one"]
    assert ([s.log_likelihood for s in off.score(texts)]
            == [s.log_likelihood for s in zero.score(texts)])


def test_score_file_equals_the_token_by_token_reference(each_bundle, excerpt):
    """Batch 1: one unchunked pass of the graph, then the definition token by token, equals
    score_file's chunked, carried cache (bptt 5: chunks mixed 51 at a time; bptt 1000: a
    chunk cut into pieces). Either softmax: the cache reads `hidden`, whatever decodes it."""
    cached = Scorer(each_bundle.bundle, device="cpu", threads=1, batch_size=3, bptt=5,
                    cache=SETTINGS)
    ids = cached.vocab.encode(TextPipeline().iter_tokens(excerpt))[:700]
    path = excerpt.parent / "short.tokens"
    path.write_text(" ".join(cached.vocab.decode(ids)) + "\n", encoding="utf-8")
    ids = cached.vocab.encode(TextPipeline().iter_tokens(path))
    tokens, targets = ids[None, :-1].astype(np.int32), ids[None, 1:].astype(np.int32)
    model, _, hidden = cached.step_hidden(tokens, targets, cached.zero_state(1))
    want = reference_logprobs(hidden[0].astype(np.float64), targets[0], model[0], SETTINGS)
    assert plan(1, 5) == (51, 255) and plan(1, 1000) == (1, 256)
    for bptt in (5, 1000):
        result = cached.score_file(path, batch_size=1, bptt=bptt)
        assert result.num_tokens == targets.size
        assert result.nll_sum == pytest.approx(-want.sum(), rel=1e-6)
    assert -want.sum() < -model.sum(dtype=np.float64)  # the cache helps even this model


def test_chunked_streams_score_like_whole_streams(scorer, excerpt):
    """Carried state and cache: bptt 5 equals one chunk per column, at batch 1 and 3."""
    cached = with_cache(scorer, SETTINGS)
    for batch in (1, 3):
        chunked = cached.score_file(excerpt, batch, 5)
        whole = cached.score_file(excerpt, batch, 100_000)
        assert chunked.num_tokens == whole.num_tokens
        assert chunked.nll_sum == pytest.approx(whole.nll_sum, rel=1e-6)
        assert chunked.nll_sum != pytest.approx(scorer.score_file(excerpt, batch, 5).nll_sum,
                                                rel=1e-3)


def test_a_repeated_paragraph_scores_lower_with_the_cache(scorer, excerpt, tmp_path):
    paragraph = excerpt.read_text(encoding="utf-8").splitlines(keepends=True)[:12]
    path = tmp_path / "repeated.tokens"
    path.write_text("".join(paragraph) * 4, encoding="utf-8")
    cached = with_cache(scorer, CacheSettings(2000, 0.5, 0.5))
    off, on = scorer.score_file(path, 1, 35), cached.score_file(path, 1, 35)
    assert on.perplexity < 0.5 * off.perplexity
    text = "".join(paragraph).replace("\n", " ")
    (alone,) = scorer.score([text * 3])
    (with_it,) = cached.score([text * 3])
    assert with_it.perplexity < 0.5 * alone.perplexity  # within one text too


def test_each_text_starts_with_an_empty_cache(scorer):
    """Texts scored together (rows of one batch, rows leaving as they end) score as each alone,
    and a text after a copy of itself gets no help from it."""
    cached = with_cache(scorer, SETTINGS)
    texts = ["a b c a b c a b c the the the the game began in 1998 .",
             "the game began in 1998 . the game began in 1998 .", "one", "= Valkyria ="]
    together = cached.score(texts)
    alone = [cached.score([t])[0] for t in texts]
    np.testing.assert_allclose([s.log_likelihood for s in together],
                               [s.log_likelihood for s in alone], rtol=1e-6)
    assert together[1].log_likelihood > scorer.score([texts[1]])[0].log_likelihood


def test_a_recording_replays_what_scoring_gives(scorer, excerpt):
    cached = with_cache(scorer, SETTINGS)
    recording = cached.record_file(excerpt, 3, 7)
    result = cached.score_file(excerpt, 3, 7)
    assert recording.num_tokens == result.num_tokens
    assert recording.nll(SETTINGS) == pytest.approx(result.nll_sum, rel=1e-9)
    assert -recording.model_logprobs().sum() == pytest.approx(
        scorer.score_file(excerpt, 3, 7).nll_sum, rel=1e-12)


@pytest.fixture(scope="module")
def old_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle as exported before the `hidden` output existed."""
    import onnx

    path = Path(shutil.copytree(tiny_bundle.bundle, tmp_path_factory.mktemp("old") / "bundle"))
    model = onnx.load(path / "model.onnx")
    keep = [o for o in model.graph.output if o.name != "hidden"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, path / "model.onnx")
    edit_json(path / "bundle.json",
              lambda d: d.update(outputs=[o for o in d["outputs"] if o["name"] != "hidden"]))
    return path


def test_an_old_bundle_scores_without_the_cache_and_says_to_re_export(old_bundle, excerpt):
    plain = Scorer(old_bundle, device="cpu")
    assert plain.score_file(excerpt).num_tokens > 0
    with pytest.raises(UserError, match=r"no 'hidden' output.*re-export it with the current "
                                        r"export\.to_onnx: python -m export\.to_onnx"):
        Scorer(old_bundle, device="cpu", cache=SETTINGS)
    with pytest.raises(UserError, match="re-export"):
        plain.cache = SETTINGS


# ---- score.py --------------------------------------------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = score_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_report_states_the_cache_settings(capsys, tiny_bundle, excerpt, tmp_path):
    model = str(tiny_bundle.bundle)
    code, out, _ = run_cli(capsys, excerpt, "--model", model)
    assert code == 0 and "Cache:\toff" in out.splitlines()
    flags = ["--cache-size", "40", "--cache-theta", "0.7", "--cache-lambda", "0.3"]
    code, out, _ = run_cli(capsys, excerpt, "--model", model, *flags)
    fields = dict(line.split(":\t", 1) for line in out.splitlines())
    assert code == 0 and fields["Cache"].startswith("window 40, theta 0.7, lambda 0.3")
    want = Scorer(model, device="cpu", cache=SETTINGS).score_file(excerpt)
    assert fields["Perplexity including <unk>"] == f"{want.perplexity:.2f}"
    per_line = tmp_path / "lines.jsonl"
    code, out, _ = run_cli(capsys, excerpt, "--model", model, *flags, "--json",
                           "--per-line", per_line)
    assert code == 0 and json.loads(out)["cache"] == {"size": 40, "theta": 0.7, "lambda": 0.3}
    rows = [json.loads(line) for line in per_line.read_text(encoding="utf-8").splitlines()]
    assert rows and all(r["cache"] == {"size": 40, "theta": 0.7, "lambda": 0.3} for r in rows)
    code, out, _ = run_cli(capsys, excerpt, "--model", model, "--json", "--per-line", per_line)
    assert json.loads(out)["cache"] is None
    assert json.loads(per_line.read_text(encoding="utf-8").splitlines()[0])["cache"] is None


def test_tune_cache_tunes_on_one_file_and_scores_another(capsys, tiny_bundle, excerpt,
                                                         tmp_path):
    model = str(tiny_bundle.bundle)
    lines = excerpt.read_text(encoding="utf-8").splitlines(keepends=True)
    valid, test = tmp_path / "valid.tokens", tmp_path / "test.tokens"
    valid.write_text("".join(lines[:30]), encoding="utf-8")
    test.write_text("".join(lines[30:]), encoding="utf-8")
    code, out, _ = run_cli(capsys, "--model", model, "--cache-size", "100", "--tune-cache", valid)
    fields = dict(line.split(":\t", 1) for line in out.splitlines())
    assert code == 0 and fields["Cache tuned on"].startswith(str(valid))
    flags = fields["Cache flags"].split()
    assert flags[:2] == ["--cache-size", "100"]
    code, out, _ = run_cli(capsys, test, "--model", model, "--json", "--cache-size", "100",
                           "--tune-cache", valid)
    report = json.loads(out)
    tuning = report["cache_tuning"]
    assert code == 0 and tuning["tuned_on"] == str(valid)
    assert tuning["perplexity"] < tuning["perplexity_off"]
    assert report["cache"] == {"size": 100, "theta": tuning["theta"], "lambda": tuning["lambda"]}
    assert flags == CacheSettings(100, tuning["theta"], tuning["lambda"]).flags().split()
    code, out, _ = run_cli(capsys, test, "--model", model, "--json", *flags)
    assert json.loads(out)["nll_sum"] == report["nll_sum"]  # the printed flags reproduce it


BAD_FLAGS = {
    "size 0": (["--cache-size", "0"], "--cache-size: expected an integer >= 1, got '0'"),
    "size text": (["--cache-size", "many"], "--cache-size: expected an integer >= 1"),
    "negative theta": (["--cache-size", "9", "--cache-theta", "-1"], "--cache-theta: expected"),
    "lambda above 1": (["--cache-size", "9", "--cache-lambda", "1.5"],
                       "--cache-lambda: expected a number in [0, 1], got '1.5'"),
    "no size": (["--cache-lambda", "0.1"], "--cache-lambda needs --cache-size N"),
    "tune and theta": (["--cache-size", "9", "--tune-cache", "V", "--cache-theta", "1"],
                       "--tune-cache chooses theta and lambda"),
    "tune on the corpus": (["--cache-size", "9", "--tune-cache", "CORPUS"],
                           "is the corpus being scored"),
}


@pytest.mark.parametrize("flags, expected", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_cache_flags_are_one_line_and_status_1(capsys, tiny_bundle, excerpt,
                                                   flags, expected):
    flags = [str(excerpt) if f == "CORPUS" else f for f in flags]
    code, out, err = run_cli(capsys, excerpt, "--model", tiny_bundle.bundle, *flags)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_cache_flags_on_an_old_bundle_are_one_line(capsys, old_bundle, excerpt):
    code, out, err = run_cli(capsys, excerpt, "--model", old_bundle, "--cache-size", "100")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "re-export it with the current export.to_onnx: python -m export.to_onnx" in err


def test_lambda_one_reports_an_infinite_perplexity_honestly(capsys, tiny_bundle, excerpt):
    code, out, _ = run_cli(capsys, excerpt, "--model", tiny_bundle.bundle, "--json",
                           "--cache-size", "5", "--cache-lambda", "1")
    report = json.loads(out)  # valid JSON: no Infinity
    assert code == 0 and report["perplexity"] is None and report["nll_sum"] is None
