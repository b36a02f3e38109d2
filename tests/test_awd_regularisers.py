"""The AWD-LSTM's regularisers, each against a small reference computed here by hand: weight and
embedding dropout (rates, scaling, one mask a step shared by the replicas, never at evaluation),
locked dropout, AR/TAR, L2 weight decay after clipping; 1 replica == 2 and resume bit for bit
with all of them on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_resume import StopAfter, saved_arrays
from helpers_runs import tiny_run_args, wikitext_slices

from keraslm import train as train_cli
from keraslm.backend import tf
from keraslm.config import LMConfig, OptimConfig, TrainConfig
from keraslm.evaluation import Evaluator
from keraslm.model import build_model, split_decoder
from keraslm.training import checkpoint
from keraslm.training.devices import make_strategy
from keraslm.training.loop import EpochLoop
from keraslm.training.regularisers import (
    EMBEDDING_SALT,
    Regularisers,
    WeightNoise,
    activation_terms,
    keep_mask,
    step_key,
)
from keraslm.training.setup import build, prepare
from keraslm.training.signals import Stopped
from keraslm.training.step import Trainer, make_optimizer, noise_keys

EVERYTHING = {"dropout": 0.3, "dropout_h": 0.2, "dropout_i": 0.25, "dropout_e": 0.2,
              "weight_dropout": 0.4}
EVERYTHING_OPTIM = Regularisers(dropout_e=0.2, weight_dropout=0.4, alpha=2.0, beta=1.0, wd=0.01)
ALL_FLAGS = ["--dropout", "0.3", "--dropout-h", "0.2", "--dropout-i", "0.25", "--dropout-e",
             "0.2", "--weight-dropout", "0.4", "--alpha", "2", "--beta", "1", "--wd", "1e-3"]


# ---- masks ------------------------------------------------------------------------------------

def test_weight_masks_drop_at_their_rate_and_repeat_only_for_the_same_step_and_weight():
    key = step_key(3, 1, 7)
    mask = keep_mask(tf.constant(key), 1, (400, 500), 0.3).numpy()
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert mask.mean() == pytest.approx(0.7, abs=0.005)
    np.testing.assert_array_equal(keep_mask(tf.constant(key), 1, (400, 500), 0.3), mask)
    for other_key, salt in ((step_key(3, 1, 8), 1), (step_key(3, 2, 7), 1), (step_key(4, 1, 7), 1),
                            (key, 2)):
        other = keep_mask(tf.constant(other_key), salt, (400, 500), 0.3).numpy()
        assert (other != mask).mean() == pytest.approx(2 * 0.3 * 0.7, abs=0.01)
    assert 0 <= key < 2**31 and len({step_key(0, 0, b) for b in range(1000)}) == 1000


def _noise_model(**regularisers):
    config = LMConfig(vocab_size=300, emsize=16, nhid=16, nlayers=2, dropout=0.0)
    model = build_model(config, seed=1)
    return model, WeightNoise(model, Regularisers(**regularisers))


def test_embedding_dropout_drops_whole_words_at_its_rate_scaled_by_the_kept_fraction():
    model, noise = _noise_model(dropout_e=0.25)
    embedding = model.get_layer("embedding").embeddings
    variables = [embedding, model.get_layer("lstm0").cell.recurrent_kernel]
    dropped, recurrent = noise.values(variables, tf.constant(step_key(0, 0, 5)))
    dropped, table = dropped.numpy(), embedding.numpy()
    gone = (dropped == 0).all(axis=1)
    np.testing.assert_allclose(dropped[~gone], table[~gone] / 0.75, rtol=1e-6)  # whole rows kept
    assert gone.mean() == pytest.approx(0.25, abs=0.07)
    np.testing.assert_array_equal(recurrent, variables[1].numpy())  # no weight dropout asked
    words = keep_mask(tf.constant(step_key(0, 0, 5)), EMBEDDING_SALT, (300, 1), 0.25).numpy()
    np.testing.assert_array_equal(gone, words[:, 0] == 0)


def test_weight_dropout_is_element_wise_on_the_recurrent_kernels_only():
    model, noise = _noise_model(weight_dropout=0.5)
    cells = [model.get_layer(f"lstm{i}").cell for i in range(2)]
    variables = [cells[0].kernel, cells[0].recurrent_kernel, cells[1].recurrent_kernel,
                 cells[0].bias, model.get_layer("embedding").embeddings]
    values = [v.numpy() for v in noise.values(variables, tf.constant(step_key(0, 0, 0)))]
    for untouched, variable in zip((values[0], *values[3:]), (variables[0], *variables[3:])):
        np.testing.assert_array_equal(untouched, variable.numpy())
    masks = []
    for value, variable in zip(values[1:3], variables[1:3]):
        kept = value != 0
        np.testing.assert_allclose(value[kept], 2 * variable.numpy()[kept], rtol=1e-6)
        assert kept.mean() == pytest.approx(0.5, abs=0.05)
        assert not (kept.all(axis=0) | ~kept.any(axis=0)).all()  # not whole columns
        masks.append(kept)
    assert (masks[0] != masks[1]).mean() > 0.3  # each layer its own mask


def test_weight_dropout_is_the_same_on_every_replica():
    strategy = make_strategy(cpu_replicas=2)
    with strategy.scope():
        model, noise = _noise_model(weight_dropout=0.5, dropout_e=0.3)
    variables = [model.get_layer("embedding").embeddings,
                 model.get_layer("lstm1").cell.recurrent_kernel]

    @tf.function
    def values(key):
        return strategy.run(lambda: noise.values(variables, key))

    per_replica = [[t.numpy() for t in strategy.experimental_local_results(v)]
                   for v in values(tf.constant(step_key(2, 0, 3)))]
    for first, second in per_replica:
        np.testing.assert_array_equal(first, second)
    assert (per_replica[1][0] == 0).mean() > 0.3


# ---- locked dropout ---------------------------------------------------------------------------

def test_awd_dropouts_are_locked_over_time_per_column_at_their_rates():
    config = LMConfig(vocab_size=50, emsize=64, nhid=64, nlayers=3, dropout=0.4, dropout_h=0.2,
                      dropout_i=0.6)
    model = build_model(config, seed=0)
    x = tf.ones((6, 40, 64))
    keys = tf.constant(noise_keys(1, 0, 0, 6))
    for name, rate in (("embedding_dropout", 0.6), ("lstm0_dropout", 0.2),
                       ("lstm1_dropout", 0.2), ("lstm2_dropout", 0.4)):
        out = model.get_layer(name)(x, keys, training=True).numpy()
        assert (out == out[:, :1]).all(), name  # one mask over time
        assert not (out[0, 0] == out[1, 0]).all(), name  # each column its own
        np.testing.assert_allclose(np.unique(out), [0.0, 1 / (1 - rate)], rtol=1e-6)
        assert (out == 0).mean() == pytest.approx(rate, abs=0.07), name
        np.testing.assert_array_equal(model.get_layer(name)(x, keys, training=False), x)
    standard = build_model(LMConfig(vocab_size=50, emsize=64, nhid=64, nlayers=3, dropout=0.4))
    inner = standard.get_layer("lstm0_dropout")(x, keys, training=True).numpy()
    assert not (inner == inner[:, :1]).all()  # without the AWD rates: element-wise, as before
    assert (inner == 0).mean() == pytest.approx(0.4, abs=0.03)


# ---- AR and TAR -------------------------------------------------------------------------------

def test_ar_and_tar_match_numpy_and_the_replicas_shares_sum_to_the_global_value():
    rng = np.random.default_rng(0)
    dropped, raw = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)
    targets = rng.integers(0, 9, (4, 6)).astype(np.int32)
    targets[3, 4:] = -1  # padding at the end of the last column
    has = targets != -1
    pairs = has[:, 1:] & has[:, :-1]
    ar = 2.0 * (dropped ** 2)[has].mean()
    tar = 0.5 * ((raw[:, 1:] - raw[:, :-1]) ** 2)[pairs].mean()
    terms = Regularisers(alpha=2.0, beta=0.5)
    counts = [tf.constant(float(has.sum())), tf.constant(float(pairs.sum()))]
    whole = activation_terms(terms, dropped, raw, targets, *counts)
    assert float(whole) == pytest.approx(ar + tar, rel=1e-5)
    halves = sum(float(activation_terms(terms, dropped[s], raw[s], targets[s], *counts))
                 for s in (slice(0, 2), slice(2, 4)))
    assert halves == pytest.approx(ar + tar, rel=1e-5)
    assert float(activation_terms(Regularisers(alpha=2.0), dropped, raw, targets,
                                  *counts)) == pytest.approx(ar, rel=1e-5)


# ---- one step against a reference built by hand -----------------------------------------------

def _reference_step(weights, data, lr, clip, regs: Regularisers, key):
    """One SGD step of a 1-layer tied LSTM LM written out in TensorFlow ops (no Keras): dropped
    embedding rows for the input only, a DropConnect recurrent kernel, mean NLL + AR + TAR, the
    global norm with the twin bias counted twice, clipping, then wd * weight added, as MXNet's
    trainer does. Returns the new weights in the model's order."""
    embedding, kernel, recurrent, bias, out_bias = (tf.Variable(w) for w in weights)
    inputs, targets = data
    words = keep_mask(tf.constant(key), EMBEDDING_SALT, embedding.shape[:1] + (1,), regs.dropout_e)
    drop = keep_mask(tf.constant(key), 1, recurrent.shape, regs.weight_dropout)
    with tf.GradientTape() as tape:
        table = embedding * words / (1 - regs.dropout_e)
        r = recurrent * drop / (1 - regs.weight_dropout)
        h = c = tf.zeros((inputs.shape[0], recurrent.shape[0]))
        outs = []
        for t in range(inputs.shape[1]):
            z = tf.gather(table, inputs[:, t]) @ kernel + h @ r + bias
            i, f, g, o = tf.split(z, 4, axis=1)
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            h = tf.sigmoid(o) * tf.tanh(c)
            outs.append(h)
        hidden = tf.stack(outs, axis=1)  # [B, T, H]
        logits = tf.einsum("bth,vh->btv", hidden, embedding) + out_bias  # the undropped table
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
        loss = (tf.reduce_mean(nll) + regs.alpha * tf.reduce_mean(hidden ** 2)
                + regs.beta * tf.reduce_mean((hidden[:, 1:] - hidden[:, :-1]) ** 2))
    variables = [embedding, kernel, recurrent, bias, out_bias]
    grads = tape.gradient(loss, variables)
    grads[0] = tf.convert_to_tensor(grads[0])
    # MXNet's two biases each get the bias gradient: it counts twice in the norm, and their sum
    # moves by twice the step
    norm = tf.sqrt(sum(tf.reduce_sum(g ** 2) for g in grads) + tf.reduce_sum(grads[3] ** 2))
    grads[3] = 2 * grads[3]
    scale = min(1.0, clip / float(norm))
    return [(v - lr * (g * scale + regs.wd * v)).numpy() for v, g in zip(variables, grads)], norm


@pytest.mark.parametrize("jit", [False, True], ids=["fused", "xla"])
def test_one_step_with_every_regulariser_equals_the_reference_written_out_by_hand(jit):
    config = LMConfig(vocab_size=30, emsize=8, nhid=8, nlayers=1, dropout=0.0, two_biases=True,
                      dropout_e=0.3, weight_dropout=0.4)
    regs = Regularisers(dropout_e=0.3, weight_dropout=0.4, alpha=3.0, beta=2.0, wd=0.05)
    rng = np.random.default_rng(2)
    data = rng.integers(0, 30, (4, 7)).astype(np.int32)
    inputs, targets = data[:, :6], data[:, 1:]
    strategy = make_strategy(cpu_replicas=1)
    with strategy.scope():
        model = build_model(config, seed=0, fused=not jit)  # as training builds it
        model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32)
                           for w in model.get_weights()])
        initial = model.get_weights()
        trainer = Trainer(model, make_optimizer("sgd", 0.5), strategy, clip=0.2, two_biases=True,
                          regularisers=regs, jit_compile=jit)
    key = step_key(0, 0, 0)
    result, _ = trainer.train_step(inputs, targets, noise_keys(0, 0, 0, 4),
                                   trainer.zero_state(4), key)
    names = [v.path for v in model.trainable_variables]
    want, norm = _reference_step(initial, (inputs, targets), 0.5, 0.2, regs, key)
    assert float(norm) > 0.2  # clipped: wd must come after it
    assert result.grad_norm == pytest.approx(float(norm), rel=1e-4)
    for name, got, expected in zip(names, model.get_weights(), want):
        np.testing.assert_allclose(got, expected, atol=2e-6, err_msg=name)
    # the same step without the regularisers lands elsewhere: each of them mattered
    for off in ({"dropout_e": 0.0}, {"weight_dropout": 0.0}, {"alpha": 0.0}, {"beta": 0.0},
                {"wd": 0.0}):
        other = Regularisers(**{**regs.__dict__, **off})
        moved, _ = _reference_step(initial, (inputs, targets), 0.5, 0.2, other, key)
        assert max(np.abs(a - b).max() for a, b in zip(moved, want)) > 1e-5, off


def test_weight_and_embedding_dropout_are_absent_at_evaluation():
    plain = LMConfig(vocab_size=40, emsize=8, nhid=8, nlayers=2, dropout=0.0)
    awd = LMConfig(vocab_size=40, emsize=8, nhid=8, nlayers=2, dropout=0.0, dropout_e=0.5,
                   weight_dropout=0.5)
    data = np.random.default_rng(3).integers(0, 40, (2, 41)).astype(np.int32)
    batches = [(data[:, s:s + 10], data[:, s + 1:s + 11]) for s in range(0, 40, 10)]
    model = build_model(awd, seed=4)
    reference = build_model(plain, seed=4)
    assert Evaluator(model)(batches) == Evaluator(reference)(batches)
    features, _ = split_decoder(model)
    noise = WeightNoise(model, Regularisers(dropout_e=0.5, weight_dropout=0.5))
    args = [tf.constant(data[:, :10]), tf.zeros(2, tf.int32),
            *[tf.zeros((2, 8))] * 4]
    values = noise.values(features.trainable_variables, tf.constant(1))
    fixed = [tf.convert_to_tensor(v) for v in features.non_trainable_variables]
    (dropped_hidden, *_), _ = features.stateless_call(values, fixed, args, training=True)
    assert not np.allclose(dropped_hidden, features(args, training=True)[0])  # it trains noisy


# ---- distributed and resumed ------------------------------------------------------------------

def train_steps(config: LMConfig, replicas: int, steps: int, padded: bool = False):
    """`steps` steps of 7 on 8 random columns with every regulariser on: the losses, the
    weights and the state. `padded` pads the last 2 columns' final 5 targets (last_batch="keep")."""
    data = np.random.default_rng(0).integers(0, config.vocab_size, (8, steps * 7 + 1))
    data = data.astype(np.int32)
    if padded:
        data[6:, -5:] = -1
    strategy = make_strategy(cpu_replicas=replicas)
    with strategy.scope():
        model = build_model(config, seed=7)
        trainer = Trainer(model, make_optimizer("sgd", 2.0), strategy, clip=0.3,
                          two_biases=True, regularisers=EVERYTHING_OPTIM)
    state, losses = trainer.zero_state(8), []
    for step in range(steps):
        inputs = np.maximum(data[:, step * 7:(step + 1) * 7], 0)
        targets = data[:, step * 7 + 1:(step + 1) * 7 + 1]
        result, state = trainer.train_step(inputs, targets, noise_keys(3, 0, step, 8), state,
                                           step_key(3, 0, step))
        losses.append(result.nll_sum / result.num_targets)
    return np.array(losses), model.get_weights(), trainer.state_to_numpy(state)


def _train(replicas: int):
    config = LMConfig(vocab_size=60, emsize=12, nhid=12, nlayers=2, two_biases=True, **EVERYTHING)
    return train_steps(config, replicas, steps=6, padded=True)


def test_two_replicas_equal_one_with_every_regulariser_on():
    one_losses, one_weights, one_state = _train(1)
    two_losses, two_weights, two_state = _train(2)
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    for a, b in zip((*one_weights, *one_state), (*two_weights, *two_state)):
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert np.ptp(one_losses) > 1e-3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> dict[str, Path]:
    return wikitext_slices(tmp_path_factory.mktemp("corpus"),
                           {"train": 8_000, "valid": 3_000, "test": 3_000}, data_root)


def _args(corpus, runs: Path, name: str, *extra: str) -> list[str]:
    return tiny_run_args(corpus, runs, name, "--epochs", "2", "--lr", "10", *ALL_FLAGS, *extra)


def test_a_run_with_every_regulariser_resumes_bit_for_bit_and_records_them(corpus, tmp_path,
                                                                           capsys):
    runs = tmp_path / "runs"
    assert train_cli.main(_args(corpus, runs, "whole")) == 0
    config = train_cli.config_from_argv(_args(corpus, runs, "stopped"))
    strategy = make_strategy()
    with pytest.raises(Stopped):
        EpochLoop(build(prepare(config), strategy), StopAfter(20)).run()
    stopped_at = checkpoint.read_progress(runs / "stopped" / "checkpoint" / "latest.npz")
    assert (stopped_at.epoch, stopped_at.batch) == (0, 21)  # in the middle of epoch 1
    assert train_cli.main(["--resume", "stopped", "--runs-dir", str(runs)]) == 0
    whole, resumed = saved_arrays(runs / "whole"), saved_arrays(runs / "stopped")
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)
    records = [json.loads(line) for line in (runs / "stopped" / "metrics.jsonl").open()]
    assert [r["val_ppl"] for r in records] == [
        json.loads(line)["val_ppl"] for line in (runs / "whole" / "metrics.jsonl").open()]

    saved = json.loads((runs / "whole" / "config.json").read_text())
    assert {k: saved["model"][k] for k in EVERYTHING} == EVERYTHING
    assert (saved["train"]["optim"]["alpha"], saved["train"]["optim"]["beta"],
            saved["train"]["optim"]["wd"]) == (2.0, 1.0, 1e-3)
    assert TrainConfig.from_saved(saved).optim == config.optim
    capsys.readouterr()
    assert train_cli.main(["--resume", "whole", "--runs-dir", str(runs), "--beta", "0.5"]) == 1
    assert "--beta cannot change when resuming" in capsys.readouterr().err


def test_fine_tuning_takes_the_rates_it_is_given_and_the_source_shape(corpus, tmp_path):
    runs = tmp_path / "runs"
    assert train_cli.main(_args(corpus, runs, "base", "--epochs", "1", "--max-batches", "3")) == 0
    tuned = ["--finetune-from", "base", "--runs-dir", str(runs), "--name", "tuned",
             "--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
             "--test", str(corpus["test"]), "--epochs", "1", "--max-batches", "3", "--quiet",
             "--batch-size", "4", "--bptt", "8", "--dropout-h", "0.5", "--weight-dropout", "0.1",
             "--alpha", "1"]
    assert train_cli.main(tuned) == 0
    model = json.loads((runs / "tuned" / "config.json").read_text())["model"]
    assert (model["dropout_h"], model["weight_dropout"]) == (0.5, 0.1)
    assert (model["dropout_i"], model["dropout_e"], model["nhid"]) == (0.25, 0.2, 8)


def test_the_flags_default_to_off_and_parse_into_the_config():
    assert OptimConfig().alpha == OptimConfig().beta == OptimConfig().wd == 0.0
    default = LMConfig(vocab_size=10)
    assert (default.dropout_h, default.dropout_i, default.dropout_e, default.weight_dropout) == (
        None, None, 0.0, 0.0)
    config = train_cli.config_from_argv(ALL_FLAGS)
    assert config.model.resolve(100).weight_dropout == 0.4
    assert (config.optim.alpha, config.optim.beta, config.optim.wd) == (2.0, 1.0, 1e-3)
    with pytest.raises(Exception, match="--weight-dropout must be in"):
        LMConfig(vocab_size=10, weight_dropout=1.0)
