"""GluonNLP's language-model script's schedule, against references computed here by hand: the
step schedule (--lr-update-interval / --lr-update-factor) beside the plateau decay, NT-ASGD (its
trigger, the average, fine-tuning) and variable-length BPTT (the drawn lengths, the columns they
advance, the scaled learning rate); 1 replica == 2 and resume bit for bit with them on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_resume import StopAfter, saved_arrays
from helpers_runs import tiny_run_args, wikitext_slices
from test_awd_regularisers import ALL_FLAGS

from keraslm import train as train_cli
from keraslm.batching import BPTTBatches
from keraslm.config import LMConfig, OptimConfig
from keraslm.errors import UserError
from keraslm.evaluation import Evaluator, evaluate_run
from keraslm.model import build_model
from keraslm.rundir import RunDir
from keraslm.training.averaging import WeightAverage, nonmonotonic_trigger
from keraslm.training.devices import make_strategy
from keraslm.training.loop import EpochLoop
from keraslm.training.regularisers import step_key
from keraslm.training.schedule import LRSchedule
from keraslm.training.setup import build, prepare
from keraslm.training.signals import Stopped
from keraslm.training.step import Trainer, make_optimizer, noise_keys
from keraslm.variable_bptt import VariableBPTTBatches, draw_length

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> dict[str, Path]:
    return wikitext_slices(tmp_path_factory.mktemp("corpus"),
                           {"train": 6_000, "valid": 2_000, "test": 2_000}, data_root)


def _args(corpus, runs: Path, name: str, *extra: str) -> list[str]:
    return tiny_run_args(corpus, runs, name, *extra)


def _untimed(record: dict) -> dict:
    """An epoch's record without its timings (which no two runs share)."""
    return {k: v for k, v in record.items() if k not in ("seconds", "tokens_per_s", "eval_seconds")}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _progress(run: Path) -> dict:
    with np.load(run / "checkpoint" / "latest.npz") as saved:
        return json.loads(saved["progress"].tobytes())


# ---- the step schedule ------------------------------------------------------------------------

def test_the_step_schedule_multiplies_the_lr_after_n_stale_validations_counted_from_the_last_improvement():
    schedule = LRSchedule(interval=3, factor=0.1)
    improved = [True, False, False, True, False, False, False, False, False, False, True, False]
    # by hand: a count of stale validations, reset by an improvement and by an update
    want = [(30, 0), (30, 1), (30, 2), (30, 0), (30, 1), (30, 2), (3, 0), (3, 1), (3, 2),
            (0.3, 0), (0.3, 0), (0.3, 1)]
    lr, stale, got = 30.0, 0, []
    for better in improved:
        lr, stale = schedule.after_validation(lr, stale, better)
        got.append((lr, stale))
    assert [s for _, s in got] == [s for _, s in want]
    np.testing.assert_allclose([lr for lr, _ in got], [lr for lr, _ in want], rtol=1e-12)


def test_the_plateau_decay_is_the_step_schedule_with_an_interval_of_one():
    assert LRSchedule.of(OptimConfig()) == LRSchedule(1, 0.25)
    assert LRSchedule.of(OptimConfig(lr_decay=0.5)) == LRSchedule(1, 0.5)
    assert LRSchedule.of(OptimConfig(lr_update_interval=30)) == LRSchedule(30, 0.1)  # the script's
    plateau, lr = LRSchedule.of(OptimConfig()), 20.0
    for better, want in ((True, 20.0), (False, 5.0), (False, 1.25), (True, 1.25)):
        lr, stale = plateau.after_validation(lr, 0, better)
        assert (lr, stale) == (want, 0)


def test_given_the_step_schedule_replaces_the_plateau_decay_and_the_flags_parse():
    config = train_cli.config_from_argv(["--lr-update-interval", "4", "--lr-update-factor", "0.5",
                                         "--lr-decay", "0.9"])
    assert (config.optim.lr_update_interval, config.optim.lr_update_factor) == (4, 0.5)
    assert LRSchedule.of(config.optim) == LRSchedule(4, 0.5)
    for bad in (["--lr-update-interval", "0"], ["--lr-update-factor", "0"],
                ["--lr-update-factor", "1.5"]):
        with pytest.raises(UserError):
            train_cli.config_from_argv(bad)


def test_a_run_follows_the_step_schedule_across_a_resume(corpus, tmp_path):
    # lr 1e-30 leaves the float32 weights as they are: only the first validation improves, so
    # by hand the lr is L, L, L (two stale: update), L/2, L/2 (update), L/4.
    runs, lr = tmp_path / "runs", 1e-30
    args = _args(corpus, runs, "s", "--lr", str(lr), "--lr-update-interval", "2",
                 "--lr-update-factor", "0.5", "--epochs", "4")
    assert train_cli.main(args) == 0
    assert _progress(runs / "s")["stale_epochs"] == 1
    assert train_cli.main(["--resume", "s", "--runs-dir", str(runs), "--epochs", "6"]) == 0
    records = _metrics(runs / "s")
    assert [r["best"] for r in records] == [True] + [False] * 5
    np.testing.assert_allclose([r["lr"] for r in records],
                               [lr, lr, lr, lr / 2, lr / 2, lr / 4], rtol=1e-6)
    assert _progress(runs / "s")["stale_epochs"] == 1


# ---- NT-ASGD ----------------------------------------------------------------------------------

def _first_switch(losses: list[float], window: int) -> int | None:
    """The index of the validation after which the trigger fires, asked as the loop asks it."""
    for t, loss in enumerate(losses):
        if nonmonotonic_trigger(losses[:t], loss, window):
            return t
    return None


def test_the_trigger_fires_when_validation_is_worse_than_the_best_before_the_window():
    assert not nonmonotonic_trigger([5.0, 4.0], 9.0, 2)        # only 2 earlier: not yet
    assert not nonmonotonic_trigger([5.0, 4.0, 3.0], 4.9, 2)   # better than 5, the only one compared
    assert nonmonotonic_trigger([5.0, 4.0, 3.0], 5.1, 2)
    assert not nonmonotonic_trigger([3.0, 4.0, 5.0, 6.0], 3.0, 2)  # equal is not worse
    assert nonmonotonic_trigger([3.0, 4.0, 5.0, 6.0], 3.5, 2)
    # the script's window of 5: the 7th validation is the first that can fire
    assert _first_switch([6, 5, 4, 3, 2, 1, 6.5], 5) == 6
    assert _first_switch([6, 5, 4, 3, 2, 1, 5.9, 4.5, 3.9, 3.1], 5) == 9  # min of 6, 5, 4, 3
    assert _first_switch([6, 5, 4, 3, 2, 7, 7, 7], 5) == 6  # 7 > 6
    assert _first_switch([9, 8, 7, 6, 5, 4, 3, 2, 1], 5) is None  # improving: never


def _tiny_trainer(replicas: int):
    config = LMConfig(vocab_size=40, emsize=8, nhid=8, nlayers=2, dropout=0.2, two_biases=True)
    strategy = make_strategy(cpu_replicas=replicas)
    with strategy.scope():
        model = build_model(config, seed=5)
        trainer = Trainer(model, make_optimizer("sgd", 3.0), strategy, clip=0.5,
                          two_biases=True)
    return model, trainer


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_average_is_numpys_mean_of_the_weights_at_the_switch_and_after_every_step(replicas):
    model, trainer = _tiny_trainer(replicas)
    data = np.random.default_rng(1).integers(0, 40, (4, 6 * 5 + 1)).astype(np.int32)
    state, snapshots = trainer.zero_state(4), []
    average = WeightAverage(model)
    for step in range(6):
        if step == 2:
            average.start()
            snapshots.append(model.get_weights())
        inputs, targets = data[:, step * 5:(step + 1) * 5], data[:, step * 5 + 1:(step + 1) * 5 + 1]
        _, state = trainer.train_step(inputs, targets, noise_keys(0, 0, step, 4), state)
        if average.active:
            average.update()
            snapshots.append(model.get_weights())
    assert average.count == len(snapshots) == 5
    means = [np.mean(np.stack(ws), axis=0, dtype=np.float64) for ws in zip(*snapshots)]
    for got, want in zip(average.values(), means):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert max(np.abs(a - b).max() for a, b in zip(snapshots[0], snapshots[-1])) > 1e-3
    last = model.get_weights()
    with average.applied():
        for got, want in zip(model.get_weights(), means):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for got, want in zip(model.get_weights(), last):  # put back bit for bit
        np.testing.assert_array_equal(got, want)


def test_two_replicas_average_as_one():
    runs = {}
    for replicas in (1, 2):
        model, trainer = _tiny_trainer(replicas)
        data = np.random.default_rng(2).integers(0, 40, (4, 4 * 5 + 1)).astype(np.int32)
        state, average = trainer.zero_state(4), WeightAverage(model)
        average.start()
        for step in range(4):
            inputs = data[:, step * 5:(step + 1) * 5]
            targets = data[:, step * 5 + 1:(step + 1) * 5 + 1]
            _, state = trainer.train_step(inputs, targets, noise_keys(0, 0, step, 4), state)
            average.update()
        runs[replicas] = average.values()
    for one, two in zip(runs[1], runs[2]):
        np.testing.assert_allclose(two, one, atol=1e-6)


def _resumes_bit_for_bit(corpus, runs: Path, args, stop_after: int) -> dict:
    """Train `args` whole (run 'whole') and stopped after `stop_after` consistent points then
    resumed (run 'stopped'); the two final checkpoints and records must be identical."""
    assert train_cli.main([*args(runs, "whole")]) == 0
    with pytest.raises(Stopped):
        EpochLoop(build(prepare(train_cli.config_from_argv(args(runs, "stopped"))),
                        make_strategy()), StopAfter(stop_after)).run()
    assert train_cli.main(["--resume", "stopped", "--runs-dir", str(runs)]) == 0
    whole, resumed = saved_arrays(runs / "whole"), saved_arrays(runs / "stopped")
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)
    records = _metrics(runs / "whole")
    assert [_untimed(r) for r in records] == [_untimed(r) for r in _metrics(runs / "stopped")]
    return {"records": records, "saved": whole, "progress": _progress(runs / "whole")}


def test_ntasgd_switches_when_its_trigger_says_averages_from_then_on_and_resumes_bit_for_bit(
        corpus, tmp_path):
    def args(runs, name):
        return _args(corpus, runs, name, "--lr", "60", "--epochs", "6", "--ntasgd",
                     "--nonmono", "1", "--max-batches", "12")

    # stopped in epoch 5 (12 steps and one end of epoch each): after the switch
    run = _resumes_bit_for_bit(corpus, tmp_path / "runs", args, 4 * 13 + 5)
    records, progress, saved = run["records"], run["progress"], run["saved"]
    switch = next(r["epoch"] for r in records if r.get("ntasgd_switch"))
    assert 3 <= switch <= 4, "the setup must switch before the stop"
    losses = progress["val_losses"]
    assert len(losses) == switch  # the trigger's history ends at the switch
    assert _first_switch(losses, 1) == switch - 1
    np.testing.assert_allclose([np.exp(x) for x in losses], [r["val_ppl"] for r in records[
        :switch]], rtol=1e-9)
    assert [r["averaged"] for r in records] == [e > switch for e in range(1, 7)]
    # the switch's snapshot and a step after every one of the 12 a later epoch has
    assert int(saved["average_steps"]) == 1 + 12 * (6 - switch)


def test_a_fine_tune_with_ntasgd_averages_from_its_first_step_and_keeps_and_scores_the_average(
        corpus, tmp_path):
    runs = tmp_path / "runs"
    assert train_cli.main(_args(corpus, runs, "base", "--epochs", "1", "--max-batches", "3")) == 0
    tuned = ["--finetune-from", "base", "--runs-dir", str(runs), "--name", "tuned",
             "--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
             "--test", str(corpus["test"]), "--epochs", "1", "--max-batches", "4", "--quiet",
             "--batch-size", "4", "--bptt", "8", "--eval-batch-size", "4", "--lr", "5",
             "--ntasgd"]
    assert train_cli.main(tuned) == 0
    (record,) = _metrics(runs / "tuned")
    assert record["averaged"] and record["best"]
    saved = saved_arrays(runs / "tuned")
    assert int(saved["average_steps"]) == 1 + 4  # the source's weights, then every step
    model = build_model(RunDir(runs / "tuned").model_config())
    model.load_weights(runs / "tuned" / "best.weights.h5")
    averages = [saved[f"average_{i}"] for i in range(len(model.trainable_variables))]
    for weight, average in zip(model.trainable_variables, averages):
        np.testing.assert_array_equal(weight.numpy(), average)  # the best weights: the average
    raw = [saved[f"weight_{i}"] for i in range(len(averages))]
    assert max(np.abs(a - w).max() for a, w in zip(averages, raw)) > 1e-4  # not the weights
    score = evaluate_run(runs / "tuned", str(corpus["valid"]), batch_size=4, bptt=8)
    assert score.perplexity == pytest.approx(record["val_ppl"], rel=1e-6)


# ---- variable-length BPTT ---------------------------------------------------------------------

def test_lengths_are_drawn_as_the_script_draws_them_and_only_from_their_key():
    lengths = np.array([draw_length(0, 0, b, 70) for b in range(20_000)])
    short = lengths < 53  # between the two modes (35 and 70, each +- 5)
    assert short.mean() == pytest.approx(0.05, abs=0.005)
    # int() of N(70, 5) has the mean 70 - 0.5 (truncated down), the spread 5 (and 1/12)
    assert lengths[~short].mean() == pytest.approx(69.5, abs=0.12)
    assert lengths[~short].std() == pytest.approx(np.sqrt(25 + 1 / 12), abs=0.12)
    assert lengths[short].mean() == pytest.approx(34.5, abs=0.5)
    # at bptt 6 the minimum of 5 is drawn when N(6 or 3, 5) < 6: by hand,
    # 0.95 * Phi(0) + 0.05 * Phi(0.6) = 0.95 * 0.5 + 0.05 * 0.72575 = 0.51129
    small = np.array([draw_length(1, 2, b, 6) for b in range(20_000)])
    assert small.min() == 5 and (small == 5).mean() == pytest.approx(0.51129, abs=0.01)
    assert draw_length(3, 4, 5, 70) == draw_length(3, 4, 5, 70)
    for other in ([draw_length(3, 5, b, 70) for b in range(50)],
                  [draw_length(4, 4, b, 70) for b in range(50)]):
        assert other != [draw_length(3, 4, b, 70) for b in range(50)]


@pytest.mark.parametrize("last_batch", ["discard", "keep"])
def test_an_epoch_advances_every_column_by_the_drawn_lengths_to_its_end(last_batch):
    stream = np.arange(1, 203, dtype=np.int32)  # column j of 4 holds j*L+1 ...
    fixed = BPTTBatches(stream, 4, 8, last_batch)
    epoch = VariableBPTTBatches(fixed, seed=2, epoch=1)
    length = fixed.column_length
    assert epoch.lengths == [draw_length(2, 1, b, 8) for b in range(len(epoch))]
    assert epoch.starts == list(np.cumsum([0, *epoch.lengths[:-1]]))
    # on while two targets remain (the script's i < len - 2), the last batch cut to the end
    assert epoch.starts[-1] < length - 2 <= epoch.starts[-1] + epoch.lengths[-1]
    covered = min(epoch.starts[-1] + epoch.lengths[-1], length - 1)
    inputs = np.concatenate([epoch[i][0] for i in range(len(epoch))], axis=1)
    targets = np.concatenate([epoch[i][1] for i in range(len(epoch))], axis=1)
    assert inputs.shape[1] == covered  # every step in order, once, up to the end
    columns = np.full((4, length), -1)
    used = stream[: 4 * (len(stream) // 4)] if last_batch == "discard" else stream
    columns.flat[: used.size] = used
    real = columns[:, 1:covered + 1] != -1
    np.testing.assert_array_equal(np.where(real, inputs, -1),
                                  np.where(real, columns[:, :covered], -1))
    np.testing.assert_array_equal(targets, columns[:, 1:covered + 1])
    assert [epoch.lr_scale(i) for i in range(len(epoch))] == [n / 8 for n in epoch.lengths]


def test_the_state_carried_across_drawn_lengths_is_the_state_of_the_whole_columns():
    config = LMConfig(vocab_size=60, emsize=8, nhid=8, nlayers=2, dropout=0.0)
    model = build_model(config, seed=1)
    stream = np.random.default_rng(4).integers(0, 60, 3 * 90).astype(np.int32)
    epoch = VariableBPTTBatches(BPTTBatches(stream, 3, 12, "discard"), seed=0, epoch=0)
    assert len(set(epoch.lengths)) > 2
    pieces = Evaluator(model)(epoch[i] for i in range(len(epoch)))
    whole = np.concatenate([epoch[i][0] for i in range(len(epoch))], axis=1), np.concatenate(
        [epoch[i][1] for i in range(len(epoch))], axis=1)
    at_once = Evaluator(model)([whole])
    covered = min(epoch.starts[-1] + epoch.lengths[-1], 89)
    assert pieces[1] == at_once[1] == 3 * covered and covered >= 88
    assert pieces[0] == pytest.approx(at_once[0], rel=1e-5)


def test_a_step_runs_at_the_learning_rate_times_its_scale_and_puts_the_rate_back():
    data = np.random.default_rng(3).integers(0, 40, (4, 7)).astype(np.int32)
    weights = {}
    for lr, scale in ((2.0, 0.75), (1.5, 1.0), (2.0, 1.0)):
        model, trainer = _tiny_trainer(1)
        trainer.learning_rate = lr
        trainer.train_step(data[:, :6], data[:, 1:], noise_keys(0, 0, 0, 4),
                           trainer.zero_state(4), 0, scale)
        assert trainer.learning_rate == lr
        weights[lr, scale] = model.get_weights()
    for a, b in zip(weights[2.0, 0.75], weights[1.5, 1.0]):
        np.testing.assert_array_equal(a, b)
    assert any((a != b).any() for a, b in zip(weights[2.0, 0.75], weights[2.0, 1.0]))


def _variable_steps(replicas: int, steps: int = 8):
    model, trainer = _tiny_trainer(replicas)
    stream = np.random.default_rng(6).integers(0, 40, 4 * 120).astype(np.int32)
    epoch = VariableBPTTBatches(BPTTBatches(stream, 4, 10, "keep"), seed=1, epoch=0)
    state, losses = trainer.zero_state(4), []
    for i in range(steps):
        inputs, targets = epoch[i]
        result, state = trainer.train_step(inputs, targets, noise_keys(1, 0, i, 4), state,
                                           step_key(1, 0, i), epoch.lr_scale(i))
        losses.append(result.nll_sum / result.num_targets)
    return np.array(losses), model.get_weights(), trainer, epoch


def test_two_replicas_train_variable_lengths_as_one_and_the_step_is_not_traced_per_length():
    one_losses, one_weights, trainer, epoch = _variable_steps(1)
    assert len(set(epoch.lengths[:8])) >= 4
    # the zero state's call, the carried state's, then one with the time left open
    assert trainer._train_step.experimental_get_tracing_count() <= 3
    two_losses, two_weights, _, _ = _variable_steps(2)
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    for a, b in zip(one_weights, two_weights):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_a_run_with_variable_lengths_ntasgd_the_step_schedule_and_every_regulariser_resumes_bit_for_bit(
        corpus, tmp_path):
    losses = tmp_path / "losses.jsonl"

    def args(runs, name):
        return _args(corpus, runs, name, "--lr", "30", "--epochs", "4", "--variable-bptt",
                     "--ntasgd", "--nonmono", "1", "--lr-update-interval", "2",
                     "--max-batches", "10", *ALL_FLAGS,
                     *(["--log-losses", str(losses)] if name == "whole" else []))

    run = _resumes_bit_for_bit(corpus, tmp_path / "runs", args, 2 * 11 + 4)
    steps = [json.loads(line) for line in losses.read_text().splitlines()]
    assert len(steps) == 40
    lrs = {r["epoch"]: r["lr"] for r in run["records"]}
    for step in steps:
        drawn = draw_length(3, step["epoch"] - 1, step["batch"] - 1, 8)
        assert step["bptt"] == drawn  # none is the cut last batch: 10 of about 23 an epoch
        assert step["lr"] == pytest.approx(lrs[step["epoch"]] * drawn / 8, rel=1e-6)
    assert len({s["bptt"] for s in steps}) > 4
