"""The typed training configuration: one schema for the command line, config.json and --resume."""

from __future__ import annotations

import json

import pytest
from helpers_runs import wikitext_slices

from keraslm import train as train_cli
from keraslm.config import (
    FIELDS,
    OVERRIDE,
    PROCESS,
    SAVED,
    DataConfig,
    ModelOptions,
    OptimConfig,
    RunConfig,
    TrainConfig,
    resume_config,
)
from keraslm.errors import UserError
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


def test_every_field_has_help_and_a_resume_policy():
    for name, (_, field) in FIELDS.items():
        assert field.metadata["help"], name
        assert field.metadata["resume"] in (SAVED, OVERRIDE, PROCESS), name


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
