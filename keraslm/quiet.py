"""TensorFlow started without its start-up noise on machines that have no NVIDIA GPU.

A CPU-only `import tensorflow` writes lines that look like errors and warnings to a user who did
nothing wrong: absl's `WARNING: All log messages before absl::InitializeLog() ...`, cudart_stub's
`Could not find cuda drivers`, and, at the first look for devices, `E0000 ... failed call to
cuInit`. Those come from C++ before TensorFlow's own log level applies, so `start_tensorflow`
imports TensorFlow and looks for GPUs once (CUDA initializes only once per process) with file
descriptor 2 sent to a temporary file, then writes back every line but that noise. Anything else
(a real error, a Python traceback) is kept, and stderr is restored even if the import fails.

On a machine with an NVIDIA device (`/proc/driver/nvidia` or `/dev/nvidia0`) nothing is hidden:
its CUDA messages matter there. `KERASLM_TF_LOGS=1` also keeps everything, for debugging.
TF_CPP_MIN_LOG_LEVEL defaults to 2 (TensorFlow's errors stay visible) either way.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} "                                    # C++ info and warning lines (glog format)
    r"|E\d{4} .*(cuInit|cuda_platform|cuda_dnn|cuda_fft|cuda_blas|cudart|CUDA)"
    r"|To enable the following instructions: .* rebuild TensorFlow)")


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver or device is present (then CUDA's messages are worth seeing)."""
    return Path("/proc/driver/nvidia").is_dir() or Path("/dev/nvidia0").exists()


def start_tensorflow() -> None:
    """Import TensorFlow and Keras (`keraslm.backend`, before the caller does), quietly unless a
    GPU is present (module doc)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or has_nvidia_gpu() or os.environ.get("KERASLM_TF_LOGS"):
        return
    with filtered_stderr(NOISE):
        from keraslm.backend import tf  # Keras on TensorFlow, whatever the user's settings

        tf.config.list_physical_devices("GPU")  # cuInit's complaint, if any, comes now
    try:
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover - TensorFlow depends on absl-py
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern) -> Iterator[None]:
    """Within the block, every line written to file descriptor 2 (Python's or C++'s) is held
    back; at its end, the lines not matching `noise` are written to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not noise.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
