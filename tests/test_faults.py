"""Faults: saves interrupted at any moment, unusable run directories, weights gone non-finite.

(A training process killed mid-epoch and resumed is tested in test_training.py; a worker dying in
a multi-worker run in test_multiworker.py.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_runs import wikitext_slices

from keraslm import train as train_cli
from keraslm.errors import UserError
from keraslm.model import LMConfig, build_model
from keraslm.rundir import atomic_path
from keraslm.training import checkpoint
from keraslm.training.step import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> dict[str, Path]:
    """Tiny train/valid/test files cut from WikiText-2 (whole lines)."""
    return wikitext_slices(tmp_path_factory.mktemp("corpus"), {"train": 10_000, "valid": 2_000, "test": 2_000}, data_root)


def tiny_args(corpus, runs: Path, *extra: str) -> list[str]:
    return ["--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
            "--test", str(corpus["test"]), "--emsize", "8", "--nhid", "8", "--batch-size", "4",
            "--bptt", "10", "--eval-batch-size", "4", "--test-batch-size", "4", "--epochs", "1",
            "--max-batches", "6", "--runs-dir", str(runs), "--log-interval", "0", "--quiet", *extra]


def error_line(capsys, *, trained: bool = False) -> str:
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in out.err
    assert out.out.startswith("run ") == trained, out.out
    return err[-1]


# ---- saves interrupted at any moment --------------------------------------------------------------

class FakeVariable:
    """What checkpoint.save/load touch on a Keras variable."""

    def __init__(self, value):
        self.value = np.asarray(value)

    @property
    def shape(self):
        return self.value.shape

    def numpy(self):
        return self.value

    def assign(self, value):
        self.value = np.asarray(value)


class FakeModel:
    def __init__(self, weights):
        self.weights = weights

    def get_weights(self):
        return self.weights

    def set_weights(self, weights):
        self.weights = list(weights)


class FakeOptimizer:
    def __init__(self, count: int, shape: tuple = ()):
        self.variables = [FakeVariable(np.zeros(shape, np.float32)) for _ in range(count)]


SAVE_LOOP = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path
    from types import SimpleNamespace as Fake
    import numpy as np
    from keraslm.training import checkpoint

    def slow_write(self, data):  # a slow disk: most of the loop's time is spent mid-write
        with open(self, "wb") as f:
            for start in range(0, len(data), len(data) // 16 + 1):
                f.write(data[start:start + len(data) // 16 + 1])
                f.flush()
                time.sleep(0.002)

    Path.write_bytes = slow_write
    path, step = sys.argv[1], int(sys.argv[2])
    while True:  # every array of save number `step` holds `step`
        weights = [np.full((300, 300), step, np.float32), np.full(40, step, np.float32)]
        slots = [np.full((300, 300), step, np.float32) for _ in range(2)]
        model = Fake(get_weights=lambda: weights)
        optimizer = Fake(variables=[Fake(numpy=lambda v=v: v) for v in slots])
        state = [np.full((4, 8), step, np.float32)]
        checkpoint.save(path, model, optimizer, checkpoint.Progress(batch=step), state)
        step += 1
""")


def load_consistent(path: Path) -> int:
    """Load a checkpoint the loop wrote; every array must come from one and the same save."""
    model = FakeModel([np.zeros((300, 300), np.float32), np.zeros(40, np.float32)])
    optimizer = FakeOptimizer(2, (300, 300))
    progress, state = checkpoint.load(path, model, optimizer)
    step = progress.batch
    for array in [*model.weights, *(v.value for v in optimizer.variables), *state]:
        assert np.all(array == step)
    return step


def mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def test_a_kill_at_any_moment_of_a_save_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "checkpoint" / checkpoint.CHECKPOINT_FILE
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = np.random.default_rng(0)
    step, cut_short = 1, 0
    for _ in range(6):
        before = mtime(path)
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path), str(step)], env=env,
                                start_new_session=True, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while mtime(path) == before and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.005)  # until this process has saved once
            time.sleep(rng.uniform(0.0, 0.1))  # somewhere inside a later save, most likely
            assert proc.poll() is None, proc.stderr.read().decode()
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stderr.close()
        leftovers = [p for p in path.parent.iterdir() if p != path]
        cut_short += bool(leftovers)  # the kill landed inside a write
        for leftover in leftovers:
            leftover.unlink()
        newest = load_consistent(path)
        assert newest >= step - 1  # this round's last save, or the last complete one before it
        step = newest + 1
    assert step > 6 and cut_short >= 1


def test_a_save_that_fails_midway_leaves_the_previous_files_loadable(tmp_path, monkeypatch):
    config = LMConfig(vocab_size=30, emsize=8, nhid=8, nlayers=1, dropout=0.0)
    model, other = build_model(config, seed=1), build_model(config, seed=2)
    good = [w.copy() for w in model.get_weights()]
    ckpt = tmp_path / "checkpoint" / checkpoint.CHECKPOINT_FILE
    best = tmp_path / "best.weights.h5"
    optimizer = FakeOptimizer(0)
    checkpoint.save(ckpt, model, optimizer, checkpoint.Progress(batch=1), None)
    with atomic_path(best) as tmp:
        model.save_weights(tmp)

    model.set_weights(other.get_weights())
    real_write = Path.write_bytes

    def disk_full(self, data):  # half the bytes reach the disk, then ENOSPC
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(UserError, match="cannot save the checkpoint .No space left on device.; "
                                        "the previous checkpoint is kept"):
        checkpoint.save(ckpt, model, optimizer, checkpoint.Progress(batch=2), None)
    monkeypatch.undo()
    # a crash after the new weights were written, before the rename
    with pytest.raises(RuntimeError), atomic_path(best) as tmp:
        model.save_weights(tmp)
        raise RuntimeError("crash")

    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "best.weights.h5", "latest.npz"]  # no temporary file left
    restored = build_model(config, seed=3)
    progress, _ = checkpoint.load(ckpt, restored, optimizer)
    assert progress.batch == 1
    for a, b in zip(restored.get_weights(), good):
        np.testing.assert_array_equal(a, b)
    restored = build_model(config, seed=3)
    restored.load_weights(best)
    for a, b in zip(restored.get_weights(), good):
        np.testing.assert_array_equal(a, b)


# ---- unusable run directories fail before training -------------------------------------------------

def test_an_unwritable_run_directory_fails_before_training(corpus, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert train_cli.main(tiny_args(corpus, blocker / "runs")) == 1
    line = error_line(capsys)
    assert "cannot write the run directory" in line and str(blocker) in line


def test_too_little_disk_space_fails_before_training(corpus, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50_000))
    assert train_cli.main(tiny_args(corpus, runs, "--name", "full")) == 1
    line = error_line(capsys)
    assert "not enough free disk space" in line and "MB free" in line
    assert not (runs / "full").exists()


# ---- non-finite weights are never checkpointed ----------------------------------------------------

def test_weights_gone_non_finite_are_never_checkpointed(corpus, tmp_path, capsys, monkeypatch):
    # The loss of batch 3 is finite (computed before the update), but the update leaves a NaN.
    real_step = Trainer.train_step
    calls = []

    def poisoned_step(self, *args):
        result, state = real_step(self, *args)
        calls.append(1)
        if len(calls) == 3:
            weight = self.model.trainable_variables[0]
            weight.assign(np.full(weight.shape, np.nan, np.float32))
        return result, state

    monkeypatch.setattr(Trainer, "train_step", poisoned_step)
    runs = tmp_path / "runs"
    assert train_cli.main(tiny_args(corpus, runs, "--checkpoint-every", "1", "--name", "n")) == 1
    line = error_line(capsys, trained=True)
    assert "not finite at epoch 1, batch 3" in line
    assert "last good checkpoint (epoch 1, batch 2)" in line
    with np.load(runs / "n" / "checkpoint" / "latest.npz") as saved:
        assert json.loads(saved["progress"].tobytes())["batch"] == 2
        assert all(np.isfinite(saved[k]).all() for k in saved.files if k.startswith("weight_"))


# ---- unusable checkpoints are one line, never a traceback -----------------------------------------

@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A run stopped mid-way with a checkpoint, to resume from (copied by each test)."""
    runs = tmp_path_factory.mktemp("trained") / "runs"
    assert train_cli.main(tiny_args(corpus, runs, "--name", "t", "--checkpoint-every", "3",
                                    "--max-batches", "3")) == 0
    return runs


def _spoil_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _spoil_garbage(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04" + os.urandom(2000))


def _spoil_empty(path: Path) -> None:
    path.write_bytes(b"")


def _spoil_foreign(path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, something=np.arange(3))


def _spoil_progress(path: Path) -> None:
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    arrays["progress"] = np.frombuffer(b'{"epoch": 1, "bat', dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _spoil_other_model(path: Path) -> None:
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    arrays["weight_0"] = np.zeros((5, 5), np.float32)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(("spoil", "reason"), [
    (_spoil_truncated, "truncated or corrupt"), (_spoil_garbage, "truncated or corrupt"),
    (_spoil_empty, "truncated or corrupt"), (_spoil_foreign, "not a keraslm checkpoint"),
    (_spoil_progress, "progress record is corrupt"), (_spoil_other_model, "another model")])
def test_an_unusable_checkpoint_is_one_line_naming_the_file(trained, tmp_path, capsys, spoil,
                                                           reason):
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs)
    path = runs / "t" / "checkpoint" / checkpoint.CHECKPOINT_FILE
    spoil(path)
    capsys.readouterr()
    assert train_cli.main(["--resume", "t", "--runs-dir", str(runs), "--epochs", "2"]) == 1
    line = error_line(capsys)
    assert str(path) in line and reason in line


def test_the_last_good_checkpoint_note_survives_a_corrupt_checkpoint(trained, tmp_path):
    from types import SimpleNamespace

    from keraslm.rundir import RunDir
    from keraslm.training.loop import EpochLoop

    run = RunDir(tmp_path / "t")
    shutil.copytree(trained / "t", run.path)
    path = run.checkpoint_dir / checkpoint.CHECKPOINT_FILE
    loop = SimpleNamespace(checkpoint_path=path, run_dir=run)
    assert "(epoch 2, batch 0)" in EpochLoop.last_good(loop)
    _spoil_truncated(path)
    note = EpochLoop.last_good(loop)
    assert "unusable" in note and str(path) in note


def test_a_resume_that_changes_a_fixed_setting_is_refused(trained, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs)
    assert train_cli.main(["--resume", "t", "--runs-dir", str(runs), "--lr", "3"]) == 1
    assert "--lr cannot change when resuming" in error_line(capsys)


def test_a_run_written_by_the_previous_version_still_resumes_and_exports(trained, tmp_path):
    """Before the typed config, config.json kept the flat argparse namespace under "args" and
    the model config had no two_biases."""
    from export.to_onnx import export_run

    runs = tmp_path / "runs"
    shutil.copytree(trained, runs)
    config_path = runs / "t" / "config.json"
    config = json.loads(config_path.read_text())
    flat = {k: v for section in config.pop("train").values() for k, v in section.items()}
    config["args"] = {**flat, "resume": None, "runs_dir": "elsewhere", "retired_flag": 1}
    del config["model"]["two_biases"]
    config_path.write_text(json.dumps(config))

    assert train_cli.main(["--resume", "t", "--runs-dir", str(runs), "--epochs", "2"]) == 0
    records = [json.loads(line) for line in (runs / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    bundle = export_run(runs / "t", tmp_path / "bundle")
    assert (bundle / "model.onnx").is_file()
