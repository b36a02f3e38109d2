"""Generation from a bundle (serve/generate.py), and Tiny Shakespeare's carved-out splits.

Sampling is property-tested against a plain-Python reference of the allowed set; greedy
generation is checked token for token against the Keras model the bundle was exported from.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_runs import edit_json
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keraslm import corpora
from keraslm.errors import UserError
from keraslm.text import RAW, WIKITEXT
from serve import generate as gen
from serve.bundle import load_bundle

REPO = Path(__file__).resolve().parents[1]


# ---- one sampling step, against a reference ------------------------------------------------------

def reference_allowed(row: list[float], temperature: float, top_k: int, top_p: float,
                      banned: set[int]) -> tuple[list[int], dict[int, float]]:
    """Best-first order of the tokens still in play, and each one's probability mass before it
    (after top-k, renormalised), computed the slow obvious way."""
    scores = [-math.inf if i in banned else x / temperature for i, x in enumerate(row)]
    order = sorted(range(len(row)), key=lambda i: (-scores[i], i))
    order = [i for i in order if scores[i] > -math.inf]
    if top_k:
        order = order[:top_k]
    best = scores[order[0]]
    weights = [math.exp(scores[i] - best) for i in order]
    total = math.fsum(weights)
    before, running = {}, 0.0
    for i, w in zip(order, weights):
        before[i] = running / total
        running += w
    return order, before


rows_of_logprobs = st.integers(2, 12).flatmap(lambda vocab: st.lists(
    st.lists(st.one_of(st.floats(-30.0, 0.0), st.just(-math.inf)), min_size=vocab,
             max_size=vocab), min_size=1, max_size=4))


@settings(max_examples=300, deadline=None)
@given(rows=rows_of_logprobs, temperature=st.one_of(st.just(0.0), st.floats(0.05, 5.0)),
       top_k=st.integers(0, 14), top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
       banned=st.sets(st.integers(0, 11), max_size=4), seed=st.integers(0, 2**32 - 1))
def test_sample_step_never_draws_outside_the_allowed_set(rows, temperature, top_k, top_p,
                                                         banned, seed):
    vocab = len(rows[0])
    banned = {i for i in banned if i < vocab}
    assume(all(any(x > -math.inf for i, x in enumerate(r) if i not in banned) for r in rows))
    ids = gen.sample_step(np.array(rows, np.float32), np.random.default_rng(seed),
                          temperature=temperature, top_k=top_k, top_p=top_p, banned=sorted(banned))
    assert ids.shape == (len(rows),)
    for row, token in zip(rows, ids.tolist()):
        row32 = np.array(row, np.float32).astype(float).tolist()  # what sample_step saw
        if temperature == 0:
            allowed = [x if i not in banned else -math.inf for i, x in enumerate(row32)]
            assert token == int(np.argmax(allowed))
            continue
        order, before = reference_allowed(row32, temperature, top_k, top_p, banned)
        assert token in order, "banned, zero-probability or outside the top k"
        assert before[token] < top_p + 1e-9, "outside the nucleus"


def test_sample_step_draws_in_proportion_within_the_kept_tokens():
    logprobs = np.log([[0.1, 0.6, 0.3]] * 4000)
    rng = np.random.default_rng(0)
    counts = np.bincount(gen.sample_step(logprobs, rng, top_k=2), minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.0, 2 / 3, 1 / 3], atol=0.03)
    counts = np.bincount(gen.sample_step(logprobs, rng, top_p=0.8), minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.0, 2 / 3, 1 / 3], atol=0.03)  # 0.6 < 0.8: two kept
    assert set(gen.sample_step(logprobs, rng, top_p=0.5).tolist()) == {1}
    counts = np.bincount(gen.sample_step(logprobs, rng, temperature=1e-6), minlength=3)
    assert counts.tolist() == [0, 4000, 0]
    counts = np.bincount(gen.sample_step(logprobs, rng), minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.1, 0.6, 0.3], atol=0.03)


def test_sample_step_refuses_bad_settings_and_empty_rows():
    with pytest.raises(UserError, match="--top-p"):
        gen.sample_step(np.zeros((1, 3)), np.random.default_rng(), top_p=0.0)
    with pytest.raises(UserError, match="--temperature"):
        gen.sample_step(np.zeros((1, 3)), np.random.default_rng(), temperature=-1)
    with pytest.raises(UserError, match="no token left"):
        gen.sample_step(np.array([[0.0, -np.inf]]), np.random.default_rng(), banned=[0])


# ---- text in, text out ------------------------------------------------------------------------------

def test_prompt_keeps_its_last_sentence_open_unless_it_ends_a_line():
    assert gen.prompt_tokens(WIKITEXT, "the game\nbegan") == ["the", "game", "<eos>", "began"]
    assert gen.prompt_tokens(WIKITEXT, "the game\n") == ["the", "game", "<eos>"]
    assert gen.prompt_tokens(WIKITEXT, "") == []
    assert gen.prompt_tokens(RAW, "Hello, Mr. Holmes. How are") == [
        "Hello", ",", "Mr.", "Holmes", ".", "<eos>", "How", "are"]


def test_detokenize_turns_eos_into_line_breaks_and_reads_as_text():
    tokens = ["Hello", ",", "world", ".", "<eos>", "I", "'m", "here", "<eos>", "<eos>", "Bye"]
    assert gen.detokenize(tokens, RAW) == "Hello, world.\nI'm here\n\nBye"
    assert gen.detokenize(tokens, WIKITEXT) == "Hello , world .\nI 'm here\n\nBye"


# ---- generating with a real bundle -----------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle.bundle)


def keras_greedy_path(run: Path, context: list[int], steps: int, banned: list[int]) -> list[int]:
    """The argmax continuation computed by the Keras model, one token at a time, state carried."""
    import tensorflow as tf

    from keraslm.model import LMConfig, build_model
    from keraslm.rundir import RunDir

    run = RunDir(run)
    config = LMConfig.from_dict(run.read_config()["model"])
    model = build_model(config)
    model.load_weights(run.best_weights_path)
    state = [tf.zeros((1, config.nhid))] * len(config.state_names())
    keys = tf.zeros((1,), tf.int32)
    tokens, path = tf.constant([context], tf.int32), []
    for _ in range(steps):
        logits, *state = model([tokens, keys, *state], training=False)
        last = logits.numpy()[0, -1].astype(np.float64)
        last[banned] = -np.inf
        path.append(int(np.argmax(last)))
        tokens = tf.constant([[path[-1]]], tf.int32)
    return path


@pytest.mark.parametrize("allow_unk", [False, True])
def test_greedy_generation_is_the_keras_models_argmax_path(each_bundle, allow_unk):
    """Either softmax: generation reads `next_logprobs`, whatever computed it."""
    bundle = load_bundle(each_bundle.bundle)
    prompt = "the game began in"
    samples = gen.generate(bundle, prompt, tokens=25, temperature=0.0, num_samples=2,
                           allow_unk=allow_unk)
    context = bundle.vocab.encode(["<eos>", *gen.prompt_tokens(bundle.pipeline, prompt)])
    banned = [] if allow_unk else [bundle.vocab.unk_id]
    expected = keras_greedy_path(each_bundle.run, context.tolist(), 25, banned)
    assert samples[0].ids == samples[1].ids == expected
    assert samples[0].tokens == bundle.vocab.decode(expected)


def test_seed_reproduces_samples_and_each_sample_ignores_the_batch(bundle):
    args = {"tokens": 30, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    three = gen.generate(bundle, "the game", seed=7, num_samples=3, **args)
    assert [s.ids for s in gen.generate(bundle, "the game", seed=7, num_samples=3, **args)] \
        == [s.ids for s in three]
    assert gen.generate(bundle, "the game", seed=7, num_samples=1, **args)[0].ids == three[0].ids
    assert len({tuple(s.ids) for s in three}) == 3
    assert gen.generate(bundle, "the game", seed=8, **args)[0].ids != three[0].ids
    assert all(s.text.startswith("the game") for s in three)


def favour(bundle_dir: Path, token_id: int) -> Path:
    """Make the graph's decoder bias so large for `token_id` that it is always the argmax."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(bundle_dir / "model.onnx")
    vocab_size = len(load_bundle(bundle_dir).vocab)
    (bias,) = [t for t in model.graph.initializer if list(t.dims) == [vocab_size]]
    values = numpy_helper.to_array(bias).copy()
    values[token_id] += 100.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, bundle_dir / "model.onnx")
    return bundle_dir


def test_unk_is_drawn_only_with_allow_unk(bundle_copy):
    b = load_bundle(favour(bundle_copy, 0))
    assert b.vocab.unk_id == 0
    for temperature in (0.0, 1.0):
        kept_out = gen.generate(b, "the", tokens=20, temperature=temperature, seed=1,
                                num_samples=2)
        assert all(0 not in s.ids for s in kept_out)
    allowed = gen.generate(b, "the", tokens=20, temperature=1.0, seed=1, allow_unk=True)
    assert allowed[0].ids == [0] * 20 and allowed[0].text == "the" + " <unk>" * 20


def test_eos_becomes_a_line_break(bundle_copy, capsys):
    eos = load_bundle(bundle_copy).vocab.token_to_id("<eos>")
    favour(bundle_copy, eos)
    assert gen.main(["--model", str(bundle_copy), "--prompt", "the game", "--tokens", "3",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "the game\n\n\n\n"


def test_raw_text_bundles_read_as_moses_detokenized_text(bundle_copy, capsys):
    edit_json(bundle_copy / "bundle.json", lambda d: d.update(pipeline=RAW.to_dict()))
    assert gen.main(["--model", str(bundle_copy), "--prompt", "the game , he said", "--tokens",
                     "4", "--seed", "0", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "--- sample 1 of 2 ---" and out[1].startswith("the game, he said")
    assert "--- sample 2 of 2 ---" in out


def test_bundle_without_next_logprobs_asks_for_a_re_export(bundle_copy, capsys):
    import onnx

    model = onnx.load(bundle_copy / "model.onnx")
    kept = [o for o in model.graph.output if o.name != "next_logprobs"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, bundle_copy / "model.onnx")
    edit_json(bundle_copy / "bundle.json", lambda d: d.update(
        outputs=[o for o in d["outputs"] if o["name"] != "next_logprobs"]))
    assert gen.main(["--model", str(bundle_copy), "--prompt", "the"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "no 'next_logprobs' output" in err
    assert "re-export it with the current export.to_onnx" in err
    assert str(bundle_copy) in err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert gen.main(["--model", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        gen.main(["--top-p", "0"])
    assert exit_.value.code == 2


def test_script_path_and_module_give_the_same_text_without_tensorflow(tiny_bundle):
    flags = ["--model", str(tiny_bundle.bundle), "--prompt", "the game", "--tokens", "8",
             "--seed", "3", "--json"]
    env = {**os.environ, "PYTHONPATH": ""}
    as_script = subprocess.run([sys.executable, str(REPO / "serve" / "generate.py"), *flags],
                               capture_output=True, text=True, cwd=tiny_bundle.bundle.parent,
                               env=env, timeout=120, check=False)
    assert as_script.returncode == 0, as_script.stderr
    check = ("import sys; from serve.generate import main; code = main(sys.argv[1:]); "
             "assert 'tensorflow' not in sys.modules, 'generate imported TensorFlow'; "
             "sys.exit(code)")
    as_module = subprocess.run([sys.executable, "-c", check, *flags], capture_output=True,
                               text=True, cwd=REPO, env=env, timeout=120, check=False)
    assert as_module.returncode == 0, as_module.stderr
    assert as_script.stdout == as_module.stdout and '"text": "the game' in as_script.stdout


# ---- Tiny Shakespeare: one file, three splits ------------------------------------------------------

@pytest.fixture
def shared_root(data_root) -> Path:
    """The shared, read-only data root (conftest's data_root), with Tiny Shakespeare in it."""
    if not (data_root / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"no tinyshakespeare under {data_root}")
    return data_root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_tinyshakespeare_splits_are_cached_verified_and_reassemble_the_file(tmp_path,
                                                                            monkeypatch,
                                                                            shared_root):
    monkeypatch.setenv(corpora.CACHE_ENV, str(tmp_path / "cache"))
    before = snapshot(shared_root)
    paths = {s: corpora.resolve_split("tinyshakespeare", s, shared_root, download=False)
             for s in ("train", "valid", "test")}
    assert snapshot(shared_root) == before  # the read-only data root is never written
    assert all(p.is_relative_to(tmp_path / "cache") for p in paths.values())
    parts = [paths[s].read_bytes() for s in ("train", "valid", "test")]
    assert b"".join(parts) == (shared_root / "tinyshakespeare" / "input.txt").read_bytes()
    assert [p.count(b"\n") for p in parts] == [36000, 2000, 2000]
    for split, path in paths.items():
        assert hashlib.sha1(path.read_bytes()).hexdigest() == \
            corpora.CORPORA["tinyshakespeare"].line_splits[split]

    valid = paths["valid"]
    stamp = valid.stat().st_mtime_ns
    assert corpora.resolve_split("tinyshakespeare", "valid", shared_root) == valid
    assert valid.stat().st_mtime_ns == stamp  # a verified cached split is reused untouched
    valid.write_text("tampered\n")
    assert corpora.resolve_split("tinyshakespeare", "valid", shared_root) == valid
    assert valid.read_bytes() == parts[1]  # a corrupt one is carved again
    assert not [p for p in (tmp_path / "cache").rglob(".*")]  # no temporary files left


def test_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch, shared_root):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(corpora.CACHE_ENV, str(blocker))
    with pytest.raises(corpora.DataError, match="cache not writable.*KERASLM_CACHE"):
        corpora.resolve_split("tinyshakespeare", "test", shared_root)


def test_training_on_tinyshakespeare_reads_its_splits_as_raw_text(tmp_path, monkeypatch,
                                                                  shared_root):
    import json

    from keraslm import train

    monkeypatch.setenv(corpora.CACHE_ENV, str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    assert train.main(["--corpus", "tinyshakespeare", "--data-root", str(shared_root),
                       "--emsize", "8", "--nhid", "8", "--max-batches", "3", "--epochs", "1",
                       "--batch-size", "4", "--bptt", "10", "--eval-batch-size", "20",
                       "--test-batch-size", "20", "--runs-dir", str(runs), "--name", "ts",
                       "--quiet", "--log-interval", "0"]) == 0
    config = json.loads((runs / "ts" / "config.json").read_text())
    assert config["pipeline"]["split"] == "sentences"
    assert config["pipeline"]["tokenizer"] == "moses"
    expected = corpora.CORPORA["tinyshakespeare"].line_splits
    assert {s: c["sha1"] for s, c in config["corpora"].items()} == expected
    assert (runs / "ts" / "best.weights.h5").is_file()
