"""bf16 mixed precision: the hardware check, the numerics, and what a bf16 run records and exports.

This machine (and CI) may lack bf16 hardware, so the numerics run under
KERASLM_ALLOW_EMULATED_BF16=1: TensorFlow emulates bfloat16, with the same rounding as hardware.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers_runs import wikitext_slices

from keraslm import precision
from keraslm import train as train_cli
from keraslm.backend import tf
from keraslm.losses import full_softmax_nll_sum
from keraslm.model import LMConfig, build_model
from keraslm.training.devices import make_strategy
from keraslm.training.step import Trainer, make_optimizer, noise_keys

CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse2 avx2 fma {extra}
"""


def test_cpu_flags_name_the_bf16_instruction_sets():
    assert precision.cpu_bf16_flags(CPUINFO.format(extra="avx512f")) == []
    assert precision.cpu_bf16_flags(CPUINFO.format(extra="avx512_bf16")) == ["avx512_bf16"]
    assert precision.cpu_bf16_flags(CPUINFO.format(extra="amx_tile amx_bf16")) == ["amx_bf16"]


def test_bf16_without_hardware_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(precision.ALLOW_EMULATED, raising=False)
    monkeypatch.setattr(precision, "bf16_hardware", lambda: None)
    runs = tmp_path / "runs"
    assert train_cli.main(["--precision", "bf16", "--runs-dir", str(runs), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "AVX512-BF16" in err and "--precision fp32" in err
    assert not runs.exists()


def _losses(config: LMConfig, data: np.ndarray, mode: str, steps: int = 5):
    strategy = make_strategy()
    with strategy.scope():
        model = build_model(config, seed=3, precision=mode)
        optimizer = make_optimizer("sgd", 5.0)
    trainer = Trainer(model, optimizer, strategy, clip=0.25, two_biases=config.two_biases)
    state = trainer.zero_state(len(data))
    losses, norms = [], []
    for step in range(steps):
        inputs, targets = data[:, step * 10:(step + 1) * 10], data[:, step * 10 + 1:(step + 1) * 10 + 1]
        result, state = trainer.train_step(inputs, targets, noise_keys(0, 0, step, len(data)), state)
        losses.append(result.nll_sum / result.num_targets)
        norms.append(result.grad_norm)
    return model, trainer.state_to_numpy(state), np.array(losses), np.array(norms)


def test_bf16_computes_in_bf16_and_keeps_fp32_weights_state_and_loss(monkeypatch):
    monkeypatch.setenv(precision.ALLOW_EMULATED, "1")
    config = LMConfig(vocab_size=200, emsize=32, nhid=32, nlayers=1, dropout=0.2, two_biases=True)
    data = np.random.default_rng(0).integers(0, 200, (8, 51)).astype(np.int32)
    _, _, fp32_losses, fp32_norms = _losses(config, data, "fp32")
    model, state, losses, norms = _losses(config, data, "bf16")

    assert model.get_layer("decoder").compute_dtype == "bfloat16"
    assert {v.dtype for v in model.trainable_variables} == {"float32"}
    assert {s.dtype for s in state} == {np.dtype(np.float32)}
    assert np.all(np.isfinite(losses))
    # bf16 rounding shows (it really ran in bf16) but stays small against fp32's
    assert np.abs(losses - fp32_losses).max() > 0
    np.testing.assert_allclose(losses, fp32_losses, rtol=5e-3)
    np.testing.assert_allclose(norms, fp32_norms, rtol=5e-2)


def test_a_bf16_run_records_its_precision_and_exports_fp32(tmp_path, monkeypatch, data_root):
    from export.to_onnx import export_run

    monkeypatch.setenv(precision.ALLOW_EMULATED, "1")
    (tmp_path / "corpus").mkdir()
    corpus = wikitext_slices(tmp_path / "corpus", {"train": 20_000, "valid": 4_000,
                                                   "test": 4_000}, data_root)
    runs = tmp_path / "runs"
    assert train_cli.main([
        "--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
        "--test", str(corpus["test"]), "--emsize", "16", "--nhid", "16", "--batch-size", "8",
        "--bptt", "10", "--epochs", "1", "--nlayers", "1", "--max-batches", "5", "--runs-dir", str(runs), "--name", "b",
        "--log-interval", "0", "--quiet", "--precision", "bf16"]) == 0
    config = json.loads((runs / "b" / "config.json").read_text())
    assert config["train"]["optim"]["precision"] == "bf16"
    record = json.loads((runs / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["val_ppl"]) and record["val_ppl"] < 2 * config["model"]["vocab_size"]

    bundle = export_run(runs / "b", tmp_path / "bundle")
    graph = onnx.load(str(bundle / "model.onnx")).graph
    assert {t.data_type for t in graph.initializer} <= {onnx.TensorProto.FLOAT,
                                                        onnx.TensorProto.INT64,
                                                        onnx.TensorProto.INT32}
    assert all(i.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16 for i in graph.input)


def _traced_ops(mode: str, softmax: str = "full"):
    """The ops of one traced training forward+backward (the trainer's tape) under `mode`."""
    config = LMConfig(vocab_size=200, emsize=32, nhid=32, nlayers=2, dropout=0.2, softmax=softmax,
                      cutoffs=(50,) if softmax == "adaptive" else ())
    strategy = make_strategy()
    with strategy.scope():
        model = build_model(config, seed=3, precision=mode)
        trainer = Trainer(model, make_optimizer("sgd", 1.0), strategy)
    data = np.random.default_rng(0).integers(0, 200, (8, 11)).astype(np.int32)
    state = tuple(tf.zeros((8, 32)) for _ in config.state_names())
    graph = trainer._forward_backward.get_concrete_function(
        tf.constant(data[:, :10]), tf.constant(data[:, 1:]), tf.constant(noise_keys(0, 0, 0, 8)),
        state, tf.constant(80.0)).graph
    return model, graph.get_operations()


def _outputs(ops, dtype, shape):
    return [op for op in ops for out in op.outputs
            if out.dtype == dtype and out.shape.as_list() == list(shape)]


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_bf16_keeps_the_fused_lstm_kernel_in_fp32(softmax, monkeypatch):
    # BlockLSTM has no bf16 kernel: under bf16 the LSTMs must still run it, in float32
    monkeypatch.setenv(precision.ALLOW_EMULATED, "1")
    model, ops = _traced_ops("bf16", softmax)
    assert model.get_layer("lstm0").compute_dtype == "float32"
    assert model.get_layer("embedding").compute_dtype == "float32"
    assert model.get_layer("decoder").compute_dtype == "bfloat16"
    blocks = [op for op in ops if op.type == "BlockLSTM"]
    assert len(blocks) == 2 and all(op.get_attr("T") == tf.float32 for op in blocks)
    assert not [op for op in ops if op.type == "While"]  # Keras' generic LSTM loops


def test_bf16_runs_the_decoder_matmuls_in_bf16_without_float32_logits(monkeypatch):
    monkeypatch.setenv(precision.ALLOW_EMULATED, "1")
    tokens, vocab = 80, 200
    _, fp32_ops = _traced_ops("fp32")
    _, ops = _traced_ops("bf16")
    bf16_matmuls = [op for op in ops if op.type == "MatMul" and op.get_attr("T") == tf.bfloat16]
    shapes = sorted(tuple(op.outputs[0].shape.as_list()) for op in bf16_matmuls)
    assert shapes == [(tokens, 32), (tokens, vocab), (vocab, 32)]  # forward, d hidden, d kernel
    # the [tokens, vocab] logits exist in float32 only inside the XLA passes, never in between
    assert _outputs(fp32_ops, tf.float32, (tokens, vocab))
    assert not _outputs(ops, tf.float32, (tokens, vocab))
    assert _outputs(ops, tf.bfloat16, (tokens, vocab))


def test_the_bf16_fused_softmax_matches_fp32_in_value_and_gradients():
    rng = np.random.default_rng(1)
    vocab, width = 300, 24
    embedding = tf.constant(rng.uniform(-0.1, 0.1, (vocab, width)), tf.float32)
    bias = tf.constant(rng.normal(0, 0.5, vocab), tf.float32)
    hidden = tf.constant(rng.normal(0, 1, (6, 7, width)), tf.float32)
    targets = rng.integers(0, vocab, (6, 7)).astype(np.int32)
    targets[0, :3] = -1  # padding
    results = {}
    for dtype in (tf.float32, tf.bfloat16):
        h = tf.cast(hidden, dtype)
        with tf.GradientTape() as tape:
            tape.watch([h, embedding, bias])
            loss = full_softmax_nll_sum(h, embedding, bias, tf.constant(targets),
                                        transposed_kernel=True)
        grads = tape.gradient(loss, [h, embedding, bias])
        results[dtype] = loss, grads
    loss32, (h32, k32, b32) = results[tf.float32]
    loss16, (h16, k16, b16) = results[tf.bfloat16]
    assert loss16.dtype == tf.float32 and h16.dtype == tf.bfloat16
    assert k16.dtype == tf.float32 and b16.dtype == tf.float32
    assert float(loss16) != float(loss32)  # it did compute in bf16
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-3)
    for fast, exact in ((h16, h32), (k16, k32), (b16, b32)):
        fast, exact = np.asarray(tf.cast(fast, tf.float32)), np.asarray(exact)
        assert np.linalg.norm(fast - exact) < 2e-2 * np.linalg.norm(exact)


@pytest.mark.parametrize("bad", ["fp16", "float32"])
def test_unknown_precision_is_refused_by_the_flags(bad, capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--precision", bad])
    assert "--precision" in capsys.readouterr().err
