"""The training-curve command draws a run's metrics.jsonl into a small PNG."""

from __future__ import annotations

import json

import pytest

from keraslm import plot
from keraslm.rundir import RunDir


def make_run(path, records):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return RunDir(path)


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved while the test runs, as it was when saved."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def test_plot_draws_every_epoch_of_metrics_jsonl(tmp_path, capsys, saved_figures):
    """Every epoch's train and validation perplexity, test perplexity where it was measured,
    and a mark at each epoch whose learning rate decayed (not best), into a PNG."""
    records = [
        {"epoch": 1, "train_ppl": 900.0, "val_ppl": 300.0, "test_ppl": 280.0, "best": True},
        {"epoch": 2, "train_ppl": 500.0, "val_ppl": 310.0, "best": False},
        {"epoch": 3, "train_ppl": 420.0, "val_ppl": 250.0, "test_ppl": 240.0, "best": True},
        {"epoch": 4, "train_ppl": 400.0, "val_ppl": 260.0, "best": False},
        {"epoch": 5, "train_ppl": 390.0, "val_ppl": 245.0, "test_ppl": 236.0, "best": True},
    ]
    run = make_run(tmp_path / "runs" / "r", records)
    assert plot.main([str(run.path)]) == 0
    assert str(run.path / "curve.png") in capsys.readouterr().out
    assert (run.path / "curve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    (fig,) = saved_figures
    (ax,) = fig.axes
    curves = {line.get_label(): line for line in ax.get_lines()
              if not line.get_label().startswith("_")}  # axvline's are "_child<n>"
    assert set(curves) == {"train", "validation", "test"}

    def points(label):
        line = curves[label]
        return list(zip(line.get_xdata().tolist(), line.get_ydata().tolist()))

    assert points("train") == [(r["epoch"], r["train_ppl"]) for r in records]
    assert points("validation") == [(r["epoch"], r["val_ppl"]) for r in records]
    assert points("test") == [(r["epoch"], r["test_ppl"]) for r in records if "test_ppl" in r]
    decays = sorted(line.get_xdata()[0] for line in ax.get_lines()
                    if line.get_label().startswith("_"))
    assert decays == [r["epoch"] for r in records if not r["best"]]
    assert ax.get_yscale() == "log"
    assert ax.get_xticks().tolist() == [r["epoch"] for r in records]


def test_plot_of_a_run_without_epochs_is_a_one_line_error(tmp_path, capsys):
    run = make_run(tmp_path / "r", [])
    assert plot.main([str(run.path), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no epochs" in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()
