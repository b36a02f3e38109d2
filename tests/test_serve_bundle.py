"""Opening a bundle: what is checked, and one clear line naming the file for each problem.

The tiny real bundle every serve test shares (`tiny_bundle`, `bundle_copy`) is built in
conftest.py (helpers_runs.make_bundle).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_runs import edit_json

import serve.session
from keraslm import contract
from serve.bundle import BundleError, load_bundle, resolve_bundle

REPO = Path(__file__).resolve().parents[1]

# ---- a good bundle ------------------------------------------------------------------------------

def test_load_bundle_exposes_settings_vocab_and_outputs(tiny_bundle):
    b = load_bundle(tiny_bundle.bundle)
    assert b.state_names == ["h0", "c0", "h1", "c1"]
    assert b.nhid == 16 and len(b.vocab) == b.model["vocab_size"] == 202
    assert b.pipeline.split == "lines" and b.pipeline.eos == "<eos>"
    assert b.has_output("next_logprobs") and b.has_output("logprobs")
    assert not b.has_output("logits")
    assert b.providers == ["CPUExecutionProvider"]


def test_bundle_without_next_logprobs_loads_and_says_so(bundle_copy):
    """Bundles exported before `next_logprobs` still score; generation can tell them apart."""
    import onnx

    model = onnx.load(bundle_copy / "model.onnx")
    keep = [o for o in model.graph.output if o.name != "next_logprobs"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, bundle_copy / "model.onnx")
    edit_json(bundle_copy / "bundle.json", lambda d: d.update(
        outputs=[o for o in d["outputs"] if o["name"] != "next_logprobs"]))

    b = load_bundle(bundle_copy)
    assert not b.has_output("next_logprobs")
    from serve.scorer import Scorer

    assert Scorer(bundle_copy).score(["the game"])[0].num_tokens == 3


# ---- bad bundles ---------------------------------------------------------------------------------

def _remove(name):
    return lambda d: (d / name).unlink()


def _write(name, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _folder(name):
    def damage(bundle: Path) -> None:
        (bundle / name).unlink()
        (bundle / name).mkdir()
    return damage


def _meta(edit):
    return lambda d: edit_json(d / "bundle.json", edit)


def _rename_output(meta):
    meta["outputs"][0]["name"] = "log_probs"


def _wrong_state_shape(meta):
    meta["inputs"][2]["shape"] = ["batch", 17]


def _bigger_vocab(d: Path):
    """vocab.json and bundle.json agree on 203 tokens; the graph still scores 202."""
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    vocab["tokens"].append("zzz-extra")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    edit_json(d / "bundle.json", lambda m: m["model"].update(vocab_size=203))


def _vocab_without_eos(d: Path):
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    vocab["tokens"] = [t if t != "<eos>" else "<end>" for t in vocab["tokens"]]
    vocab["specials"] = ["<end>"]
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")


def _truncate(name):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:1000])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payloads here are under 2**21 bytes)."""
    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _nested_graphs(levels: int) -> bytes:
    """A ModelProto whose graph's node's attribute holds a graph, `levels` deep."""
    graph = b""
    for _ in range(levels):
        graph = _field(1, _field(5, _field(6, graph)))  # graph.node.attribute.g
    return _field(7, graph)


DEEP = b"[" * 100_000 + b"]" * 100_000


BAD_BUNDLES = {
    "no bundle.json": (_remove("bundle.json"), "file not found: <bundle>/bundle.json"),
    "bundle.json a folder": (_folder("bundle.json"),
                             "bundle.json: is not a regular file (a directory)"),
    "corrupt bundle.json": (_write("bundle.json", b"{not json"), "bundle.json: not valid JSON"),
    "newer schema": (_meta(lambda m: m.update(schema_version=2)), "schema_version 2"),
    "no model config": (_meta(lambda m: m.pop("model")), "'model' missing"),
    "no model.onnx": (_remove("model.onnx"), "file not found: <bundle>/model.onnx"),
    "corrupt model.onnx": (_write("model.onnx", b"\x08\x07garbage" * 50),
                           "model.onnx: onnxruntime cannot load it"),
    "no vocab.json": (_remove("vocab.json"), "vocab.json"),
    "corrupt vocab.json": (_write("vocab.json", b"[1, 2"), "vocab.json: not valid JSON"),
    "not a vocabulary": (_write("vocab.json", b'{"format": "csv"}'),
                         "vocab.json: invalid vocabulary: not a keraslm vocabulary"),
    "outputs differ": (_meta(_rename_output), "differ from bundle.json"),
    "state shape differs": (_meta(_wrong_state_shape), "h0 is float32 ['batch', 16] in the graph"),
    "vocab size differs from bundle.json": (
        _meta(lambda m: m["model"].update(vocab_size=300)), "vocab.json: 202 tokens but"),
    "vocab differs from the graph": (_bigger_vocab, "the graph scores 202 tokens"),
    "deeply nested bundle.json": (_write("bundle.json", DEEP), "nested too deeply"),
    "huge number in bundle.json": (_write("bundle.json", b'{"schema_version": ' + b"9" * 5000
                                          + b"}"), "bundle.json: not valid JSON"),
    "oversized bundle.json": (_write("bundle.json", b" " * (2 << 20)),
                              "bundle.json: over 1,048,576 bytes"),
    "10^7 layers": (_meta(lambda m: m["model"].update(nlayers=10**7)), "model.nlayers is"),
    "nhid 10^12": (_meta(lambda m: m["model"].update(nhid=10**12)), "model.nhid is"),
    "nhid true": (_meta(lambda m: m["model"].update(nhid=True)), "model.nhid missing or not"),
    "deeply nested vocab.json": (_write("vocab.json", DEEP),
                                 "vocab.json: not valid JSON (nested too deeply)"),
    "vocab without <eos>": (_vocab_without_eos, "does not have it"),
    "truncated model.onnx": (_truncate("model.onnx"), "model.onnx: onnxruntime cannot load it"),
    "model.onnx nested too deeply": (_write("model.onnx", _nested_graphs(50)), "nested more than"),
}


@pytest.mark.parametrize("damage, expected", BAD_BUNDLES.values(), ids=BAD_BUNDLES.keys())
def test_bad_bundle_is_one_line_naming_the_file(bundle_copy, damage, expected):
    damage(bundle_copy)
    started = time.monotonic()
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    assert time.monotonic() - started < 10  # refused before allocating anything big
    message = str(err.value)
    assert expected.replace("<bundle>", str(bundle_copy)) in message
    assert str(bundle_copy) in message
    assert "\n" not in message


@pytest.mark.parametrize("module, limit, name", [
    (serve.bundle, "MAX_VOCAB_JSON_BYTES", "vocab.json"),
    (contract, "MAX_BUNDLE_JSON_BYTES", "bundle.json")])
def test_a_json_file_over_its_limit_is_refused_at_the_limit(bundle_copy, monkeypatch, module,
                                                            limit, name):
    monkeypatch.setattr(module, limit, 1000)
    assert (bundle_copy / name).stat().st_size > 1000
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    assert str(err.value) == f"{bundle_copy / name}: over 1,000 bytes, more than it may have"


# ---- files that are not regular files: refused at once, never opened for long or read whole -------

def _fifo(name):
    def damage(bundle: Path) -> None:
        (bundle / name).unlink()
        os.mkfifo(bundle / name)
    return damage


def _link(name, target):
    def damage(bundle: Path) -> None:
        (bundle / name).unlink()
        (bundle / name).symlink_to(target)
    return damage


def _external_data_fifo(bundle: Path) -> None:
    pytest.importorskip("onnx")
    _external_weights(bundle, contract.DATA_FILE)
    _fifo(contract.DATA_FILE)(bundle)


SPECIAL_FILES = {
    "vocab.json a FIFO": (_fifo("vocab.json"), "vocab.json: is not a regular file (a FIFO)"),
    "bundle.json a FIFO": (_fifo("bundle.json"), "bundle.json: is not a regular file (a FIFO)"),
    "model.onnx a FIFO": (_fifo("model.onnx"), "model.onnx: is not a regular file (a FIFO)"),
    "vocab.json a link to /dev/zero": (_link("vocab.json", "/dev/zero"),
                                       "vocab.json: is not a regular file (a character device)"),
    "bundle.json a link to /dev/urandom": (
        _link("bundle.json", "/dev/urandom"),
        "bundle.json: is not a regular file (a character device)"),
    "external data a FIFO": (
        _external_data_fifo,
        "model.onnx: external data location 'model.onnx.data' is not a regular file (a FIFO)"),
}

# load_bundle in a child process given half a GiB more address space than its imports took: a
# regression that waits on a FIFO times out, one that reads /dev/zero whole dies of MemoryError,
# and neither hangs the suite or fills the machine's memory.
_LOAD_IN_A_CHILD = """
import resource, sys
from serve.bundle import BundleError, load_bundle

with open("/proc/self/statm") as f:
    room = int(f.read().split()[0]) * resource.getpagesize() + (512 << 20)
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
if hard != resource.RLIM_INFINITY:
    room = min(room, hard)
resource.setrlimit(resource.RLIMIT_AS, (room, hard))
try:
    load_bundle(sys.argv[1])
except BundleError as err:
    print(err)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("damage, expected", SPECIAL_FILES.values(), ids=SPECIAL_FILES.keys())
def test_a_file_that_is_not_a_regular_file_is_refused_at_once(bundle_copy, damage, expected):
    damage(bundle_copy)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _LOAD_IN_A_CHILD, str(bundle_copy)],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert time.monotonic() - started < 30  # Python and onnxruntime's start-up included
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == f"{bundle_copy}/{expected}\n"


# ---- finding a bundle -----------------------------------------------------------------------------

def test_resolve_bundle_by_path_by_name_and_newest(tiny_bundle, tmp_path):
    root = tmp_path / "bundles"
    old = Path(shutil.copytree(tiny_bundle.bundle, root / "old"))
    new = Path(shutil.copytree(tiny_bundle.bundle, root / "new"))
    (root / "not-a-bundle").mkdir()
    past = time.time() - 100
    os.utime(old / "bundle.json", (past, past))
    os.utime(new / "bundle.json")  # now: copytree kept the fixture's time, maybe older than past
    assert resolve_bundle(None, root) == new
    assert resolve_bundle("old", root) == old
    assert resolve_bundle(old, tmp_path / "elsewhere") == old
    with pytest.raises(BundleError, match="no such bundle"):
        resolve_bundle("missing", root)
    with pytest.raises(BundleError, match="not a bundle folder"):
        resolve_bundle(root / "not-a-bundle", root)
    with pytest.raises(BundleError, match="no bundle under"):
        resolve_bundle(None, tmp_path / "empty")


# ---- the contract --------------------------------------------------------------------------------

def test_exported_bundle_follows_the_contract(tiny_bundle):
    """File names, bundle.json as BundleMeta (nothing lost or added on a round trip), graph
    inputs/outputs with dtypes and shapes."""
    from keraslm.config import LMConfig

    path = tiny_bundle.bundle
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [contract.BUNDLE_FILE, contract.MODEL_FILE, contract.VOCAB_FILE, "README.md"])
    raw = json.loads((path / contract.BUNDLE_FILE).read_text(encoding="utf-8"))
    meta = contract.BundleMeta.read(path / contract.BUNDLE_FILE)
    assert meta.to_dict() == raw
    assert contract.BundleMeta.from_dict(meta.to_dict()) == meta
    assert sorted(raw) == sorted(f.name for f in dataclasses.fields(contract.BundleMeta))
    assert meta.schema_version == contract.SCHEMA_VERSION
    nlayers = meta.nlayers
    assert contract.state_names(nlayers) == LMConfig(**meta.model).state_names() == [
        "h0", "c0", "h1", "c1"]
    specs = contract.io_specs(meta.layer_sizes, meta.vocab_size)
    for kind, names in (("inputs", contract.input_names(nlayers)),
                        ("outputs", contract.output_names(nlayers))):
        assert raw[kind] == [{"name": n, "dtype": specs[n][0], "shape": specs[n][1]}
                             for n in names]

    b = load_bundle(path)
    assert [i.name for i in b.session.inputs] == contract.input_names(nlayers)
    assert [o.name for o in b.session.outputs] == contract.output_names(nlayers)


def test_the_graph_scores_batchings_padding_as_nothing(tiny_bundle):
    """keraslm.batching pads the last columns and the last batch; through the exported graph
    with the state carried, every real target scores as its column does alone and every
    padded target scores exactly 0."""
    from keraslm.batching import BPTTBatches

    b = load_bundle(tiny_bundle.bundle)
    ids = (np.arange(23) * 7 + 3) % len(b.vocab)
    batches = BPTTBatches(ids, batch_size=3, bptt=4, last_batch="keep")
    state = b.session.zero_state(3)
    scored, padded = [], []
    for inputs, targets in batches:
        logprobs, state = b.session.step(inputs, targets, state)
        scored.append(np.where(targets == contract.PAD_TARGET, np.nan, logprobs))
        padded.extend(logprobs[targets == contract.PAD_TARGET].tolist())
    assert padded and not any(padded)
    scored = np.concatenate(scored, axis=1)
    length = batches.column_length
    for j in range(3):
        column = ids[j * length:(j + 1) * length].astype(np.int32)[None, :]
        alone, _ = b.session.step(column[:, :-1], column[:, 1:], b.session.zero_state(1))
        got = scored[j][~np.isnan(scored[j])]
        np.testing.assert_allclose(got, alone[0], rtol=1e-5, atol=1e-6)


# ---- external data ---------------------------------------------------------------------------------

def _external_weights(bundle: Path, location: str, data_at: Path | None = None) -> None:
    """Store the model's weights as external data named `location`, the file put at `data_at`
    (default: where `location` points from the bundle folder)."""
    import onnx

    model = onnx.load(bundle / contract.MODEL_FILE)
    onnx.save_model(model, bundle / contract.MODEL_FILE, save_as_external_data=True,
                    location=contract.DATA_FILE)
    model = onnx.load(bundle / contract.MODEL_FILE, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, bundle / contract.MODEL_FILE)
    target = data_at or bundle / location
    target.parent.mkdir(parents=True, exist_ok=True)
    (bundle / contract.DATA_FILE).rename(target)


def _constant_in_a_subgraph(bundle: Path, location: str) -> None:
    """A model whose only tensor is a Constant inside an If branch, stored at `location`."""
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    value.data_location = TensorProto.EXTERNAL
    value.ClearField("float_data")
    value.external_data.add(key="location", value=location)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=value)], "b", [],
                               [out])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "c", TensorProto.BOOL, [])], [out])
    onnx.save_model(helper.make_model(graph), bundle / contract.MODEL_FILE)


def _no_onnxruntime(*args, **kwargs):
    raise AssertionError("onnxruntime was asked to open the model")


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "subgraph"])
def test_external_data_outside_the_bundle_is_refused_before_onnxruntime(bundle_copy, tmp_path,
                                                                        monkeypatch, kind):
    pytest.importorskip("onnx")
    secret = tmp_path / "secret.bin"
    if kind == "parent":
        location = "../secret.bin"
        _external_weights(bundle_copy, location)
    elif kind == "absolute":
        location = str(secret)
        _external_weights(bundle_copy, location)
    elif kind == "symlink":
        location = "weights.data"
        _external_weights(bundle_copy, location, secret)
        (bundle_copy / location).symlink_to(secret)
    else:
        location = "../../secret.bin"
        _constant_in_a_subgraph(bundle_copy, location)
    monkeypatch.setattr(serve.session.ort, "InferenceSession", _no_onnxruntime)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    message = str(err.value)
    assert message.startswith(f"{bundle_copy / contract.MODEL_FILE}: external data location "
                              f"{location!r} ")
    assert "\n" not in message


@pytest.mark.parametrize("location", [contract.DATA_FILE, "sub/../weights/model.data"])
def test_external_data_inside_the_bundle_loads(bundle_copy, tiny_bundle, location):
    pytest.importorskip("onnx")
    _external_weights(bundle_copy, location)
    assert (bundle_copy / location).stat().st_size > 4000  # the weights really moved there
    got = load_bundle(bundle_copy).session
    want = load_bundle(tiny_bundle.bundle).session
    tokens, targets = np.array([[3, 4]], np.int32), np.array([[4, 5]], np.int32)
    np.testing.assert_array_equal(got.step(tokens, targets, got.zero_state(1))[0],
                                  want.step(tokens, targets, want.zero_state(1))[0])
