"""Vocabulary: tokens <-> integer ids, with GluonNLP ``Vocab`` semantics and JSON I/O.

Ids: the unknown token first (id 0), then the other special tokens in the order given, then every
other token by frequency, most frequent first, ties in alphabetical (code point) order. Ids are
stable across save/load. This module never imports TensorFlow.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from keraslm.errors import UserError
from keraslm.files import read_bounded, write_text_atomic

MAX_VOCAB_JSON_BYTES = 1 << 30  # of vocab.json: far above any real vocabulary's

FORMAT = "keraslm-vocab"
VERSION = 1
_NOT_FOUND = -1  # encode's marker for tokens not in the vocabulary


class Vocab:
    """An immutable token <-> id mapping.

    ``tokens[0]`` is ``unk`` (when there is one), followed by ``specials``; ``build`` makes one
    from token counts. Unknown tokens encode to ``unk_id``.
    """

    def __init__(self, tokens: Sequence[str], unk: str | None = "<unk>",
                 specials: Sequence[str] = ("<eos>",)) -> None:
        self._tokens = tuple(tokens)
        self._unk = unk
        self._specials = tuple(specials)
        if not all(isinstance(t, str) and t for t in self._tokens):
            raise UserError("vocabulary tokens must be non-empty strings")
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        if len(self._ids) != len(self._tokens):
            dup = next(t for i, t in enumerate(self._tokens) if self._ids[t] != i)
            raise UserError(f"vocabulary has duplicate token {dup!r}")
        head = ((unk,) if unk is not None else ()) + self._specials
        if self._tokens[:len(head)] != head:
            raise UserError(f"vocabulary must start with its special tokens {list(head)}, "
                            f"got {list(self._tokens[:len(head)])}")

    @classmethod
    def build(cls, tokens_or_counter: Iterable[str] | Mapping[str, int], min_freq: int = 1,
              max_size: int | None = None, unk: str | None = "<unk>",
              specials: Sequence[str] = ("<eos>",)) -> Vocab:
        """Build a vocabulary from a token stream or token counts.

        Keeps tokens seen at least ``min_freq`` times, at most ``max_size`` of them besides the
        special tokens (``unk`` and ``specials``, which always come first and are never counted
        twice). No padding or bos token unless it is listed in ``specials``.
        """
        if min_freq < 1:
            raise UserError(f"min_freq must be at least 1, got {min_freq}")
        if max_size is not None and max_size < 0:
            raise UserError(f"max_size must be at least 0, got {max_size}")
        counts = (tokens_or_counter if isinstance(tokens_or_counter, Mapping)
                  else Counter(tokens_or_counter))
        head = ((unk,) if unk is not None else ()) + tuple(specials)
        if len(set(head)) != len(head):
            raise UserError(f"special tokens must be distinct, got {list(head)}")
        reserved = set(head)
        ranked = sorted((t for t, c in counts.items() if c >= min_freq and t not in reserved),
                        key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[:max_size]
        return cls(head + tuple(ranked), unk=unk, specials=specials)

    # --- lookups -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return (self._tokens, self._unk, self._specials) == (
            other._tokens, other._unk, other._specials)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens, unk={self._unk!r}, specials={list(self._specials)})"

    @property
    def tokens(self) -> tuple[str, ...]:
        """All tokens, in id order."""
        return self._tokens

    @property
    def unk(self) -> str | None:
        """The unknown token, or None when unknown tokens are an error."""
        return self._unk

    @property
    def specials(self) -> tuple[str, ...]:
        """The special tokens after ``unk`` (e.g. ``("<eos>",)``)."""
        return self._specials

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown token (0), or None when there is none."""
        return None if self._unk is None else 0

    def token_to_id(self, token: str) -> int:
        """The id of ``token``; ``unk_id`` for a token not in the vocabulary."""
        i = self._ids.get(token, self.unk_id)
        if i is None:
            raise UserError(f"token {token!r} is not in the vocabulary, which has no unknown token")
        return i

    def id_to_token(self, i: int) -> str:
        """The token with id ``i`` (IndexError when out of range)."""
        if not 0 <= i < len(self._tokens):
            raise IndexError(f"token id {i} out of range for a vocabulary of {len(self)} tokens")
        return self._tokens[i]

    # --- streams -----------------------------------------------------------------------------

    def encode(self, tokens: Iterable[str], return_oov: bool = False
               ) -> np.ndarray | tuple[np.ndarray, int]:
        """Map tokens (any iterable, e.g. a streaming generator) to an int32 id array.

        Tokens not in the vocabulary become ``unk_id``. With ``return_oov=True`` also returns how
        many tokens that was (a literal ``<unk>`` in the text is in the vocabulary, so it is not
        counted). Only the int32 array is kept in memory, never a list of the tokens.
        """
        ids = np.fromiter(map(self._ids.get, tokens, repeat(_NOT_FOUND)), dtype=np.int32)
        missing = ids == _NOT_FOUND
        oov = int(np.count_nonzero(missing))
        if oov:
            if self._unk is None:
                raise UserError(f"{oov} tokens are not in the vocabulary, which has no "
                                "unknown token")
            ids[missing] = self.unk_id
        return (ids, oov) if return_oov else ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Map ids back to tokens (IndexError for an id out of range)."""
        if not isinstance(ids, (np.ndarray, list, tuple)):
            ids = list(ids)
        arr = np.asarray(ids, dtype=np.int64).ravel()
        bad = (arr < 0) | (arr >= len(self._tokens))
        if bad.any():
            raise IndexError(f"token id {arr[bad][0]} out of range for a vocabulary of "
                             f"{len(self)} tokens")
        return [self._tokens[i] for i in arr.tolist()]

    # --- storage -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form; ``from_dict`` restores an equal vocabulary."""
        return {"format": FORMAT, "version": VERSION, "unk": self._unk,
                "specials": list(self._specials), "tokens": list(self._tokens)}

    @classmethod
    def from_dict(cls, d: Any) -> Vocab:
        """Rebuild a vocabulary from ``to_dict`` output, validating it (UserError if invalid)."""
        if not isinstance(d, dict):
            raise UserError(f"a vocabulary must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise UserError(f"not a keraslm vocabulary (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise UserError(f"unsupported vocabulary version {d.get('version')!r} "
                            f"(this keraslm reads version {VERSION})")
        unknown = sorted(set(d) - {"format", "version", "unk", "specials", "tokens"})
        if unknown:
            raise UserError(f"unknown vocabulary field(s) {unknown}")
        tokens, unk, specials = d.get("tokens"), d.get("unk"), d.get("specials")
        if not isinstance(tokens, list):
            raise UserError("vocabulary 'tokens' must be a list of strings")
        if unk is not None and not isinstance(unk, str):
            raise UserError(f"vocabulary 'unk' must be a string or null, got {unk!r}")
        if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
            raise UserError("vocabulary 'specials' must be a list of strings")
        return cls(tokens, unk=unk, specials=specials)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON, atomically (a crash never leaves a truncated file)."""
        write_text_atomic(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Read a vocabulary written by ``save``; UserError naming the file if it is invalid."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"vocabulary file not found: {path}")
        data = read_bounded(path, MAX_VOCAB_JSON_BYTES)  # a FIFO or /dev/zero: one line, at once
        try:
            d = json.loads(data.decode("utf-8"))
        except ValueError as e:  # bad JSON or UTF-8, or ints too long
            raise UserError(f"{path}: corrupt vocabulary file (invalid JSON: {e})") from None
        except RecursionError:
            raise UserError(f"{path}: corrupt vocabulary file (JSON nested too deeply)") from None
        try:
            return cls.from_dict(d)
        except UserError as e:
            raise UserError(f"{path}: invalid vocabulary: {e}") from None
