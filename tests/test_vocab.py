"""Vocab: GluonNLP ordering and specials, streaming encode, stable JSON round trips."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from keraslm.errors import UserError
from keraslm.text import WIKITEXT
from keraslm.vocab import Vocab

DATA = Path(os.environ["KERASLM_DATA"])  # conftest.py sets it (default: ../shared/data)


@pytest.fixture(scope="module")
def wikitext2_vocab() -> Vocab:
    return Vocab.build(WIKITEXT.iter_tokens(DATA / "wikitext-2" / "wiki.train.tokens"))


def test_wikitext2_train_vocabulary_has_33278_entries(wikitext2_vocab):
    assert len(wikitext2_vocab) == 33_278
    assert wikitext2_vocab.tokens[:5] == ("<unk>", "<eos>", "the", ",", ".")


def test_wikitext2_valid_encodes_without_oov(wikitext2_vocab):
    ids, oov = wikitext2_vocab.encode(
        WIKITEXT.iter_tokens(DATA / "wikitext-2" / "wiki.valid.tokens"), return_oov=True)
    assert (ids.dtype, ids.shape, oov) == (np.int32, (217_646,), 0)
    assert wikitext2_vocab.decode(ids[:5]) == ["<eos>", "=", "Homarus", "gammarus", "="]


def test_order_is_specials_then_frequency_then_alphabetical():
    vocab = Vocab.build(Counter({"b": 2, "a": 2, "c": 3, "d": 1, "B": 2}))
    assert vocab.tokens == ("<unk>", "<eos>", "c", "B", "a", "b", "d")
    assert Vocab.build(["x", "y", "y", "z", "z", "z"]).tokens == ("<unk>", "<eos>", "z", "y", "x")


def test_specials_come_first_once_and_nothing_else_is_added():
    vocab = Vocab.build(["a", "<eos>", "b", "<unk>", "a", "<eos>", "<eos>"])
    assert vocab.tokens == ("<unk>", "<eos>", "a", "b")
    assert (vocab.unk_id, vocab.token_to_id("<eos>")) == (0, 1)
    assert "<pad>" not in vocab and "<bos>" not in vocab
    padded = Vocab.build(["a"], specials=("<pad>", "<bos>", "<eos>"))
    assert padded.tokens == ("<unk>", "<pad>", "<bos>", "<eos>", "a")


def test_min_freq_and_max_size_count_only_ordinary_tokens():
    counts = Counter({"a": 5, "b": 4, "c": 3, "d": 1})
    assert Vocab.build(counts, min_freq=3).tokens == ("<unk>", "<eos>", "a", "b", "c")
    assert Vocab.build(counts, max_size=2).tokens == ("<unk>", "<eos>", "a", "b")
    with pytest.raises(UserError, match="min_freq"):
        Vocab.build(counts, min_freq=0)


def test_encode_maps_unknown_tokens_to_unk_and_counts_them():
    vocab = Vocab.build(["a", "b", "b"])
    ids, oov = vocab.encode(iter(["b", "x", "a", "<unk>", "y"]), return_oov=True)
    assert ids.tolist() == [2, 0, 3, 0, 0]
    assert ids.dtype == np.int32
    assert oov == 2  # a literal <unk> is a vocabulary token, not an out-of-vocabulary one
    assert vocab.encode(t for t in ["a"]).tolist() == [3]
    assert vocab.encode([]).shape == (0,)
    assert vocab.token_to_id("zzz") == 0


def test_decode_and_lookups():
    vocab = Vocab.build(["a", "b", "b"])
    assert vocab.decode(np.array([1, 2, 3], dtype=np.int32)) == ["<eos>", "b", "a"]
    assert vocab.decode(iter([0])) == ["<unk>"]
    assert vocab.id_to_token(2) == "b"
    with pytest.raises(IndexError):
        vocab.id_to_token(4)
    with pytest.raises(IndexError, match="token id 9"):
        vocab.decode([1, 9])


def test_without_unknown_token_unknown_words_are_errors():
    vocab = Vocab.build(["a"], unk=None)
    assert vocab.tokens == ("<eos>", "a") and vocab.unk_id is None
    with pytest.raises(UserError, match="not in the vocabulary"):
        vocab.encode(["a", "b"])
    with pytest.raises(UserError, match="'b' is not in the vocabulary"):
        vocab.token_to_id("b")


def test_save_load_round_trip_keeps_ids(tmp_path, wikitext2_vocab):
    path = tmp_path / "sub" / "vocab.json"
    wikitext2_vocab.save(path)
    loaded = Vocab.load(path)
    assert loaded == wikitext2_vocab
    assert loaded.tokens == wikitext2_vocab.tokens
    assert [p.name for p in path.parent.iterdir()] == ["vocab.json"]  # no temporary file left
    assert Vocab.from_dict(json.loads(json.dumps(loaded.to_dict()))) == loaded


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "vocab.json"
    Vocab.build(["a"]).save(path)
    Vocab.build(["b"]).save(path)
    assert Vocab.load(path).tokens == ("<unk>", "<eos>", "b")


def test_equality_needs_same_tokens_and_specials():
    assert Vocab.build(["a"]) == Vocab.build(["a"])
    assert Vocab.build(["a"]) != Vocab.build(["b"])
    assert Vocab.build(["a"]) != Vocab.build(["a"], specials=())


def test_corrupt_file_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text('{"format": "keraslm-vocab", "tok')
    with pytest.raises(UserError, match=rf"{path}: corrupt vocabulary file"):
        Vocab.load(path)


def test_duplicate_tokens_are_rejected_on_load(tmp_path):
    path = tmp_path / "vocab.json"
    d = Vocab.build(["a", "b"]).to_dict()
    d["tokens"].append("a")
    path.write_text(json.dumps(d))
    with pytest.raises(UserError, match=rf"{path}: invalid vocabulary: .*duplicate token 'a'"):
        Vocab.load(path)


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "other"}, "not a keraslm vocabulary"),
    ({"version": 99}, "unsupported vocabulary version 99"),
    ({"extra": 1}, "unknown vocabulary field"),
    ({"tokens": "abc"}, "'tokens' must be a list"),
    ({"specials": ["<pad>"]}, "must start with its special tokens"),
])
def test_invalid_contents_are_rejected(tmp_path, change, message):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({**Vocab.build(["a"]).to_dict(), **change}))
    with pytest.raises(UserError, match=message):
        Vocab.load(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="vocabulary file not found"):
        Vocab.load(tmp_path / "none.json")


def test_a_vocabulary_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    fifo = tmp_path / "vocab.json"
    os.mkfifo(fifo)  # opened for reading, it would wait for a writer forever
    with pytest.raises(UserError, match="not a regular file"):
        Vocab.load(fifo)
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")  # read whole, it would fill the memory
    with pytest.raises(UserError, match="not a regular file"):
        Vocab.load(link)
