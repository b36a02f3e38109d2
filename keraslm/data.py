"""From corpus names or files to encoded id streams: the glue of corpora, text and vocab."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keraslm import corpora
from keraslm.errors import UserError
from keraslm.text import TextPipeline
from keraslm.vocab import Vocab

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class EncodedSplit:
    """One split as ids, with where it came from."""

    name: str
    path: Path
    ids: np.ndarray
    num_oov: int  # tokens not in the vocabulary, mapped to <unk>

    @property
    def num_tokens(self) -> int:
        return int(self.ids.size)


def corpus_format(corpus: str | None, fmt: str | None = None) -> str | None:
    """The text format to read `corpus` as: `fmt` when given, else the named corpus's, else None
    (your own files: `keraslm.text.pipeline_for_format` decides)."""
    if fmt is not None:
        return fmt
    return corpora.get_corpus(corpus).format if corpus in corpora.CORPORA else None


def resolve_paths(corpus: str | None, overrides: dict[str, str | None],
                  root: str | os.PathLike | None = None,
                  splits: tuple[str, ...] = SPLITS) -> dict[str, Path]:
    """Paths of the splits: explicit files win, the rest come from the named corpus."""
    paths = {}
    for split in splits:
        spec = overrides.get(split) or corpus
        if spec is None:
            raise UserError(f"no {split} data: give --corpus NAME or --{split} PATH")
        paths[split] = corpora.resolve_split(spec, split, root)
    return paths


def build_vocab(path: Path, pipeline: TextPipeline, min_freq: int = 1,
                max_size: int | None = None) -> Vocab:
    """A vocabulary counted from the training file."""
    vocab = Vocab.build(pipeline.iter_tokens(path), min_freq=min_freq, max_size=max_size)
    if len(vocab) <= 2:
        raise UserError(f"{path}: no tokens to build a vocabulary from")
    return vocab


def encode_file(name: str, path: Path, pipeline: TextPipeline, vocab: Vocab) -> EncodedSplit:
    """Encode a whole file to an int32 id stream, counting out-of-vocabulary tokens."""
    ids, num_oov = vocab.encode(pipeline.iter_tokens(path), return_oov=True)
    if ids.size == 0:
        raise UserError(f"{path}: no tokens (empty file?)")
    return EncodedSplit(name, Path(path), ids, int(num_oov))
