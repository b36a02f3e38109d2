"""The bundle's card: `README.md` beside model.onnx, written by export.to_onnx.

What the model is (preset, sizes, parameters), the data and text pipeline it was trained on, its
validation and test perplexity per epoch, its training curve (`curve.png`, by keraslm.plot), the
ONNX graph's inputs and outputs, how to score with it, and its known limits. Every number comes
from the run's files (config.json, metrics.jsonl) or from bundle.json; what a run did not record
is said to be unknown, never guessed.
"""

from __future__ import annotations

from pathlib import Path

from keraslm.config import LMConfig
from keraslm.errors import UserError
from keraslm.files import write_text_atomic
from keraslm.rundir import RunDir

CARD_FILE = "README.md"
CURVE_FILE = "curve.png"
SPLITS = ("train", "valid", "test")


def write_card(bundle: Path, run: RunDir, info: dict, name: str) -> Path:
    """Write the card (and the curve, when the run has metrics and matplotlib is installed) into
    the bundle folder `bundle`; `info` is its bundle.json and `name` the bundle's name."""
    metrics = run.read_metrics()
    curve = _write_curve(run, bundle / CURVE_FILE) if metrics else None
    path = bundle / CARD_FILE
    write_text_atomic(path, render_card(run.read_config(), metrics, info, name, curve))
    return path


def _write_curve(run: RunDir, out: Path) -> str | None:
    try:
        from keraslm.plot import plot_run
    except ImportError:  # pragma: no cover - matplotlib comes with the train extra
        return None
    try:
        plot_run(run, out)
    except (ImportError, UserError):
        return None
    return out.name


def render_card(config: dict, metrics: list[dict], info: dict, name: str,
                curve: str | None = None) -> str:
    """The card's Markdown from the run's config.json and metrics.jsonl records and bundle.json."""
    intro = (f"# {name}\n\nA word-level LSTM language model trained with keraslm (Keras on "
             "TensorFlow) and exported to ONNX, to score and generate text with onnxruntime alone.")
    sections = [
        intro,
        _model_section(config, info),
        _data_section(config, info),
        _results_section(metrics, curve),
        _graph_section(info),
        _usage_section(name),
        _limits_section(config, info),
    ]
    return "\n\n".join(sections) + "\n"


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _preset(config: dict) -> str:
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    model = train.get("model") if isinstance(train.get("model"), dict) else {}
    return model.get("preset") or config.get("args", {}).get("preset") or "not recorded"


def _model_section(config: dict, info: dict) -> str:
    m = LMConfig.from_dict(info["model"])
    rows = [("preset", _preset(config)), ("LSTM layers", m.nlayers), ("embedding size", m.emsize),
            ("hidden size", _hidden_sizes(m)), ("vocabulary", m.vocab_size), ("tied embedding", m.tied),
            ("two biases (MXNet)", m.two_biases), ("dropout (training)", m.dropout),
            ("output layer", _output_layer(m)), ("parameters", f"{m.num_parameters():,}")]
    quantized = info.get("quantization")
    rows.append(("weights", "int8 (dynamic quantization)" if quantized else "float32"))
    return "## Model\n\n" + _table(("", "value"), rows)


def _hidden_sizes(m: LMConfig) -> str:
    """`nhid`, or each layer's size when they differ (a last layer as wide as the embedding)."""
    sizes = m.layer_sizes()
    return str(m.nhid) if set(sizes) == {m.nhid} else " / ".join(map(str, sizes))


def _output_layer(m: LMConfig) -> str:
    if m.softmax != "adaptive":
        return "full softmax"
    cutoffs = ", ".join(f"{c:,}" for c in m.cutoffs) or "none"
    return f"adaptive softmax: cutoffs {cutoffs}; div_value {m.div_value:g}"


def _data_section(config: dict, info: dict) -> str:
    corpora = config.get("corpora") or {}
    rows = [(split, f"`{Path(c.get('path', '?')).name}`", f"`{c.get('sha1', '?')}`",
             f"{c['tokens']:,}" if "tokens" in c else "?", c.get("oov", "?"))
            for split in SPLITS if isinstance(c := corpora.get(split), dict)]
    text = "## Data and text pipeline\n\n"
    text += (_table(("split", "file", "SHA-1", "tokens", "OOV"), rows) if rows else
             "The run recorded no corpora.")
    p = info["pipeline"]
    moses = (f"sacremoses (lang en), XML escaping {'on' if p.get('escape') else 'off'}, "
             f"protected tokens {', '.join(p.get('protected') or []) or 'none'}"
             if p.get("tokenizer") == "moses" else "whitespace (the text is already tokenized)")
    text += ("\n\n" + _table(("pipeline", "setting"), [
        ("samples", "one per line" if p.get("split") == "lines" else "one per sentence (punkt)"),
        ("tokenizer", moses), ("begin / end of sample", f"{_code(p.get('bos'))} / {_code(p.get('eos'))}"),
        ("empty samples", "skipped" if p.get("skip_empty") else "kept")]))
    return text


def _code(token: str | None) -> str:
    return f"`{token}`" if token else "none"


def _results_section(metrics: list[dict], curve: str | None) -> str:
    text = "## Results\n\n"
    if not metrics:
        return text + "The run recorded no epochs (no metrics.jsonl)."
    rows = [(r["epoch"], _ppl(r, "train_ppl"), _ppl(r, "val_ppl"), _ppl(r, "test_ppl"),
             f"{r['lr']:g}" if "lr" in r else "–", "yes" if r.get("best", True) else "")
            for r in metrics]
    best = min(metrics, key=lambda r: r["val_ppl"])
    text += (f"{len(metrics)} epoch(s) trained. The exported weights are epoch {best['epoch']}'s "
             f"(the best validation perplexity): validation perplexity {best['val_ppl']:.2f}"
             + (f", test perplexity {best['test_ppl']:.2f}" if "test_ppl" in best else "")
             + ".\n\n" + _table(("epoch", "train ppl", "valid ppl", "test ppl", "lr",
                                 "best so far"), rows))
    if curve:
        text += f"\n\n![training curve: perplexity per epoch]({curve})"
    return text


def _ppl(record: dict, key: str) -> str:
    return f"{record[key]:.2f}" if key in record else "–"


def _graph_section(info: dict) -> str:
    rows = [(kind, f"`{io['name']}`", io["dtype"], "[" + ", ".join(map(str, io["shape"])) + "]")
            for kind in ("inputs", "outputs") for io in info.get(kind, [])]
    return ("## ONNX graph\n\n`model.onnx`, opset " + str(info.get("opset")) + " (the contract "
            "is keraslm/contract.py). Log-probabilities are natural logs; a target < 0 is padding "
            "and scores 0.\n\n" + _table(("", "name", "dtype", "shape"), rows))


def _usage_section(name: str) -> str:
    b = f"bundles/{name}"
    return f"""## How to score with it

```
python serve/score.py --model {b} FILE                # perplexity of a file
python serve/score.py --model {b} FILE --cache-size 2000 --tune-cache VALID_FILE
                                        # with the continuous cache, tuned on VALID_FILE
python serve/generate.py --model {b} --prompt "The"   # sample a continuation
python -m serve.server --model {b}                    # HTTP service and page on :8080
curl -s localhost:8080/v1/score -H 'content-type: application/json' -d '{{"texts": ["a text"]}}'
```

From Python: `from serve.scorer import Scorer; Scorer("{b}").score(["a text"])`."""


def _limits_section(config: dict, info: dict) -> str:
    m, p = info["model"], info["pipeline"]
    test = (config.get("corpora") or {}).get("test") or {}
    unk = (f"{test['oov'] / test['tokens']:.2%} of its own test split's {test['tokens']:,} tokens "
           f"were out of the vocabulary; tokens written `<unk>` in the corpus itself, as in WikiText, "
           f"are not counted" if test.get("tokens") else
           "its rate on the run's test split was not recorded")
    return f"""## Known limits

- Closed vocabulary of {m['vocab_size']:,} tokens: any other word is scored as `<unk>` ({unk}).
  A text's perplexity is only comparable with others under the same vocabulary and pipeline.
- Case-sensitive: the pipeline does not lower-case (`The` and `the` are different tokens).
- Text must go through the same pipeline as training (tokenizer `{p.get('tokenizer')}`); the
  scorer, service and generator do this for you."""
