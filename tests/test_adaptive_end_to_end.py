"""`--softmax adaptive` end to end, through the real CLIs: it trains on two replicas with clipping,
dropout and two biases, records itself in config.json, resumes bit for bit after a SIGTERM,
fine-tunes, evaluates as its exported bundle scores, and serves (HTTP score, generate, the page).

One small model is trained once (two epochs on WikiText-2 slices, cutoffs 40 and 400 over its
~1,500 words) and exported once; each test takes what it needs of that run. The same things on
the full softmax are the tests of test_training.py, test_interrupt.py, test_end_to_end.py and
test_server.py; the serving tests that run on both softmaxes use conftest's `each_bundle`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_runs import REPO, wikitext_slices
from helpers_server import serving

from export.to_onnx import export_run
from keraslm import evaluate as evaluate_cli
from keraslm import train as train_cli
from keraslm.config import LMConfig
from keraslm.evaluation import evaluate_run
from keraslm.runs import load_run_model
from keraslm.training import checkpoint, loop
from serve import score as score_cli
from serve.scorer import Scorer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ADAPTIVE = ("--softmax", "adaptive", "--cutoffs", "40,400", "--div-value", "2")
STOP_AT = (2, 5)  # (epoch, batch) after which the interrupted run gets its SIGTERM


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> dict[str, Path]:
    return wikitext_slices(tmp_path_factory.mktemp("corpus"),
                           {"train": 25_000, "valid": 6_000, "test": 3_000}, data_root)


def common_args(corpus, runs: Path, name: str) -> list[str]:
    """Two epochs of 12 batches on two replicas, with dropout, clipping and two biases."""
    return ["--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
            "--test", str(corpus["test"]), "--emsize", "16", "--nhid", "16", "--batch-size", "8",
            "--bptt", "10", "--eval-batch-size", "4", "--test-batch-size", "4", "--epochs", "2",
            "--lr", "5", "--clip", "0.25", "--dropout", "0.2", "--two-biases", "--seed", "5",
            "--cpu-replicas", "2", "--max-batches", "12", "--runs-dir", str(runs), "--name",
            name, "--quiet", "--log-interval", "0"]


def train_args(corpus, runs: Path, name: str, *extra: str) -> list[str]:
    return [*common_args(corpus, runs, name), *ADAPTIVE, *extra]


def read_losses(path: Path) -> dict[tuple[int, int], dict]:
    return {(r["epoch"], r["batch"]): r for r in map(json.loads, path.read_text().splitlines())}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict:
    """The uninterrupted run, its per-step losses, and its bundle."""
    root = tmp_path_factory.mktemp("adaptive")
    losses = root / "losses.jsonl"
    assert train_cli.main(train_args(corpus, root / "runs", "ref", "--log-losses",
                                     str(losses))) == 0
    run = root / "runs" / "ref"
    steps = read_losses(losses)
    norms = [r["grad_norm"] for r in steps.values()]
    assert min(norms) < 0.25 < max(norms), "some steps must be clipped and some not"
    return {"run": run, "losses": steps, "bundle": export_run(run, root / "bundles" / "ref")}


def test_config_json_records_the_output_layer_and_counts_its_parameters(trained):
    config = json.loads((trained["run"] / "config.json").read_text())
    model = config["model"]
    assert (model["softmax"], model["cutoffs"], model["div_value"]) == ("adaptive", [40, 400], 2.0)
    assert " ".join(ADAPTIVE) in " ".join(config["command"])
    keras_model, lm = load_run_model(trained["run"])
    assert lm == LMConfig.from_dict(model)
    assert lm.num_parameters() == keras_model.count_params()
    bundle = json.loads((trained["bundle"] / "bundle.json").read_text())
    assert bundle["model"] == model
    card = (trained["bundle"] / "README.md").read_text()
    assert f"| parameters | {lm.num_parameters():,} |" in card
    assert "| output layer | adaptive softmax: cutoffs 40, 400; div_value 2 |" in card


def test_a_run_stopped_by_sigterm_resumes_bit_for_bit(corpus, trained, tmp_path, monkeypatch):
    """SIGTERM mid-epoch (after the lr may have decayed), then --resume: every step's loss,
    learning rate and gradient norm, every epoch's record and the final checkpoint are the
    uninterrupted run's, exactly."""
    logged = loop.append_line

    def sigterm_after_the_step(path, record):
        logged(path, record)
        if (record["epoch"], record["batch"]) == STOP_AT:
            # the trainer's handler only records the request (else this would end pytest)
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            signal.raise_signal(signal.SIGTERM)

    runs, first, second = tmp_path / "runs", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    monkeypatch.setattr(loop, "append_line", sigterm_after_the_step)
    assert train_cli.main(train_args(corpus, runs, "run", "--log-losses", str(first))) == 143
    monkeypatch.undo()
    saved = checkpoint.read_progress(runs / "run" / "checkpoint" / checkpoint.CHECKPOINT_FILE)
    assert (saved.epoch + 1, saved.batch) == STOP_AT
    assert train_cli.main(["--resume", "run", "--runs-dir", str(runs),
                           "--log-losses", str(second)]) == 0
    assert min(read_losses(second)) == (STOP_AT[0], STOP_AT[1] + 1)
    assert {**read_losses(first), **read_losses(second)} == trained["losses"]
    for got, want in zip(metrics(runs / "run"), metrics(trained["run"]), strict=True):
        for key in ("epoch", "lr", "train_ppl", "val_ppl", "test_ppl", "best"):
            assert got.get(key) == want.get(key), (got["epoch"], key)
    with (np.load(runs / "run" / "checkpoint" / checkpoint.CHECKPOINT_FILE) as got,
          np.load(trained["run"] / "checkpoint" / checkpoint.CHECKPOINT_FILE) as want):
        arrays = [k for k in want.files if k != "progress"]
        assert sorted(got.files) == sorted(want.files)
        for key in arrays:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_finetuning_keeps_the_output_layer_and_starts_from_its_weights(corpus, trained,
                                                                       tmp_path):
    """A fine-tune (no --softmax given) has the source run's output layer and vocabulary; a few
    batches on the validation text lower its perplexity below the source's, which a model
    that did not start from the source's weights could not."""
    runs = trained["run"].parent
    base = evaluate_run(trained["run"], str(corpus["valid"]), batch_size=4, bptt=10)
    args = ["--finetune-from", str(trained["run"]), "--runs-dir", str(tmp_path), "--name", "ft",
            "--train", str(corpus["valid"]), "--valid", str(corpus["valid"]),
            "--test", str(corpus["test"]), "--epochs", "1", "--lr", "2", "--batch-size", "4",
            "--bptt", "10", "--eval-batch-size", "4", "--test-batch-size", "4",
            "--max-batches", "20", "--quiet", "--log-interval", "0"]
    assert train_cli.main(args) == 0
    tuned = tmp_path / "ft"
    config = json.loads((tuned / "config.json").read_text())
    assert config["model"] == json.loads((trained["run"] / "config.json").read_text())["model"]
    assert (tuned / "vocab.json").read_bytes() == (runs / "ref" / "vocab.json").read_bytes()
    after = evaluate_run(tuned, str(corpus["valid"]), batch_size=4, bptt=10)
    assert after.num_tokens == base.num_tokens
    assert after.perplexity < base.perplexity


def test_keraslm_evaluate_equals_the_bundles_scorer(corpus, trained, capsys):
    """`keraslm.evaluate` (TensorFlow, the training loss) and `serve/score.py` (onnxruntime,
    the exported graph) give the same perplexity, which is also the run's own validation
    figure for its best epoch."""
    run, valid = trained["run"], str(corpus["valid"])
    capsys.readouterr()
    assert evaluate_cli.main([run.name, "--runs-dir", str(run.parent), "--corpus", valid,
                              "--batch-size", "4", "--bptt", "10", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert score_cli.main([valid, "--model", str(trained["bundle"]), "--batch-size", "4",
                           "--bptt", "10", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["num_tokens"] == evaluated["num_tokens"] > 1000
    assert scored["perplexity"] == pytest.approx(evaluated["perplexity"], rel=1e-4)
    best = min(metrics(run), key=lambda r: r["val_ppl"])
    assert evaluated["perplexity"] == pytest.approx(best["val_ppl"], rel=1e-5)
    assert evaluated["perplexity"] < 1000  # it learned something


def test_the_service_scores_generates_and_shows_the_page(trained, tmp_path):
    texts = ["the game began in 1998 .", "", "a longer text with words like zyzzyva . " * 5]
    with serving(tmp_path, trained["bundle"]) as server:
        results = server.score(texts)
        greedy = [server.post("/v1/generate", json={"prompt": "the game", "tokens": 8,
                                                    "temperature": 0}) for _ in range(2)]
        page = server.get("/")
    expected = Scorer(trained["bundle"], device="cpu", threads=1).score(texts)
    for got, want in zip(results, expected, strict=True):
        assert got["num_tokens"] == want.num_tokens
        assert got["log_likelihood"] == pytest.approx(want.log_likelihood, rel=1e-6)
    assert [g.status_code for g in greedy] == [200, 200]
    assert greedy[0].json()["tokens"] == greedy[1].json()["tokens"]
    assert len(greedy[0].json()["tokens"]) == 8
    assert page.status_code == 200 and "<html" in page.text.lower()


@pytest.mark.parametrize(("flags", "needles"), [
    (("--softmax", "adaptive", "--cutoffs", "400,40"), ["--cutoffs must increase", "400,40"]),
    (("--softmax", "adaptive", "--cutoffs", "0"), ["--cutoffs must increase", "got 0"]),
    (("--softmax", "adaptive", "--cutoffs", "99999"), ["--cutoffs must increase", "vocabulary"]),
    (("--softmax", "adaptive", "--cutoffs", "40,400", "--div-value", "8"),
     ["the last tail", "--div-value"]),
    (("--softmax", "adaptive", "--div-value", "0"), ["--div-value must be positive"]),
    (("--cutoffs", "40,400"), ["only to --softmax adaptive"]),
], ids=["decreasing", "zero", "past-the-vocabulary", "a-tail-of-no-units", "div-value-0",
        "full-softmax"])
def test_bad_cutoffs_are_one_line_errors(corpus, tmp_path, capsys, flags, needles):
    assert train_cli.main([*common_args(corpus, tmp_path / "runs", "bad"), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert all(needle in err[-1] for needle in needles), err[-1]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cutoffs_that_are_not_numbers_stop_the_command_with_one_line():
    result = subprocess.run([sys.executable, "-m", "keraslm.train", "--softmax", "adaptive",
                             "--cutoffs", "2000,ten"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --cutoffs must be comma-separated integers")
