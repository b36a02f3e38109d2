"""Compute precision of training: fp32, or bf16 mixed precision where the hardware has bf16.

`bf16` runs the output layer's matmuls in bfloat16, the bulk of the FLOPs at a large vocabulary
([tokens, H] x [H, vocab] and its two gradient products), and keeps in float32 what has no fast
bf16 kernel or gains nothing from one: the embedding, dropout and the LSTMs (TensorFlow's fused
`BlockLSTM` kernel has no bf16 version, and Keras' generic LSTM is slower in bf16 than the fused
kernel in float32). The weights stay float32 (the optimizer updates float32 master weights); the
softmax's log-sum-exp, the loss, the gradients handed to the optimizer, the clipping norm and the
carried LSTM state are float32. Exports are float32 whatever the precision.

bf16 pays only on hardware that computes it natively: CPUs with AVX512-BF16 or AMX, or GPUs of
compute capability 8.0 and later. Elsewhere TensorFlow emulates it, slower than fp32, so training
refuses with one line; `KERASLM_ALLOW_EMULATED_BF16=1` runs it anyway (what tests and CI use to
check the numerics on any machine).
"""

from __future__ import annotations

import os
from pathlib import Path

from keraslm.errors import UserError

PRECISIONS = ("fp32", "bf16")
KERAS_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}  # the output layer's
FEATURES_POLICY = "float32"  # the embedding, dropout and LSTMs, in every precision
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # Linux /proc/cpuinfo names
GPU_BF16_CAPABILITY = (8, 0)
ALLOW_EMULATED = "KERASLM_ALLOW_EMULATED_BF16"


def keras_policy(precision: str) -> str:
    """The Keras dtype policy of the model's output layer for `precision` (the layers before it
    use `FEATURES_POLICY`)."""
    if precision not in KERAS_POLICIES:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return KERAS_POLICIES[precision]


def cpu_bf16_flags(cpuinfo: str) -> list[str]:
    """The bf16 instruction-set flags named in the text of /proc/cpuinfo."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def gpu_bf16_devices() -> list[str]:
    """Names of the visible GPUs that compute bf16 natively (compute capability >= 8.0)."""
    from keraslm.backend import tf

    found = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        if tuple(details.get("compute_capability") or (0, 0)) >= GPU_BF16_CAPABILITY:
            found.append(details.get("device_name", device.name))
    return found


def bf16_hardware() -> str | None:
    """What on this machine computes bf16 natively (a GPU or the CPU's flags), or None."""
    gpus = gpu_bf16_devices()
    if gpus:
        return f"GPU {gpus[0]}"
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpu_bf16_flags(cpuinfo.read_text(errors="replace")) if cpuinfo.is_file() else []
    return f"CPU with {', '.join(flags)}" if flags else None


def check_supported(precision: str) -> None:
    """Refuse `precision` with one line when this machine cannot run it at speed."""
    keras_policy(precision)
    if precision != "bf16" or os.environ.get(ALLOW_EMULATED) == "1":
        return
    if bf16_hardware() is None:
        raise UserError(
            "--precision bf16 needs a CPU with AVX512-BF16 or AMX or a GPU of compute "
            "capability 8.0+, and this machine has none (TensorFlow would emulate bf16, slower "
            f"than fp32); train with --precision fp32, or set {ALLOW_EMULATED}=1 to run it anyway")
