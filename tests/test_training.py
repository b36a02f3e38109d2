"""Training: replica exactness, stateful semantics, learning, LR decay, checkpoints, CLIs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_runs import make_run, wikitext_slices

from keraslm import train as train_cli
from keraslm.backend import tf
from keraslm.evaluation import evaluate_run
from keraslm.model import KeyedDropout, LMConfig, build_model
from keraslm.training.devices import make_strategy
from keraslm.training.step import Trainer, distribute_columns, make_optimizer, noise_keys

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> dict[str, Path]:
    """Small real train/valid/test files cut from WikiText-2 (whole lines)."""
    return wikitext_slices(tmp_path_factory.mktemp("corpus"), {"train": 60_000, "valid": 12_000, "test": 12_000}, data_root)


def tiny_args(corpus, runs: Path, *extra: str) -> list[str]:
    return ["--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
            "--test", str(corpus["test"]), "--emsize", "16", "--nhid", "16", "--batch-size", "8",
            "--bptt", "10", "--eval-batch-size", "4", "--test-batch-size", "4",
            "--runs-dir", str(runs), "--log-interval", "0", "--quiet", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# ---- distributed exactness ---------------------------------------------------------------------

def _train_steps(replicas: int, config: LMConfig, data: np.ndarray, steps: int, bptt: int,
                 clip: float):
    strategy = make_strategy(cpu_replicas=replicas)
    with strategy.scope():
        model = build_model(config, seed=7)
        optimizer = make_optimizer("sgd", 2.0)
    trainer = Trainer(model, optimizer, strategy, clip=clip, two_biases=config.two_biases)
    state = trainer.zero_state(data.shape[0])
    losses, norms = [], []
    for step in range(steps):
        inputs = data[:, step * bptt:(step + 1) * bptt]
        targets = data[:, step * bptt + 1:(step + 1) * bptt + 1]
        result, state = trainer.train_step(inputs, targets, noise_keys(3, 0, step, len(data)), state)
        losses.append(result.nll_sum / result.num_targets)
        norms.append(result.grad_norm)
    return (np.array(losses), np.array(norms), [w.numpy() for w in model.weights],
            trainer.state_to_numpy(state))


ADAPTIVE = {"softmax": "adaptive", "cutoffs": (10, 30), "div_value": 2.0}


# clip 0.13 (0.4 with the adaptive softmax) lies inside the range of this setup's gradient
# norms: some steps are clipped, some not
@pytest.mark.parametrize(("dropout", "clip", "two_biases", "output"),
                         [(0.0, 0.0, False, {}), (0.3, 0.0, True, {}), (0.0, 0.13, False, {}),
                          (0.3, 0.13, True, {}), (0.3, 0.4, True, ADAPTIVE)],
                         ids=["plain", "dropout-two-biases", "clip", "all", "all-adaptive"])
def test_two_replicas_give_the_same_losses_norms_and_weights_as_one(dropout, clip, two_biases,
                                                                     output):
    config = LMConfig(vocab_size=60, emsize=12, nhid=12, nlayers=2, dropout=dropout,
                      two_biases=two_biases, **output)
    data = np.random.default_rng(0).integers(0, 60, (8, 8 * 7 + 1)).astype(np.int32)
    one_losses, one_norms, one_weights, one_state = _train_steps(1, config, data, 8, 7, clip)
    two_losses, two_norms, two_weights, two_state = _train_steps(2, config, data, 8, 7, clip)
    if clip:
        assert (one_norms > clip).any() and (one_norms < clip).any(), one_norms
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    np.testing.assert_allclose(two_norms, one_norms, rtol=1e-5)
    for a, b in zip(one_weights, two_weights):
        np.testing.assert_allclose(b, a, atol=1e-5)
    for a, b in zip(one_state, two_state):  # each replica carried its own columns' state
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert np.ptp(one_losses) > 1e-3  # the weights really moved


def test_dropout_masks_differ_between_columns_and_repeat_for_the_same_key():
    layer = KeyedDropout(0.5, salt=1)
    x = tf.ones((4, 5, 32))
    keys = tf.constant(noise_keys(1, 0, 0, 4))
    a = layer(x, keys, training=True).numpy()
    b = layer(x, keys, training=True).numpy()
    np.testing.assert_array_equal(a, b)
    masks = (a > 0).reshape(4, -1)
    assert not any(np.array_equal(masks[i], masks[j]) for i in range(4) for j in range(i + 1, 4))
    assert 0.4 < masks.mean() < 0.6
    other = layer(x, tf.constant(noise_keys(1, 0, 1, 4)), training=True).numpy()
    assert not np.array_equal(a, other)
    np.testing.assert_array_equal(layer(x, keys, training=False).numpy(), x.numpy())


def test_replicas_draw_different_dropout_masks():
    strategy = make_strategy(cpu_replicas=2)
    layer = KeyedDropout(0.5, salt=0)
    keys = noise_keys(0, 0, 0, 4)

    @tf.function
    def masks(k):
        return strategy.run(lambda kk: layer(tf.ones((2, 3, 16)), kk, training=True), args=(k,))

    per_replica = strategy.experimental_local_results(masks(distribute_columns(strategy, keys)))
    assert len(per_replica) == 2
    assert not np.array_equal(per_replica[0].numpy(), per_replica[1].numpy())


def test_state_carried_across_two_halves_equals_feeding_the_whole_stream():
    config = LMConfig(vocab_size=40, emsize=8, nhid=8, nlayers=2, dropout=0.0)
    model = build_model(config, seed=1)
    tokens = tf.constant(np.random.default_rng(1).integers(0, 40, (3, 12)), tf.int32)
    keys = tf.zeros(3, tf.int32)
    zeros = [tf.zeros((3, 8))] * 4
    whole, *whole_state = model([tokens, keys, *zeros])
    first, *state = model([tokens[:, :5], keys, *zeros])
    second, *final_state = model([tokens[:, 5:], keys, *state])
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-5)
    for a, b in zip(final_state, whole_state):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # and each column's state is its own: changing column 0 leaves column 1 untouched
    changed = tokens.numpy()
    changed[0] = (changed[0] + 1) % 40
    other, *_ = model([tf.constant(changed), keys, *zeros])
    np.testing.assert_allclose(other[1:], whole[1:], atol=1e-6)
    assert not np.allclose(other[0], whole[0])


# ---- the training loop through the CLI ------------------------------------------------------------

def test_training_lowers_validation_perplexity_and_writes_a_complete_run(corpus, tmp_path):
    runs = tmp_path / "runs"
    assert train_cli.main(tiny_args(corpus, runs, "--epochs", "2", "--lr", "5", "--name", "a")) == 0
    run = runs / "a"
    records = metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["val_ppl"] < records[0]["val_ppl"] < 600
    assert all(r["best"] and "test_ppl" in r for r in records)
    assert all(r["seconds"] > 0 and r["eval_seconds"] > 0 for r in records)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["nhid"] == 16 and config["pipeline"]["split"] == "lines"
    assert config["corpora"]["train"]["sha1"] == sha1(corpus["train"])
    assert (run / "best.weights.h5").is_file() and (run / "vocab.json").is_file()
    assert (run / "checkpoint" / "latest.npz").is_file()
    assert list((run / "logs").iterdir())
    assert not [p for p in run.rglob(".*") if p.is_file()]  # no temporary files left

    result = evaluate_run(run, str(corpus["valid"]), batch_size=4, bptt=10)
    assert result.perplexity == pytest.approx(records[-1]["val_ppl"], rel=1e-5)


def test_learning_rate_decays_when_validation_does_not_improve(corpus, tmp_path):
    # lr 1e-30 leaves float32 weights unchanged, so epoch 2 cannot beat epoch 1.
    runs = tmp_path / "runs"
    args = tiny_args(corpus, runs, "--epochs", "1", "--lr", "1e-30", "--name", "p")
    assert train_cli.main(args) == 0
    best = runs / "p" / "best.weights.h5"
    before = sha1(best)
    assert train_cli.main(["--resume", "p", "--runs-dir", str(runs), "--epochs", "2"]) == 0
    first, second = metrics(runs / "p")
    assert first["best"] and not second["best"]
    assert second["val_ppl"] == pytest.approx(first["val_ppl"], rel=1e-6)
    assert "test_ppl" not in second
    checkpoint = np.load(runs / "p" / "checkpoint" / "latest.npz")
    progress = json.loads(checkpoint["progress"].tobytes())
    assert progress["epoch"] == 2
    assert sha1(best) == before  # best weights are only written on improvement
    lrs = [float(checkpoint[k]) for k in checkpoint.files
           if k.startswith("optimizer_") and checkpoint[k].shape == () and
           abs(float(checkpoint[k]) - 2.5e-31) < 1e-35]
    assert lrs, "learning rate was not multiplied by 0.25"


def test_resume_after_kill_reproduces_the_uninterrupted_run(corpus, tmp_path):
    runs = tmp_path / "runs"
    common = tiny_args(corpus, runs, "--epochs", "2", "--lr", "5", "--dropout", "0.2",
                       "--checkpoint-every", "5")
    assert train_cli.main([*common, "--name", "whole"]) == 0

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "keraslm.train", *common, "--name", "killed"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = runs / "killed" / "checkpoint" / "latest.npz"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file():
                progress = json.loads(np.load(ckpt)["progress"].tobytes())
                if progress["epoch"] == 0 and progress["batch"] >= 5:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not (runs / "killed" / "metrics.jsonl").exists()
    assert train_cli.main(["--resume", "killed", "--runs-dir", str(runs)]) == 0
    assert not [p for p in (runs / "killed").rglob(".*") if p.is_file()]  # a killed save's leftovers
    whole, resumed = metrics(runs / "whole"), metrics(runs / "killed")
    for a, b in zip(whole, resumed, strict=True):
        for key in ("train_ppl", "val_ppl", "test_ppl", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_finetune_starts_from_the_source_run_and_keeps_its_vocabulary(corpus, tmp_path, data_root):
    runs = tmp_path / "runs"
    assert train_cli.main(tiny_args(corpus, runs, "--epochs", "1", "--name", "base")) == 0
    sherlock = data_root / "sherlockholmes"
    base_val = evaluate_run(runs / "base", str(sherlock / "sherlockholmes.valid.txt"),
                            batch_size=4, bptt=10, fmt="raw")
    args = ["--finetune-from", "base", "--runs-dir", str(runs), "--name", "tuned",
            "--corpus", "sherlockholmes", "--epochs", "1", "--lr", "5", "--batch-size", "8",
            "--bptt", "10", "--eval-batch-size", "4", "--test-batch-size", "4", "--quiet",
            "--log-interval", "0", "--max-batches", "40"]
    assert train_cli.main(args) == 0
    assert (runs / "tuned" / "vocab.json").read_text() == (runs / "base" / "vocab.json").read_text()
    tuned_val = evaluate_run(runs / "tuned", "sherlockholmes", "valid", batch_size=4, bptt=10)
    assert tuned_val.num_tokens == base_val.num_tokens
    assert tuned_val.perplexity < base_val.perplexity


def test_evaluate_cli_reports_tokens_and_oov(corpus, tmp_path, capsys):
    from keraslm import evaluate as evaluate_cli

    runs = tmp_path / "runs"
    assert train_cli.main(tiny_args(corpus, runs, "--epochs", "1", "--name", "e")) == 0
    capsys.readouterr()
    assert evaluate_cli.main(["e", "--runs-dir", str(runs), "--corpus", "wikitext-2",
                              "--split", "valid", "--batch-size", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_tokens"] == 217_646 - 20  # every token but each column's first
    assert 0 < report["num_oov"] < report["num_tokens"]
    assert report["batch_size"] == 20 and report["bptt"] == 35


# ---- bad input ------------------------------------------------------------------------------------

def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_bad_input_gives_one_clear_line(corpus, tmp_path, capsys):
    runs = tmp_path / "runs"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("a b c\n")
    # each line names the file (or setting) at fault and says what is wrong with it
    cases = [
        ([*tiny_args(corpus, runs), "--train", str(empty)],
         [f"{empty}: ", "no tokens to build a vocabulary from"]),
        ([*tiny_args(corpus, runs), "--train", str(short)],
         [f"{short} (train split)", "has 4 tokens, too few for one batch",
          "batch size 8 and bptt 10 need at least 88"]),
        ([*tiny_args(corpus, runs), "--preset", "nope"],
         ["unknown preset 'nope'", "standard_lstm_lm_200"]),
        ([*tiny_args(corpus, runs), "--valid", str(tmp_path / "nope.txt")],
         [f"valid corpus '{tmp_path / 'nope.txt'}'", "not found", "nor a known corpus"]),
    ]
    for argv, needles in cases:
        assert train_cli.main(argv) != 0
        line = _error_line(capsys)
        assert all(needle in line for needle in needles), (needles, line)
    assert not runs.exists() or not any(runs.iterdir())


def test_a_run_without_best_weights_is_refused_for_fine_tuning_and_evaluation(corpus, tmp_path,
                                                                           capsys):
    from keraslm import evaluate as evaluate_cli
    from keraslm.vocab import Vocab

    runs = tmp_path / "runs"
    vocab = Vocab.build(["the", "cat", "sat", "on", "the", "mat"])
    make_run(runs / "unfinished", LMConfig(vocab_size=len(vocab), emsize=8, nhid=8, nlayers=1),
             vocab, weights=False)
    assert train_cli.main(tiny_args(corpus, runs, "--finetune-from", "unfinished",
                                    "--name", "tuned")) == 1
    assert _error_line(capsys) == (f"error: {runs / 'unfinished'}: no best.weights.h5 to "
                                   f"fine-tune from (the run has not finished an epoch)")
    assert not (runs / "tuned").exists()
    assert evaluate_cli.main(["unfinished", "--runs-dir", str(runs),
                              "--corpus", str(corpus["valid"])]) == 1
    assert _error_line(capsys) == (f"error: {runs / 'unfinished'}: no best.weights.h5 "
                                   f"(the run has not finished an epoch)")


def test_vocab_that_does_not_match_the_run_is_refused(corpus, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train_cli.main(tiny_args(corpus, runs, "--epochs", "1", "--name", "m",
                                    "--max-batches", "2")) == 0
    vocab = json.loads((runs / "m" / "vocab.json").read_text())
    vocab["tokens"] = vocab["tokens"][:-5]
    (runs / "m" / "vocab.json").write_text(json.dumps(vocab))
    from keraslm import evaluate as evaluate_cli

    assert evaluate_cli.main(["m", "--runs-dir", str(runs), "--corpus", str(corpus["valid"])]) != 0
    assert "vocab" in _error_line(capsys)


def test_nan_loss_stops_with_the_batch_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = tiny_args(corpus, runs, "--epochs", "1", "--lr", "1e38", "--clip", "0",
                     "--checkpoint-every", "1", "--name", "nan")
    assert train_cli.main(args) != 0
    line = _error_line(capsys)
    assert "epoch 1, batch" in line and "checkpoint" in line
    with np.load(runs / "nan" / "checkpoint" / "latest.npz") as saved:
        progress = json.loads(saved["progress"].tobytes())
        assert all(np.isfinite(saved[k]).all() for k in saved.files if k.startswith("weight_"))
    assert progress["batch"] >= 1
    assert np.isfinite(progress["epoch_nll"])
