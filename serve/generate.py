"""CLI: sample text from an exported bundle — `python serve/generate.py --prompt "The"`.

The prompt goes through the bundle's text pipeline, after `<eos>` as the first context token (as
the scorer scores a text on its own); its last sentence is left open unless the prompt ends with a
line break, so the model continues it. The context runs through the model `CONTEXT_CHUNK` tokens per onnxruntime call (memory bounded
whatever the prompt's length). Then `--tokens` tokens are drawn, step by step, for
`--num-samples` samples at once: the samples are the rows of one onnxruntime run per step, each
carrying its own LSTM state and reading the graph's `next_logprobs`. `<unk>` is never drawn
unless `--allow-unk`; `<eos>` becomes a line break, and the tokens are joined back into text
(sacremoses' Moses detokenizer for raw-text bundles, spaces for WikiText-style ones).

Sampling: `--temperature 0` is greedy (argmax); otherwise temperature, then `--top-k`, then
`--top-p` (nucleus) narrow the distribution. `--seed` makes the output reproducible, and every
sample draws from its own generator, so sample i is the same whatever `--num-samples` is.
Runs on onnxruntime alone: never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

if not __package__:  # run as `python serve/generate.py`: import `serve` from this checkout
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import numpy as np

from keraslm.contract import DEFAULT_BUNDLES_ROOT, OUTPUT_NEXT_LOGPROBS
from keraslm.errors import UserError
from keraslm.text import TextPipeline
from serve.argtypes import float_at_least, int_at_least
from serve.bundle import Bundle, load_bundle, resolve_bundle
from serve.session import DEVICES, choose_providers

Rng = np.random.Generator | Sequence[np.random.Generator]
Call = Callable[[Callable[[], Any]], Any]  # runs one onnxruntime call where it must run


@dataclass(frozen=True)
class Sample:
    """One generated continuation."""

    ids: list[int]     # the generated token ids (the prompt's not included)
    tokens: list[str]  # the same as tokens
    text: str          # prompt and continuation as readable text


# --- one sampling step -----------------------------------------------------------------------------

def sample_step(logprobs: np.ndarray, rng: Rng, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, banned: Sequence[int] = ()) -> np.ndarray:
    """Draw one token id per row of `logprobs` [rows, vocab] (log-probabilities or logits).

    `banned` ids are never drawn. `temperature` 0 takes the argmax (the lowest id on ties) and
    ignores the rest. Otherwise the scores are divided by `temperature`; `top_k` > 0 keeps the k
    best tokens (ties broken towards the lower id); `top_p` < 1 then keeps the fewest best tokens
    whose probability (renormalised after top-k) reaches `top_p`. A token of probability 0 is
    never drawn. `rng` is one generator, or one per row (a row's draw then does not depend on
    the other rows). Returns int64 ids [rows].
    """
    _check_sampling(temperature, top_k, top_p)
    scores = np.array(logprobs, dtype=np.float64, ndmin=2)
    if scores.ndim != 2:
        raise ValueError(f"logprobs must be [rows, vocab], got shape {scores.shape}")
    if np.isnan(scores).any():
        raise UserError("the model gave NaN log-probabilities")
    if len(banned):
        scores[:, np.asarray(banned, dtype=np.int64)] = -np.inf
    if not np.isfinite(scores.max(axis=1)).all():
        raise UserError("no token left to sample: every allowed token has probability 0")
    rows = scores.shape[0]
    if temperature == 0:
        return np.argmax(scores, axis=1)
    scores = (scores - scores.max(axis=1, keepdims=True)) / temperature  # <= 0: no overflow
    if top_k or top_p < 1.0:
        order = np.argsort(-scores, axis=1, kind="stable")  # best first, ties by lower id
        scores = np.take_along_axis(scores, order, axis=1)
    else:
        order = None
    probs = np.exp(scores)  # the best token (or tokens) get 1
    if top_k:
        probs[:, top_k:] = 0.0
    if top_p < 1.0:
        cumulative = np.cumsum(probs, axis=1)
        before = np.concatenate([np.zeros((rows, 1)), cumulative[:, :-1]], axis=1)
        probs[before >= top_p * cumulative[:, -1:]] = 0.0  # the best token always stays
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]  # exactly 1.0 from the last token of probability > 0 on
    picked = np.count_nonzero(cdf <= _uniforms(rng, rows)[:, None], axis=1)
    return picked if order is None else order[np.arange(rows), picked]


def _uniforms(rng: Rng, rows: int) -> np.ndarray:
    if isinstance(rng, np.random.Generator):
        return rng.random(rows)
    generators = list(rng)
    if len(generators) != rows:
        raise ValueError(f"{len(generators)} generators for {rows} rows")
    return np.array([g.random() for g in generators])


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (np.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be a number >= 0, got {temperature}")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0: off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1] (1: off), got {top_p}")


# --- text in, text out -----------------------------------------------------------------------------

def prompt_tokens(pipeline: TextPipeline, prompt: str) -> list[str]:
    """The prompt as the pipeline tokenizes it, its last sample left open (no `eos`) unless the
    prompt ends with a line break."""
    tokens = [t for sample in pipeline.process(prompt) for t in sample]
    if pipeline.eos and tokens and tokens[-1] == pipeline.eos and not prompt.endswith(("\n", "\r")):
        tokens.pop()
    return tokens


def detokenize(tokens: Sequence[str], pipeline: TextPipeline) -> str:
    """Tokens as text: `eos` ends a line, `bos` is dropped, and each line is joined back by
    sacremoses' Moses detokenizer (Moses pipelines) or by single spaces (whitespace ones)."""
    eos = pipeline.eos or "<eos>"
    lines: list[list[str]] = [[]]
    for token in tokens:
        if token == eos:
            lines.append([])
        elif token != pipeline.bos:
            lines[-1].append(token)
    if pipeline.tokenizer == "moses":
        from sacremoses import MosesDetokenizer

        moses = MosesDetokenizer(lang="en")
        return "\n".join(moses.detokenize(line, unescape=pipeline.escape) for line in lines)
    return "\n".join(" ".join(line) for line in lines)


# --- the generation loop ---------------------------------------------------------------------------

def require_next_logprobs(bundle: Bundle) -> None:
    """BundleError unless the graph returns the last position's full log-distribution."""
    bundle.require_output(OUTPUT_NEXT_LOGPROBS, "generation")


class GenerationStopped(Exception):
    """`generate` was told to stop before it finished."""


CONTEXT_CHUNK = 256  # context tokens per onnxruntime call; `stop()` is asked between calls


def generation_context(pipeline: TextPipeline, prompt: Sequence[str]) -> list[str]:
    """The tokens generation continues: `eos` (a fresh start), then the prompt's tokens
    (`prompt_tokens`)."""
    return [pipeline.eos or "<eos>", *prompt]


def generate(bundle: Bundle, prompt: str = "", *, tokens: int = 50, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, num_samples: int = 1,
             allow_unk: bool = False, stop: Callable[[], bool] | None = None,
             call: Call | None = None) -> list[Sample]:
    """`num_samples` continuations of `prompt`, `tokens` tokens each (see the module doc).

    `stop()`, asked before every onnxruntime call, ends the work early with GenerationStopped
    (the service's deadline, or its client leaving). `call(fn)` runs each onnxruntime call
    `fn()` and returns its result (default: here; the service runs them on its model thread, so
    they take turns with its batches)."""
    context = generation_context(bundle.pipeline, prompt_tokens(bundle.pipeline, prompt))
    return continue_context(bundle, context, tokens=tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, num_samples=num_samples,
                            allow_unk=allow_unk, stop=stop, call=call)


def continue_context(bundle: Bundle, context: Sequence[str], *, tokens: int = 50,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int | None = None, num_samples: int = 1, allow_unk: bool = False,
                     stop: Callable[[], bool] | None = None, call: Call | None = None
                     ) -> list[Sample]:
    """`generate` from an already tokenized context (`generation_context`'s tokens: `eos`
    first); the same arguments, the same samples."""
    require_next_logprobs(bundle)
    _check_sampling(temperature, top_k, top_p)
    if tokens < 1 or num_samples < 1:
        raise UserError("--tokens and --num-samples must be positive")
    if not context:
        raise ValueError("the context must hold at least its first token (eos)")
    vocab, pipeline = bundle.vocab, bundle.pipeline
    context = list(context)
    banned = [] if allow_unk or vocab.unk_id is None else [vocab.unk_id]
    rngs = [np.random.Generator(np.random.PCG64(s))
            for s in np.random.SeedSequence(seed).spawn(num_samples)]

    def run(ids: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        if stop is not None and stop():
            raise GenerationStopped
        if call is None:
            return bundle.session.next_logprobs(ids, state)
        return call(lambda: bundle.session.next_logprobs(ids, state))

    # The context runs once, in chunks; its state and distribution are then copied to every
    # sample.
    ids, state = vocab.encode(context)[None, :], bundle.session.zero_state(1)
    for start in range(0, ids.shape[1], CONTEXT_CHUNK):
        dist, state = run(ids[:, start:start + CONTEXT_CHUNK], state)
    dist = np.repeat(dist, num_samples, axis=0)
    state = [np.repeat(s, num_samples, axis=0) for s in state]
    drawn = np.zeros((num_samples, tokens), np.int64)
    for t in range(tokens):
        drawn[:, t] = sample_step(dist, rngs, temperature=temperature, top_k=top_k, top_p=top_p,
                                  banned=banned)
        if t + 1 < tokens:
            dist, state = run(drawn[:, t:t + 1].astype(np.int32), state)
    samples = []
    for row in drawn.tolist():
        words = vocab.decode(row)
        samples.append(Sample(row, words, detokenize(context[1:] + words, pipeline)))
    return samples


# --- CLI -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python serve/generate.py",
                                description=__doc__.splitlines()[0].split(" — ")[0])
    p.add_argument("--model", default=None,
                   help=f"bundle folder or name under {DEFAULT_BUNDLES_ROOT}/ "
                        "(default: the newest bundle there)")
    p.add_argument("--prompt", default="", help="text to continue (default: none)")
    p.add_argument("--tokens", type=int_at_least(1), default=50,
                   help="tokens to generate per sample (default 50)")
    p.add_argument("--temperature", type=float_at_least(0.0), default=1.0,
                   help="0: greedy; above 1 flatter, below 1 sharper (default 1)")
    p.add_argument("--top-k", type=int_at_least(0), default=0,
                   help="draw only from the k most likely tokens (default 0: off)")
    p.add_argument("--top-p", type=_top_p, default=1.0,
                   help="nucleus sampling: draw only from the most likely tokens that together "
                        "reach this probability (default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh each run)")
    p.add_argument("--num-samples", type=int_at_least(1), default=1,
                   help="samples, generated together as one batch (default 1)")
    p.add_argument("--allow-unk", action="store_true", help="let <unk> be generated")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per sample (text, tokens, ids)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="onnxruntime device (auto: CUDA when installed and present)")
    return p


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 bad input, 2 bad flags)."""
    args = build_parser().parse_args(argv)
    try:
        bundle = load_bundle(resolve_bundle(args.model), providers=choose_providers(args.device))
        samples = generate(bundle, args.prompt, tokens=args.tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           num_samples=args.num_samples, allow_unk=args.allow_unk)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    _, oov = bundle.vocab.encode(prompt_tokens(bundle.pipeline, args.prompt), return_oov=True)
    if oov:
        print(f"note: {oov} prompt token(s) not in the vocabulary, read as <unk>", file=sys.stderr)
    for i, sample in enumerate(samples, 1):
        if args.json:
            print(json.dumps({"sample": i, "text": sample.text, "tokens": sample.tokens,
                              "ids": sample.ids}))
        else:
            if len(samples) > 1:
                print(f"--- sample {i} of {len(samples)} ---")
            print(sample.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
