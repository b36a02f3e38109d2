"""TextPipeline: GluonNLP CorpusDataset semantics on the real corpora, streaming, settings."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
from pathlib import Path

import pytest

from keraslm import text as text_module
from keraslm.errors import UserError
from keraslm.text import (
    MAX_PIECE_CHARS,
    MAX_SENTENCE_CHARS,
    RAW,
    RAW_TUTORIAL,
    WIKITEXT,
    TextPipeline,
    default_nltk_dirs,
    pipeline_for_format,
    punkt_tokenizer,
    use_data_root,
)

DATA = Path(os.environ["KERASLM_DATA"])  # conftest sets it (the shared data root by default)
WIKI = DATA / "wikitext-2"
SHERLOCK = DATA / "sherlockholmes"

FIRST_SENTENCE = ("project gutenberg {apos} s the adventures of sherlock holmes , by arthur conan "
                  "doyle this ebook is for the use of anyone anywhere at no cost and with almost "
                  "no restrictions whatsoever . <eos>")
SECOND_SENTENCE = ("you may copy it , give it away or re - use it under the terms of the project "
                   "gutenberg license included with this ebook or online at www . <eos>")


@pytest.mark.parametrize(("split", "expected"),
                         [("train", 2_088_628), ("valid", 217_646), ("test", 245_569)])
def test_wikitext2_token_counts_match_gluonnlp(split, expected):
    assert sum(1 for _ in WIKITEXT.iter_tokens(WIKI / f"wiki.{split}.tokens")) == expected


def test_wikitext_stream_starts_like_the_file():
    tokens = list(itertools.islice(WIKITEXT.iter_tokens(WIKI / "wiki.valid.tokens"), 8))
    # The file starts with a blank line, then " = Homarus gammarus = ", then a blank line.
    assert tokens == ["<eos>", "=", "Homarus", "gammarus", "=", "<eos>", "<eos>", "Homarus"]


def test_lines_blank_lines_give_eos_and_final_newline_adds_no_sample():
    assert WIKITEXT.process("a b\n\n c \n") == [["a", "b", "<eos>"], ["<eos>"], ["c", "<eos>"]]
    assert WIKITEXT.process("a b\n\nc") == [["a", "b", "<eos>"], ["<eos>"], ["c", "<eos>"]]
    assert WIKITEXT.process("") == []


def test_lines_handle_crlf_and_cr_like_universal_newlines(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"a b\r\n\r\nc\rd\n")
    expected = [["a", "b", "<eos>"], ["<eos>"], ["c", "<eos>"], ["d", "<eos>"]]
    assert list(WIKITEXT.iter_processed(path)) == expected
    assert WIKITEXT.process("a b\r\n\r\nc\rd\n") == expected


def test_bos_and_skip_empty():
    pipeline = TextPipeline(bos="<bos>", skip_empty=True)
    assert pipeline.process("a\n\n  \nb c\n") == [["<bos>", "a", "<eos>"],
                                                  ["<bos>", "b", "c", "<eos>"]]
    assert TextPipeline(eos=None).process("a\n\nb\n") == [["a"], [], ["b"]]


def test_text_and_binary_streams_read_like_files(tmp_path):
    text = "one two\n\nthree\n"
    path = tmp_path / "f.txt"
    path.write_text(text)
    from_path = list(WIKITEXT.iter_tokens(path))
    assert from_path == list(WIKITEXT.iter_tokens(str(path)))
    assert from_path == list(WIKITEXT.iter_tokens(io.StringIO(text)))
    assert from_path == list(WIKITEXT.iter_tokens(io.BytesIO(text.encode())))
    assert from_path == [t for s in WIKITEXT.process(text) for t in s]


def test_sherlock_first_sentences_with_product_default():
    sentences = RAW.process((SHERLOCK / "sherlockholmes.train.txt").read_text(encoding="utf-8"))
    assert sentences[0] == FIRST_SENTENCE.format(apos="'").split()
    assert sentences[1] == SECOND_SENTENCE.split()


def test_sherlock_first_sentences_with_tutorial_setting():
    stream = RAW_TUTORIAL.iter_tokens(SHERLOCK / "sherlockholmes.train.txt")
    expected = (FIRST_SENTENCE.format(apos="&apos;") + " " + SECOND_SENTENCE).split()
    assert list(itertools.islice(stream, len(expected))) == expected


def test_unk_is_kept_by_default_and_escaped_by_the_tutorial_setting():
    text = (SHERLOCK / "sherlockholmes.train.txt").read_text(encoding="utf-8")
    assert 'this ring \n--" he <unk> an <unk> <unk> ring from his' in text
    default = RAW.process(text)
    tutorial = RAW_TUTORIAL.process(text)
    i = next(i for i, s in enumerate(default) if s[:2] == ["this", "ring"])
    assert default[i][:8] == ["this", "ring", "--", '"', "he", "<unk>", "an", "<unk>"]
    assert tutorial[i][:9] == ["this", "ring", "--", "&quot;", "he", "&lt;", "unk", "&gt;", "an"]
    # Every <unk> of the file survives intact by default, none with the tutorial setting.
    assert sum(s.count("<unk>") for s in default) == text.count("<unk>") > 10_000
    assert sum(s.count("<unk>") for s in tutorial) == 0
    assert sum(s.count("unk") for s in tutorial) == text.count("<unk>")


def test_protected_tokens_stay_intact_even_with_escaping():
    pipeline = TextPipeline(split="sentences", tokenizer="moses", escape=True)
    assert pipeline.tokenize('he said <unk> & "hi" <eos>') == [
        "he", "said", "<unk>", "&amp;", "&quot;", "hi", "&quot;", "<eos>"]
    assert RAW.tokenize('a <unk>, "b"') == ["a", "<unk>", ",", '"', "b", '"']


def test_more_protected_tokens_than_sacremoses_allows_in_one_call():
    text = " ".join(["<unk> word ,"] * 1500)
    assert RAW.tokenize(text) == ["<unk>", "word", ","] * 1500


@pytest.mark.parametrize("pipeline", [RAW, RAW_TUTORIAL], ids=["default", "tutorial"])
@pytest.mark.parametrize("split", ["train", "valid"])
def test_sentence_streaming_equals_whole_file(pipeline, split):
    path = SHERLOCK / f"sherlockholmes.{split}.txt"
    whole = [t for s in pipeline.process(path.read_text(encoding="utf-8")) for t in s]
    assert list(pipeline.iter_tokens(path)) == whole
    # Small blocks cut the text many times, mid-sentence included.
    assert list(pipeline.iter_tokens(path, block_chars=3000)) == whole


def test_sentence_samples_stream_at_small_blocks():
    path = SHERLOCK / "sherlockholmes.valid.txt"
    whole = RAW.samples(path.read_text(encoding="utf-8"))
    assert list(RAW.iter_samples(path, block_chars=1)) == whole


class _EndlessText(io.RawIOBase):
    """A byte stream that never ends: reading it all would never finish."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = b"the cat sat on the mat . it was happy .\n" * 8
        n = min(len(buffer), len(chunk))
        buffer[:n] = chunk[:n]
        return n


@pytest.mark.parametrize("pipeline", [WIKITEXT, RAW], ids=["lines", "sentences"])
def test_iter_tokens_streams_without_reading_everything(pipeline):
    stream = io.BufferedReader(_EndlessText())
    first = list(itertools.islice(pipeline.iter_tokens(stream, block_chars=4096), 12))
    assert first[:6] == ["the", "cat", "sat", "on", "the", "mat"]


def test_invalid_utf8_names_file_byte_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine line\nbad \xff here\n")
    with pytest.raises(UserError, match=r"bad\.txt: invalid UTF-8 at byte 14 \(line 2\)"):
        list(WIKITEXT.iter_tokens(path))
    assert list(WIKITEXT.iter_tokens(path, errors="replace")) == [
        "fine", "line", "<eos>", "bad", "\ufffd", "here", "<eos>"]


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="file not found: .*nothing.txt"):
        list(WIKITEXT.iter_tokens(tmp_path / "nothing.txt"))


def test_missing_punkt_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match=rf"punkt_tab.*not found.*{tmp_path}.*nltk.downloader"):
        punkt_tokenizer(tmp_path, download=False)


def test_a_data_root_given_by_the_program_is_searched_for_punkt(tmp_path, monkeypatch):
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.setenv("KERASLM_DATA", str(tmp_path / "env-root"))
    monkeypatch.setattr(text_module, "_DATA_ROOTS", [])
    assert default_nltk_dirs() == [tmp_path / "env-root" / "nltk_data"]
    use_data_root(DATA)
    use_data_root(DATA)  # once is enough
    assert default_nltk_dirs() == [DATA.absolute() / "nltk_data", tmp_path / "env-root" / "nltk_data"]
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk"))
    assert default_nltk_dirs()[0] == tmp_path / "nltk"  # $NLTK_DATA still comes first


def test_punkt_from_an_explicit_folder():
    tokenizer = punkt_tokenizer(DATA / "nltk_data", download=False)
    assert tokenizer.tokenize("Mr. Holmes came in. He sat down.") == [
        "Mr. Holmes came in.", "He sat down."]


@pytest.mark.parametrize("pipeline", [WIKITEXT, RAW, RAW_TUTORIAL,
                                      TextPipeline(bos="<s>", eos=None, skip_empty=True)])
def test_settings_round_trip_through_json(pipeline):
    d = json.loads(json.dumps(pipeline.to_dict()))
    assert TextPipeline.from_dict(d) == pipeline


def test_from_dict_rejects_unknown_keys_and_bad_values():
    with pytest.raises(UserError, match="unknown text pipeline setting.*'lowercase'"):
        TextPipeline.from_dict({"lowercase": True})
    with pytest.raises(UserError, match="unknown split 'words'"):
        TextPipeline.from_dict({"split": "words"})
    with pytest.raises(UserError, match="unknown tokenizer 'spacy'"):
        TextPipeline.from_dict({"tokenizer": "spacy"})
    with pytest.raises(UserError, match="'escape' must be true or false"):
        TextPipeline.from_dict({"escape": "yes"})
    with pytest.raises(UserError, match="'protected' must be a list"):
        TextPipeline.from_dict({"protected": "<unk>"})
    with pytest.raises(UserError, match="'eos' must be a token"):
        TextPipeline.from_dict({"eos": "end of sentence"})
    assert TextPipeline.from_dict({}) == WIKITEXT


def test_each_format_reads_text_as_it_says():
    """tokens: a sample per line, split at whitespace; raw: punkt sentences tokenized by Moses,
    <unk> kept and nothing escaped; raw with the tutorial's setting: XML-escaped, <unk> too."""
    text = 'He said <unk> & "hi". Then he left.'
    assert pipeline_for_format("tokens").process(text + "\nnext") == [
        ["He", "said", "<unk>", "&", '"hi".', "Then", "he", "left.", "<eos>"], ["next", "<eos>"]]
    then = ["Then", "he", "left", ".", "<eos>"]
    assert pipeline_for_format("raw").process(text) == [
        ["He", "said", "<unk>", "&", '"', "hi", '"', ".", "<eos>"], then]
    assert pipeline_for_format("raw", True).process(text) == [
        ["He", "said", "&lt;", "unk", "&gt;", "&amp;", "&quot;", "hi", "&quot;", ".", "<eos>"],
        then]
    with pytest.raises(UserError, match="unknown text format 'xml'"):
        pipeline_for_format("xml")


def test_describe_is_one_line_naming_the_settings():
    assert WIKITEXT.describe() == "one sample per line, whitespace tokens, bos=none, eos=<eos>"
    assert "escape on" in RAW_TUTORIAL.describe()
    assert "escape off, protected: <unk> <eos>" in RAW.describe()
    assert "\n" not in RAW.describe()


def test_a_megabyte_of_short_sentences_splits_despite_nltks_regex_time_limit(tmp_path):
    """NLTK 3.10+ stops a regex scan after 5 s; punkt's scan of 1 MB of this in one call takes
    longer (TimeoutError), so the text must reach punkt in smaller blocks."""
    path = tmp_path / "dense.txt"
    path.write_text("Hi. " * (1 << 18), encoding="utf-8")  # 1 MiB, one line
    assert sum(1 for _ in RAW.iter_samples(path)) == 1 << 18


def test_text_without_sentence_ends_is_cut_into_bounded_samples():
    text = "word " * 200_000  # 1 MB and not one sentence end
    samples = RAW.samples(text)
    assert " ".join(samples).split() == text.split()
    assert max(map(len, samples)) <= 2 * MAX_SENTENCE_CHARS


# ---- reading in chunks, long lines ---------------------------------------------------------------

MIXED = ("\ufeffcaf\u00e9 na\u00efve \U0001F600 x\r\n\r\ntwo\rthree\x85four\u2028five\v"
         " six  seven \n\u00e9t\u00e9\r")


@pytest.mark.parametrize("read_bytes", [1, 2, 3, 5, 7, 1 << 20])
@pytest.mark.parametrize("pipeline", [WIKITEXT, RAW], ids=["lines", "sentences"])
def test_reading_in_small_chunks_equals_the_whole_text(tmp_path, monkeypatch, read_bytes,
                                                       pipeline):
    """Multibyte characters, a BOM and \\r\\n cut by the reads: the same as the whole text."""
    path = tmp_path / "mixed.txt"
    path.write_bytes(MIXED.encode("utf-8"))
    monkeypatch.setattr(text_module, "READ_BYTES", read_bytes)
    whole = [t for s in pipeline.process(MIXED.removeprefix("\ufeff")) for t in s]
    assert list(pipeline.iter_tokens(path)) == whole
    assert list(pipeline.iter_tokens(io.StringIO(MIXED.removeprefix("\ufeff")))) == whole
    if pipeline is WIKITEXT:
        assert whole[:6] == ["caf\u00e9", "na\u00efve", "\U0001F600", "x", "<eos>", "<eos>"]
        assert whole.count("<eos>") == 8


def test_reads_of_the_real_size_split_no_character_token_or_line_break(tmp_path):
    """At the READ_BYTES the module really uses: a 4-byte and a 2-byte character, a \\r\\n and
    a word each straddle a read boundary of the file, and a \\r\\n one of a text stream; the
    tokens are those of the whole text."""
    size = text_module.READ_BYTES

    def up_to(data: bytes, offset: int) -> bytes:  # ASCII filler until `offset`; each
        # piece put after it starts with a space, so no token joins the filler
        filler = b"ab cd\n" * (1 + (offset - len(data)) // 6)
        return data + filler[:offset - len(data)]

    data = up_to(b"", size - 3) + " x\U0001F600y ".encode()  # the emoji: bytes size - 1 .. + 2
    data = up_to(data, 2 * size - 2) + " \u00e9t\u00e9 ".encode()  # é: 2 * size - 1, 2 * size
    data = up_to(data, 3 * size - 5) + b" end\r\nnext "  # \r, \n: 3 * size - 1, 3 * size
    data = up_to(data, 4 * size - 6) + b" straddling tail"
    assert data[size - 1:size + 3] == "\U0001F600".encode()
    assert data[2 * size - 1:2 * size + 1] == "\u00e9".encode()
    assert data[3 * size - 1:3 * size + 1] == b"\r\n"
    assert data[4 * size - 1:4 * size + 1] == b"dd"  # inside "straddling"
    path = tmp_path / "boundaries.txt"
    path.write_bytes(data)

    whole = [t for s in WIKITEXT.process(data.decode("utf-8")) for t in s]
    assert {"x\U0001F600y", "\u00e9t\u00e9", "end", "next", "straddling"} <= set(whole)
    assert list(WIKITEXT.iter_tokens(path)) == whole
    with path.open("rb") as f:
        assert list(WIKITEXT.iter_tokens(f)) == whole
    # a text stream is read READ_BYTES characters at a time: a \r\n across its first boundary
    text = up_to(b"", size - 5).decode() + " end\r\nnext tail"
    assert text[size - 1:size + 1] == "\r\n"
    tokens = list(WIKITEXT.iter_tokens(io.StringIO(text)))
    assert tokens == [t for s in WIKITEXT.process(text) for t in s]
    assert tokens[-5:] == ["end", "<eos>", "next", "tail", "<eos>"]


@pytest.mark.parametrize("read_bytes", [1, 3, 1 << 20])
def test_invalid_utf8_is_named_by_byte_and_line_across_reads(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr(text_module, "READ_BYTES", read_bytes)
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xef\xbb\xbfok\n\xc3\xa9\xc3\xa9\nab \xe2\x82 \n")  # BOM, 2-byte chars
    with pytest.raises(UserError, match=r"bad\.txt: invalid UTF-8 at byte 14 \(line 3\)"):
        list(WIKITEXT.iter_tokens(path))
    path.write_bytes(b"ok\nend \xe2\x82")  # a character cut off by the end of the file
    with pytest.raises(UserError, match=r"invalid UTF-8 at byte 7 \(line 2\)"):
        list(WIKITEXT.iter_tokens(path))
    assert list(WIKITEXT.iter_tokens(path, errors="replace")) == [
        "ok", "<eos>", "end", "\ufffd", "<eos>"]


def test_a_long_line_is_tokenized_in_bounded_parts_with_the_whole_lines_tokens(tmp_path):
    """2.2 MB on one line (and a short one after it): parts of at most MAX_PIECE_CHARS
    characters' tokens, together the tokens of the whole line."""
    words = [f"w{i % 997}" for i in range(450_000)]
    line = " ".join(words)
    path = tmp_path / "long.txt"
    path.write_text(f"{line}\nshort line\n", encoding="utf-8")
    assert len(line) > 8 * MAX_PIECE_CHARS
    parts = list(WIKITEXT.iter_parts(path))
    assert [last for _, last in parts].count(True) == 2 and len(parts) > 8
    assert max(len(tokens) for tokens, _ in parts) <= MAX_PIECE_CHARS // 2
    tokens = [t for part, _ in parts for t in part]
    assert tokens == [*words, "<eos>", "short", "line", "<eos>"]
    assert list(WIKITEXT.iter_processed(path)) == [[*words, "<eos>"], ["short", "line", "<eos>"]]
    assert list(WIKITEXT.iter_samples(path)) == [line, "short line"]


MOSES_TRAPS = ["foo.", "bar", "Bar", "'em", "dogs'", ",5", "5,", "said.'", "...y", "x...",
               "Mr.", "U.S.", "a", "(b)", "<unk>", '"q"', "it's", "x\x01", "\x01'y", "1,000",
               "``", "-", "e.g.", "end.", "The"]


@pytest.mark.parametrize("pipeline", [TextPipeline(tokenizer="moses"),
                                      TextPipeline(tokenizer="moses", escape=True, protected=()),
                                      TextPipeline(bos="<s>", skip_empty=True)],
                         ids=["moses", "moses-escaped", "whitespace"])
def test_long_line_pieces_give_the_tokens_of_the_whole_line(tmp_path, monkeypatch, pipeline):
    """Cut into pieces of at most 100 characters, a line of words Moses treats by their
    neighbours (periods, commas, apostrophes, control characters) still gives exactly the whole
    line's tokens. (Cut at any whitespace, 20 places differ.)"""
    monkeypatch.setattr(text_module, "MAX_PIECE_CHARS", 100)
    rng = random.Random(7)
    line = " ".join(rng.choice(MOSES_TRAPS) + rng.choice(["", "", " ", "\t"])
                    for _ in range(3000))
    path = tmp_path / "traps.txt"
    path.write_text(f"   \n{line}\n\t\n", encoding="utf-8")
    expected = pipeline.process(f"   \n{line}\n\t\n")
    parts = list(pipeline.iter_parts(path))
    assert len(parts) > 100
    assert list(pipeline.iter_processed(path)) == expected


def test_a_word_across_the_real_piece_boundary_stays_one_token(tmp_path):
    """At the MAX_PIECE_CHARS the module really uses: a line one piece and a bit long, with a
    long word over the place a piece must end, gives the whole line's tokens."""
    limit = text_module.MAX_PIECE_CHARS
    word = "w" * 40 + "\u00e9" * 40
    head = "ab " * ((limit - 50) // 3)
    line = head + word + " " + "cd " * 100 + "tail"
    assert len(head) < limit < len(head) + len(word)
    path = tmp_path / "piece.txt"
    path.write_text(f"{line}\nshort\n", encoding="utf-8")
    parts = list(WIKITEXT.iter_parts(path))
    assert len(parts) >= 3  # the long line came in at least two pieces
    assert [t for part, _ in parts for t in part] == [*line.split(), "<eos>", "short", "<eos>"]


def test_a_line_without_whitespace_for_max_piece_chars_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "MAX_PIECE_CHARS", 64)
    path = tmp_path / "blob.txt"
    path.write_text("fine text\n" + "a b " * 20 + "x" * 65 + " tail\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"blob\.txt: line 2 has 64 characters without "
                                        r"whitespace; is it text\?"):
        list(WIKITEXT.iter_tokens(path))
    path.write_text("fine text\n" + "x" * 63 + " tail\n", encoding="utf-8")  # just fits
    assert list(WIKITEXT.iter_tokens(path))[3:] == ["x" * 63, "tail", "<eos>"]
