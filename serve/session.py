"""The one onnxruntime session: opens a scoring graph and runs it by the contract's names.

Everything that runs a keraslm graph goes through `ModelSession`: the scorer and its row batches,
generation, bundle validation, and export's int8 calibration. It alone chooses the execution
providers, the thread count, whether idle threads spin, and the memory arena, and it alone turns
onnxruntime's errors into one-line UserErrors naming the model file.

The graph's interface is keraslm/contract.py's: int32 `tokens` and `targets` [batch, time], the
LSTM state h0, c0, h1, c1, ... [batch, units of the layer] in and `<name>_out` out, `logprobs` of
the targets, optionally `next_logprobs` (the last position's distribution) and `hidden` (the last
layer's output). State is a list of arrays in `state_names` order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from keraslm.contract import (
    INPUT_TARGETS,
    INPUT_TOKENS,
    OUTPUT_HIDDEN,
    OUTPUT_LOGPROBS,
    OUTPUT_NEXT_LOGPROBS,
    PAD_TARGET,
    BundleError,
    TensorSpec,
    state_names,
    state_output,
)
from keraslm.errors import UserError, first_line

DEVICES = ("auto", "cpu", "cuda")
Spin = Literal["on", "off", "stop"]
State = list[np.ndarray]
RUN_ERRORS = (_ort_state.Fail, _ort_state.InvalidArgument, _ort_state.RuntimeException)


def choose_providers(device: str) -> list[str]:
    """onnxruntime providers for `device`; asks what is installed first, so no GPU means no noise."""
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device != "cpu":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda":
            raise UserError("--device cuda: this onnxruntime has no CUDAExecutionProvider "
                            "(install onnxruntime-gpu, e.g. `pip install keraslm[gpu]`)")
    return ["CPUExecutionProvider"]


_ARENA: list[bool] = []  # whether the process-wide CPU arena below was registered


def _use_exact_size_arena() -> bool:
    """Register (once per process) a CPU memory arena that grows by exactly what is asked.

    The scoring graph's decoder works on as many rows as a call has targets, so the size of its
    [rows, vocab] buffers changes from call to call; onnxruntime's default arena grows in powers
    of two and keeps every region (a service's peak RSS measured 590 MB on WikiText-2's
    vocabulary against 430 MB with this one, at the same speed).
    """
    if not _ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
            _ARENA.append(True)
        except Exception:  # noqa: BLE001 - an onnxruntime without it: its default arena
            _ARENA.append(False)
    return _ARENA[0]


def session_options(threads: int | None = None, spin: Spin = "on") -> ort.SessionOptions:
    """Options for a keraslm graph: errors-only logging, `threads` intra-op threads (None: all
    cores), and idle threads that spin ("on", onnxruntime's default), never spin ("off": for a
    process whose other threads need the cores between calls, the HTTP service) or spin only
    within a call ("stop": for the continuous cache, whose threads work between calls)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings about unused initializers
    if spin == "stop":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    elif spin == "off":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spin != "on":
        raise ValueError(f"spin must be 'on', 'off' or 'stop', got {spin!r}")
    if _use_exact_size_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


class ModelSession:
    """An onnxruntime session over one keraslm scoring graph (model.onnx).

    Opening fails with a BundleError naming the file. `state_sizes` (each state input's units,
    in `state_names` order: layers may differ in width) are read from the graph's state inputs
    unless given (a bundle passes its own, which it checks against the graph).
    """

    def __init__(self, model_path: str | os.PathLike, *,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None, spin: Spin = "on",
                 state_sizes: Sequence[int] | None = None) -> None:
        self.path = Path(model_path)
        options = session_options(threads, spin)
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=options,
                                                 providers=list(providers))
        except Exception as err:  # noqa: BLE001 - onnxruntime's own types (InvalidProtobuf, Fail...)
            raise BundleError(f"{self.path}: onnxruntime cannot load it "
                              f"({first_line(err)})") from None
        self.inputs = tuple(TensorSpec.from_ort(a) for a in self._session.get_inputs())
        self.outputs = tuple(TensorSpec.from_ort(a) for a in self._session.get_outputs())
        given = {s.name for s in self.inputs} - {INPUT_TOKENS, INPUT_TARGETS}
        self.state_names = state_names(len(given) // 2)
        if state_sizes is None:
            dims = {s.name: s.shape[-1] for s in self.inputs if s.name in given}
            state_sizes = [dims.get(name) for name in self.state_names]
            if not all(isinstance(d, int) for d in state_sizes):
                raise BundleError(f"{self.path}: the state inputs have no fixed sizes; "
                                  f"give state_sizes")
        self.state_sizes = [int(size) for size in state_sizes]
        if len(self.state_sizes) != len(self.state_names):
            raise BundleError(f"{self.path}: {len(self.state_names)} state inputs, but "
                              f"{len(self.state_sizes)} state sizes")
        self._step_outputs = [OUTPUT_LOGPROBS, *map(state_output, self.state_names)]

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses, preferred first."""
        return self._session.get_providers()

    @property
    def hidden_size(self) -> int:
        """Units of the last LSTM layer (its h and c are the last state): `hidden`'s width."""
        return self.state_sizes[-1]

    def zero_state(self, batch: int) -> State:
        """A zero state of `batch` rows: one [batch, units] array per state input."""
        return [np.zeros((batch, size), np.float32) for size in self.state_sizes]

    def run(self, outputs: Sequence[str], tokens: np.ndarray, targets: np.ndarray,
            state: State) -> list[np.ndarray]:
        """The named `outputs` for one call; UserError (naming the model) if onnxruntime fails,
        e.g. on a token id the graph has no row for."""
        feed = {INPUT_TOKENS: tokens, INPUT_TARGETS: targets, **dict(zip(self.state_names, state))}
        try:
            return self._session.run(list(outputs), feed)
        except RUN_ERRORS as err:
            raise UserError(f"{self.path}: onnxruntime failed ({first_line(err)})") from None

    def step(self, tokens: np.ndarray, targets: np.ndarray, state: State
             ) -> tuple[np.ndarray, State]:
        """Log-probabilities of `targets` [batch, time] (0 at padding) and the state after."""
        logprobs, *new_state = self.run(self._step_outputs, tokens, targets, state)
        return logprobs, new_state

    def step_hidden(self, tokens: np.ndarray, targets: np.ndarray, state: State
                    ) -> tuple[np.ndarray, State, np.ndarray]:
        """`step`, and the last LSTM layer's output [batch, time, units] (the cache's keys)."""
        *out, hidden = self.run([*self._step_outputs, OUTPUT_HIDDEN], tokens, targets, state)
        return out[0], out[1:], hidden

    def next_logprobs(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """The log-distribution [batch, vocab] after the last position of `tokens`, and the
        state; nothing is scored (every target is padding: the decoder runs at the last
        position alone)."""
        dist, *new_state = self.run([OUTPUT_NEXT_LOGPROBS, *self._step_outputs[1:]], tokens,
                                    np.full_like(tokens, PAD_TARGET), state)
        return dist, new_state
