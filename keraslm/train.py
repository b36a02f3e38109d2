"""CLI: train an LSTM language model — `python -m keraslm.train`.

With no flags: GluonNLP's tutorial (standard_lstm_lm_200 on WikiText-2, batch 20, bptt 35,
lr 20, clip 0.25, 3 epochs) into `runs/<name>/`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from keraslm.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m keraslm.train", description=__doc__.splitlines()[0])
    data = p.add_argument_group("data")
    data.add_argument("--corpus", default=None, help="named corpus (default wikitext-2)")
    for split in ("train", "valid", "test"):
        data.add_argument(f"--{split}", metavar="PATH", help=f"your own {split} file")
    data.add_argument("--format", choices=("tokens", "raw"), default=None,
                      help="tokens: one sample per line, whitespace tokens; raw: sentences + Moses")
    data.add_argument("--moses-tutorial", action="store_true",
                      help="the tutorial's Moses settings (XML escaping on, <unk> not protected)")
    data.add_argument("--data-root", default=None, help="corpora folder (default $KERASLM_DATA)")
    data.add_argument("--min-freq", type=int, default=1)
    data.add_argument("--max-vocab", type=int, default=None)

    model = p.add_argument_group("model")
    model.add_argument("--preset", default="standard_lstm_lm_200")
    model.add_argument("--emsize", type=int, default=None)
    model.add_argument("--nhid", type=int, default=None)
    model.add_argument("--nlayers", type=int, default=None)
    model.add_argument("--dropout", type=float, default=None)
    model.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--two-biases", action=argparse.BooleanOptionalAction, default=None,
                       help="MXNet's twin LSTM biases (on for the GluonNLP presets)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=3)
    opt.add_argument("--batch-size", type=int, default=20)
    opt.add_argument("--bptt", type=int, default=35)
    opt.add_argument("--lr", type=float, default=20.0)
    opt.add_argument("--clip", type=float, default=0.25, help="global gradient norm (0: off)")
    opt.add_argument("--lr-decay", type=float, default=0.25,
                     help="learning-rate factor when validation perplexity does not improve")
    opt.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    opt.add_argument("--momentum", type=float, default=0.0)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--last-batch", choices=("discard", "keep"), default="discard",
                     help="training batches: drop the incomplete tail (tutorial) or pad it")
    opt.add_argument("--eval-batch-size", type=int, default=10)
    opt.add_argument("--test-batch-size", type=int, default=1)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--max-batches", type=int, default=None,
                     help="stop each epoch after this many batches (quick trials)")

    run = p.add_argument_group("run")
    run.add_argument("--runs-dir", default="runs")
    run.add_argument("--name", default=None, help="run name (default run-<timestamp>)")
    run.add_argument("--resume", metavar="RUN", default=None,
                     help="continue an interrupted run from its last checkpoint")
    run.add_argument("--finetune-from", metavar="RUN", default=None,
                     help="start from a run's best weights and vocabulary")
    run.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                     help="also save a resumable checkpoint every N batches")
    run.add_argument("--log-interval", type=int, default=200)
    run.add_argument("--cpu-replicas", type=int, default=None,
                     help="split the CPU into N replicas (when there is no GPU)")
    run.add_argument("--strategy", choices=("mirrored", "multiworker"), default="mirrored",
                     help="multiworker: MultiWorkerMirroredStrategy over the hosts in $TF_CONFIG "
                          "(run the same command on every host; only the chief writes the run)")
    run.add_argument("--log-losses", metavar="PATH", default=None,
                     help="debug: append every step's loss, lr and gradient norm to PATH (JSON "
                          "lines; each process its own file, not inherited by --resume)")
    run.add_argument("--jit", action="store_true",
                     help="XLA-compile the whole per-replica step (measured slower on CPU; "
                          "the decoder's element-wise work is always compiled)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill`), handled like Ctrl-C: save a checkpoint, then stop."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        from keraslm.fit import run_training

        run_training(args, argv if argv is not None else sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"{what}: {err or 'a resumable checkpoint was saved'}", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
