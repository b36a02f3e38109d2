"""What the benchmarks share: the machine's measured matmul peak, the model's FLOPs, and the
peak memory of a benchmark's child process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np

from keraslm.config import tail_widths


def matmul_peak(n: int = 2048, repeats: int = 10) -> tuple[float, str]:
    """Best fp32 GFLOP/s of an n x n matmul, all cores: numpy (BLAS) and onnxruntime (MLAS)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    candidates = {"numpy": lambda: a @ b,
                  "onnxruntime MatMul": lambda: session.run(None, {"a": a, "b": b})}
    best = {}
    for name, fn in candidates.items():
        fn()  # warm up
        best[name] = 2 * n ** 3 / min(_timed(fn) for _ in range(repeats)) / 1e9
    name = max(best, key=best.get)
    return best[name], f"{name} {n}x{n}; " + ", ".join(f"{k} {v:.1f}" for k, v in best.items())


def layer_sizes(model: dict) -> list[int]:
    """Units of each LSTM layer of a run's model config (config.json's "model"), as
    `LMConfig.layer_sizes` has them: `nhid`, but `emsize` for a tied last layer with
    `last_layer_emsize` (the AWD-LSTM presets)."""
    sizes = [model["nhid"]] * model["nlayers"]
    if model.get("tied", True) and model.get("last_layer_emsize", False):
        sizes[-1] = model["emsize"]
    return sizes


def flops_per_token(model: dict) -> float:
    """Multiply-adds x 2 of one token through the LSTMs and the decoder (softmax not counted)."""
    sizes = layer_sizes(model)
    inputs = [model["emsize"], *sizes[:-1]]
    lstm = sum(4 * h * (x + h) for x, h in zip(inputs, sizes, strict=True))
    return 2.0 * (lstm + sizes[-1] * model["vocab_size"])


def adaptive_flops_per_token(model: dict, cutoffs: Sequence[int], div_value: float,
                              tail_shares: Sequence[float], tied_step_tokens: int = 0) -> float:
    """Multiply-adds x 2 of one token through the LSTMs and an adaptive softmax (softmax not
    counted): the head (the first cutoff's words plus one logit per tail) for every token, and
    tail i (its projection to nhid // div_value**i units, then its words) for the share
    `tail_shares[i]` of the targets that fall in it, as a loss that runs each tail only on its
    targets' rows does (keraslm's and PyTorch's). With `tied_step_tokens`, the tails' output
    matrices are keraslm's tied ones, the words' embedding rows times a projection (E[a:b] @ Q_i),
    made once a step of that many tokens (none for a tail as wide as the hidden state, which
    reads E[a:b] itself)."""
    h, v = layer_sizes(model)[-1], model["vocab_size"]
    lstm = flops_per_token({**model, "vocab_size": 0}) / 2
    head = h * ((cutoffs[0] if cutoffs else v) + len(cutoffs))
    tails = tied = 0.0
    for share, width, (start, end) in zip(tail_shares, tail_widths(h, cutoffs, div_value),
                                          pairwise((*cutoffs, v)), strict=True):
        tails += share * (width * h + width * (end - start))
        if tied_step_tokens and width != h:  # a full-width tied tail reads E[a:b] itself
            tied += (end - start) * h * width / tied_step_tokens
    return 2.0 * (lstm + head + tails + tied)


def tail_shares(targets: np.ndarray, cutoffs: Sequence[int]) -> list[float]:
    """The share of `targets` (ids in frequency order) in each tail cluster, past cutoffs[0]."""
    targets = np.asarray(targets).ravel()
    bounds = (*cutoffs, np.iinfo(np.int64).max)
    return [float(np.mean((targets >= a) & (targets < b))) if targets.size else 0.0
            for a, b in pairwise(bounds)]


# Runs a command, then writes the peak RSS of its process tree (KiB on Linux, bytes on macOS) to
# argv[1]. A child forked from a big benchmark process would report that process's RSS as its
# own peak (ru_maxrss keeps the high-water mark across exec), so this small interpreter forks it.
_PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN)"
             ".ru_maxrss)); sys.exit(code)")


def run_measured(command: Sequence[str], timeout: float | None = None, **kwargs
                 ) -> tuple[subprocess.CompletedProcess, float | None]:
    """Run `command` in a process of its own (text output captured): its result and its peak
    RSS in MB (ru_maxrss of the child, None if it did not finish)."""
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        rss = Path(tmp) / "peak_rss"
        done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(rss), *map(str, command)],
                              capture_output=True, text=True, timeout=timeout, check=False,
                              **kwargs)
        scale = 1 if sys.platform == "darwin" else 1024
        peak = int(rss.read_text()) * scale / 2**20 if rss.is_file() else None
    return done, peak


def child_env() -> dict[str, str]:
    """The environment for a benchmark child run from a checkout (this repository importable)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started

