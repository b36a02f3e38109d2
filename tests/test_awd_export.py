"""A run trained with every AWD-LSTM regulariser exports to native ONNX LSTM ops with no weight
or embedding dropout in the graph, and its bundle scores exactly what `keraslm.evaluate` does."""

from __future__ import annotations

import json

import onnx
import pytest
from helpers_runs import wikitext_slices
from test_awd_regularisers import ALL_FLAGS

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
