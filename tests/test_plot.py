"""The training-curve command draws a run's metrics.jsonl into a small PNG."""

from __future__ import annotations

import json

from keraslm import plot
from keraslm.rundir import RunDir


def make_run(path, records):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return RunDir(path)


def test_plot_writes_a_small_png_of_every_epoch(tmp_path, capsys):
    records = [{"epoch": 1, "train_ppl": 900.0, "val_ppl": 300.0, "test_ppl": 280.0, "best": True},
               {"epoch": 2, "train_ppl": 500.0, "val_ppl": 310.0, "best": False}]
    run = make_run(tmp_path / "runs" / "r", records)
    assert plot.main([str(run.path)]) == 0
    png = (run.path / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 5_000 < len(png) < 100_000
    assert "curve.png" in capsys.readouterr().out


def test_plot_of_a_run_without_epochs_is_a_one_line_error(tmp_path, capsys):
    run = make_run(tmp_path / "r", [])
    assert plot.main([str(run.path), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no epochs" in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()
