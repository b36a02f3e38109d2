"""bench/synthetic_corpus.py: the synthetic WikiText-103 stand-in (issue 24).

The script runs as a user runs it, at a small size (20,000 train tokens, 5,000 words), fitted to
the real WikiText-2 train split, and what it writes is read back with keraslm's own WikiText
reader and vocabulary (keraslm.text, keraslm.vocab, keraslm.data: no TensorFlow).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from keraslm.data import build_vocab, resolve_paths
from keraslm.text import WIKITEXT, pipeline_for_format

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "synthetic_corpus.py"
VOCAB = 5_000
SIZES = {"train": 20_000, "valid": 3_000, "test": 2_500}
SMALL = ["--tokens", str(SIZES["train"]), "--valid-tokens", str(SIZES["valid"]),
         "--test-tokens", str(SIZES["test"]), "--vocab", str(VOCAB)]
FILES = ["wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens", "synthetic.json"]


def run(*args: str) -> subprocess.CompletedProcess:
    """The script in its own interpreter, as `python bench/synthetic_corpus.py ARGS`."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def generate(out: Path, *args: str) -> dict:
    """Write a small corpus to `out`; its synthetic.json."""
    result = run("--out", str(out), *SMALL, *args)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "synthetic.json").read_text())


def paths(folder: Path) -> dict[str, Path]:
    """The splits as the training CLI finds them: `--train/--valid/--test PATH`."""
    return resolve_paths(None, {split: str(folder / f"wiki.{split}.tokens") for split in SIZES})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "seed0"
    return out, generate(out)


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(corpus, tmp_path):
    folder, _ = corpus
    generate(tmp_path / "again")
    generate(tmp_path / "other", "--seed", "1")
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes(), name
    for name in FILES[:3]:
        assert (tmp_path / "other" / name).read_bytes() != (folder / name).read_bytes(), name


def test_keraslm_reads_the_splits_at_the_asked_sizes(corpus):
    folder, meta = corpus
    assert pipeline_for_format("tokens") == WIKITEXT  # what `--format tokens` reads them with
    for split, path in paths(folder).items():
        tokens = list(WIKITEXT.iter_tokens(path))
        assert len(tokens) == SIZES[split] == meta["splits"][split]["tokens"]
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        assert tokens.count("<eos>") == len(lines) == meta["splits"][split]["lines"]
        # WikiText's spacing, " w1 w2 ... wn \n", and no empty line.
        assert all(line.startswith(" ") and line.endswith(" \n") and "  " not in line
                   and line.strip() for line in lines)


def test_no_word_outside_the_vocabulary(corpus):
    folder, meta = corpus
    unk_rank = meta["unk_rank"]
    allowed = {f"w{r}" for r in range(1, VOCAB)} - {f"w{unk_rank}"} | {"<unk>", "<eos>"}
    assert len(allowed) == VOCAB
    files = paths(folder)
    for path in files.values():
        assert set(WIKITEXT.iter_tokens(path)) <= allowed, path
    vocab = build_vocab(files["train"], WIKITEXT)
    assert len(vocab) == meta["splits"]["train"]["keraslm_vocab"] <= VOCAB
    # The printed count of distinct train words is the reader's (<eos> is not a word).
    assert len(vocab) - 1 == meta["splits"]["train"]["distinct_words"]


def test_the_top_ranks_follow_the_fitted_law(corpus):
    folder, meta = corpus
    law = meta["law"]
    # The maximum-likelihood law of WikiText-2's train split (its file is fixed by its SHA-1).
    assert law["source_sha1"] == "863f29c46ef9d167fff4940ec821195882fe29d1"
    assert (law["s"], law["q"]) == pytest.approx((1.0714, 1.0314), abs=2e-4)
    weights = (np.arange(1, VOCAB) + law["q"]) ** -law["s"]
    p = weights / weights.sum()
    counts = Counter(WIKITEXT.iter_tokens(folder / "wiki.train.tokens"))
    words = meta["splits"]["train"]["words"]
    assert words == SIZES["train"] - counts["<eos>"]
    for rank in range(1, 21):
        word = "<unk>" if rank == meta["unk_rank"] else f"w{rank}"
        expected = words * p[rank - 1]
        # Each count is Binomial(words, p): 5 standard deviations (1 in 1.7 M per rank by
        # chance; rank 1 is ~1,700 +- 37) while a rank off by one is 10-40 % off at these ranks.
        sigma = math.sqrt(words * p[rank - 1] * (1 - p[rank - 1]))
        assert abs(counts[word] - expected) <= 5 * sigma, (rank, counts[word], expected)


def test_the_fit_recovers_a_known_law():
    spec = importlib.util.spec_from_file_location("bench_synthetic_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    true = module.Law(s=1.2, q=2.5)
    counts = np.round(1e7 * true.probabilities(20_000)).astype(np.int64)
    fitted = module.fit_law(counts)
    assert (fitted.s, fitted.q) == pytest.approx((true.s, true.q), abs=0.01)


def test_cover_puts_every_word_into_train(tmp_path):
    meta = generate(tmp_path, "--cover")
    assert len(build_vocab(tmp_path / "wiki.train.tokens", WIKITEXT)) == VOCAB
    assert meta["splits"]["train"]["keraslm_vocab"] == VOCAB


@pytest.mark.parametrize("args", [["--tokens", "0"], ["--tokens", "many"], ["--vocab", "2"],
                                  ["--vocab", "20000000"], ["--valid-tokens", "1"],
                                  ["--seed", "-1"], ["--no-such-flag"]])
def test_a_bad_flag_is_one_error_line(tmp_path, args):
    result = run("--out", str(tmp_path / "out"), *args)
    assert result.returncode != 0
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_is_one_error_line(tmp_path):
    (tmp_path / "file").write_text("in the way\n")
    result = run("--out", str(tmp_path / "file" / "corpus"), *SMALL)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot write to") and \
        result.stderr.count("\n") == 1, result.stderr
