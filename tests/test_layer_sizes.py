"""Per-layer LSTM widths, end to end, on GluonNLP's AWDRNN shape in small: 3 tied layers of 16,
16 and 8 units, the last as wide as the embedding. The config and its parameter count, training
on 1 and 2 replicas, a resume bit for bit, export to native ONNX LSTMs that score what
`keraslm.evaluate` does, int8, the continuous cache and row batches on such a bundle, and
bundles written before `layer_sizes` still loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers_resume import saved_arrays
from helpers_runs import edit_json, tiny_run_args, wikitext_slices
from test_awd_regularisers import ALL_FLAGS, EVERYTHING, StopAfter, train_steps
from test_cache import SETTINGS, reference_logprobs

from export.to_onnx import export_run
from keraslm import train as train_cli
from keraslm.config import LMConfig
from keraslm.contract import BUNDLE_FILE, BundleError
from keraslm.errors import UserError
from keraslm.evaluation import evaluate_run
from keraslm.model import build_model, split_decoder
from keraslm.text import TextPipeline
from keraslm.training import checkpoint
from keraslm.training.devices import make_strategy
from keraslm.training.loop import EpochLoop
from keraslm.training.setup import build, prepare
from keraslm.training.signals import Stopped
from serve.bundle import load_bundle
from serve.scorer import Scorer
from serve.session import ModelSession

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

AWD_SHAPE = {"emsize": 8, "nhid": 16, "nlayers": 3, "last_layer_emsize": True}  # tied: 16/16/8
AWD_FLAGS = ["--emsize", "8", "--nhid", "16", "--nlayers", "3", "--last-layer-emsize"]
STATE_SIZES = [16, 16, 16, 16, 8, 8]


# ---- the config ---------------------------------------------------------------------------------

def test_the_last_layer_is_as_wide_as_the_embedding_only_when_tied_and_asked():
    awd = LMConfig(100, **AWD_SHAPE)
    assert (awd.layer_sizes(), awd.output_size(), awd.state_sizes()) == ((16, 16, 8), 8,
                                                                          STATE_SIZES)
    assert LMConfig(100, **AWD_SHAPE, tied=False).layer_sizes() == (16, 16, 16)  # as GluonNLP
    assert LMConfig(100, emsize=16, nhid=16, nlayers=2).layer_sizes() == (16, 16)
    assert LMConfig(100, emsize=8, nhid=16, nlayers=1, last_layer_emsize=True
                    ).layer_sizes() == (8,)
    with pytest.raises(UserError, match="tied embeddings need --emsize == --nhid"):
        LMConfig(100, emsize=8, nhid=16, nlayers=3)
    # the adaptive softmax's tails project the last layer's 8 units, not nhid's 16
    LMConfig(100, emsize=16, nhid=16, nlayers=3, softmax="adaptive", cutoffs=(20, 50),
             div_value=4.0)
    with pytest.raises(UserError, match="would project 8 units to none"):
        LMConfig(100, **AWD_SHAPE, softmax="adaptive", cutoffs=(20, 50), div_value=4.0)


def test_a_config_saved_before_layer_sizes_loads_with_every_layer_nhid_wide():
    saved = LMConfig(100, emsize=16, nhid=16, nlayers=3).to_dict()
    del saved["last_layer_emsize"]
    config = LMConfig.from_dict(saved)
    assert not config.last_layer_emsize and config.layer_sizes() == (16, 16, 16)
    assert LMConfig.from_dict(LMConfig(100, **AWD_SHAPE).to_dict()).layer_sizes() == (16, 16, 8)


@pytest.mark.parametrize("extra", [{}, {"tied": False}, {"two_biases": True},
                                   {"softmax": "adaptive", "cutoffs": (20, 60), "div_value": 2.0},
                                   {"softmax": "adaptive", "cutoffs": (20, 60), "tied": False}],
                         ids=["tied", "untied", "two-biases", "adaptive", "adaptive-untied"])
def test_the_model_has_the_layer_widths_and_the_parameters_the_config_counts(extra):
    config = LMConfig(100, **AWD_SHAPE, **extra)
    model = build_model(config, seed=0)
    assert [model.get_layer(f"lstm{i}").units for i in range(3)] == list(config.layer_sizes())
    assert [int(s.shape[-1]) for s in model.inputs[2:]] == config.state_sizes()
    assert split_decoder(model)[0].outputs[0].shape[-1] == config.output_size()
    assert model.count_params() == config.num_parameters()


# ---- training -----------------------------------------------------------------------------------

def _train(replicas: int):
    config = LMConfig(vocab_size=60, **AWD_SHAPE, two_biases=True, **EVERYTHING)
    return train_steps(config, replicas, steps=5)


def test_two_replicas_train_as_one_with_layers_of_different_widths():
    one_losses, one_weights, one_state = _train(1)
    two_losses, two_weights, two_state = _train(2)
    assert [s.shape for s in one_state] == [(8, size) for size in STATE_SIZES]
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    for a, b in zip((*one_weights, *one_state), (*two_weights, *two_state)):
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert np.ptp(one_losses) > 1e-3 and np.abs(one_state[-1]).max() > 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> dict[str, Path]:
    return wikitext_slices(tmp_path_factory.mktemp("corpus"),
                           {"train": 8_000, "valid": 3_000, "test": 3_000}, data_root)


def _args(corpus, runs: Path, name: str) -> list[str]:
    return tiny_run_args(corpus, runs, name, *AWD_FLAGS, "--epochs", "2", "--lr", "10", *ALL_FLAGS)


@pytest.fixture(scope="module")
def awd_run(corpus, tmp_path_factory) -> Path:
    """A run of the 16/16/8 model trained 2 epochs with every AWD regulariser."""
    runs = tmp_path_factory.mktemp("runs")
    assert train_cli.main(_args(corpus, runs, "whole")) == 0
    return runs / "whole"


def test_a_run_stopped_mid_epoch_resumes_bit_for_bit(awd_run, corpus):
    runs = awd_run.parent
    config = train_cli.config_from_argv(_args(corpus, runs, "stopped"))
    with pytest.raises(Stopped):
        EpochLoop(build(prepare(config), make_strategy()), StopAfter(10)).run()
    stopped = checkpoint.read_arrays(runs / "stopped" / "checkpoint" / checkpoint.CHECKPOINT_FILE)
    assert [stopped[f"state_{i}"].shape for i in range(6)] == [(4, s) for s in STATE_SIZES]
    assert train_cli.main(["--resume", "stopped", "--runs-dir", str(runs)]) == 0
    whole, resumed = saved_arrays(awd_run), saved_arrays(runs / "stopped")
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)
    model = json.loads((awd_run / "config.json").read_text())["model"]
    assert (model["nhid"], model["emsize"], model["last_layer_emsize"]) == (16, 8, True)


# ---- export and serving -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def awd_bundle(awd_run, tmp_path_factory) -> Path:
    return export_run(awd_run, tmp_path_factory.mktemp("bundles") / "awd")


def test_the_bundle_has_native_lstms_and_each_state_its_layers_width(awd_bundle):
    ops = [node.op_type for node in onnx.load(awd_bundle / "model.onnx").graph.node]
    assert ops.count("LSTM") == 3 and "Loop" not in ops and "Scan" not in ops
    info = json.loads((awd_bundle / BUNDLE_FILE).read_text())
    assert info["layer_sizes"] == [16, 16, 8]
    shapes = {v["name"]: v["shape"][-1] for v in info["inputs"] + info["outputs"]}
    assert [shapes[n] for n in ("h0", "c1", "h2", "c2_out", "hidden")] == [16, 16, 8, 8, 8]
    bundle = load_bundle(awd_bundle)
    assert (bundle.session.state_sizes, bundle.hidden_size, bundle.nhid) == (STATE_SIZES, 8, 16)
    assert ModelSession(awd_bundle / "model.onnx").state_sizes == STATE_SIZES  # from the graph
    assert "| hidden size | 16 / 16 / 8 |" in (awd_bundle / "README.md").read_text()  # the card


def test_the_bundle_scores_what_keraslm_evaluate_does(awd_run, awd_bundle, corpus):
    expected = evaluate_run(awd_run, str(corpus["valid"]), batch_size=4, bptt=10)
    got = Scorer(awd_bundle, batch_size=4, bptt=10).score_file(corpus["valid"])
    assert got.num_tokens == expected.num_tokens > 500
    assert got.perplexity == pytest.approx(expected.perplexity, rel=1e-4)


def test_int8_quantizes_the_three_lstms_and_scores_close_to_float32(awd_run, awd_bundle,
                                                                   corpus, tmp_path):
    bundle = export_run(awd_run, tmp_path / "int8", quantize="int8")
    ops = {node.op_type for node in onnx.load(bundle / "model.onnx").graph.node}
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= ops
    int8 = Scorer(bundle, batch_size=4, bptt=10).score_file(corpus["valid"])
    fp32 = Scorer(awd_bundle, batch_size=4, bptt=10).score_file(corpus["valid"])
    assert int8.num_tokens == fp32.num_tokens
    assert int8.perplexity == pytest.approx(fp32.perplexity, rel=0.1)


def test_the_cache_keys_are_the_last_layers_output(awd_bundle, corpus):
    """The cache on the 8-unit last layer equals the definition token by token, helps, and
    texts scored together in row batches score as each alone."""
    cached = Scorer(awd_bundle, device="cpu", threads=1, batch_size=1, bptt=7, cache=SETTINGS)
    ids = cached.vocab.encode(TextPipeline().iter_tokens(corpus["valid"]))[:400]
    path = corpus["valid"].parent / "awd_short.tokens"
    path.write_text(" ".join(cached.vocab.decode(ids)) + "\n", encoding="utf-8")
    ids = cached.vocab.encode(TextPipeline().iter_tokens(path))
    tokens, targets = ids[None, :-1].astype(np.int32), ids[None, 1:].astype(np.int32)
    model, _, hidden = cached.step_hidden(tokens, targets, cached.zero_state(1))
    assert hidden.shape == (1, targets.size, 8)
    want = reference_logprobs(hidden[0].astype(np.float64), targets[0], model[0], SETTINGS)
    result = cached.score_file(path, batch_size=1, bptt=7)
    assert result.num_tokens == targets.size
    assert result.nll_sum == pytest.approx(-want.sum(), rel=1e-6)
    assert -want.sum() != pytest.approx(-model.sum(dtype=np.float64), rel=1e-4)
    texts = ["the game began in 1998 . the game began in 1998 .", "one", "a b c a b c a b"]
    together = cached.score(texts)
    alone = [cached.score([t])[0] for t in texts]
    np.testing.assert_allclose([s.log_likelihood for s in together],
                               [s.log_likelihood for s in alone], rtol=1e-6)


def test_a_bundle_without_layer_sizes_loads_as_layers_of_nhid(bundle_copy):
    before = load_bundle(bundle_copy)
    edit_json(bundle_copy / BUNDLE_FILE, lambda d: d.pop("layer_sizes"))
    old = load_bundle(bundle_copy)
    assert old.meta.layer_sizes == before.meta.layer_sizes == (16, 16)
    assert old.session.state_sizes == [16] * 4 and old.hidden_size == 16
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_array_equal(old.session.step(ids, ids, old.session.zero_state(2))[0],
                                  before.session.step(ids, ids, before.session.zero_state(2))[0])


@pytest.mark.parametrize(("sizes", "message"), [
    ([16, 16, 16], "state h2 has size 8 but bundle.json says LSTM layer 2 has nhid 16"),
    ([16, 8, 8], "state h1 has size 16 but bundle.json says LSTM layer 1 has 8 units"),
    ([16, 16], "'layer_sizes' is not a list of 3 sizes"),
    ([16, 16, 0], "'layer_sizes' is not a list of 3 sizes"),
])
def test_layer_sizes_that_disagree_with_the_graph_are_refused(awd_bundle, tmp_path, sizes,
                                                              message):
    copy = Path(shutil.copytree(awd_bundle, tmp_path / "bundle"))
    edit_json(copy / BUNDLE_FILE, lambda d: d.update(layer_sizes=sizes))
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)
