"""The three programs chained: train (2 replicas) -> export -> score, on real WikiText-2 text.

A tiny model trained by the real CLI with `--cpu-replicas 2`, exported by the real exporter, must
score the whole WikiText-2 validation split with onnxruntime exactly as `keraslm.evaluate` scores
it with Keras, at the same batch size, and per token as the Keras model does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from export.to_onnx import export_run
from keraslm import train as train_cli
from keraslm.evaluation import evaluate_run
from keraslm.runs import load_run_model
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


@pytest.mark.parametrize("batch", [1, 20])
def test_per_token_logprobs_match_keras(trained, data_root, batch):
    run, bundle = trained
    model, config = load_run_model(run)
    vocab = Vocab.load(run / "vocab.json")
    text = (data_root / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8")
    ids = vocab.encode(text.split()[: batch * 41])
    stream = ids[: batch * 41].reshape(batch, 41)
    tokens, targets = stream[:, :40], stream[:, 1:]
    state = [np.zeros((batch, config.nhid), np.float32) for _ in config.state_names()]
    logits, *_ = model([tf.constant(tokens), tf.zeros(batch, tf.int32), *map(tf.constant, state)])
    want = np.take_along_axis(tf.nn.log_softmax(logits).numpy(), targets[..., None], -1)[..., 0]
    scorer = Scorer(bundle, batch_size=batch, bptt=40)
    feed = {"tokens": tokens.astype(np.int32), "targets": targets.astype(np.int32),
            **dict(zip(config.state_names(), state))}
    got = scorer.bundle.session.run(["logprobs"], feed)[0]
    assert np.abs(got - want).max() <= 1e-4
