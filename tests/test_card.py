"""The bundle's card (export/card.py): every number in README.md is the run's."""

from __future__ import annotations

import json
import re

from helpers_runs import make_run, wikitext_tokens

from export.to_onnx import export_run
from keraslm.corpora import sha1_of
from keraslm.model import LMConfig
from keraslm.vocab import Vocab

METRICS = [  # as the trainer writes them: epoch 2 is the best, epoch 3 decayed the rate
    {"epoch": 1, "lr": 20.0, "train_ppl": 900.123, "val_ppl": 700.456, "val_tokens": 99,
     "test_ppl": 710.789, "test_tokens": 120, "best": True},
    {"epoch": 2, "lr": 20.0, "train_ppl": 500.5, "val_ppl": 450.25, "val_tokens": 99,
     "test_ppl": 460.125, "test_tokens": 120, "best": True},
    {"epoch": 3, "lr": 20.0, "train_ppl": 480.0, "val_ppl": 455.0, "val_tokens": 99,
     "best": False},
]


def test_the_card_holds_the_runs_numbers(tmp_path):
    vocab = Vocab.build(wikitext_tokens(3000), max_size=150)
    config = LMConfig(vocab_size=len(vocab), emsize=8, nhid=12, nlayers=2, tied=False)
    run = make_run(tmp_path / "runs" / "tiny", config, vocab)
    corpus = tmp_path / "test.txt"
    corpus.write_text("the game began .\n", encoding="utf-8")
    saved = run.read_config()
    saved["train"]["model"] = {"preset": "standard_lstm_lm_200"}
    saved["corpora"] = {split: {"path": str(corpus), "sha1": sha1_of(corpus), "tokens": tokens,
                                "oov": oov}
                        for split, tokens, oov in (("train", 12345, 0), ("test", 2000, 37))}
    run.write_config(saved)
    for record in METRICS:
        run.append_metrics(record)

    bundle = export_run(run, tmp_path / "bundles" / "tiny")
    card = (bundle / "README.md").read_text(encoding="utf-8")
    info = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))

    assert card.startswith("# tiny\n")
    assert f"| parameters | {config.num_parameters():,} |" in card
    assert "| output layer | full softmax |" in card
    assert "| preset | standard_lstm_lm_200 |" in card and "| hidden size | 12 |" in card
    assert f"| train | `test.txt` | `{sha1_of(corpus)}` | 12,345 | 0 |" in card
    assert f"| test | `test.txt` | `{sha1_of(corpus)}` | 2,000 | 37 |" in card
    assert "1.85% of its own test split's 2,000 tokens" in card  # 37 / 2000
    assert "3 epoch(s) trained" in card
    assert "epoch 2's (the best validation perplexity): validation perplexity 450.25, " \
           "test perplexity 460.12." in card
    for r in METRICS:
        assert re.search(rf"^\| {r['epoch']} \| {r['train_ppl']:.2f} \| {r['val_ppl']:.2f} \|",
                         card, re.MULTILINE)
    for io in info["inputs"] + info["outputs"]:
        assert f"`{io['name']}` | {io['dtype']} |" in card
    assert f"Closed vocabulary of {len(vocab):,} tokens" in card
    assert "--model bundles/tiny" in card
    assert "![training curve: perplexity per epoch](curve.png)" in card
    assert (bundle / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert not list(bundle.glob(".*"))  # no temporary files left behind


def test_a_run_without_metrics_says_so(tmp_path):
    vocab = Vocab.build(wikitext_tokens(2000), max_size=100)
    run = make_run(tmp_path / "bare", LMConfig(vocab_size=len(vocab), emsize=8, nhid=8,
                                               nlayers=1, tied=False), vocab)
    bundle = export_run(run, tmp_path / "bundle")
    card = (bundle / "README.md").read_text(encoding="utf-8")
    assert "The run recorded no epochs" in card and "| preset | not recorded |" in card
    assert "not recorded)" in card and not (bundle / "curve.png").exists()
