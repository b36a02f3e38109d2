"""Dynamic int8 quantization of an exported model, and what it costs in perplexity and gains in speed."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quantize_dynamic

from keraslm.text import TextPipeline
from keraslm.vocab import Vocab
from serve.session import ModelSession

SAMPLE_COLUMNS, SAMPLE_LENGTH, SAMPLE_CHUNK = 4, 100, 25  # 400 scored tokens in 4 chunks
TIMING_REPEATS = 3


def quantize_int8(fp32_path: Path, int8_path: Path, *, external_data: bool = False) -> dict:
    """Quantize weights of LSTM, MatMul and Gather to int8 (activations quantized at run time).

    Give it the graph with tied weights unshared: quantization then stores the embedding and the
    decoder as two int8 copies (half of one float32 copy) and runs the decoder as MatMulInteger.
    """
    op_types = ["LSTM", "MatMul", "Gather"]
    quantize_dynamic(fp32_path, int8_path, op_types_to_quantize=op_types,
                     weight_type=QuantType.QInt8, use_external_data_format=external_data)
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "int8",
            "op_types": op_types}


def score_stream(session: ModelSession, ids: np.ndarray, chunk: int) -> np.ndarray:
    """Log-probabilities of ids[:, 1:] given the prefix, fed `chunk` steps at a time with the
    state carried between chunks (ids: int [columns, length + 1]; result float [columns, length])."""
    state = session.zero_state(ids.shape[0])
    pieces = []
    for start in range(0, ids.shape[1] - 1, chunk):
        window = ids[:, start:start + chunk + 1].astype(np.int32)
        logprobs, state = session.step(window[:, :-1], window[:, 1:], state)
        pieces.append(logprobs)
    return np.concatenate(pieces, axis=1)


def sample_ids(run_config: dict, vocab: Vocab) -> tuple[np.ndarray, str]:
    """Ids [SAMPLE_COLUMNS, SAMPLE_LENGTH + 1] to measure on, and what they are: the start of the
    run's validation text when it is still there, else random in-vocabulary tokens."""
    shape = (SAMPLE_COLUMNS, SAMPLE_LENGTH + 1)
    count = shape[0] * shape[1]
    valid = run_config.get("corpora", {}).get("valid", {}).get("path")
    if valid and Path(valid).is_file():
        pipeline = TextPipeline.from_dict(run_config["pipeline"])
        ids = vocab.encode(itertools.islice(pipeline.iter_tokens(valid, errors="replace"), count))
        if ids.size == count:
            return ids.reshape(shape), f"tokens of {Path(valid).name}"
    rng = np.random.default_rng(0)
    return rng.integers(0, len(vocab), shape, dtype=np.int32), "random in-vocabulary tokens"


def compare(fp32_path: Path, int8_path: Path, ids: np.ndarray, sample: str) -> dict:
    """Perplexity and scoring time of both models on the same token columns."""
    report: dict = {"sample_tokens": int(ids.shape[0] * (ids.shape[1] - 1)), "sample": sample}
    for label, path in (("fp32", fp32_path), ("int8", int8_path)):
        session = ModelSession(path, threads=1)
        logprobs = score_stream(session, ids, SAMPLE_CHUNK)  # also the warm-up run
        seconds = []
        for _ in range(TIMING_REPEATS):
            start = time.perf_counter()
            score_stream(session, ids, SAMPLE_CHUNK)
            seconds.append(time.perf_counter() - start)
        report[f"perplexity_{label}"] = math.exp(-float(logprobs.mean()))
        report[f"seconds_{label}"] = min(seconds)
        report[f"bytes_{label}"] = _model_bytes(path)
    return report


def _model_bytes(path: Path) -> int:
    """Size of a model file and its external data files, if any."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def summary(report: dict) -> str:
    """One line a person can read: perplexity change, speed change, size change."""
    ppl32, ppl8 = report["perplexity_fp32"], report["perplexity_int8"]
    t32, t8 = report["seconds_fp32"], report["seconds_int8"]
    return (
        f"int8 on {report['sample_tokens']} {report['sample']}: "
        f"perplexity {ppl32:.4g} -> {ppl8:.4g} ({100 * (ppl8 / ppl32 - 1):+.2f}%), "
        f"scoring time {1000 * t32:.1f} ms -> {1000 * t8:.1f} ms ({t32 / t8:.2f}x speed), "
        f"size {report['bytes_fp32'] / 1e6:.2f} MB -> {report['bytes_int8'] / 1e6:.2f} MB"
    )
