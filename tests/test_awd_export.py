"""A run trained with every AWD-LSTM regulariser exports to native ONNX LSTM ops with no weight
or embedding dropout in the graph, and its bundle scores exactly what `keraslm.evaluate` does.
A run of the whole recipe (variable-length BPTT, the step schedule, every regulariser, then a
fine-tune with NT-ASGD) exports its average: the bundle, its int8 twin and the cache score it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers_resume import saved_arrays
from helpers_runs import tiny_run_args, wikitext_slices
from test_awd_regularisers import ALL_FLAGS
from test_cache import SETTINGS

from export.to_onnx import export_run
from keraslm import train as train_cli
from keraslm.evaluation import evaluate_run
from serve.scorer import Scorer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_an_awd_run_exports_native_lstms_and_scores_as_keraslm_evaluate(tmp_path, data_root):
    corpus = wikitext_slices(tmp_path, {"train": 20_000, "valid": 6_000, "test": 3_000},
                             data_root)
    runs = tmp_path / "runs"
    assert train_cli.main([
        "--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
        "--test", str(corpus["test"]), "--emsize", "12", "--nhid", "12", "--nlayers", "3",
        "--batch-size", "4", "--bptt", "10", "--epochs", "1", "--lr", "10",
        "--eval-batch-size", "4", "--test-batch-size", "4", "--runs-dir", str(runs),
        "--name", "awd", "--quiet", "--log-interval", "0", *ALL_FLAGS]) == 0
    bundle = export_run(runs / "awd", tmp_path / "bundle")
    ops = [node.op_type for node in onnx.load(bundle / "model.onnx").graph.node]
    assert ops.count("LSTM") == 3 and "Loop" not in ops and "Scan" not in ops
    assert not {"RandomUniform", "RandomUniformLike", "Dropout"} & set(ops)
    model = json.loads((bundle / "bundle.json").read_text())["model"]
    assert (model["weight_dropout"], model["dropout_e"], model["dropout_h"]) == (0.4, 0.2, 0.2)

    expected = evaluate_run(runs / "awd", str(corpus["valid"]), batch_size=4, bptt=10)
    got = Scorer(bundle, batch_size=4, bptt=10).score_file(corpus["valid"])
    assert got.num_tokens == expected.num_tokens > 1000
    assert got.perplexity == pytest.approx(expected.perplexity, rel=1e-4)


def test_the_whole_recipe_exports_its_average_and_int8_and_the_cache_score_it(tmp_path,
                                                                              data_root):
    corpus = wikitext_slices(tmp_path, {"train": 12_000, "valid": 4_000, "test": 3_000},
                             data_root)
    runs, recipe = tmp_path / "runs", ["--variable-bptt", "--lr-update-interval", "1", *ALL_FLAGS]
    assert train_cli.main(tiny_run_args(corpus, runs, "base", "--emsize", "8", "--nhid", "16",
                                        "--nlayers", "3", "--last-layer-emsize", "--lr", "20",
                                        "--epochs", "2", *recipe)) == 0
    assert train_cli.main(tiny_run_args(corpus, runs, "tuned", "--finetune-from", "base",
                                        "--lr", "5", "--epochs", "1", "--ntasgd", *recipe)) == 0
    record = json.loads((runs / "tuned" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["averaged"] and record["best"]
    saved = saved_arrays(runs / "tuned")
    assert int(saved["average_steps"]) > 10

    bundle = export_run(runs / "tuned", tmp_path / "bundle")
    initializers = {t.name: onnx.numpy_helper.to_array(t)
                    for t in onnx.load(bundle / "model.onnx").graph.initializer}
    embedding = saved["average_0"]  # the tied embedding, as averaged
    assert embedding.shape[1] == 8 and any(
        a.shape == embedding.shape and np.array_equal(a, embedding) for a in initializers.values())
    assert not any(a.shape == embedding.shape and np.array_equal(a, saved["weight_0"])
                   for a in initializers.values())  # not the weights training went on from
    fp32 = Scorer(bundle, batch_size=4, bptt=8).score_file(corpus["valid"])
    assert fp32.perplexity == pytest.approx(record["val_ppl"], rel=1e-4)

    int8 = Scorer(export_run(runs / "tuned", tmp_path / "int8", quantize="int8"),
                  batch_size=4, bptt=8).score_file(corpus["valid"])
    assert int8.num_tokens == fp32.num_tokens
    assert int8.perplexity == pytest.approx(fp32.perplexity, rel=0.1)

    cached = Scorer(bundle, batch_size=4, bptt=8, cache=SETTINGS).score_file(corpus["valid"])
    assert cached.num_tokens == fp32.num_tokens
    assert cached.perplexity < fp32.perplexity  # WikiText repeats its words: the cache helps
