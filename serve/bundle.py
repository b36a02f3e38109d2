"""Load and validate a serving bundle (`bundles/<name>/`), never importing TensorFlow.

    model.onnx     the scoring graph (export/graph.py documents its inputs and outputs)
    vocab.json     the vocabulary
    bundle.json    schema version, model config, text pipeline, source run, versions, and the
                   graph's inputs and outputs

A bundle is checked when it is opened, so every later failure is about the text, not the model:
the schema version is one this code reads, the graph loads in onnxruntime, its inputs and
outputs are the ones bundle.json declares (names, dtypes, shapes), and the vocabulary has exactly
as many tokens as the model scores. Each problem is one line of `BundleError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from keraslm.errors import UserError
from keraslm.text import TextPipeline
from keraslm.vocab import Vocab

SCHEMA_VERSION = 1
DEFAULT_BUNDLES_ROOT = Path("bundles")
MODEL_FILE, VOCAB_FILE, BUNDLE_FILE = "model.onnx", "vocab.json", "bundle.json"
NEXT_LOGPROBS = "next_logprobs"

# Bounds checked before anything is allocated: a bundle.json is a few kB, and these sizes are far
# beyond any model onnxruntime could hold (a 2-layer nhid-65,536 LSTM alone is 68 GB).
MAX_BUNDLE_JSON_BYTES = 1 << 20
MAX_VOCAB_JSON_BYTES = 1 << 30
MODEL_LIMITS = {"vocab_size": 100_000_000, "emsize": 65_536, "nhid": 65_536, "nlayers": 64}

_ORT_DTYPES = {"tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(float)": "float32",
               "tensor(float16)": "float16", "tensor(double)": "float64"}


class BundleError(UserError):
    """A bundle is missing, corrupt, or inconsistent; the message names the file."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype (numpy name) and shape (int or symbolic dims)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_json(cls, d: Any) -> TensorSpec:
        if not (isinstance(d, dict) and isinstance(d.get("name"), str)
                and isinstance(d.get("dtype"), str) and isinstance(d.get("shape"), list)):
            raise TypeError(f"expected {{name, dtype, shape}}, got {d!r}")
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    @classmethod
    def from_ort(cls, arg: Any) -> TensorSpec:
        return cls(arg.name, _ORT_DTYPES.get(arg.type, arg.type), tuple(arg.shape))

    def matches(self, graph: TensorSpec) -> bool:
        """Same name, dtype and rank; fixed sizes agree (a symbolic dim matches anything)."""
        return (self.name == graph.name and self.dtype == graph.dtype
                and len(self.shape) == len(graph.shape)
                and all(not isinstance(a, int) or not isinstance(b, int) or a == b
                        for a, b in zip(self.shape, graph.shape)))


@dataclass(frozen=True)
class Bundle:
    """An opened, validated bundle: its settings, vocabulary and onnxruntime session."""

    path: Path
    meta: dict
    pipeline: TextPipeline
    vocab: Vocab
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def model(self) -> dict:
        """The model config (vocab_size, emsize, nhid, nlayers, dropout, tied)."""
        return self.meta["model"]

    @property
    def nhid(self) -> int:
        return int(self.model["nhid"])

    @property
    def state_names(self) -> list[str]:
        """State inputs in graph order: h0, c0, h1, c1, ...; outputs add `_out`."""
        return [f"{kind}{layer}" for layer in range(int(self.model["nlayers"]))
                for kind in ("h", "c")]

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses, preferred first."""
        return self.session.get_providers()

    def has_output(self, name: str) -> bool:
        """Whether the graph has output `name` (bundles exported before `next_logprobs` lack it)."""
        return any(o.name == name for o in self.outputs)


def resolve_bundle(spec: str | os.PathLike | None,
                   root: str | os.PathLike = DEFAULT_BUNDLES_ROOT) -> Path:
    """A bundle folder given by path or by name under `root`; the newest one there when None."""
    root = Path(root)
    if spec is None:
        found = [p for p in root.glob("*") if (p / BUNDLE_FILE).is_file()] if root.is_dir() else []
        if not found:
            raise BundleError(f"no bundle under {root.resolve()} (export one with "
                              f"`python -m export.to_onnx`, or pass --model BUNDLE)")
        return max(found, key=lambda p: (p / BUNDLE_FILE).stat().st_mtime)
    for candidate in (Path(spec), root / str(spec)):
        if (candidate / BUNDLE_FILE).is_file():
            return candidate
    if Path(spec).is_dir():
        raise BundleError(f"{Path(spec) / BUNDLE_FILE}: file not found (not a bundle folder)")
    raise BundleError(f"{spec}: no such bundle (not a folder with {BUNDLE_FILE}, "
                      f"nor a name under {root.resolve()})")


def load_bundle(path: str | os.PathLike, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                options: ort.SessionOptions | None = None) -> Bundle:
    """Open the bundle folder `path` and check it (see the module docstring); BundleError if bad."""
    path = Path(path)
    meta = _read_meta(path / BUNDLE_FILE)
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise BundleError(f"{model_path}: file not found")
    try:
        pipeline = TextPipeline.from_dict(meta["pipeline"])
    except UserError as err:
        raise BundleError(f"{path / BUNDLE_FILE}: bad text pipeline: {err}") from None
    vocab = _read_vocab(path / VOCAB_FILE, pipeline)
    session = _open_session(model_path, providers, options)
    bundle = Bundle(path=path, meta=meta, pipeline=pipeline, vocab=vocab, session=session,
                    inputs=tuple(TensorSpec.from_json(d) for d in meta["inputs"]),
                    outputs=tuple(TensorSpec.from_json(d) for d in meta["outputs"]))
    _check_graph(bundle)
    _check_vocab(bundle)
    return bundle


def _check_size(path: Path, limit: int) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BundleError(f"{path}: file not found") from None
    except OSError as err:
        raise BundleError(f"{path}: cannot read ({err.strerror or err})") from None
    if size > limit:
        raise BundleError(f"{path}: {size:,} bytes, more than the {limit:,} a bundle allows")


def _read_meta(path: Path) -> dict:
    _check_size(path, MAX_BUNDLE_JSON_BYTES)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # ValueError: JSON, huge ints
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise BundleError(f"{path}: not valid JSON ({reason})") from None
    except OSError as err:
        raise BundleError(f"{path}: cannot read ({err.strerror or err})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a JSON object")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise BundleError(f"{path}: schema_version {version!r}, this keraslm reads "
                          f"{SCHEMA_VERSION}" + (" (the bundle is newer: upgrade keraslm)"
                                                 if newer else ""))
    for key, kind in (("model", dict), ("pipeline", dict), ("inputs", list), ("outputs", list)):
        if not isinstance(meta.get(key), kind):
            raise BundleError(f"{path}: '{key}' missing or not a JSON {kind.__name__}")
    model = meta["model"]
    for key, limit in MODEL_LIMITS.items():
        value = model.get(key)
        if key == "emsize" and value is None:
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise BundleError(f"{path}: model.{key} missing or not a positive integer")
        if value > limit:
            raise BundleError(f"{path}: model.{key} is {value:,}, more than {limit:,}")
    try:
        for d in meta["inputs"] + meta["outputs"]:
            TensorSpec.from_json(d)
    except TypeError as err:
        raise BundleError(f"{path}: bad inputs/outputs entry: {err}") from None
    return meta


def _read_vocab(path: Path, pipeline: TextPipeline) -> Vocab:
    """The vocabulary, which must hold the tokens the pipeline adds to every sample."""
    _check_size(path, MAX_VOCAB_JSON_BYTES)
    try:
        vocab = Vocab.load(path)
    except UserError as err:
        raise BundleError(str(err)) from None
    for role in ("bos", "eos"):
        token = getattr(pipeline, role)
        if token is not None and token not in vocab:
            raise BundleError(f"{path}: the text pipeline adds {role} {token!r} after every "
                              f"sample, but the vocabulary does not have it")
    return vocab


def _open_session(model_path: Path, providers: Sequence[str],
                  options: ort.SessionOptions | None) -> ort.InferenceSession:
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no warnings about unused initializers
    try:
        return ort.InferenceSession(str(model_path), sess_options=options,
                                    providers=list(providers))
    except Exception as err:  # noqa: BLE001 - onnxruntime's own types (InvalidProtobuf, Fail...)
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise BundleError(f"{model_path}: onnxruntime cannot load it ({first})") from None


def _check_graph(bundle: Bundle) -> None:
    """bundle.json's declared inputs/outputs equal the graph's, and the scorer's needs are met."""
    where = bundle.path / MODEL_FILE
    for kind, declared, actual in (
            ("inputs", bundle.inputs, bundle.session.get_inputs()),
            ("outputs", bundle.outputs, bundle.session.get_outputs())):
        graph = {a.name: TensorSpec.from_ort(a) for a in actual}
        names = {d.name for d in declared}
        if names != set(graph):
            raise BundleError(
                f"{where}: graph {kind} {sorted(graph)} differ from {BUNDLE_FILE}'s "
                f"{sorted(names)}")
        for spec in declared:
            if not spec.matches(graph[spec.name]):
                g = graph[spec.name]
                raise BundleError(
                    f"{where}: {kind[:-1]} {spec.name} is {g.dtype} {list(g.shape)} in the "
                    f"graph but {spec.dtype} {list(spec.shape)} in {BUNDLE_FILE}")
    needed_in = ["tokens", "targets", *bundle.state_names]
    needed_out = ["logprobs", *(f"{s}_out" for s in bundle.state_names)]
    have_in = {s.name for s in bundle.inputs}
    missing = [n for n in needed_in if n not in have_in]
    missing += [n for n in needed_out if not bundle.has_output(n)]
    if missing:
        raise BundleError(f"{where}: not a keraslm scoring graph for a {bundle.model['nlayers']}"
                          f"-layer model (missing {', '.join(missing)})")
    state = {s.name: s for s in bundle.inputs if s.name in bundle.state_names}
    for name, spec in state.items():
        if isinstance(spec.shape[-1], int) and spec.shape[-1] != bundle.nhid:
            raise BundleError(f"{where}: state {name} has size {spec.shape[-1]} but "
                              f"{BUNDLE_FILE} says nhid {bundle.nhid}")


def _check_vocab(bundle: Bundle) -> None:
    """The vocabulary, bundle.json and the graph agree on the number of tokens.

    The graph's own vocabulary size is read from one step's `next_logprobs` when it has that
    output (a fixed dim in the declared shape could be stale; the computed one cannot).
    """
    vocab_size = int(bundle.model["vocab_size"])
    if len(bundle.vocab) != vocab_size:
        raise BundleError(f"{bundle.path / VOCAB_FILE}: {len(bundle.vocab):,} tokens but the "
                          f"model's vocab_size is {vocab_size:,}: vocabulary and model do not "
                          f"match")
    if not bundle.has_output(NEXT_LOGPROBS):
        return
    feed: dict[str, np.ndarray] = {"tokens": np.zeros((1, 1), np.int32),
                                   "targets": np.zeros((1, 1), np.int32)}
    feed.update({s: np.zeros((1, bundle.nhid), np.float32) for s in bundle.state_names})
    try:
        (dist,) = bundle.session.run([NEXT_LOGPROBS], feed)
    except Exception as err:  # noqa: BLE001 - any failure here means a broken graph
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise BundleError(f"{bundle.path / MODEL_FILE}: fails on a one-token input "
                          f"({first})") from None
    if dist.shape[-1] != vocab_size:
        raise BundleError(f"{bundle.path / MODEL_FILE}: the graph scores {dist.shape[-1]:,} "
                          f"tokens but {VOCAB_FILE} and {BUNDLE_FILE} have {vocab_size:,}: "
                          f"vocabulary and model do not match")
