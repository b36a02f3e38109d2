"""A synthetic WikiText-103 stand-in: WikiText-103's vocabulary size, WikiText-2's word frequencies.

WikiText-103 (103 M training tokens, 267,735 words) cannot be downloaded here. This writes a
corpus of its vocabulary size whose words follow a Zipf-Mandelbrot law fitted to WikiText-2's
training split, in WikiText's file format, for training benchmarks at that vocabulary size:

    python bench/synthetic_corpus.py --out DIR [--tokens 2000000] [--vocab 267735] [--seed 0]
        [--valid-tokens 217646] [--test-tokens 245569] [--cover] [--fit-from PATH] [--data-root DIR]
    python bench/synthetic_corpus.py --out DIR --tokens 103227021    # WikiText-103's train size

and trains on it with keraslm's WikiText reader (`--format tokens`: `<eos>` after every line):

    python -m keraslm.train --train DIR/wiki.train.tokens --valid DIR/wiki.valid.tokens \\
        --test DIR/wiki.test.tokens --format tokens

Writes DIR/wiki.{train,valid,test}.tokens and DIR/synthetic.json (the law, its fit, the flags and
the counts below), each atomically (a temporary name, then a rename). Prints the fitted law and
its quality, the vocabulary, the tokens of each split, how many distinct words train holds, and
the seconds taken. The same flags, seed and source file give byte-identical files.

The law. p(r) ∝ (r + q)^-s over the word ranks r = 1..V-1, fitted to the rank-frequency counts of
WikiText-2's train split (`--fit-from` another WikiText-format file) by maximum likelihood: it
weighs every token once, so the fit is best where the tokens are, which is what a softmax sees.
Least squares on log-log over all ranks is ruled by the ~33 k rare ranks instead: on WikiText-2
it gives q = 393, s = 1.43 and under-predicts the ten most frequent words 12-43x. s and q are
rounded to 4 decimals, and that rounded law is the one sampled and recorded.

Words. V = --vocab counts as keraslm's vocabulary does: `<eos>` (which the reader adds, never
in the files) plus V-1 word ranks. The word of rank r is "w<r>", except `<unk>`, which WikiText
has in its files and keraslm's vocabulary always holds: it takes its rank in the source
(WikiText-2: 5th), or the last rank if the source has none. Words are drawn independently.

Lines. Each line's word count is drawn from the source's non-empty lines (WikiText-2: 23,767
lines, 86.3 words on average); a line is " w1 w2 ... wn \\n" as in WikiText. A split of N
tokens counts as keraslm reads it, words plus one `<eos>` a line (as WikiText's official sizes
do), and has exactly N: its last line is cut (or one word longer) to fit. The defaults of
--valid-tokens and --test-tokens are WikiText-103's (the same as WikiText-2's). Each split draws
from its own stream of --seed, so a split does not change when another one's size does.

Coverage. With 2 M tokens (seed 0) only 165,027 of the 267,734 word ranks occur, and keraslm builds its
vocabulary from train, so a training run on it has 165,028 words, not 267,735: the printed count
is the honest figure. 103 M tokens cover every rank. --cover gives every word one of train's
places, chosen uniformly at random (the other places follow the law), so that keraslm's
vocabulary is exactly V at any size of at least V-1 words; it prints what share of train that
takes (13.5 % at 2 M tokens).

Cost (one core): 2 M tokens in ~2 s; 103 M in ~31 s, 512 MB of train file, 160 MB of memory at
most. Memory holds the word table and the law (~100 bytes a word), the line lengths (8 bytes a
line) and one chunk of lines; the files are streamed to disk.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keraslm.corpora import corpus_file, sha1_of
from keraslm.errors import UserError
from keraslm.files import atomic_path, write_json_atomic
from keraslm.text import TextPipeline

WIKITEXT_103_VOCAB = 267_735
WIKITEXT_103_VALID = 217_646
WIKITEXT_103_TEST = 245_569
MAX_VOCAB = 10_000_000  # the word table and the law cost ~100 bytes a word
MAX_TOKENS = 10 ** 9 - 1  # per split: ~10x WikiText-103 (and NumPy's hypergeometric draw's limit)
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
FILES = {split: f"wiki.{split}.tokens" for split in SPLITS}
CHUNK_LINES = 4096  # lines drawn and written at a time (~350 k words, ~2 MB of text)
SHARE_RANKS = (1, 10, 100, 2_000, 10_000)  # where the fit's quality is shown


@dataclass(frozen=True)
class Law:
    """Zipf-Mandelbrot: p(r) ∝ (r + q)^-s for ranks r = 1..n."""

    s: float
    q: float

    def probabilities(self, ranks: int) -> np.ndarray:
        """p(1..ranks), normalised over those ranks."""
        weights = (np.arange(1, ranks + 1) + self.q) ** -self.s
        return weights / weights.sum()

    def __str__(self) -> str:
        return f"p(r) ∝ (r + {self.q:.4f})^-{self.s:.4f}"


@dataclass(frozen=True)
class Profile:
    """What is taken from the source corpus: its word counts and its line lengths."""

    counts: np.ndarray  # occurrences of each distinct word, most frequent first
    unk_rank: int | None  # rank of <unk> among them (1-based), None if it has none
    line_lengths: np.ndarray  # the distinct word counts of its non-empty lines
    line_weights: np.ndarray  # how many lines have each

    @property
    def mean_line(self) -> float:
        return float((self.line_lengths * self.line_weights).sum() / self.line_weights.sum())


def read_profile(path: Path) -> Profile:
    """Word counts and line lengths of a WikiText-format file, read by keraslm's own reader."""
    counts: dict[str, int] = {}
    lengths: dict[int, int] = {}
    for words in TextPipeline(eos=None).iter_processed(path):
        for word in words:
            counts[word] = counts.get(word, 0) + 1
        if words:
            lengths[len(words)] = lengths.get(len(words), 0) + 1
    if not counts:
        raise UserError(f"{path}: no words to fit a law to")
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    unk_rank = ranked.index(UNK) + 1 if UNK in counts else None
    sizes = sorted(lengths)
    return Profile(np.array([counts[w] for w in ranked], dtype=np.int64), unk_rank,
                   np.array(sizes, dtype=np.int64), np.array([lengths[n] for n in sizes]))


def fit_law(counts: np.ndarray) -> Law:
    """The maximum-likelihood Zipf-Mandelbrot law of rank-frequency `counts` (most frequent first).

    The mean negative log-likelihood of a token is s * mean(ln(r + q)) + ln Z(s, q). For a given q
    it is convex in s, so s is found by bisection on its derivative; q by golden-section search
    over (-1, 100] on the likelihood profile.
    """
    freq = counts / counts.sum()
    ranks = np.arange(1, counts.size + 1)

    def best_s(q: float) -> tuple[float, float]:
        x = np.log(ranks + q)
        target = float(freq @ x)  # d/ds of the loss is target - E_p[x]
        lo, hi = 0.0, 20.0
        for _ in range(60):
            s = (lo + hi) / 2
            w = np.exp(-s * (x - x[0]))
            lo, hi = (s, hi) if float(w @ x) / w.sum() > target else (lo, s)
        s = (lo + hi) / 2
        loss = s * target - s * x[0] + float(np.log(np.exp(-s * (x - x[0])).sum()))
        return s, loss

    lo, hi = -1 + 1e-6, 100.0
    golden = (5 ** 0.5 - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    loss_a, loss_b = best_s(a)[1], best_s(b)[1]
    for _ in range(60):
        if loss_a < loss_b:
            hi, b, loss_b = b, a, loss_a
            a = hi - golden * (hi - lo)
            loss_a = best_s(a)[1]
        else:
            lo, a, loss_a = a, b, loss_b
            b = lo + golden * (hi - lo)
            loss_b = best_s(b)[1]
    q = (lo + hi) / 2
    return Law(s=round(best_s(q)[0], 4), q=round(q, 4))


def fit_quality(counts: np.ndarray, law: Law) -> dict:
    """How well `law` (over the source's ranks) matches `counts`: word shares of the top ranks
    and the largest gap between the two cumulative shares (a Kolmogorov-Smirnov distance)."""
    source = np.cumsum(counts) / counts.sum()
    fitted = np.cumsum(law.probabilities(counts.size))
    gaps = np.abs(source - fitted)
    shown = [r for r in SHARE_RANKS if r <= counts.size]
    return {"top_ranks": shown,
            "source_share": [round(float(source[r - 1]), 4) for r in shown],
            "law_share": [round(float(fitted[r - 1]), 4) for r in shown],
            "max_gap": round(float(gaps.max()), 4), "max_gap_rank": int(gaps.argmax()) + 1}


def word_table(vocab: int, unk_rank: int) -> list[bytes]:
    """The bytes written for each id: 0 ends a line, r (1..vocab-1) is the word of rank r."""
    table = [b" \n"] + [b" w%d" % r for r in range(1, vocab)]
    table[unk_rank] = b" " + UNK.encode()
    return table


def draw_line_lengths(rng: np.random.Generator, profile: Profile, tokens: int) -> np.ndarray:
    """Word counts of lines holding exactly `tokens` tokens (words + one <eos> a line).

    Lines are drawn until one would end at or past `tokens - 1`; that last line gets what is
    left, so that every line has a word (it has at most one word more than drawn).
    """
    cdf = np.cumsum(profile.line_weights) / profile.line_weights.sum()
    lengths, used = [], 0
    while True:
        block = int(tokens / (profile.mean_line + 1) * 1.05) + 64
        drawn = profile.line_lengths[np.searchsorted(cdf, rng.random(block), side="right")]
        ends = used + np.cumsum(drawn + 1)
        last = int(np.searchsorted(ends, tokens - 1, side="left"))
        if last < block:
            start = used if last == 0 else int(ends[last - 1])
            drawn = drawn[:last + 1].copy()
            drawn[last] = tokens - start - 1
            lengths.append(drawn)
            return np.concatenate(lengths)
        lengths.append(drawn)
        used = int(ends[-1])


def write_split(path: Path, rng: np.random.Generator, tokens: int, profile: Profile,
                cdf: np.ndarray, table: list[bytes], cover: bool) -> tuple[dict, np.ndarray]:
    """Draw one split and stream it to `path` (atomically); its counts, and its words per rank."""
    lines = draw_line_lengths(rng, profile, tokens)
    words = int(lines.sum())
    vocab_words = len(table) - 1
    if cover and words < vocab_words:
        raise UserError(f"--cover needs at least {vocab_words:,} words in train (one of each "
                        f"word), and {tokens:,} tokens give {words:,}: raise --tokens")
    order = rng.permutation(np.arange(1, vocab_words + 1)) if cover else np.empty(0, np.int64)
    placed = 0  # words of `order` written so far
    per_rank = np.zeros(vocab_words + 1, dtype=np.int64)
    left = words  # word places still to write
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for start in range(0, lines.size, CHUNK_LINES):
            chunk = lines[start:start + CHUNK_LINES]
            ranks = np.searchsorted(cdf, rng.random(int(chunk.sum())), side="right") + 1
            if cover:
                # The cover words not yet placed fall uniformly on the places left: this chunk
                # gets a hypergeometric share of them, at random places within it.
                here = int(rng.hypergeometric(order.size - placed,
                                              left - (order.size - placed), ranks.size))
                spots = rng.choice(ranks.size, size=here, replace=False)
                ranks[spots] = order[placed:placed + here]
                placed += here
                left -= ranks.size
            per_rank += np.bincount(ranks, minlength=vocab_words + 1)
            ids = np.insert(ranks, np.cumsum(chunk), 0)  # 0: the line's end
            f.write(b"".join(map(table.__getitem__, ids.tolist())))
    return {"file": path.name, "tokens": tokens, "lines": int(lines.size), "words": words,
            "cover_words": int(order.size)}, per_rank


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake as one `error:` line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def integer(minimum: int, maximum: int | None = None):
    """An argparse type: an integer from `minimum` to `maximum`."""
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", "").replace(",", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:,}, got {value:,}")
        return value
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="python bench/synthetic_corpus.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to write wiki.{train,valid,test}.tokens and synthetic.json to")
    parser.add_argument("--tokens", type=integer(2, MAX_TOKENS), default=2_000_000,
                        help="train tokens, <eos> included (default 2,000,000; WikiText-103: "
                             "103,227,021)")
    parser.add_argument("--valid-tokens", type=integer(2, MAX_TOKENS),
                        default=WIKITEXT_103_VALID,
                        help=f"validation tokens (default {WIKITEXT_103_VALID:,})")
    parser.add_argument("--test-tokens", type=integer(2, MAX_TOKENS), default=WIKITEXT_103_TEST,
                        help=f"test tokens (default {WIKITEXT_103_TEST:,})")
    parser.add_argument("--vocab", type=integer(3, MAX_VOCAB), default=WIKITEXT_103_VOCAB,
                        help=f"vocabulary size, <unk> and <eos> included (default "
                             f"{WIKITEXT_103_VOCAB:,}, WikiText-103's; at most {MAX_VOCAB:,})")
    parser.add_argument("--seed", type=integer(0), default=0, help="random seed (default 0)")
    parser.add_argument("--cover", action="store_true",
                        help="put every word of the vocabulary into train at least once")
    parser.add_argument("--fit-from", type=Path, metavar="PATH",
                        help="WikiText-format file to fit the law and line lengths to "
                             "(default: WikiText-2's train split)")
    parser.add_argument("--data-root", help="corpora folder (default $KERASLM_DATA)")
    return parser.parse_args(argv)


def generate(args: argparse.Namespace) -> dict:
    """Fit, draw and write the corpus; print what was done; return what synthetic.json holds."""
    started = time.perf_counter()
    source = args.fit_from or corpus_file("wikitext-2", "train", args.data_root)
    source_name = str(args.fit_from) if args.fit_from else "WikiText-2's train split"
    profile = read_profile(source)
    args.out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before the fit
    law = fit_law(profile.counts)
    quality = fit_quality(profile.counts, law)
    ranks = args.vocab - 1
    unk_rank = min(profile.unk_rank or ranks, ranks)
    p = law.probabilities(ranks)
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    cdf[-1] = 1.0  # a uniform draw in [0, 1) always lands on a rank

    shares = " / ".join(f"{r:,}" for r in quality["top_ranks"])
    print(f"law: Zipf-Mandelbrot {law}, maximum likelihood on {source_name} "
          f"({profile.counts.sum():,} words, {profile.counts.size:,} distinct)")
    print(f"fit: share of the words in the top {shares} ranks: source "
          f"{_percents(quality['source_share'])}, law {_percents(quality['law_share'])}; "
          f"largest gap of the cumulative shares {100 * quality['max_gap']:.1f} points "
          f"(rank {quality['max_gap_rank']:,})")
    extended = [r for r in SHARE_RANKS if r <= ranks]
    print(f"vocabulary: {args.vocab:,} words: <eos> (added by the reader) and {ranks:,} ranks, "
          f"w<rank> but <unk> at rank {unk_rank}; over them the law gives the top "
          f"{' / '.join(f'{r:,}' for r in extended)} ranks "
          f"{_percents(np.cumsum(p)[np.array(extended) - 1])}")
    print(f"lines: word counts drawn from the source's {profile.line_weights.sum():,} non-empty "
          f"lines (mean {profile.mean_line:.1f})")

    table = word_table(args.vocab, unk_rank)
    sizes = {"train": args.tokens, "valid": args.valid_tokens, "test": args.test_tokens}
    streams = np.random.SeedSequence(args.seed).spawn(len(SPLITS))
    splits, in_train = {}, None
    for split, stream in zip(SPLITS, streams):
        path = args.out / FILES[split]
        record, per_rank = write_split(path, np.random.default_rng(stream), sizes[split], profile,
                                       cdf, table, cover=args.cover and split == "train")
        occurring = per_rank > 0
        record["distinct_words"] = int(occurring.sum())
        line = (f"{split}: {record['tokens']:,} tokens ({record['words']:,} words, "
                f"{record['lines']:,} lines) -> {path}")
        if split == "train":
            in_train = occurring
            record["keraslm_vocab"] = record["distinct_words"] + 1 + int(not occurring[unk_rank])
            line += (f"\n  {record['distinct_words']:,} of the {ranks:,} word ranks occur in "
                     f"train, so keraslm's vocabulary from it has {record['keraslm_vocab']:,} "
                     f"words (of {args.vocab:,})")
            if args.cover:
                line += (f"; --cover put {record['cover_words']:,} of its words there "
                         f"({100 * record['cover_words'] / record['words']:.2f} %)")
        else:
            record["not_in_train"] = int(per_rank[~in_train].sum())
            line += f"; {record['not_in_train']:,} words not in train (read as <unk>)"
        print(line, flush=True)
        splits[split] = record

    meta = {"format": "keraslm-synthetic-corpus", "version": 1,
            "law": {"name": "zipf-mandelbrot", "s": law.s, "q": law.q,
                    "fit": "maximum likelihood", "source": source_name,
                    "source_sha1": sha1_of(source), "quality": quality},
            "vocab": args.vocab, "unk_rank": unk_rank, "seed": args.seed, "cover": args.cover,
            "splits": splits}
    write_json_atomic(args.out / "synthetic.json", meta)
    print(f"done in {time.perf_counter() - started:.1f} s ({args.out / 'synthetic.json'})")
    return meta


def _percents(shares) -> str:
    return " / ".join(f"{100 * x:.1f}" for x in shares) + " %"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        generate(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot write to {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the file being written is removed; those done stay
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
