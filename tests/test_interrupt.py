"""Ctrl-C or SIGTERM during training saves a resumable checkpoint, exits cleanly, and --resume
finishes the run."""

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

from keraslm import train as train_cli

REPO = Path(__file__).resolve().parents[1]
# A shell's background job (CI may be one) ignores SIGINT and its children inherit that, so Python
# installs no KeyboardInterrupt handler. Run the trainer with the SIGINT of a terminal.
TRAIN_WITH_TERMINAL_SIGINT = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'keraslm.train'; runpy.run_module('keraslm.train', run_name='__main__')")


@pytest.mark.parametrize(("signum", "status", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_resume_completes_the_run(
        tmp_path, data_root, signum, status, word):
    text = (data_root / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")[:40_000]
    corpus = tmp_path / "text.txt"
    corpus.write_text(text[: text.rindex("\n") + 1], encoding="utf-8")
    runs = tmp_path / "runs"
    args = ["--train", str(corpus), "--valid", str(corpus), "--test", str(corpus),
            "--emsize", "8", "--nhid", "8", "--batch-size", "4", "--bptt", "5", "--epochs", "1",
            "--checkpoint-every", "10", "--runs-dir", str(runs), "--name", "c", "--quiet",
            "--log-interval", "0"]
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_WITH_TERMINAL_SIGINT, *args],
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    checkpoint = runs / "c" / "checkpoint" / "latest.npz"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not checkpoint.is_file():
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be interrupted"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == status
    assert word in err and "Traceback" not in err
    progress = json.loads(np.load(checkpoint)["progress"].tobytes())
    assert progress["epoch"] == 0 and progress["batch"] >= 10
    assert not (runs / "c" / "metrics.jsonl").exists()

    assert train_cli.main(["--resume", "c", "--runs-dir", str(runs)]) == 0
    records = [json.loads(line) for line in (runs / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
