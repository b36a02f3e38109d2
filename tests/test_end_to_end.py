"""The three programs chained: train (2 replicas) -> export -> score, on real WikiText-2 text.

A tiny model trained by the real CLI with `--cpu-replicas 2`, exported by the real exporter, must
score through the Scorer's public methods exactly what the Keras side gives: the whole WikiText-2
validation split as `keraslm.evaluate` scores it at the same batch size, each text as the
Evaluator sums it, and every token as the Keras model gives it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.to_onnx import export_run
from keraslm import train as train_cli
from keraslm.backend import tf
from keraslm.batching import BPTTBatches
from keraslm.evaluation import Evaluator, evaluate_run
from keraslm.runs import load_run_model
from keraslm.text import TextPipeline
from keraslm.vocab import Vocab
from serve.scorer import Scorer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("e2e")
    wiki = data_root / "wikitext-2"
    train_text = (wiki / "wiki.train.tokens").read_text(encoding="utf-8")[:150_000]
    (root / "train.txt").write_text(train_text[: train_text.rindex("\n") + 1], encoding="utf-8")
    args = ["--train", str(root / "train.txt"), "--valid", str(wiki / "wiki.valid.tokens"),
            "--test", str(wiki / "wiki.valid.tokens"), "--emsize", "16", "--nhid", "16",
            "--batch-size", "8", "--bptt", "12", "--epochs", "1", "--lr", "5", "--dropout", "0.1",
            "--cpu-replicas", "2", "--max-batches", "60", "--eval-batch-size", "20",
            "--test-batch-size", "20", "--runs-dir", str(root / "runs"), "--name", "two",
            "--quiet", "--log-interval", "0"]
    assert train_cli.main(args) == 0
    run = root / "runs" / "two"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["run"]["cpu_replicas"] == 2
    bundle = export_run(run, root / "bundles" / "two")
    return run, bundle


def test_scorer_equals_keras_evaluation_on_the_whole_valid_split(trained, data_root):
    run, bundle = trained
    valid = data_root / "wikitext-2" / "wiki.valid.tokens"
    expected = evaluate_run(run, str(valid), batch_size=20, bptt=35)
    got = Scorer(bundle, batch_size=20, bptt=35).score_file(valid)
    assert got.num_tokens == expected.num_tokens == 217_646 - 20
    assert got.perplexity == pytest.approx(expected.perplexity, rel=1e-4)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert expected.perplexity < 1000 and metrics[-1]["val_ppl"] < 1000  # it learned something


def keras_logprobs(model, rows: list[np.ndarray], context: int) -> list[np.ndarray]:
    """Each id row's per-token log-probabilities by the Keras model itself: from a zero state,
    `context` before the row's first token, the whole row in one call."""
    nhid = model.get_layer("lstm0").units
    out = []
    for ids in rows:
        tokens = np.concatenate([[context], ids[:-1]]).astype(np.int32)[None]
        state = [tf.zeros((1, nhid)) for _ in range(len(model.inputs) - 2)]
        logits, *_ = model([tf.constant(tokens), tf.zeros(1, tf.int32), *state])
        logprobs = tf.nn.log_softmax(logits).numpy()[0]
        out.append(logprobs[np.arange(ids.size), ids])
    return out


@pytest.fixture(scope="module")
def wiki_lines(data_root) -> list[str]:
    """WikiText-2 test lines: blank ones, headings, and lines longer than several bptt chunks."""
    lines = (data_root / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8")
    lines = lines.splitlines()[:60]
    assert max(len(line.split()) for line in lines) > 3 * 35 and "" in [x.strip() for x in lines]
    return lines


@pytest.mark.parametrize("batch", [1, 20])
def test_scorer_rows_and_steps_give_the_keras_models_logprobs(trained, wiki_lines, batch):
    """Scorer.score_rows (rows of many lengths, batched, chunked at bptt with the state carried)
    and Scorer.step (one call) give, token for token, what the Keras model gives each row."""
    run, bundle = trained
    model, _ = load_run_model(run)
    vocab = Vocab.load(run / "vocab.json")
    eos = vocab.token_to_id("<eos>")  # every row's context
    rows = [vocab.encode(line.split() + ["<eos>"]) for line in wiki_lines]
    want = keras_logprobs(model, rows, eos)
    scorer = Scorer(bundle, batch_size=batch)
    got = scorer.score_rows(rows, max_rows=batch)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert max(np.abs(g - w).max() for g, w in zip(got, want)) <= 1e-4

    targets = np.array([row[:40] for row in rows if row.size >= 40][:batch], np.int32)
    assert len(targets) == batch
    tokens = np.concatenate([np.full((batch, 1), eos), targets[:, :-1]], 1)
    logprobs, state = scorer.step(tokens.astype(np.int32), targets, scorer.zero_state(batch))
    zeros = [tf.zeros(s.shape) for s in state]
    logits, *keras_state = model([tf.constant(tokens), tf.zeros(batch, tf.int32), *zeros])
    want = np.take_along_axis(tf.nn.log_softmax(logits).numpy(), targets[..., None], -1)[..., 0]
    assert np.abs(logprobs - want).max() <= 1e-4
    assert len(state) == len(keras_state)  # the state after the call, h and c of every layer
    assert max(np.abs(a - b.numpy()).max() for a, b in zip(state, keras_state)) <= 1e-4


def test_each_text_scores_what_keras_evaluate_sums_for_it(trained, wiki_lines):
    """Scorer.score of every line equals keraslm.evaluation's Evaluator (the fused decoder and
    loss that training uses) over that line alone, as one stream with <eos> before it."""
    run, bundle = trained
    model, _ = load_run_model(run)
    vocab = Vocab.load(run / "vocab.json")
    pipeline = TextPipeline.from_dict(json.loads((run / "config.json").read_text())["pipeline"])
    evaluator = Evaluator(model)
    scores = Scorer(bundle, batch_size=8, bptt=35).score(wiki_lines)
    assert len(scores) == len(wiki_lines)
    for line, score in zip(wiki_lines, scores):
        tokens = [t for sample in pipeline.process(line) for t in sample]
        stream = np.concatenate([[vocab.token_to_id("<eos>")], vocab.encode(tokens)])
        nll_sum, count = evaluator(BPTTBatches(stream, 1, 35, "keep"))
        assert score.num_tokens == count == len(tokens), line
        assert score.num_oov == sum(t not in vocab for t in tokens), line
        assert -score.log_likelihood == pytest.approx(nll_sum, rel=1e-5, abs=1e-4), line
