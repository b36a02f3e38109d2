"""Tiny training runs made without training: what tests of export and serving start from.

A run made here has the layout the trainer writes (config.json, vocab.json, best.weights.h5) with
random weights. Every weight, biases included, is drawn from U(-0.5, 0.5) so that a wrong gate
order, a dropped bias or a mis-tied decoder would change the scores.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from keraslm.model import LMConfig, build_model
from keraslm.rundir import RunDir
from keraslm.text import TextPipeline
from keraslm.vocab import Vocab

DATA_ROOT = Path(os.environ.get("KERASLM_DATA", "/work/shared/data"))
WIKITEXT_VALID = DATA_ROOT / "wikitext-2" / "wiki.valid.tokens"


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
