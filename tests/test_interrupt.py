"""Ctrl-C and SIGTERM stop training at a consistent point: a resumed run is bit-identical.

Each case interrupts a real training process (SIGINT or SIGTERM) at a different moment: in the
middle of the first epoch, in the middle of an epoch after the learning rate decayed, and while
the end of an epoch is being validated. It then resumes the run and compares every step's loss,
every epoch's record and the final weights with an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_runs import wikitext_slices

from keraslm import train as train_cli
from keraslm.training import checkpoint

REPO = Path(__file__).resolve().parents[1]
# A shell's background job (CI may be one) ignores SIGINT and its children inherit that, so Python
# installs no KeyboardInterrupt handler. Run the trainer with the SIGINT of a terminal.
TRAIN_WITH_TERMINAL_SIGINT = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'keraslm.train'; runpy.run_module('keraslm.train', run_name='__main__')")
EPOCHS, LR = 4, 60.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> dict[str, Path]:
    """A small training text, and a long validation text scored at batch 1, so that the end
    of an epoch lasts long enough to be interrupted."""
    return wikitext_slices(tmp_path_factory.mktemp("corpus"),
                           {"train": 12_000, "valid": 40_000, "test": 3_000}, data_root)


def train_args(corpus, runs: Path, name: str) -> list[str]:
    # lr 60 with clipping at 0.25 overshoots often enough that validation gets worse in some
    # epoch, so the learning rate decays during the run (asserted on the reference run).
    return ["--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
            "--test", str(corpus["test"]), "--emsize", "8", "--nhid", "8", "--batch-size", "4",
            "--bptt", "10", "--eval-batch-size", "1", "--test-batch-size", "4",
            "--epochs", str(EPOCHS), "--lr", str(LR), "--dropout", "0.3", "--seed", "5",
            "--runs-dir", str(runs), "--name", name, "--quiet", "--log-interval", "0"]


def read_losses(path: Path) -> dict[tuple[int, int], dict]:
    """Per-step records by (epoch, batch)."""
    return {(r["epoch"], r["batch"]): r for r in map(json.loads, path.read_text().splitlines())}


def final_state(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "checkpoint" / checkpoint.CHECKPOINT_FILE) as saved:
        return {k: saved[k] for k in saved.files if k != "progress"}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    """The uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    losses = folder / "losses.jsonl"
    args = [*train_args(corpus, folder / "runs", "ref"), "--log-losses", str(losses)]
    assert train_cli.main(args) == 0
    run = folder / "runs" / "ref"
    records = metrics(run)
    decayed = [r["epoch"] for r in records if not r["best"]]
    assert decayed and decayed[0] < EPOCHS, "the setup must decay the learning rate mid-run"
    steps = read_losses(losses)
    return {"run": run, "losses": steps, "metrics": records,
            "batches_per_epoch": max(b for e, b in steps if e == 1),
            "decayed_after": decayed[0]}


def interrupt(corpus, folder: Path, signum: int, after_steps: int) -> tuple[subprocess.Popen, str]:
    """Start a training process, send `signum` once it has logged `after_steps` steps."""
    losses = folder / "losses.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN_WITH_TERMINAL_SIGINT,
         *train_args(corpus, folder / "runs", "run"), "--log-losses", str(losses)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if losses.exists() and len(losses.read_text().splitlines()) >= after_steps:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"training ended before the signal: {proc.stderr.read()}"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc, err


@pytest.mark.parametrize("case", ["sigint mid-epoch", "sigterm after the lr decayed",
                                  "sigterm while validating"])
def test_an_interrupted_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(
        corpus, reference, tmp_path, case):
    per_epoch = reference["batches_per_epoch"]
    decayed = reference["decayed_after"]  # the lr is decayed from epoch decayed + 1 on
    signum, after_steps = {
        "sigint mid-epoch": (signal.SIGINT, per_epoch // 3),
        "sigterm after the lr decayed": (signal.SIGTERM, decayed * per_epoch + per_epoch // 2),
        "sigterm while validating": (signal.SIGTERM, per_epoch),
    }[case]
    proc, err = interrupt(corpus, tmp_path, signum, after_steps)
    status, word = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}[signum]
    assert proc.returncode == status, err
    assert word in err and "resumable checkpoint" in err and "Traceback" not in err

    run = tmp_path / "runs" / "run"
    stopped_at = checkpoint.read_progress(run / "checkpoint" / checkpoint.CHECKPOINT_FILE)
    done = metrics(run) if (run / "metrics.jsonl").exists() else []
    assert [r["epoch"] for r in done] == list(range(1, stopped_at.epoch + 1))  # no duplicate row
    if case == "sigterm while validating":
        assert (stopped_at.epoch, stopped_at.batch) == (1, 0)
    else:
        assert stopped_at.batch > 0
    if case == "sigterm after the lr decayed":
        assert stopped_at.epoch == decayed

    resumed_losses = tmp_path / "resumed.jsonl"
    assert train_cli.main(["--resume", "run", "--runs-dir", str(tmp_path / "runs"),
                           "--log-losses", str(resumed_losses)]) == 0
    resumed = read_losses(resumed_losses)
    first = min(resumed)
    if case == "sigterm after the lr decayed":
        # The lr came from the checkpoint: --lr (the saved 60) would give another figure.
        assert resumed[first]["lr"] == pytest.approx(LR * 0.25) != LR

    steps = {**read_losses(tmp_path / "losses.jsonl"), **resumed}
    assert steps == reference["losses"]  # every step's loss, lr and gradient norm, exactly
    for got, want in zip(metrics(run), reference["metrics"], strict=True):
        for key in ("epoch", "lr", "train_ppl", "val_ppl", "test_ppl", "best"):
            assert got.get(key) == want.get(key), (got["epoch"], key)
    want_state, got_state = final_state(reference["run"]), final_state(run)
    assert want_state.keys() == got_state.keys()
    for key, value in want_state.items():
        np.testing.assert_array_equal(got_state[key], value, err_msg=key)
