"""bench/equal_time.py: epochs placed on the wall clock from metrics.jsonl, and the runs compared
where the shortest one stopped."""

from __future__ import annotations

import json
from pathlib import Path

from bench.equal_time import best_by, epoch_hours, main, training_flops
from bench.seed_table import read_metrics


def _run(folder: Path, epochs: list[tuple[float, float, float]], nhid: int = 8) -> Path:
    """A run folder whose epochs took (training seconds, eval seconds) and reached val_ppl."""
    folder.mkdir()
    model = {"nhid": nhid, "emsize": 4, "nlayers": 1, "vocab_size": 10}
    (folder / "config.json").write_text(json.dumps({"model": model}))
    records = [{"epoch": i + 1, "seconds": train, "eval_seconds": evaluate, "val_ppl": ppl,
                "tokens_per_s": 100.0, "best": True, "test_ppl": ppl - 1}
               for i, (train, evaluate, ppl) in enumerate(epochs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_an_epochs_hours_count_its_training_and_its_evaluation(tmp_path):
    run = _run(tmp_path / "a", [(3000, 600, 300.0), (3000, 600, 200.0)])
    assert epoch_hours(run, read_metrics(run)) == {1: 1.0, 2: 2.0}


def test_runs_are_compared_by_what_they_had_when_the_shortest_stopped(tmp_path, capsys):
    fast = _run(tmp_path / "fast", [(1700, 100, 400.0), (1700, 100, 250.0), (1700, 100, 180.0),
                                    (1700, 100, 190.0)])  # 0.5 h an epoch, 2 h in all
    slow = _run(tmp_path / "slow", [(3600, 1800, 300.0), (1800, 0, 260.0)], nhid=16)  # 1.5, 2.0
    hours, records = epoch_hours(fast, read_metrics(fast)), read_metrics(fast)
    assert best_by(hours, records, 1.0) == (250.0, 2)
    assert best_by(hours, records, 0.4) is None
    assert training_flops(slow) == 3 * 2 * (4 * 16 * (4 + 16) + 16 * 10)
    assert main([str(fast), str(slow), "--peak", "1"]) == 0
    out = capsys.readouterr().out
    assert "At equal wall time (2.00 h" in out
    assert "- fast: best validation perplexity 180.00 (epoch 3)" in out
    assert "- slow: best validation perplexity 260.00 (epoch 2)" in out
    assert "| 1 | 1.50 | 300.00 | 299.00 | 100 |" in out
