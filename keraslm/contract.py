"""The bundle contract: what `export/` writes and `serve/` reads, defined once.

Pure Python (the standard library and keraslm's errors and files), so the trainer, the
exporter and a serving host (which never has TensorFlow) can all share it. `BundleMeta` is bundle.json as one
typed object: export builds it and writes `to_dict()`, serve reads it with `BundleMeta.read`,
which validates every field before anything is allocated from it.

A bundle is one folder, `bundles/<run name>/` by default:

    model.onnx        the scoring graph
    model.onnx.data   its weights as ONNX external data, only for models too big for one
                      protobuf; every external-data location must name a file inside the folder
    vocab.json        the vocabulary (keraslm.vocab)
    bundle.json       a JSON object: schema_version (SCHEMA_VERSION), model (the LMConfig),
                      pipeline (the text pipeline), inputs and outputs (the graph's, each
                      {name, dtype, shape}), layer_sizes (each LSTM layer's units; bundles
                      written before it have nlayers layers of nhid), external_data (the files
                      above), quantization (null or what was done and measured), opset,
                      source_run, versions

The graph (export/graph.py builds it; `io_specs` gives every dtype and shape):

    inputs   tokens   int32   [batch, time]    input ids (PAD_INPUT where padded)
             targets  int32   [batch, time]    the ids to score; < 0 is padding (PAD_TARGET)
             h0, c0, h1, c1, ...  float32 [batch, units]   LSTM state in, `state_names`
    outputs  logprobs float32 [batch, time]    log p(target | prefix); 0 at padding
             h0_out, c0_out, ...  float32 [batch, units]   LSTM state out, `state_output`
             next_logprobs float32 [batch, vocab]  log-distribution after the last position
                                                   (optional: older bundles lack it)
             hidden   float32 [batch, time, units]  the last LSTM layer's output at every
                                                   position (the one the decoder reads), for
                                                   the continuous cache (serve/cache.py);
                                                   optional: bundles exported before it lack it

`units` is the layer's own size (`layer_sizes`): every layer's is nhid, except in a model whose
last layer is as wide as its embedding (GluonNLP's AWD-LSTM), and `hidden` has the last layer's.
`hidden` is computed for the decoder anyway (onnxruntime runs the whole graph whatever is asked
for): asking for it costs one copy of [batch, time, units].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keraslm.errors import UserError
from keraslm.files import read_json, write_json_atomic

SCHEMA_VERSION = 1
DEFAULT_BUNDLES_ROOT = Path("bundles")

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
VOCAB_FILE = "vocab.json"
BUNDLE_FILE = "bundle.json"

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


def state_sizes(layer_sizes: Sequence[int]) -> list[int]:
    """Units of each state input, in `state_names` order: h and c of a layer have its size."""
    return [int(size) for size in layer_sizes for _ in ("h", "c")]


def io_specs(layer_sizes: Sequence[int], vocab_size: int
             ) -> dict[str, tuple[str, list[int | str]]]:
    """Every graph input and output of a model whose LSTM layers have `layer_sizes` units:
    (numpy dtype name, shape with symbolic batch/time dims)."""
    specs: dict[str, tuple[str, list[int | str]]] = {
        INPUT_TOKENS: ("int32", [BATCH_DIM, TIME_DIM]),
        INPUT_TARGETS: ("int32", [BATCH_DIM, TIME_DIM]),
        OUTPUT_LOGPROBS: ("float32", [BATCH_DIM, TIME_DIM]),
        OUTPUT_NEXT_LOGPROBS: ("float32", [BATCH_DIM, vocab_size]),
        OUTPUT_HIDDEN: ("float32", [BATCH_DIM, TIME_DIM, int(layer_sizes[-1])]),
    }
    for name, size in zip(state_names(len(layer_sizes)), state_sizes(layer_sizes)):
        specs[name] = specs[state_output(name)] = ("float32", [BATCH_DIM, size])
    return specs


# --- bundle.json ---------------------------------------------------------------------------------

# Bounds checked before anything is allocated: a bundle.json is a few kB, and these sizes are far
# beyond any model onnxruntime could hold (a 2-layer nhid-65,536 LSTM alone is 68 GB).
MAX_BUNDLE_JSON_BYTES = 1 << 20
MODEL_LIMITS = {"vocab_size": 100_000_000, "emsize": 65_536, "nhid": 65_536, "nlayers": 64}
ORT_DTYPES = {"tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(double)": "float64"}


class BundleError(UserError):
    """A bundle is missing, corrupt, or inconsistent; the message names the file."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype (numpy name) and shape (int or symbolic dims)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any) -> TensorSpec:
        if not (isinstance(d, dict) and isinstance(d.get("name"), str)
                and isinstance(d.get("dtype"), str) and isinstance(d.get("shape"), list)):
            raise TypeError(f"expected {{name, dtype, shape}}, got {d!r}")
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    @classmethod
    def from_ort(cls, arg: Any) -> TensorSpec:
        """From an onnxruntime NodeArg (name, type such as 'tensor(float)', shape)."""
        return cls(arg.name, ORT_DTYPES.get(arg.type, arg.type), tuple(arg.shape))

    def matches(self, graph: TensorSpec) -> bool:
        """Same name, dtype and rank; fixed sizes agree (a symbolic dim matches anything)."""
        return (self.name == graph.name and self.dtype == graph.dtype
                and len(self.shape) == len(graph.shape)
                and all(not isinstance(a, int) or not isinstance(b, int) or a == b
                        for a, b in zip(self.shape, graph.shape)))


@dataclass(frozen=True)
class BundleMeta:
    """bundle.json: what a bundle is, how its text is read, and its graph's inputs and outputs.

    `model` is the LMConfig as a dict (vocab_size, emsize, nhid, nlayers, ...) and `pipeline`
    the TextPipeline's; both are kept as plain dicts here so that this module needs neither.
    `layer_sizes` are the graph's LSTM widths, first layer to last (what serving allocates
    state by); empty means the model's `nlayers` layers of `nhid` units, as every bundle
    written before the field had.
    """

    model: dict[str, Any]
    pipeline: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int | None = None
    external_data: tuple[str, ...] = ()
    quantization: dict[str, Any] | None = None
    source_run: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    layer_sizes: tuple[int, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        sizes = tuple(self.layer_sizes)
        if not sizes and isinstance(self.model.get("nlayers"), int):
            sizes = (self.model.get("nhid"),) * self.model["nlayers"]
        object.__setattr__(self, "layer_sizes", sizes)

    @property
    def vocab_size(self) -> int:
        return int(self.model["vocab_size"])

    @property
    def nhid(self) -> int:
        """The model's `nhid` (every LSTM layer's size but, perhaps, the last's)."""
        return int(self.model["nhid"])

    @property
    def nlayers(self) -> int:
        return int(self.model["nlayers"])

    @property
    def state_sizes(self) -> list[int]:
        """Units of each state input and output, in `state_names` order."""
        return state_sizes(self.layer_sizes)

    @property
    def hidden_size(self) -> int:
        """Units of the last LSTM layer: the width of `hidden` (the continuous cache's keys)."""
        return int(self.layer_sizes[-1])

    @property
    def source_run_path(self) -> str:
        """The run the bundle was exported from, for messages that say how to re-export it."""
        return self.source_run.get("path") or self.source_run.get("name") or "RUN"

    def has_output(self, name: str) -> bool:
        return any(o.name == name for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "model": self.model,
            "pipeline": self.pipeline, "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs], "opset": self.opset,
            "layer_sizes": list(self.layer_sizes),
            "external_data": list(self.external_data), "quantization": self.quantization,
            "source_run": self.source_run, "versions": self.versions,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = BUNDLE_FILE) -> BundleMeta:
        """Validate a parsed bundle.json; BundleError naming `where` for the first problem."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise BundleError(f"{where}: schema_version {version!r}, this keraslm reads "
                              f"{SCHEMA_VERSION}" + (" (the bundle is newer: upgrade keraslm)"
                                                     if newer else ""))
        for key, kind in (("model", dict), ("pipeline", dict), ("inputs", list),
                          ("outputs", list)):
            if not isinstance(d.get(key), kind):
                raise BundleError(f"{where}: '{key}' missing or not a JSON {kind.__name__}")
        for key, kind in (("external_data", list), ("quantization", dict), ("source_run", dict),
                          ("versions", dict), ("opset", int)):
            if d.get(key) is not None and not isinstance(d[key], kind):
                raise BundleError(f"{where}: '{key}' is not a JSON {kind.__name__}")
        _check_model(d["model"], where)
        layer_sizes = _layer_sizes(d, where)
        try:
            inputs = tuple(TensorSpec.from_dict(s) for s in d["inputs"])
            outputs = tuple(TensorSpec.from_dict(s) for s in d["outputs"])
        except TypeError as err:
            raise BundleError(f"{where}: bad inputs/outputs entry: {err}") from None
        return cls(model=d["model"], pipeline=d["pipeline"], inputs=inputs, outputs=outputs,
                   opset=d.get("opset"), external_data=tuple(d.get("external_data") or ()),
                   quantization=d.get("quantization"), source_run=d.get("source_run") or {},
                   versions=d.get("versions") or {}, layer_sizes=layer_sizes,
                   schema_version=version)

    @classmethod
    def read(cls, path: str | Path) -> BundleMeta:
        """Read and validate a bundle.json file (a regular file of at most
        MAX_BUNDLE_JSON_BYTES)."""
        try:
            parsed = read_json(path, MAX_BUNDLE_JSON_BYTES)
        except UserError as err:
            raise BundleError(str(err)) from None
        return cls.from_dict(parsed, Path(path))

    def write(self, path: str | Path) -> None:
        """Write bundle.json atomically."""
        write_json_atomic(path, self.to_dict())


def _layer_sizes(d: dict[str, Any], where: str | Path) -> tuple[int, ...]:
    """bundle.json's `layer_sizes`, checked against the model's `nlayers`; without it (a bundle
    written before the field), `nlayers` layers of `nhid` units."""
    model = d["model"]
    if d.get("layer_sizes") is None:
        return (model["nhid"],) * model["nlayers"]
    sizes = d["layer_sizes"]
    limit = MODEL_LIMITS["nhid"]
    if not (isinstance(sizes, list) and len(sizes) == model["nlayers"] and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= limit for s in sizes)):
        raise BundleError(f"{where}: 'layer_sizes' is not a list of {model['nlayers']} sizes "
                          f"(positive integers up to {limit:,}), one per LSTM layer")
    return tuple(sizes)


def _check_model(model: dict[str, Any], where: str | Path) -> None:
    for key, limit in MODEL_LIMITS.items():
        value = model.get(key)
        if key == "emsize" and value is None:
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise BundleError(f"{where}: model.{key} missing or not a positive integer")
        if value > limit:
            raise BundleError(f"{where}: model.{key} is {value:,}, more than {limit:,}")
