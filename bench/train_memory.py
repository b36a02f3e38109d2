"""Benchmark: the training process's memory over an epoch of the tutorial run.

    python bench/train_memory.py [--max-batches N] [--interval 100] [-- extra train flags]

Runs `python -m keraslm.train` (WikiText-2, standard_lstm_lm_200, the tutorial's settings, one
epoch or its first `--max-batches` batches, then validation and test as usual) in its own
process, reads that process's resident memory (VmRSS in /proc) whenever it prints a progress line
(every `--interval` batches), and prints the table of batch -> RSS, the growth from the first
progress line to the last, and the process's peak (VmHWM). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"epoch (\d+) \| batch (\d+)/(\d+)")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of process `pid`, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-batches", type=int, default=None, help="stop the epoch after N batches")
    p.add_argument("--interval", type=int, default=100, help="batches between samples")
    p.add_argument("extra", nargs="*", help="more flags for keraslm.train (after --)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="keraslm-mem-") as runs:
        command = [sys.executable, "-u", "-m", "keraslm.train", "--runs-dir", runs, "--name",
                   "memory", "--epochs", "1", "--log-interval", str(args.interval), "--quiet",
                   *args.extra]
        if args.max_batches:
            command += ["--max-batches", str(args.max_batches)]
        print("$ " + " ".join(command[1:]), flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        samples: list[tuple[int, float, int]] = []  # (batch, seconds, RSS KiB)
        peak = 0
        for line in proc.stdout:
            match = PROGRESS.search(line)
            try:
                mem = memory_kib(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            peak = max(peak, mem.get("VmHWM", 0))
            if match:
                samples.append((int(match[2]), time.monotonic() - started, mem["VmRSS"]))
            elif line.startswith(("error", "Traceback")):
                print(line, end="")
        status = proc.wait()
    if status != 0 or not samples:
        print(f"training failed (exit status {status})")
        return 1
    print(f"{'batch':>7} {'seconds':>8} {'RSS MiB':>8}")
    for batch, seconds, rss in samples:
        print(f"{batch:>7} {seconds:>8.0f} {rss / 1024:>8.1f}")
    first, last = samples[0][2], samples[-1][2]
    print(f"RSS from batch {samples[0][0]} to batch {samples[-1][0]}: {first / 1024:.1f} -> "
          f"{last / 1024:.1f} MiB ({(last - first) / 1024:+.1f} MiB); peak (VmHWM, validation "
          f"and test included) {peak / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
