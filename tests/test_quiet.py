"""Quiet CLIs (keraslm/quiet.py): on a CPU-only machine, training, evaluating and exporting a tiny
run print no line that looks like an error or a warning; real errors still show. And run.sh
ends with a short summary of where things are and what to try next."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_runs import wikitext_slices

from keraslm.quiet import NOISE, filtered_stderr, has_nvidia_gpu

REPO = Path(__file__).resolve().parents[1]
ALARMING = re.compile(r"^[EWF]\d{4} |cuInit|absl::InitializeLog|\b(warning|error)s?\b",
                      re.IGNORECASE)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERASLM_TF_LOGS")}  # a user's plain shell
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.skipif(has_nvidia_gpu(), reason="GPU machines keep TensorFlow's CUDA messages")
def test_train_evaluate_and_export_print_no_alarming_line(tmp_path, data_root):
    corpus = wikitext_slices(tmp_path, {"train": 20_000, "valid": 4_000, "test": 4_000}, data_root)
    runs = tmp_path / "runs"
    commands = [
        ("keraslm.train", "--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
         "--test", str(corpus["test"]), "--emsize", "8", "--nhid", "8", "--batch-size", "8",
         "--bptt", "10", "--eval-batch-size", "4", "--test-batch-size", "4", "--runs-dir",
         str(runs), "--log-interval", "0", "--epochs", "1", "--max-batches", "3", "--name", "q"),
        ("keraslm.evaluate", str(runs / "q"), "--corpus", str(corpus["test"])),
        ("export.to_onnx", str(runs / "q"), "--out", str(tmp_path / "bundle")),
    ]
    for command in commands:
        done = run_cli(*command)
        assert done.returncode == 0, done.stderr
        alarming = [line for line in done.stderr.splitlines() if ALARMING.search(line)]
        assert alarming == [], f"{command[0]} printed: {alarming}"


def test_real_errors_pass_the_filter(capfd):
    with filtered_stderr(NOISE):
        for line in (
            "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
            "I0000 00:00:1.5 1 cudart_stub.cc:31] Could not find cuda drivers on your machine",
            "E0000 00:00:1.5 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
            "E0000 00:00:1.5 1 op_kernel.cc:1] OOM when allocating tensor",
            "error: something the user must see",
        ):
            os.write(2, (line + "\n").encode())
    assert capfd.readouterr().err.splitlines() == [
        "E0000 00:00:1.5 1 op_kernel.cc:1] OOM when allocating tensor",
        "error: something the user must see"]


def test_a_failure_inside_the_block_still_restores_stderr(capfd):
    with pytest.raises(RuntimeError), filtered_stderr(NOISE):
        os.write(2, b"kept\n")
        raise RuntimeError
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "kept\nafter\n"


def test_run_sh_ends_with_a_summary():
    """run.sh's closing lines (its `summary` function; the tutorial itself trains for hours)."""
    done = subprocess.run(["bash", "-c", ". ./run.sh && summary demo runs/demo/test-scores.txt"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    out = done.stdout
    for where in ("run:     runs/demo", "bundle:  bundles/demo", "bundles/demo/README.md",
                  "scores:  runs/demo/test-scores.txt"):
        assert where in out
    for command in ("serve/score.py --model bundles/demo -", "serve/generate.py --model bundles/demo",
                    "python -m serve.server --model bundles/demo"):
        assert command in out
    assert done.stderr == ""
