"""GluonNLP's language-model script's schedule, against references computed here by hand: the
step schedule (--lr-update-interval / --lr-update-factor) beside the plateau decay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_runs import wikitext_slices

from keraslm import train as train_cli
from keraslm.config import OptimConfig
from keraslm.errors import UserError
from keraslm.training.schedule import LRSchedule

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> dict[str, Path]:
    return wikitext_slices(tmp_path_factory.mktemp("corpus"),
                           {"train": 6_000, "valid": 2_000, "test": 2_000}, data_root)


def _args(corpus, runs: Path, name: str, *extra: str) -> list[str]:
    return ["--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
            "--test", str(corpus["test"]), "--emsize", "8", "--nhid", "8", "--nlayers", "2",
            "--batch-size", "4", "--bptt", "8", "--eval-batch-size", "4",
            "--test-batch-size", "4", "--seed", "3", "--runs-dir", str(runs), "--name", name,
            "--quiet", "--log-interval", "0", *extra]


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

