"""Opening a bundle: what is checked, and one clear line naming the file for each problem.

Also home of the tiny real bundle (a random 2x16 LSTM over a 202-token WikiText vocabulary,
exported by export.to_onnx) that every serve test shares: `tiny_bundle` builds it once per session.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from serve.bundle import BundleError, load_bundle, resolve_bundle


class TinyBundle(NamedTuple):
    run: Path
    bundle: Path


def make_bundle(root: Path, name: str = "tiny", *, seed: int = 0) -> TinyBundle:
    """A run with random weights under root/runs/<name>, exported to root/bundles/<name>."""
    from helpers_runs import make_run, wikitext_tokens

    from export.to_onnx import export_run
    from keraslm.model import LMConfig
    from keraslm.vocab import Vocab

    vocab = Vocab.build(wikitext_tokens(3000), max_size=200)
    config = LMConfig(vocab_size=len(vocab), emsize=16, nhid=16, nlayers=2, dropout=0.0)
    run = make_run(root / "runs" / name, config, vocab, seed=seed)
    return TinyBundle(run.path, export_run(run, root / "bundles" / name))


@functools.cache
def _shared_bundle(root: Path) -> TinyBundle:
    return make_bundle(root)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> TinyBundle:
    """The shared tiny bundle (built once per session, whichever module asks first)."""
    return _shared_bundle(tmp_path_factory.getbasetemp() / "serve")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle, free to damage."""
    return Path(shutil.copytree(tiny_bundle.bundle, tmp_path / "bundle"))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


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


DEEP = b"[" * 100_000 + b"]" * 100_000


BAD_BUNDLES = {
    "no bundle.json": (_remove("bundle.json"), "bundle.json: file not found"),
    "corrupt bundle.json": (_write("bundle.json", b"{not json"), "bundle.json: not valid JSON"),
    "newer schema": (_meta(lambda m: m.update(schema_version=2)), "schema_version 2"),
    "no model config": (_meta(lambda m: m.pop("model")), "'model' missing"),
    "no model.onnx": (_remove("model.onnx"), "model.onnx: file not found"),
    "corrupt model.onnx": (_write("model.onnx", b"\x08\x07garbage" * 50),
                           "model.onnx: onnxruntime cannot load it"),
    "no vocab.json": (_remove("vocab.json"), "vocab.json"),
    "corrupt vocab.json": (_write("vocab.json", b"[1, 2"), "vocab.json: corrupt"),
    "outputs differ": (_meta(_rename_output), "differ from bundle.json"),
    "state shape differs": (_meta(_wrong_state_shape), "h0 is float32 ['batch', 16] in the graph"),
    "vocab size differs from bundle.json": (
        _meta(lambda m: m["model"].update(vocab_size=300)), "vocab.json: 202 tokens but"),
    "vocab differs from the graph": (_bigger_vocab, "the graph scores 202 tokens"),
    "deeply nested bundle.json": (_write("bundle.json", DEEP), "nested too deeply"),
    "huge number in bundle.json": (_write("bundle.json", b'{"schema_version": ' + b"9" * 5000
                                          + b"}"), "bundle.json: not valid JSON"),
    "oversized bundle.json": (_write("bundle.json", b" " * (2 << 20)), "more than the"),
    "10^7 layers": (_meta(lambda m: m["model"].update(nlayers=10**7)), "model.nlayers is"),
    "nhid 10^12": (_meta(lambda m: m["model"].update(nhid=10**12)), "model.nhid is"),
    "nhid true": (_meta(lambda m: m["model"].update(nhid=True)), "model.nhid missing or not"),
    "deeply nested vocab.json": (_write("vocab.json", DEEP), "vocab.json: corrupt"),
    "vocab without <eos>": (_vocab_without_eos, "does not have it"),
}


@pytest.mark.parametrize("damage, expected", BAD_BUNDLES.values(), ids=BAD_BUNDLES.keys())
def test_bad_bundle_is_one_line_naming_the_file(bundle_copy, damage, expected):
    damage(bundle_copy)
    started = time.monotonic()
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    assert time.monotonic() - started < 10  # refused before allocating anything big
    message = str(err.value)
    assert expected in message
    assert str(bundle_copy) in message
    assert "\n" not in message


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
