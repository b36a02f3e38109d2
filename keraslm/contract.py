"""The bundle contract: what `export/` writes and `serve/` reads, defined once.

Pure Python with no imports beyond the standard library, so the trainer, the exporter and a
serving host (which never has TensorFlow) can all share it.

A bundle is one folder, `bundles/<run name>/` by default:

    model.onnx        the scoring graph
    model.onnx.data   its weights as ONNX external data, only for models too big for one
                      protobuf; every external-data location must name a file inside the folder
    vocab.json        the vocabulary (keraslm.vocab)
    bundle.json       a JSON object: schema_version (SCHEMA_VERSION), model (the LMConfig),
                      pipeline (the text pipeline), inputs and outputs (the graph's, each
                      {name, dtype, shape}), external_data (the files above), quantization (null
                      or what was done and measured), opset, source_run, versions

The graph (export/graph.py builds it; `io_specs` gives every dtype and shape):

    inputs   tokens   int32   [batch, time]    input ids (PAD_INPUT where padded)
             targets  int32   [batch, time]    the ids to score; < 0 is padding (PAD_TARGET)
             h0, c0, h1, c1, ...  float32 [batch, nhid]    LSTM state in, `state_names`
    outputs  logprobs float32 [batch, time]    log p(target | prefix); 0 at padding
             h0_out, c0_out, ...  float32 [batch, nhid]    LSTM state out, `state_output`
             next_logprobs float32 [batch, vocab]  log-distribution after the last position
                                                   (optional: older bundles lack it)
             hidden   float32 [batch, time, nhid]  the last LSTM layer's output at every position
                                                   (the one the decoder reads), for the
                                                   continuous cache (serve/cache.py); optional:
                                                   bundles exported before it lack it

`hidden` is computed for the decoder anyway (onnxruntime runs the whole graph whatever is asked
for): asking for it costs one copy of [batch, time, nhid].
"""

from __future__ import annotations

from pathlib import Path

SCHEMA_VERSION = 1
DEFAULT_BUNDLES_ROOT = Path("bundles")

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
VOCAB_FILE = "vocab.json"
BUNDLE_FILE = "bundle.json"
BUNDLE_FIELDS = ("schema_version", "model", "pipeline", "inputs", "outputs", "external_data",
                 "quantization", "opset", "source_run", "versions")

INPUT_TOKENS = "tokens"
INPUT_TARGETS = "targets"
OUTPUT_LOGPROBS = "logprobs"
OUTPUT_NEXT_LOGPROBS = "next_logprobs"
OUTPUT_HIDDEN = "hidden"
OPTIONAL_OUTPUTS = (OUTPUT_NEXT_LOGPROBS, OUTPUT_HIDDEN)
STATE_OUTPUT_SUFFIX = "_out"
BATCH_DIM, TIME_DIM = "batch", "time"

PAD_INPUT = 0  # an input id where there is no token (any valid id would do: its score is masked)
PAD_TARGET = -1  # a target that is not scored: the graph gives it log-probability 0


def state_names(nlayers: int) -> list[str]:
    """The state inputs in graph order: h0, c0, h1, c1, ... (the Keras model's order too)."""
    return [f"{kind}{layer}" for layer in range(nlayers) for kind in ("h", "c")]


def state_output(name: str) -> str:
    """The output that returns state input `name` after the call: h0 -> h0_out."""
    return f"{name}{STATE_OUTPUT_SUFFIX}"


def input_names(nlayers: int) -> list[str]:
    """Every graph input, in order."""
    return [INPUT_TOKENS, INPUT_TARGETS, *state_names(nlayers)]


def output_names(nlayers: int) -> list[str]:
    """Every graph output, in order (a bundle may lack the OPTIONAL_OUTPUTS)."""
    return [OUTPUT_LOGPROBS, *map(state_output, state_names(nlayers)), OUTPUT_NEXT_LOGPROBS,
            OUTPUT_HIDDEN]


def io_specs(nlayers: int, nhid: int, vocab_size: int) -> dict[str, tuple[str, list[int | str]]]:
    """Every graph input and output: (numpy dtype name, shape with symbolic batch/time dims)."""
    specs: dict[str, tuple[str, list[int | str]]] = {
        INPUT_TOKENS: ("int32", [BATCH_DIM, TIME_DIM]),
        INPUT_TARGETS: ("int32", [BATCH_DIM, TIME_DIM]),
        OUTPUT_LOGPROBS: ("float32", [BATCH_DIM, TIME_DIM]),
        OUTPUT_NEXT_LOGPROBS: ("float32", [BATCH_DIM, vocab_size]),
        OUTPUT_HIDDEN: ("float32", [BATCH_DIM, TIME_DIM, nhid]),
    }
    for name in state_names(nlayers):
        specs[name] = specs[state_output(name)] = ("float32", [BATCH_DIM, nhid])
    return specs
