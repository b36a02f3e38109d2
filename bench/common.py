"""What the benchmarks share: the machine's measured matmul peak and the model's FLOPs."""

from __future__ import annotations

import time

import numpy as np


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


def flops_per_token(model: dict) -> float:
    """Multiply-adds x 2 of one token through the LSTMs and the decoder (softmax not counted)."""
    h, v, e = model["nhid"], model["vocab_size"], model["emsize"]
    lstm = sum(4 * h * ((e if layer == 0 else h) + h) for layer in range(model["nlayers"]))
    return 2.0 * (lstm + h * v)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started

