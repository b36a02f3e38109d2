"""What scoring reports: one result type per concept, and the one perplexity function.

`TextScore` is a text scored on its own; `CorpusScore` is a corpus scored as carried BPTT
streams. Both are produced by the onnxruntime scorer (serve/scorer.py) and the corpus score also
by `keraslm.evaluate` (TensorFlow), and both serialise with the same field names everywhere: the
CLI's `--json` and `--per-line`, Python and HTTP.

Definitions, the same for every producer:
- perplexity = exp(mean NLL over the targets scored), natural logs, `<unk>` targets included;
- `num_oov` counts the text's tokens that are not in the vocabulary (scored as `<unk>`); a
  corpus's `oov_rate` divides it by the text's tokens (its stream tokens, not its targets);
- JSON has no NaN or infinity: those are written as null.

Pure Python: imported by training, export and serving alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


def perplexity(nll_sum: float, count: int) -> float:
    """exp(nll_sum / count): nan when nothing was scored, inf when the mean overflows."""
    if count <= 0:
        return math.nan
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 else math.inf


def finite_or_none(x: float | None) -> float | None:
    """`x`, or None when it is NaN or infinite (JSON has neither)."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class TextScore:
    """One text scored on its own: `<eos>` as context, then every token of the text."""

    num_tokens: int        # tokens scored (the text's own bos/eos included)
    num_oov: int           # of those, not in the vocabulary (scored as <unk>)
    log_likelihood: float  # natural log, summed over the tokens

    @property
    def perplexity(self) -> float:
        return perplexity(-self.log_likelihood, self.num_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "num_oov": self.num_oov,
                "log_likelihood": finite_or_none(self.log_likelihood),
                "perplexity": finite_or_none(self.perplexity)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextScore:
        ll = d["log_likelihood"]
        return cls(int(d["num_tokens"]), int(d["num_oov"]), -math.inf if ll is None else float(ll))


@dataclass(frozen=True)
class CorpusScore:
    """A corpus scored as `batch_size` carried streams (the column layout of keraslm.batching
    with last_batch='keep': every stream token but the first of each column is a target once)."""

    source: str             # the file, as named to the scorer
    model: str              # the bundle (onnxruntime) or run (TensorFlow) that scored it
    pipeline: str           # TextPipeline.describe() of the pipeline used
    runtime: str            # onnxruntime's execution provider, or "tensorflow"
    batch_size: int
    bptt: int
    num_stream_tokens: int  # tokens in the text
    num_tokens: int         # targets scored
    num_oov: int            # stream tokens not in the vocabulary
    num_unk: int | None     # targets that are <unk> (out-of-vocabulary or a literal <unk>);
                            # None where not counted (keraslm.evaluate)
    nll_sum: float          # natural log
    nll_sum_unk: float | None  # the part of nll_sum from <unk> targets (None: not counted)
    seconds: float
    cache: dict | None = None  # the continuous cache's settings (CacheSettings.to_dict), or off

    @property
    def oov_rate(self) -> float:
        return self.num_oov / self.num_stream_tokens if self.num_stream_tokens else math.nan

    @property
    def avg_nll(self) -> float:
        return self.nll_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def perplexity(self) -> float:
        """exp(mean NLL over all targets, <unk> included)."""
        return perplexity(self.nll_sum, self.num_tokens)

    @property
    def perplexity_excl_unk(self) -> float:
        """exp(mean NLL over the targets that are not <unk>): KenLM's "excluding OOVs" (nan
        when <unk> targets were not counted)."""
        if self.num_unk is None or self.nll_sum_unk is None:
            return math.nan
        return perplexity(self.nll_sum - self.nll_sum_unk, self.num_tokens - self.num_unk)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else math.nan

    DERIVED = ("oov_rate", "avg_nll", "perplexity", "perplexity_excl_unk", "tokens_per_second")

    def to_dict(self) -> dict[str, Any]:
        """Every field and derived figure; NaN and infinity (a cache weight of 1 can give an
        infinite NLL) as null."""
        d = asdict(self)
        for name in ("nll_sum", "nll_sum_unk"):
            d[name] = finite_or_none(d[name])
        return {**d, **{name: finite_or_none(getattr(self, name)) for name in self.DERIVED}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorpusScore:
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        values["nll_sum"] = math.inf if values.get("nll_sum") is None else float(values["nll_sum"])
        if values.get("nll_sum_unk") is None and values.get("num_unk") is not None:
            values["nll_sum_unk"] = math.inf  # counted, but infinite (written as null)
        return cls(**values)
