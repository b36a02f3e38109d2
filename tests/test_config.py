"""The typed training configuration: one schema for the command line, config.json and --resume."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
from helpers_runs import wikitext_slices

from keraslm import train as train_cli
from keraslm.config import (
    FIELDS,
    PRESETS,
    PROCESS,
    SECTIONS,
    DataConfig,
    ModelOptions,
    OptimConfig,
    RunConfig,
    TrainConfig,
    flag_name,
    resume_config,
)
from keraslm.errors import UserError
from keraslm.rundir import RunDir
from keraslm.training import train


def test_every_flag_lands_in_its_section():
    config = train_cli.config_from_argv(
        ["--corpus", "sherlockholmes", "--nhid", "64", "--no-tied", "--lr", "1.5", "--quiet",
         "--cpu-replicas", "2", "--max-vocab", "500"])
    assert config.data == DataConfig(corpus="sherlockholmes", max_vocab=500)
    assert config.model == ModelOptions(nhid=64, tied=False)
    assert config.optim == OptimConfig(lr=1.5)
    assert config.run == RunConfig(quiet=True, cpu_replicas=2)
    resolved = config.model.resolve(1000)
    assert (resolved.emsize, resolved.nhid, resolved.tied, resolved.two_biases) == (200, 64,
                                                                                 False, True)


def test_no_flags_give_the_gluonnlp_tutorial():
    config = train_cli.config_from_argv([])
    assert config == TrainConfig()
    assert (config.optim.batch_size, config.optim.bptt, config.optim.lr, config.optim.clip,
            config.optim.epochs) == (20, 35, 20.0, 0.25, 3)
    assert config.model.resolve(33278).num_parameters() == 7_330_478


def test_the_equivalent_command_line_gives_the_same_config():
    config = TrainConfig.from_values({"lr": 3.0, "tied": False, "emsize": 100, "quiet": True,
                                      "train": "my.txt", "max_vocab": 500, "two_biases": False})
    argv = config.to_argv()
    assert "--no-tied" in argv and "--quiet" in argv
    assert train_cli.config_from_argv(argv) == config
    assert TrainConfig().to_argv() == []


@pytest.mark.parametrize(("flags", "needle"), [
    (["--bptt", "0"], "--bptt must be positive"), (["--lr", "-1"], "--lr must be positive"),
    (["--lr-decay", "2"], "--lr-decay"), (["--min-freq", "0"], "--min-freq"),
    (["--preset", "huge"], "unknown preset")])
def test_bad_settings_fail_before_anything_starts(flags, needle):
    with pytest.raises(UserError, match=needle):
        train_cli.config_from_argv(flags)


def test_config_json_round_trips_without_this_process_fields():
    config = TrainConfig.from_values({"lr": 3.0, "resume": "x", "log_losses": "l.jsonl",
                                      "runs_dir": "elsewhere", "name": "n"})
    saved = json.loads(json.dumps(config.to_dict()))
    assert "resume" not in saved["run"] and "log_losses" not in saved["run"]
    restored = TrainConfig.from_saved({"train": saved})
    assert restored == TrainConfig.from_values({"lr": 3.0, "name": "n"})


def test_resume_keeps_saved_settings_and_takes_only_overridable_flags():
    saved = TrainConfig.from_values({"lr": 3.0, "epochs": 2, "quiet": False, "seed": 4})
    resumed = resume_config(saved, {"epochs": 5, "quiet": True, "resume": "r", "lr": 3.0})
    assert (resumed.optim.epochs, resumed.run.quiet, resumed.run.resume) == (5, True, "r")
    assert (resumed.optim.lr, resumed.optim.seed) == (3.0, 4)
    with pytest.raises(UserError, match="--seed cannot change when resuming"):
        resume_config(saved, {"seed": 5})


def base_type(hint) -> type:
    """int for `int` and `int | None`."""
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def _other_values(name: str, default, hint, runs: Path) -> list:
    """Values of a field other than its default, valid for its type (every one for a bool with
    no default, every other choice, every other preset)."""
    if name == "preset":
        return [p for p in PRESETS if p != default]
    if name == "cutoffs":
        return ["2000,10000"]
    if name == "resume":  # a real run to continue
        run = RunDir(runs / "saved").create()
        run.write_config({"train": TrainConfig().to_dict()})
        return [str(run.path)]
    choices = FIELDS[name][1].metadata["choices"]
    if choices:
        return [c for c in choices if c != default]
    kind = base_type(hint)
    if kind is bool:
        return [True, False] if default is None else [not default]
    if kind is int:
        return [3 if default is None else default + 1]
    if kind is float:  # not a whole number, so an int-typed flag would refuse it
        value = (default or 1.0) * 0.375 + 0.0625
        return [value if value != default else value / 2]  # 0.1 maps to itself
    assert kind is str, (name, hint)
    return [f"x-{name}"]


def _field_cases(runs: Path) -> list[tuple[str, object]]:
    cases = []
    for name, (section, f) in FIELDS.items():
        hint = typing.get_type_hints(SECTIONS[section])[name]
        cases += [(name, value) for value in _other_values(name, f.default, hint, runs)]
    return cases


def test_every_field_is_a_flag_that_round_trips(tmp_path):
    """For every field of TrainConfig and every kind of value it takes: its flag gives it, the
    config's command line gives the same config back, and config.json keeps it (unless it
    belongs to this process only)."""
    cases = _field_cases(tmp_path / "runs")
    assert {name for name, _ in cases} == set(FIELDS)
    for name, value in cases:
        config = TrainConfig.from_values({name: value})
        assert config != TrainConfig(), name
        flag = flag_name(name)
        given = ([flag] if value is True else [f"--no-{flag[2:]}"] if value is False
                 else [flag, str(value)])
        assert train_cli.config_from_argv(given) == config, (name, given)
        argv = config.to_argv()
        assert argv == given, (name, argv)
        assert train_cli.config_from_argv(argv) == config, (name, argv)
        saved = TrainConfig.from_saved({"train": json.loads(json.dumps(config.to_dict()))})
        process = FIELDS[name][1].metadata["resume"] == PROCESS
        assert saved == (TrainConfig() if process else config), name


def test_all_fields_changed_at_once_round_trip(tmp_path):
    firsts = dict(reversed(_field_cases(tmp_path / "runs")))  # the first value of each field
    del firsts["resume"]  # (resuming refuses new values of the saved settings)
    config = TrainConfig.from_values(firsts)
    assert train_cli.config_from_argv(config.to_argv()) == config


def _help_entries(text: str) -> dict[str, str]:
    """--flag -> its help text, from argparse's --help output (one entry per option)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        start = re.match(r"  (--?[\w-]+)", line)
        if start:
            current = start.group(1)
            entries[current] = line[start.end():]
        elif current and line.startswith(" " * 4):
            entries[current] += " " + line
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_help_documents_every_flag_with_the_defaults_no_flags_give(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exited:
        train_cli.main(["--help"])
    assert exited.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    no_flags = train_cli.config_from_argv([]).values()
    for name, (section, f) in FIELDS.items():
        entry = entries.get(flag_name(name))
        assert entry is not None, f"{flag_name(name)} is not in --help"
        kind = base_type(typing.get_type_hints(SECTIONS[section])[name])
        described = entry.split(" ", 1)[-1] if kind is not bool else entry
        assert len(described.split()) >= 2, f"{flag_name(name)} has no help: {entry!r}"
        claims = re.findall(r"\(default ([^()]*)\)", entry)
        if kind is bool:
            assert not claims, (name, entry)  # on or off by the flag itself
        elif no_flags[name] is not None:  # (None is resolved later; its help says how, in words)
            assert claims and kind(claims[-1]) == no_flags[name], (name, entry, no_flags[name])
    preset_help = entries["--preset"]
    listed = [p for p in PRESETS if p in preset_help]
    assert listed == list(PRESETS), preset_help
    for preset in listed:  # every preset the help offers is one the flag takes
        model = train_cli.config_from_argv(["--preset", preset]).model.resolve(1000)
        assert (model.emsize, model.nhid, model.dropout) == tuple(
            PRESETS[preset][k] for k in ("emsize", "nhid", "dropout"))


def test_train_is_callable_from_python_with_a_config(tmp_path, data_root):
    corpus = wikitext_slices(tmp_path, {"train": 8_000, "valid": 2_000, "test": 2_000}, data_root)
    config = TrainConfig(
        data=DataConfig(train=str(corpus["train"]), valid=str(corpus["valid"]),
                        test=str(corpus["test"])),
        model=ModelOptions(emsize=8, nhid=8),
        optim=OptimConfig(epochs=1, batch_size=4, bptt=10, eval_batch_size=4,
                          test_batch_size=4, max_batches=5),
        run=RunConfig(runs_dir=str(tmp_path / "runs"), name="py", quiet=True, log_interval=0))
    run = train(config)
    assert run.path == tmp_path / "runs" / "py"
    assert run.best_weights_path.is_file()
    recorded = run.read_config()
    assert TrainConfig.from_saved(recorded) == config.__class__.from_values(
        {k: v for k, v in config.values().items() if k != "runs_dir"})
    assert recorded["model"]["two_biases"] is True
