"""Export: a run becomes a bundle whose ONNX graph scores exactly what the Keras model scores.

Real TensorFlow, tf2onnx and onnxruntime on tiny models; the text is the start of WikiText-2's
validation split mapped through the run's vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
from helpers_runs import WIKITEXT_VALID, make_run, wikitext_tokens
from onnx import shape_inference
from onnx.utils import Extractor

from export import graph
from export.to_onnx import DEFAULT_OPSET, export_run, main
from keraslm import contract
from keraslm.model import LMConfig, split_decoder
from keraslm.runs import load_run_model
from keraslm.vocab import Vocab

VOCAB_SIZE = 150
CONFIGS = {
    "tied-1layer": LMConfig(VOCAB_SIZE, emsize=16, nhid=16, nlayers=1, tied=True),
    "tied-2layers": LMConfig(VOCAB_SIZE, emsize=16, nhid=16, nlayers=2, tied=True),
    "untied-1layer": LMConfig(VOCAB_SIZE, emsize=12, nhid=16, nlayers=1, tied=False),
    "untied-2layers": LMConfig(VOCAB_SIZE, emsize=12, nhid=16, nlayers=2, tied=False),
    "adaptive-tied-2layers": LMConfig(VOCAB_SIZE, emsize=16, nhid=16, nlayers=2, tied=True,
                                      softmax="adaptive", cutoffs=(20, 60), div_value=2.0),
    "adaptive-untied-1layer": LMConfig(VOCAB_SIZE, emsize=12, nhid=16, nlayers=1, tied=False,
                                       softmax="adaptive", cutoffs=(30,)),
    # GluonNLP's AWDRNN shape: layers of 16, 16 and 8 units, the last tied to the embedding
    "awd-tied-3layers": LMConfig(VOCAB_SIZE, emsize=8, nhid=16, nlayers=3, tied=True,
                                 last_layer_emsize=True),
    "adaptive-awd-3layers": LMConfig(VOCAB_SIZE, emsize=8, nhid=16, nlayers=3, tied=True,
                                     last_layer_emsize=True, softmax="adaptive",
                                     cutoffs=(20, 60), div_value=2.0),
}
CHUNK = 12  # time steps per call; every stream is scored in two chunks

# Keras 3.15 converting tensors under NumPy 2.4; not ours, and harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def text() -> tuple[Vocab, np.ndarray]:
    tokens = wikitext_tokens(3000)
    vocab = Vocab.build(tokens, max_size=VOCAB_SIZE - 2)
    assert len(vocab) == VOCAB_SIZE
    return vocab, vocab.encode(tokens)


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, text, tmp_path_factory):
    """A run of each config, its bundle, the Keras model and an onnxruntime session."""
    vocab, _ = text
    config = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    run = make_run(root / "runs" / request.param, config, vocab, seed=1)
    bundle = export_run(run, root / "bundles" / request.param)
    model, _ = load_run_model(run)
    return {"config": config, "run": run, "bundle": bundle, "model": model,
            "session": session(bundle / "model.onnx")}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def zero_state(config: LMConfig, batch: int) -> list[np.ndarray]:
    return [np.zeros((batch, size), np.float32) for size in config.state_sizes()]


def onnx_call(sess, config, tokens, targets, state, *, hidden=False):
    """(logprobs, new state, next_logprobs[, hidden]) from one call of the exported graph."""
    feed = {"tokens": tokens.astype(np.int32), "targets": targets.astype(np.int32),
            **dict(zip(config.state_names(), state))}
    names = graph.output_names(config)
    out = dict(zip(names, sess.run(names, feed)))
    result = (out["logprobs"], [out[contract.state_output(n)] for n in config.state_names()],
              out["next_logprobs"])
    return (*result, out["hidden"]) if hidden else result


def keras_call(model, config, tokens, targets, state):
    """The same from the Keras model: log_softmax of its logits, gathered at the targets."""
    logits, *new_state = model([tokens, np.zeros(len(tokens), np.int32), *state], training=False)
    logprobs = tf.nn.log_softmax(logits).numpy()
    picked = np.take_along_axis(logprobs, np.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return np.where(targets >= 0, picked, 0.0), [s.numpy() for s in new_state], logprobs[:, -1]


def keras_hidden(model, tokens, state):
    """The Keras model's last LSTM layer output (the decoder's input) and the state after."""
    features = split_decoder(model)[0]
    hidden, *new_state = features([tokens, np.zeros(len(tokens), np.int32), *state],
                                  training=False)
    return hidden.numpy(), [s.numpy() for s in new_state]


def columns(ids: np.ndarray, batch: int, length: int) -> np.ndarray:
    """`batch` consecutive stretches of the stream, each `length` + 1 tokens long."""
    return ids[: batch * (length + 1)].reshape(batch, length + 1)


def test_lstm_layers_become_native_onnx_lstm_ops(exported):
    ops = [node.op_type for node in onnx.load(exported["bundle"] / "model.onnx").graph.node]
    assert ops.count("LSTM") == exported["config"].nlayers
    assert "Loop" not in ops and "Scan" not in ops


@pytest.mark.parametrize("batch", [1, 20])
def test_logprobs_match_keras_with_state_carried_across_chunks(exported, text, batch):
    config, model, sess = exported["config"], exported["model"], exported["session"]
    stream = columns(text[1], batch, 2 * CHUNK)
    onnx_state = keras_state = zero_state(config, batch)
    onnx_scores, keras_scores = [], []
    for start in (0, CHUNK):
        tokens = stream[:, start:start + CHUNK]
        targets = stream[:, start + 1:start + CHUNK + 1]
        got, onnx_state, got_next = onnx_call(sess, config, tokens, targets, onnx_state)
        want, keras_state, want_next = keras_call(model, config, tokens, targets, keras_state)
        onnx_scores.append(got)
        keras_scores.append(want)
        np.testing.assert_allclose(got_next, want_next, rtol=0, atol=1e-4)
        for got_state, want_state in zip(onnx_state, keras_state):
            np.testing.assert_allclose(got_state, want_state, rtol=0, atol=1e-5)
    onnx_scores, keras_scores = np.concatenate(onnx_scores, 1), np.concatenate(keras_scores, 1)
    assert np.abs(onnx_scores - keras_scores).max() <= 1e-4
    onnx_ppl, keras_ppl = math.exp(-onnx_scores.mean()), math.exp(-keras_scores.mean())
    assert abs(onnx_ppl / keras_ppl - 1) <= 1e-4


def test_next_logprobs_is_a_normalised_distribution(exported, text):
    """Each row of `next_logprobs` sums to 1 (the adaptive softmax's head and tails together),
    in float64 to leave float32's own rounding out of it."""
    config, sess = exported["config"], exported["session"]
    stream = columns(text[1], 5, CHUNK)
    _, _, last = onnx_call(sess, config, stream[:, :-1], stream[:, 1:], zero_state(config, 5))
    assert last.shape == (5, config.vocab_size)
    total = np.exp(last.astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-5)


def test_hidden_output_is_the_last_lstm_layer_that_the_decoder_reads(exported, text):
    """`hidden` equals Keras' last-layer output over two chunks (state carried), and decoding it
    with the model's own output layer gives the graph's log-probabilities."""
    config, model, sess = exported["config"], exported["model"], exported["session"]
    stream = columns(text[1], 3, 2 * CHUNK)
    onnx_state = keras_state = zero_state(config, 3)
    for start in (0, CHUNK):
        tokens = stream[:, start:start + CHUNK]
        targets = stream[:, start + 1:start + CHUNK + 1]
        logprobs, onnx_state, _, hidden = onnx_call(sess, config, tokens, targets, onnx_state,
                                                    hidden=True)
        want, keras_state = keras_hidden(model, tokens, keras_state)
        assert hidden.shape == (3, CHUNK, config.output_size()) and hidden.dtype == np.float32
        np.testing.assert_allclose(hidden, want, rtol=0, atol=1e-5)
        decoded = tf.nn.log_softmax(split_decoder(model)[1](hidden)).numpy()
        picked = np.take_along_axis(decoded, targets[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(picked, logprobs, rtol=0, atol=1e-4)


def test_padding_targets_score_zero_and_change_nothing_else(exported, text):
    config, sess = exported["config"], exported["session"]
    stream = columns(text[1], 3, CHUNK)
    tokens, targets = stream[:, :-1], stream[:, 1:]
    padded = targets.copy()
    padded[0, -4:] = -1  # a ragged end
    padded[2, 5] = -1
    state = zero_state(config, 3)
    full, full_state, full_next = onnx_call(sess, config, tokens, targets, state)
    got, got_state, got_next = onnx_call(sess, config, tokens, padded, state)
    assert np.all(got[padded < 0] == 0.0)
    np.testing.assert_array_equal(got[padded >= 0], full[padded >= 0])
    for a, b in zip(got_state, full_state):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got_next, full_next)  # row 0's last position is padding


def test_target_logprobs_are_read_by_row_and_word_never_by_a_flat_index(exported):
    """The targets' log-probabilities come out of the [N, vocab] log-softmax as (row, word)
    pairs (GatherND), so no row * vocab + word is ever computed: in int32 that wraps negative
    once one call covers 2**31 logits (WikiText-2's 33,278 words x 64,536 targets, e.g.
    `score.py --batch-size 64 --bptt 1024`), and ONNX Gather reads negative indices from the
    end, silently. Only the graph's structure can show this without materialising such a call;
    the log-probabilities themselves are the parity tests'."""
    nodes = onnx.load(exported["bundle"] / "model.onnx").graph.node
    softmaxes = [node.output[0] for node in nodes if node.op_type == "LogSoftmax"]
    readers = [{node.op_type for node in nodes if softmax in node.input}
               for softmax in softmaxes]
    if exported["config"].softmax == "full":
        assert len(readers) == 1
        assert readers[0] <= {"GatherND", "Gather"}  # and next_logprobs, whole rows
    else:  # the head's and each tail's on the targets, and once more for next_logprobs
        assert len(readers) == 2 * (1 + len(exported["config"].cutoffs))
    assert sum("GatherND" in r for r in readers) >= 1 + len(exported["config"].cutoffs)
    assert not set().union(*readers) & {"Reshape", "Flatten"}  # never flattened


INDEXING_OPS = {"Gather", "GatherND", "GatherElements", "ScatterND", "ScatterElements"}
BIG_VOCAB = 100_000


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_indices_are_safe_past_2_31_logits_without_materialising_them(softmax):
    """Every index the graph reads or writes with (Gather, GatherND, ScatterND...) is computed
    from the tokens, the targets and shapes alone: the subgraph that computes them holds no
    matmul, softmax or LSTM. So it runs on its own at a size whose logits would pass 2**31
    (60,000 targets x a 100,000-word softmax; the adaptive head's 50,001 columns and its tail's
    50,000 words on 60,000 and ~48,000 rows), and there every integer it computes stays within
    2 x max(vocabulary, positions) of 0 (tf2onnx adds a Gather's size to each index, for
    negative ones): no row * width + word, whose int32 product would wrap and whose int64 one
    would leave that range. The indices themselves are never negative."""
    extra = ({"softmax": "adaptive", "cutoffs": (BIG_VOCAB // 2,), "div_value": 2.0}
             if softmax == "adaptive" else {})
    config = LMConfig(BIG_VOCAB, emsize=4, nhid=4, nlayers=1, tied=True, **extra)
    proto = shape_inference.infer_shapes(graph.convert(
        load_model(config), config, DEFAULT_OPSET))
    indices = sorted({n.input[1] for n in proto.graph.node if n.op_type in INDEXING_OPS})
    sub = Extractor(proto).extract_model(graph.input_names(config), indices)
    assert not {n.op_type for n in sub.graph.node} & {"MatMul", "Gemm", "LogSoftmax",
                                                     "Softmax", "LSTM"}
    integer = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)
    sub.graph.output.extend(v for v in proto.graph.value_info
                            if v.type.tensor_type.elem_type in integer
                            and v.name in {o for n in sub.graph.node for o in n.output}
                            and v.name not in indices)

    steps, rng = 60_000, np.random.default_rng(0)
    head = config.cutoffs[0] if config.cutoffs else BIG_VOCAB  # words the head scores
    targets = rng.integers(0, BIG_VOCAB, steps)
    if config.cutoffs:  # 80 % in the tail, 20 % in the head
        targets = np.where(rng.random(steps) < 0.8, rng.integers(head, BIG_VOCAB, steps),
                           rng.integers(0, head, steps))
        # head rows x its columns (words and a cluster), tail rows x its words
        assert steps * (head + 1) > 2**31 and (targets >= head).sum() * (BIG_VOCAB - head) > 2**31
    else:
        assert steps * BIG_VOCAB > 2**31
    targets[rng.random(steps) < 0.01] = -1  # padding
    feed = {"tokens": rng.integers(0, BIG_VOCAB, (1, steps)).astype(np.int32),
            "targets": targets[None].astype(np.int32),
            **dict(zip(config.state_names(), zero_state(config, 1)))}
    sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sub.graph.input}
    values = dict(zip([o.name for o in sess.get_outputs()],
                      sess.run(None, {k: v for k, v in feed.items() if k in wanted})))
    assert set(indices) <= set(values) and len(values) > 2 * len(indices)
    for name, value in values.items():
        assert value.dtype.kind == "i", name
        if value.size:
            assert np.abs(value).max() <= 2 * max(BIG_VOCAB, steps), name
    for name in indices:
        assert values[name].min() >= 0, name  # never read from the end


def load_model(config: LMConfig):
    """A Keras model of `config` as export loads one (the plain LSTM, not the fused kernel)."""
    from keraslm.model import build_model

    return build_model(config, seed=0, fused=False)


def test_the_decoder_runs_only_at_targets_and_last_positions(exported, text, tmp_path):
    """Padding costs the LSTM, not the [vocab]-wide decoder: onnxruntime's own profile shows
    the decoder's matmul given one row per target, plus each row's last position."""
    config = exported["config"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    sess = ort.InferenceSession(str(exported["bundle"] / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])
    stream = columns(text[1], 3, CHUNK)
    tokens, targets = stream[:, :-1], stream[:, 1:].copy()
    targets[:, 4:] = -1
    targets[1, 7] = 5  # rows' targets: 4, 5 and 4; their last positions: 3 more
    onnx_call(sess, config, tokens, targets, zero_state(config, 3))
    trace = json.loads(Path(sess.end_profiling()).read_text())

    def dims(shapes: list[dict]) -> list[list[int]]:  # [{"float": [16, 17]}, ...]
        return [next(iter(shape.values())) for shape in shapes]

    # the full softmax's [*, vocab] matmul, or the adaptive softmax's head
    cutoffs = config.cutoffs
    width = cutoffs[0] + len(cutoffs) if config.softmax == "adaptive" else VOCAB_SIZE
    decoder_inputs = [dims(event["args"]["input_type_shape"])[0] for event in trace
                      if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                      and event["args"].get("op_name") in ("MatMul", "Gemm", "FusedMatMul")
                      and dims(event["args"]["output_type_shape"])[0][-1:] == [width]]
    rows = {16} if config.softmax == "full" else {13, 3}  # targets and last positions apart
    assert decoder_inputs and {shape[0] for shape in decoder_inputs} == rows


def test_two_halves_score_like_the_whole(exported, text):
    config, sess = exported["config"], exported["session"]
    stream = columns(text[1], 4, 2 * CHUNK)
    tokens, targets = stream[:, :-1], stream[:, 1:]
    whole, whole_state, whole_next = onnx_call(sess, config, tokens, targets,
                                               zero_state(config, 4))
    first, state, _ = onnx_call(sess, config, tokens[:, :CHUNK], targets[:, :CHUNK],
                                zero_state(config, 4))
    second, state, second_next = onnx_call(sess, config, tokens[:, CHUNK:], targets[:, CHUNK:],
                                           state)
    np.testing.assert_allclose(np.concatenate([first, second], 1), whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(second_next, whole_next, rtol=0, atol=1e-5)
    for a, b in zip(state, whole_state):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_bundle_json_describes_the_graph_and_its_source(exported):
    bundle, config, run = exported["bundle"], exported["config"], exported["run"]
    info = json.loads((bundle / "bundle.json").read_text())
    model = onnx.load(bundle / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    meta = contract.BundleMeta.from_dict(info)
    assert (meta.inputs, meta.outputs) == graph.describe_io(model)
    assert [i["name"] for i in info["inputs"]] == ["tokens", "targets", *config.state_names()]
    assert [o["name"] for o in info["outputs"]] == [
        "logprobs", *(f"{n}_out" for n in config.state_names()), "next_logprobs", "hidden"]
    assert contract.state_names(config.nlayers) == config.state_names()  # the Keras model's order
    specs = contract.io_specs(config.layer_sizes(), config.vocab_size)
    assert [(v["name"], v["dtype"], v["shape"]) for v in info["inputs"] + info["outputs"]] == [
        (name, *specs[name]) for name in contract.input_names(config.nlayers)
        + contract.output_names(config.nlayers)]
    shapes = {v["name"]: (v["dtype"], v["shape"]) for v in info["inputs"] + info["outputs"]}
    assert shapes["tokens"] == shapes["targets"] == ("int32", ["batch", "time"])
    assert shapes["logprobs"] == ("float32", ["batch", "time"])
    assert shapes["h0"] == shapes["c0_out"] == ("float32", ["batch", config.nhid])
    last = config.nlayers - 1  # as wide as the embedding in an AWD-shaped model
    assert shapes[f"h{last}"] == shapes[f"c{last}_out"] == ("float32",
                                                           ["batch", config.output_size()])
    assert shapes["next_logprobs"] == ("float32", ["batch", config.vocab_size])
    assert shapes["hidden"] == ("float32", ["batch", "time", config.output_size()])
    assert info["layer_sizes"] == list(config.layer_sizes())
    assert info["schema_version"] == contract.SCHEMA_VERSION == 1
    assert info["model"] == config.to_dict()
    assert sorted(info) == sorted(f.name for f in dataclasses.fields(contract.BundleMeta))
    assert info["opset"] == DEFAULT_OPSET
    assert {o.domain: o.version for o in model.opset_import}[""] == DEFAULT_OPSET
    assert info["pipeline"] == run.read_config()["pipeline"]
    assert info["source_run"]["name"] == run.name and len(info["source_run"]["weights_sha1"]) == 40
    assert {"tensorflow", "keras", "tf2onnx", "onnx", "keraslm"} <= set(info["versions"])
    assert (bundle / "vocab.json").read_bytes() == run.vocab_path.read_bytes()
    assert info["quantization"] is None and info["external_data"] == []


@pytest.mark.parametrize("softmax", ["full", "adaptive", "adaptive-div-1"])
def test_tied_embedding_is_stored_once(tmp_path, softmax):
    """tf2onnx folds the tied decoder's weights into constants of their own: the embedding
    transposed; for the adaptive softmax, its first cutoffs[0] rows transposed beside the
    cluster columns, and each tail's words' rows times its projection. Export computes them
    from the embedding instead, so the file is ~4 bytes a parameter."""
    extra = {"full": {}, "adaptive": {"cutoffs": (1000, 3000), "div_value": 2.0},
             "adaptive-div-1": {"cutoffs": (1000, 3000), "div_value": 1.0}}[softmax]
    config = LMConfig(8000, emsize=32, nhid=32, nlayers=1, tied=True,
                      softmax=softmax.split("-")[0], **extra)
    vocab = Vocab(["<unk>", "<eos>", *(f"w{i}" for i in range(7998))])
    run = make_run(tmp_path / "run", config, vocab)
    bundle = export_run(run, tmp_path / "bundle")
    ids = np.random.default_rng(0).integers(0, 8000, (2, 9))
    got, _, _ = onnx_call(session(bundle / "model.onnx"), config, ids[:, :-1], ids[:, 1:],
                          zero_state(config, 2))
    want, _, _ = keras_call(load_run_model(run)[0], config, ids[:, :-1], ids[:, 1:],
                            zero_state(config, 2))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # and it scores the same
    size = (bundle / "model.onnx").stat().st_size
    assert abs(size / (4 * config.num_parameters()) - 1) < 0.03
    initializers = onnx.load(bundle / "model.onnx").graph.initializer
    big = [t for t in initializers if 8000 in t.dims]
    if softmax == "full":
        assert len(big) == 2  # the [V, E] embedding and the decoder's own [V] bias
    else:
        assert len(big) == 1  # the embedding; no [E, 1000 + 2] head of its own
        # nor tails: only their [size] biases
        assert not [t for t in initializers
                    if len(t.dims) > 1 and {1002, 2000, 5000} & set(t.dims)]


def test_external_data_path_gives_the_same_model(exported, text, tmp_path):
    config = exported["config"]
    bundle = export_run(exported["run"], tmp_path / "bundle", external_data=True)
    assert json.loads((bundle / "bundle.json").read_text())["external_data"] == ["model.onnx.data"]
    data_bytes = (bundle / "model.onnx.data").stat().st_size
    assert 0.9 < data_bytes / (4 * config.num_parameters()) < 1.1  # tied weights stored once
    onnx.checker.check_model(str(bundle / "model.onnx"), full_check=True)
    stream = columns(text[1], 2, CHUNK)
    args = (stream[:, :-1], stream[:, 1:], zero_state(config, 2))
    got, _, _ = onnx_call(session(bundle / "model.onnx"), config, *args)
    want, _, _ = onnx_call(exported["session"], config, *args)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("name", "external"), [("tied-2layers", False),
                                                 ("tied-2layers", True),
                                                 ("adaptive-tied-2layers", False),
                                                 ("awd-tied-3layers", False)])
def test_quantize_int8_reports_its_effect(text, tmp_path, capsys, name, external):
    vocab, ids = text
    config = CONFIGS[name]
    run = make_run(tmp_path / "run", config, vocab, seed=2, valid_path=WIKITEXT_VALID)
    flags = ["--quantize", "int8"] + (["--external-data"] if external else [])
    assert main([str(run.path), "--out", str(tmp_path / "bundle"), *flags]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "wiki.valid.tokens" in printed
    info = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    measured = info["quantization"]["measured"]
    assert measured["sample_tokens"] == 400
    assert abs(measured["perplexity_int8"] / measured["perplexity_fp32"] - 1) < 0.2
    model = onnx.load(tmp_path / "bundle" / "model.onnx")
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= {n.op_type for n in model.graph.node}
    meta = contract.BundleMeta.from_dict(info)
    assert (meta.inputs, meta.outputs) == graph.describe_io(model)
    stream = columns(ids, 2, CHUNK)
    logprobs, _, _ = onnx_call(session(tmp_path / "bundle" / "model.onnx"), config,
                               stream[:, :-1], stream[:, 1:], zero_state(config, 2))
    assert np.isfinite(logprobs).all() and (logprobs < 0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "run"]
    expected = ["README.md", "bundle.json", "model.onnx",
                *(["model.onnx.data"] if external else []), "vocab.json"]
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == expected
    assert info["external_data"] == (["model.onnx.data"] if external else [])


def test_defaults_export_the_newest_run_and_replace_an_old_bundle(text, tmp_path, monkeypatch,
                                                                  capsys):
    config = CONFIGS["untied-1layer"]
    make_run(tmp_path / "runs" / "older", config, text[0], seed=3)
    make_run(tmp_path / "runs" / "newer", config, text[0], seed=4)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundles" / "newer").mkdir(parents=True)
    (tmp_path / "bundles" / "newer" / "bundle.json").write_text("{}")  # an old bundle
    assert main([]) == 0
    info = json.loads((tmp_path / "bundles" / "newer" / "bundle.json").read_text())
    assert info["source_run"]["name"] == "newer"
    assert [p.name for p in (tmp_path / "bundles").iterdir()] == ["newer"]  # no temp left
    assert "bundles/newer" in capsys.readouterr().out


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_missing_run_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["no-such-run"]) != 0
    assert "no-such-run" in error_line(capsys)
    assert main([]) != 0  # no runs at all
    assert "runs" in error_line(capsys)
    assert not (tmp_path / "bundles").exists()


def test_run_without_best_weights_is_one_line_error(text, tmp_path, capsys):
    run = make_run(tmp_path / "run", CONFIGS["tied-1layer"], text[0], weights=False)
    assert main([str(run.path), "--out", str(tmp_path / "bundle")]) != 0
    assert "best.weights.h5" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unwritable_output_is_one_line_error(text, tmp_path, capsys):
    run = make_run(tmp_path / "run", CONFIGS["tied-1layer"], text[0])
    (tmp_path / "file").write_text("a regular file")
    assert main([str(run.path), "--out", str(tmp_path / "file" / "bundle")]) != 0
    assert "file/bundle" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(text, tmp_path, capsys):
    run = make_run(tmp_path / "run", CONFIGS["tied-1layer"], text[0])
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert main([str(run.path), "--out", str(tmp_path / "precious")]) != 0
    assert "not a bundle" in error_line(capsys)
    assert [p.name for p in (tmp_path / "precious").iterdir()] == ["notes.txt"]


def test_bad_opset_is_one_line_error(text, tmp_path, capsys):
    run = make_run(tmp_path / "run", CONFIGS["tied-1layer"], text[0], weights=False)
    assert main([str(run.path), "--opset", "9"]) != 0
    assert "--opset" in error_line(capsys)


def test_cli_error_is_one_line_without_tensorflow_noise(tmp_path):
    """The real command: a mistake is reported before TensorFlow starts (and logs)."""
    result = subprocess.run([sys.executable, "-m", "export.to_onnx", "no-such-run"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no-such-run")
