"""Load and validate a serving bundle (`bundles/<name>/`), never importing TensorFlow.

keraslm/contract.py describes the format: model.onnx, perhaps its external data, vocab.json and
bundle.json.

A bundle is checked when it is opened, so every later failure is about the text, not the model:
the schema version is one this code reads, every external-data file the graph names lies inside
the bundle folder (checked here before onnxruntime opens anything, whatever its version), the
graph loads in onnxruntime, its inputs and outputs are the ones bundle.json declares (names,
dtypes, shapes) and include the contract's, and the vocabulary has exactly as many tokens as the
model scores. Each problem is one line of `BundleError` naming the file. Only regular files
are opened, and the JSON ones are read up to a limit whatever their size says
(keraslm.files.read_bounded): a FIFO or a link to /dev/zero is refused too, at once.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from keraslm import contract
from keraslm.contract import (
    BUNDLE_FILE,
    DEFAULT_BUNDLES_ROOT,
    MODEL_FILE,
    OUTPUT_NEXT_LOGPROBS,
    VOCAB_FILE,
    BundleError,
    BundleMeta,
)
from keraslm.errors import UserError
from keraslm.files import not_regular, open_binary, read_json
from keraslm.text import TextPipeline
from keraslm.vocab import MAX_VOCAB_JSON_BYTES, Vocab
from serve.session import ModelSession, Spin


@dataclass(frozen=True)
class Bundle:
    """An opened, validated bundle: its metadata, text pipeline, vocabulary and session."""

    path: Path
    meta: BundleMeta
    pipeline: TextPipeline
    vocab: Vocab
    session: ModelSession

    @property
    def model(self) -> dict:
        """The model config (vocab_size, emsize, nhid, nlayers, dropout, tied)."""
        return self.meta.model

    @property
    def nhid(self) -> int:
        """The model's `nhid` (every LSTM layer's size but, perhaps, the last's)."""
        return self.meta.nhid

    @property
    def hidden_size(self) -> int:
        """Units of the last LSTM layer: the width of `hidden`, the continuous cache's keys."""
        return self.meta.hidden_size

    @property
    def state_names(self) -> list[str]:
        """State inputs in graph order: h0, c0, h1, c1, ..."""
        return self.session.state_names

    @property
    def providers(self) -> list[str]:
        return self.session.providers

    def has_output(self, name: str) -> bool:
        """Whether the graph has output `name` (bundles exported before `next_logprobs` lack it)."""
        return self.meta.has_output(name)

    def require_output(self, name: str, needed_by: str) -> None:
        """BundleError, saying how to re-export, unless the graph has output `name`."""
        if not self.has_output(name):
            raise BundleError(
                f"{self.path / MODEL_FILE}: no '{name}' output, which {needed_by} needs "
                f"(exported before it was supported): re-export it with the current "
                f"export.to_onnx: python -m export.to_onnx {self.meta.source_run_path} "
                f"--out {self.path}")


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
                threads: int | None = None, spin: Spin = "on") -> Bundle:
    """Open the bundle folder `path` and check it (see the module docstring); BundleError if bad.

    `providers`, `threads` and `spin` are the session's (serve/session.py)."""
    path = Path(path)
    meta = BundleMeta.read(path / BUNDLE_FILE)
    try:
        pipeline = TextPipeline.from_dict(meta.pipeline)
    except UserError as err:
        raise BundleError(f"{path / BUNDLE_FILE}: bad text pipeline: {err}") from None
    vocab = _read_vocab(path / VOCAB_FILE, pipeline)
    model_path = path / MODEL_FILE
    _check_external_data(model_path)  # the first to open model.onnx: says if it is missing
    session = ModelSession(model_path, providers=providers, threads=threads, spin=spin,
                           state_sizes=meta.state_sizes)
    bundle = Bundle(path=path, meta=meta, pipeline=pipeline, vocab=vocab, session=session)
    _check_graph(bundle)
    _check_vocab(bundle)
    return bundle


def _read_vocab(path: Path, pipeline: TextPipeline) -> Vocab:
    """The vocabulary, which must hold the tokens the pipeline adds to every sample."""
    try:
        parsed = read_json(path, MAX_VOCAB_JSON_BYTES)
    except UserError as err:
        raise BundleError(str(err)) from None
    try:
        vocab = Vocab.from_dict(parsed)
    except UserError as err:
        raise BundleError(f"{path}: invalid vocabulary: {err}") from None
    for role in ("bos", "eos"):
        token = getattr(pipeline, role)
        if token is not None and token not in vocab:
            raise BundleError(f"{path}: the text pipeline adds {role} {token!r} after every "
                              f"sample, but the vocabulary does not have it")
    return vocab


def _check_external_data(model_path: Path) -> None:
    """Refuse a graph whose external data would be read from outside the bundle folder.

    Absolute locations, `..` out of the folder and symbolic links leading out are all refused,
    before onnxruntime opens anything (only recent versions refuse these themselves), and so is
    a location that is not a regular file (onnxruntime would wait forever on a FIFO).
    """
    folder = model_path.parent.resolve()
    for location in _external_locations(model_path):
        reason = _outside(folder, location) or _special(folder / location)
        if reason:
            raise BundleError(f"{model_path}: external data location {location!r} {reason}")


def _outside(folder: Path, location: str) -> str | None:
    """Why `location` (relative to `folder`, resolved) is not a file inside it; None if it is."""
    if "\0" in location or PurePosixPath(location).is_absolute() or PureWindowsPath(location).anchor:
        return "is not a relative file name"
    try:
        target = (folder / location).resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop (RuntimeError before Python 3.13)
        return "cannot be resolved"
    return None if folder in target.parents else "leads outside the bundle folder"


def _special(path: Path) -> str | None:
    """Why `path` is no file to read data from, when it exists; None if it is a regular file
    (or is missing: onnxruntime says so)."""
    try:
        kind = not_regular(path.stat().st_mode)
    except OSError:
        return None
    return kind and f"is not a regular file ({kind})"


# The ONNX messages (onnx.proto) that can hold tensors, and their fields that do: the scan below
# descends only into these and steps over every other field, weights included, by its length.
_TENSOR_FIELDS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_EXTERNAL_DATA, _ENTRY_KEY, _ENTRY_VALUE = 13, 1, 2  # TensorProto.external_data: key/value pairs
_MAX_NESTING = 100  # protobuf's own default recursion limit


class _NotProtobuf(ValueError):
    """The bytes do not follow the protobuf wire format."""


def _external_locations(model_path: Path) -> list[str]:
    """The `location` of every tensor's external data in the ONNX file, without reading any data.

    The file is mapped, not read: a 2 GB model costs a walk over its field headers.
    """
    try:
        model = open_binary(model_path, regular=True)
    except UserError as err:
        raise BundleError(str(err)) from None
    try:
        with model as f:
            if os.fstat(f.fileno()).st_size == 0:
                return []  # an empty message; onnxruntime says what is wrong with it
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return [os.fsdecode(b) for b in _scan(data, "model", 0, len(data), 0)]
    except OSError as err:
        raise BundleError(f"{model_path}: cannot read ({err.strerror or err})") from None
    except _NotProtobuf as err:  # the wire format is broken: onnxruntime's parser fails too
        raise BundleError(f"{model_path}: onnxruntime cannot load it (not a protobuf: "
                          f"{err})") from None


def _scan(data: mmap.mmap, kind: str, start: int, end: int, depth: int) -> Iterator[bytes]:
    """External-data locations inside the message `data[start:end]`, of ONNX type `kind`."""
    if depth > _MAX_NESTING:
        raise _NotProtobuf(f"messages nested more than {_MAX_NESTING} deep at byte {start}")
    inner = _TENSOR_FIELDS.get(kind, {})
    for number, begin, stop in _fields(data, start, end):
        if kind == "tensor" and number == _EXTERNAL_DATA:
            entry = {n: data[b:s] for n, b, s in _fields(data, begin, stop)}
            if entry.get(_ENTRY_KEY) == b"location":
                yield entry.get(_ENTRY_VALUE, b"")
        elif number in inner:
            yield from _scan(data, inner[number], begin, stop, depth + 1)


def _fields(data: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of `data[pos:end]`; fields of
    the other wire types are checked and stepped over."""
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or wire not in (0, 1, 2, 5):  # 3 and 4 (groups) never occur in ONNX
            raise _NotProtobuf(f"field {number} of wire type {wire} at byte {pos}")
        begin = pos
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 2:
            size, begin = _varint(data, pos, end)
            pos = begin + size
        else:
            pos += 8 if wire == 1 else 4
        if pos > end:
            raise _NotProtobuf(f"field {number} at byte {begin} runs past its message")
        if wire == 2:
            yield number, begin, pos


def _varint(data: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            break
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise _NotProtobuf(f"bad varint before byte {pos}")


def _check_graph(bundle: Bundle) -> None:
    """bundle.json's declared inputs/outputs equal the graph's, and the scorer's needs are met."""
    where = bundle.path / MODEL_FILE
    for kind, declared, actual in (
            ("inputs", bundle.meta.inputs, bundle.session.inputs),
            ("outputs", bundle.meta.outputs, bundle.session.outputs)):
        graph = {a.name: a for a in actual}
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
    nlayers = bundle.meta.nlayers
    have_in = {s.name for s in bundle.meta.inputs}
    missing = [n for n in contract.input_names(nlayers) if n not in have_in]
    missing += [n for n in contract.output_names(nlayers)
                if n not in contract.OPTIONAL_OUTPUTS and not bundle.has_output(n)]
    if missing:
        raise BundleError(f"{where}: not a keraslm scoring graph for a {nlayers}"
                          f"-layer model (missing {', '.join(missing)})")
    specs = {s.name: s for s in (*bundle.meta.inputs, *bundle.meta.outputs)}
    states = zip(contract.state_names(nlayers), bundle.meta.state_sizes)
    for index, (name, size) in enumerate(states):
        layer = index // 2  # h and c of each layer
        for state in (name, contract.state_output(name)):
            spec = specs[state]
            if isinstance(spec.shape[-1], int) and spec.shape[-1] != size:
                raise BundleError(f"{where}: state {state} has size {spec.shape[-1]} but "
                                  f"{BUNDLE_FILE} says LSTM layer {layer} has "
                                  f"{_units(bundle.meta, layer)}")
    hidden = [s for s in bundle.meta.outputs if s.name == contract.OUTPUT_HIDDEN]
    if (hidden and isinstance(hidden[0].shape[-1], int)
            and hidden[0].shape[-1] != bundle.hidden_size):
        raise BundleError(f"{where}: output {contract.OUTPUT_HIDDEN} has size "
                          f"{hidden[0].shape[-1]} but {BUNDLE_FILE} says the last layer has "
                          f"{_units(bundle.meta)}")


def _units(meta: BundleMeta, layer: int = -1) -> str:
    """'<n> units' of a layer (the last by default), saying `nhid` when no layer_sizes were
    recorded and every layer is nhid wide."""
    size = meta.layer_sizes[layer]
    return f"nhid {size}" if set(meta.layer_sizes) == {meta.nhid} else f"{size} units"


def _check_vocab(bundle: Bundle) -> None:
    """The vocabulary, bundle.json and the graph agree on the number of tokens.

    The graph's own vocabulary size is read from one step's `next_logprobs` when it has that
    output (a fixed dim in the declared shape could be stale; the computed one cannot).
    """
    vocab_size = bundle.meta.vocab_size
    if len(bundle.vocab) != vocab_size:
        raise BundleError(f"{bundle.path / VOCAB_FILE}: {len(bundle.vocab):,} tokens but the "
                          f"model's vocab_size is {vocab_size:,}: vocabulary and model do not "
                          f"match")
    if not bundle.has_output(OUTPUT_NEXT_LOGPROBS):
        return
    one = np.zeros((1, 1), np.int32)
    try:
        dist, _ = bundle.session.next_logprobs(one, bundle.session.zero_state(1))
    except UserError as err:  # any failure here means a broken graph
        raise BundleError(f"{err}, on a one-token input") from None
    if dist.shape[-1] != vocab_size:
        raise BundleError(f"{bundle.path / MODEL_FILE}: the graph scores {dist.shape[-1]:,} "
                          f"tokens but {VOCAB_FILE} and {BUNDLE_FILE} have {vocab_size:,}: "
                          f"vocabulary and model do not match")
