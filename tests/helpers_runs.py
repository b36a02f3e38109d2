"""Tiny training runs made without training, and the bundles exported from them: what tests of
export and serving start from. Plain functions; the fixtures built on them are in conftest.py.

A run made here has the layout the trainer writes (config.json, vocab.json, best.weights.h5) with
random weights. Every weight, biases included, is drawn from U(-0.5, 0.5) so that a wrong gate
order, a dropped bias or a mis-tied decoder would change the scores.

Importing this module does not import TensorFlow (serve-only test sessions stay free of it):
`make_run` and `make_bundle` import it when called, and `build_bundle` calls `make_bundle` in a
child process when this one has no TensorFlow yet.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from keraslm.config import LMConfig
from keraslm.corpora import data_root
from keraslm.rundir import RunDir
from keraslm.text import TextPipeline
from keraslm.vocab import Vocab

DATA_ROOT = data_root()  # $KERASLM_DATA, which conftest.py sets
WIKITEXT_VALID = DATA_ROOT / "wikitext-2" / "wiki.valid.tokens"
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def wikitext_tokens(count: int, path: Path = WIKITEXT_VALID) -> list[str]:
    """The first `count` tokens of a WikiText file, as the default pipeline reads them."""
    return list(itertools.islice(TextPipeline().iter_tokens(path), count))


def make_run(path: Path, config: LMConfig, vocab: Vocab, *, seed: int = 0,
             weights: bool = True, valid_path: Path | None = None) -> RunDir:
    """A run folder at `path` for a model of `config` with random weights (none if not `weights`).

    `valid_path` is recorded as the run's validation corpus, like the trainer does.
    """
    if len(vocab) != config.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} tokens, config says {config.vocab_size}")
    run = RunDir(path).create()
    corpora = {"valid": {"path": str(valid_path)}} if valid_path else {}
    run.write_config({
        "model": config.to_dict(),
        "pipeline": TextPipeline().to_dict(),
        "train": {"optim": {"seed": seed}},
        "corpora": corpora,
        "command": ["tests/helpers_runs.py"],
        "versions": {},
    })
    vocab.save(run.vocab_path)
    if weights:
        from keraslm.model import build_model  # TensorFlow

        model = build_model(config, seed=seed)
        rng = np.random.default_rng(seed)
        model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32)
                           for w in model.get_weights()])
        model.save_weights(run.best_weights_path)
    return run


def wikitext_slices(folder: Path, sizes: dict[str, int], data_root: Path = DATA_ROOT
                    ) -> dict[str, Path]:
    """Small real corpus files: the first whole lines (about `sizes[split]` characters) of each
    WikiText-2 split, written under `folder`."""
    paths = {}
    for split, size in sizes.items():
        text = (data_root / "wikitext-2" / f"wiki.{split}.tokens").read_text(encoding="utf-8")
        paths[split] = folder / f"{split}.txt"
        paths[split].write_text(text[: text.index("\n", size) + 1], encoding="utf-8")
    return paths


def tiny_run_args(corpus: dict[str, Path], runs: Path, name: str, *extra: str) -> list[str]:
    """`keraslm.train` arguments for a tiny run named `name` under `runs` on `corpus`'s splits:
    2 layers of 8 units, batches of 4 columns by 8 steps, seed 3, quiet; then `extra`."""
    return ["--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
            "--test", str(corpus["test"]), "--emsize", "8", "--nhid", "8", "--nlayers", "2",
            "--batch-size", "4", "--bptt", "8", "--eval-batch-size", "4",
            "--test-batch-size", "4", "--seed", "3", "--runs-dir", str(runs), "--name", name,
            "--quiet", "--log-interval", "0", *extra]


# ---- bundles -------------------------------------------------------------------------------------

class TinyBundle(NamedTuple):
    run: Path
    bundle: Path


# The adaptive tiny bundle's output layer: a head of 20 words and 2 clusters, tails of 60 and
# 122 words projected to 8 and 4 units.
ADAPTIVE = {"softmax": "adaptive", "cutoffs": [20, 80], "div_value": 2.0}


def make_bundle(root: Path, name: str = "tiny", *, seed: int = 0, words: int = 3000,
                vocab: int = 200, size: int = 16, nlayers: int = 2, **output) -> TinyBundle:
    """A run with random weights under root/runs/<name>, exported to root/bundles/<name>: an
    LSTM of `nlayers` x `size` over the `vocab` most frequent of the first `words` WikiText-2
    valid tokens (plus <unk> and <eos>), tied; `output` the output layer's LMConfig fields
    (e.g. ADAPTIVE). The defaults make the tiny bundle: 2x16, 202 tokens, a full softmax."""
    from export.to_onnx import export_run  # TensorFlow

    built = Vocab.build(wikitext_tokens(words), max_size=vocab)
    config = LMConfig(vocab_size=len(built), emsize=size, nhid=size, nlayers=nlayers,
                      dropout=0.0, **output)
    run = make_run(root / "runs" / name, config, built, seed=seed)
    return TinyBundle(run.path, Path(export_run(run, root / "bundles" / name)))


_CHILD = """
import json, sys
from pathlib import Path
from helpers_runs import make_bundle
print(json.dumps([str(p) for p in make_bundle(Path(sys.argv[1]), **json.loads(sys.argv[2]))]))
"""


def build_bundle(root: Path, name: str = "tiny", **options) -> TinyBundle:
    """`make_bundle(root, name, **options)`, in this process if it has TensorFlow already, else in
    a child process, so that a session of serve tests never loads TensorFlow itself."""
    if "tensorflow" in sys.modules:
        return make_bundle(root, name, **options)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(TESTS), str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", _CHILD, str(root), json.dumps(
        {"name": name, **options})], capture_output=True, text=True, env=env, timeout=600,
        check=False)
    if child.returncode != 0:
        raise RuntimeError(f"building the {name} bundle failed:\n{child.stderr[-4000:]}")
    run, bundle = json.loads(child.stdout.strip().splitlines()[-1])
    return TinyBundle(Path(run), Path(bundle))


def edit_json(path: Path, edit) -> None:
    """Rewrite the JSON file at `path` after `edit(data)` changed it in place."""
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")
