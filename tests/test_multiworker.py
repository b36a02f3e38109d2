"""Multi-worker training: two worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy.

They must give the per-step losses of one process with the same global batch, write one run
directory, stop quickly with one clear line when a worker dies, and resume from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_runs import wikitext_slices

from keraslm import train as train_cli

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2
CLIP = 0.25  # inside the range of this setup's gradient norms (asserted on the reference)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> dict[str, Path]:
    """Tiny train/valid/test files cut from WikiText-2 (whole lines)."""
    return wikitext_slices(tmp_path_factory.mktemp("corpus"), {"train": 20_000, "valid": 3_000, "test": 3_000}, data_root)


def tiny_args(corpus, runs: Path, *extra: str) -> list[str]:
    """12 batches of 4 columns a epoch, 2 epochs, dropout 0.2 (masks keyed by global column),
    clipping at CLIP."""
    return ["--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
            "--test", str(corpus["test"]), "--emsize", "8", "--nhid", "8", "--batch-size", "4",
            "--bptt", "10", "--eval-batch-size", "4", "--test-batch-size", "4", "--epochs", "2",
            "--lr", "5", "--clip", str(CLIP), "--max-batches", "12", "--checkpoint-every", "4", "--runs-dir", str(runs),
            "--log-interval", "0", "--quiet", *extra]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Cluster:
    """`WORKERS` training processes on 127.0.0.1, each in its own process group, always reaped."""

    def __init__(self, folder: Path, argv: list[str], *, log_losses: bool = False):
        self.folder = folder
        self.tmp = folder / "tmp"  # where non-chief workers put (and remove) their scratch folders
        self.tmp.mkdir(parents=True, exist_ok=True)
        ports = free_ports(WORKERS)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        self.procs = []
        for index in range(WORKERS):
            env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(self.tmp),
                   "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                   "TF_CONFIG": json.dumps({"cluster": cluster,
                                            "task": {"type": "worker", "index": index}})}
            extra = ["--log-losses", str(self.losses_path(index))] if log_losses else []
            with open(self.log_path(index), "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "keraslm.train", *argv, "--strategy", "multiworker",
                     *extra], env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))

    def losses_path(self, index: int) -> Path:
        return self.folder / f"losses{index}.jsonl"

    def log_path(self, index: int) -> Path:
        return self.folder / f"worker{index}.log"

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]

    def kill(self, index: int) -> None:
        if self.procs[index].poll() is None:
            os.killpg(self.procs[index].pid, signal.SIGKILL)

    def close(self) -> None:
        for index, proc in enumerate(self.procs):
            self.kill(index)
            proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def output(self, index: int) -> str:
        return self.log_path(index).read_text(errors="replace")


def read_losses(path: Path) -> dict[tuple[int, int], dict]:
    """Per-step records by (epoch, batch); a step run again after a resume keeps its last record."""
    return {(r["epoch"], r["batch"]): r for r in map(json.loads, path.read_text().splitlines())}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_epochs(got: list[dict], want: list[dict], rel: float = 1e-5) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(want, got):
        for key in ("train_ppl", "val_ppl", "test_ppl", "lr", "best"):
            assert (key in a) == (key in b), key
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["epoch"], key)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, two replicas (the same global batch of 4 columns): the run to match."""
    folder = tmp_path_factory.mktemp("reference")
    argv = tiny_args(corpus, folder / "runs", "--name", "one", "--cpu-replicas", "2",
                     "--log-losses", str(folder / "losses.jsonl"))
    assert train_cli.main(argv) == 0
    losses = read_losses(folder / "losses.jsonl")
    norms = [r["grad_norm"] for r in losses.values()]
    assert min(norms) < CLIP < max(norms), "some steps must be clipped and some not"
    return {"run": folder / "runs" / "one", "losses": losses}


def test_two_workers_give_the_per_step_losses_of_one_process_and_write_one_run(
        corpus, request, tmp_path):
    runs = tmp_path / "runs"
    with Cluster(tmp_path, tiny_args(corpus, runs, "--name", "mw"), log_losses=True) as cluster:
        reference = request.getfixturevalue("reference")  # trains while the workers start
        codes = cluster.wait(timeout=240)
        assert codes == [0, 0], [cluster.output(i)[-2000:] for i in range(WORKERS)]

    want = reference["losses"]
    chief, other = (read_losses(cluster.losses_path(i)) for i in range(WORKERS))
    assert sorted(chief) == sorted(want) and len(want) == 24
    for step, record in want.items():
        assert chief[step]["loss"] == pytest.approx(record["loss"], rel=1e-5), step
        assert chief[step]["lr"] == pytest.approx(record["lr"], rel=1e-6), step
        assert chief[step]["grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-5), step
    assert other == chief  # every worker saw the same losses and learning rates

    assert [p.name for p in runs.iterdir()] == ["mw"]  # one run directory, the chief's
    assert not list(cluster.tmp.iterdir())  # the other worker removed its scratch folder
    assert_same_epochs(metrics(runs / "mw"), metrics(reference["run"]))
    config = json.loads((runs / "mw" / "config.json").read_text())
    assert config["train"]["run"]["strategy"] == "multiworker"
    assert "end of epoch 2" in cluster.output(1)  # the other worker trained alongside


def cluster_and_one_process(corpus, tmp_path: Path, extra: list[str]):
    """The tiny run with `extra` on a two-worker cluster (run "mw" under tmp_path/mw/runs) and
    in one process with two replicas (run "one" under tmp_path/runs): that process's per-step
    records, the chief's, and the finished cluster."""
    with Cluster(tmp_path / "mw", tiny_args(corpus, tmp_path / "mw" / "runs", "--name", "mw",
                                            *extra), log_losses=True) as cluster:
        one = tmp_path / "one.jsonl"  # trains while the workers start
        assert train_cli.main(tiny_args(corpus, tmp_path / "runs", "--name", "one",
                                        "--cpu-replicas", "2", "--log-losses", str(one),
                                        *extra)) == 0
        codes = cluster.wait(timeout=240)
        assert codes == [0, 0], [cluster.output(i)[-2000:] for i in range(WORKERS)]
    return read_losses(one), read_losses(cluster.losses_path(0)), cluster


def test_two_workers_train_the_adaptive_softmax_like_one_process(corpus, tmp_path):
    """The same with `--softmax adaptive` (tied, two tails), 6 steps: the per-step losses and
    gradient norms of one process with two replicas."""
    adaptive = ["--softmax", "adaptive", "--cutoffs", "30,300", "--div-value", "2",
                "--epochs", "1", "--max-batches", "6"]
    want, chief, _ = cluster_and_one_process(corpus, tmp_path, adaptive)
    assert sorted(chief) == sorted(want) and len(want) == 6
    for step, record in want.items():
        assert chief[step]["loss"] == pytest.approx(record["loss"], rel=1e-5), step
        assert chief[step]["grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-5), step
    config = json.loads((tmp_path / "mw" / "runs" / "mw" / "config.json").read_text())
    assert (config["model"]["softmax"], config["model"]["cutoffs"]) == ("adaptive", [30, 300])


def test_two_workers_draw_the_lengths_and_average_the_weights_of_one_process(corpus, tmp_path):
    """GluonNLP's schedule on two workers: variable-length BPTT (each step's length and scaled
    lr), NT-ASGD (--nonmono 1 and a high lr: it switches after epoch 3) and the step schedule,
    4 epochs of 5 steps: the per-step records and the epochs of one process with two
    replicas."""
    schedule = ["--variable-bptt", "--ntasgd", "--nonmono", "1", "--lr-update-interval", "1",
                "--lr", "40", "--epochs", "4", "--max-batches", "5"]
    want, chief, cluster = cluster_and_one_process(corpus, tmp_path, schedule)
    assert sorted(chief) == sorted(want) and len(want) == 20
    assert len({r["bptt"] for r in want.values()}) > 3
    for step, record in want.items():
        assert chief[step]["bptt"] == record["bptt"], step
        assert chief[step]["lr"] == pytest.approx(record["lr"], rel=1e-6), step
        assert chief[step]["loss"] == pytest.approx(record["loss"], rel=1e-5), step
    assert read_losses(cluster.losses_path(1)) == chief
    got, expected = metrics(tmp_path / "mw" / "runs" / "mw"), metrics(tmp_path / "runs" / "one")
    assert_same_epochs(got, expected)
    assert [r["averaged"] for r in got] == [r["averaged"] for r in expected]
    assert got[-1]["averaged"], "the setup must switch to averaging before the last epoch"


def test_a_dead_worker_stops_the_other_quickly_and_the_run_resumes(corpus, reference, tmp_path):
    runs = tmp_path / "runs"
    ckpt = runs / "f" / "checkpoint" / "latest.npz"
    with Cluster(tmp_path / "first", tiny_args(corpus, runs, "--name", "f")) as cluster:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and cluster.procs[0].poll() is None:
            if ckpt.is_file():
                break
            time.sleep(0.05)
        assert cluster.procs[0].poll() is None, cluster.output(0)[-2000:]
        progress = json.loads(np.load(ckpt)["progress"].tobytes())
        assert progress["epoch"] == 0 and 0 < progress["batch"] < 12  # a mid-epoch checkpoint
        cluster.kill(1)
        killed = time.monotonic()
        code = cluster.procs[0].wait(timeout=60)  # bounded: no hang
        waited = time.monotonic() - killed
        assert code != 0 and waited < 60
        lines = cluster.output(0).strip().splitlines()
        assert lines[-1].startswith("error: multi-worker training stopped: worker 1"), lines[-5:]
        assert "--resume" in lines[-1]
    assert not (runs / "f" / "metrics.jsonl").exists()  # killed during its first epoch

    with Cluster(tmp_path / "again", ["--resume", str(runs / "f"), "--runs-dir", str(runs)]) as again:
        codes = again.wait(timeout=240)
        assert codes == [0, 0], [again.output(i)[-2000:] for i in range(WORKERS)]
    assert (runs / "f").is_dir() and [p.name for p in runs.iterdir()] == ["f"]
    assert_same_epochs(metrics(runs / "f"), metrics(reference["run"]))


def test_multiworker_needs_a_valid_tf_config(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert train_cli.main(tiny_args(corpus, tmp_path, "--strategy", "multiworker")) == 1
    assert "TF_CONFIG" in capsys.readouterr().err
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}}')
    assert train_cli.main(tiny_args(corpus, tmp_path, "--strategy", "multiworker")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: TF_CONFIG needs") and "Traceback" not in "\n".join(err)
    assert not list(tmp_path.iterdir())
