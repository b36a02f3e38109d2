"""CLI: train an LSTM language model — `python -m keraslm.train`.

With no flags: GluonNLP's tutorial (standard_lstm_lm_200 on WikiText-2, batch 20, bptt 35,
lr 20, clip 0.25, 3 epochs) into `runs/<name>/`. The flags are the fields of
`keraslm.config.TrainConfig`; `--resume RUN` continues a run with its saved settings and the
flags given again (those a resumed run may change: epochs, logging, devices, data root).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any

from keraslm.config import FIELDS, SECTIONS, TrainConfig, flag_name, resume_config
from keraslm.errors import UserError
from keraslm.quiet import start_tensorflow
from keraslm.rundir import resolve_run

TITLES = {"data": "data", "model": "model", "optim": "optimisation", "run": "run"}


def build_parser() -> argparse.ArgumentParser:
    """One option per config field; an option not given is absent from the parsed namespace."""
    parser = argparse.ArgumentParser(prog="python -m keraslm.train",
                                     description=__doc__.splitlines()[0],
                                     argument_default=argparse.SUPPRESS)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(TITLES[section])
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            group.add_argument(flag_name(field.name), dest=field.name,
                               **_argument(field, hints[field.name]))
    return parser


def _argument(field: dataclasses.Field, hint: Any) -> dict:
    meta = field.metadata
    help_text = meta["help"] + ("" if field.default is None or isinstance(field.default, bool)
                                else f" (default {field.default})")
    options: dict[str, Any] = {"help": help_text}
    kind = _base_type(hint)
    if kind is bool:
        options["action"] = ("store_true" if field.default is False
                             else argparse.BooleanOptionalAction)
        return options
    options["type"] = kind
    if meta["choices"]:
        options["choices"] = meta["choices"]
    if meta["metavar"]:
        options["metavar"] = meta["metavar"]
    return options


def _base_type(hint: Any) -> type:
    """int for `int`, `int | None` and `Optional[int]`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def config_from_argv(argv: list[str] | None) -> TrainConfig:
    """The run's configuration from the command line (the saved one, for --resume)."""
    given = vars(build_parser().parse_args(argv))
    if "resume" not in given:
        return TrainConfig.from_values(given)
    run = resolve_run(given["resume"], given.get("runs_dir", FIELDS["runs_dir"][1].default))
    return resume_config(TrainConfig.from_saved(run.read_config()), given)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = config_from_argv(argv)
        start_tensorflow()
        from keraslm.training import Stopped, train  # TensorFlow: only once the flags are good

        try:
            train(config, command=[sys.executable, "-m", "keraslm.train", *argv])
        except Stopped as stopped:
            what = "interrupted" if stopped.exit_status == 130 else "terminated"
            print(f"{what}: {stopped}", file=sys.stderr)
            return stopped.exit_status
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
