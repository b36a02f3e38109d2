"""Export a training run to a serving bundle: `python -m export.to_onnx [RUN] [--out DIR]`.

    bundles/<run name>/
        model.onnx        the scoring graph (export/graph.py builds it)
        model.onnx.data   its weights, only for models too big for one protobuf (> 1 GiB here)
        vocab.json        copied from the run
        bundle.json       schema version, model config, text pipeline, source run, versions,
                          opset, quantization, the LSTM layers' sizes, and the graph's inputs
                          and outputs
        README.md         the model's card (export/card.py): model, data, perplexities, usage
        curve.png         its training curve, when the run has metrics and matplotlib is installed

keraslm/contract.py defines this format (file names, schema version, graph inputs and outputs) for
both sides.

The bundle is built in a temporary folder beside its destination, checked with the ONNX checker,
and only then renamed into place, so a failed export leaves the previous bundle (or nothing).
TensorFlow is imported only once the run and the destination are known good: a mistake costs
one line on stderr, not TensorFlow's start-up time and log noise.

Opset: DEFAULT_OPSET = 17. The graph needs at least 13 (LogSoftmax over one axis instead of a
flattened 2-D coercion; GatherND with batch_dims). 17 lies inside tf2onnx 1.17's range (it knows
opsets up to 18), loads in every onnxruntime since 1.12 (2022), so serving hosts need nothing
recent, and onnxruntime's dynamic quantization handles it. Opsets 13-18 all export the same ops
here and score identically; a newer one buys this graph nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

import keraslm
from export.card import write_card
from keraslm.contract import (
    BUNDLE_FILE,
    DATA_FILE,
    DEFAULT_BUNDLES_ROOT,
    MODEL_FILE,
    VOCAB_FILE,
    BundleMeta,
)
from keraslm.corpora import sha1_of
from keraslm.errors import UserError
from keraslm.files import current_umask
from keraslm.quiet import start_tensorflow
from keraslm.rundir import RunDir, resolve_run
from keraslm.text import TextPipeline
from keraslm.vocab import Vocab

if TYPE_CHECKING:
    from keraslm.backend import keras
    from keraslm.config import LMConfig

DEFAULT_OPSET, MIN_OPSET, MAX_OPSET = 17, 13, 18
QUANTIZE_CHOICES = ("int8",)
# Above this many bytes of weights the model goes through tf2onnx's large-model path and is saved
# with ONNX external data. Protobuf's hard limit is 2 GiB; the margin covers the graph itself and
# the transposed copy of tied weights that exists until graph.share_tied_embedding removes it.
LARGE_MODEL_BYTES = 1 << 30


def export_run(run: RunDir | str | os.PathLike | None, out: str | os.PathLike | None = None, *,
               opset: int = DEFAULT_OPSET, quantize: str | None = None,
               external_data: bool | None = None) -> Path:
    """Export `run` (a RunDir, a path, a name under runs/, or None for the newest) to a bundle.

    `out` defaults to bundles/<run name>. `quantize="int8"` stores a dynamically quantized model
    and records its measured perplexity and speed change. `external_data` forces (True) or
    forbids (False) ONNX external data; by default only models over 1 GiB of weights use it.
    Returns the bundle directory.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise UserError(f"--quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    run = run if isinstance(run, RunDir) else resolve_run(run)
    run_config, pipeline, vocab = read_run(run)
    out = Path(out) if out is not None else DEFAULT_BUNDLES_ROOT / run.name
    _check_replaceable(out)
    work = _work_dir(out)
    try:
        meta = _write_model(work, run, run_config, vocab, opset, quantize, external_data)
        meta = dataclasses.replace(meta, pipeline=pipeline.to_dict(), source_run=_source_run(run),
                                   versions=_versions())
        shutil.copyfile(run.vocab_path, work / VOCAB_FILE)
        meta.write(work / BUNDLE_FILE)
        write_card(work, run, meta.to_dict(), out.name)
        _replace_dir(work, out)
    except OSError as err:
        raise UserError(f"cannot write the bundle {out}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def read_run(run: RunDir) -> tuple[dict, TextPipeline, Vocab]:
    """What export needs from a run, validated without TensorFlow: config, pipeline, vocab."""
    run_config = run.read_config()
    model_config = run.model_config()
    if not isinstance(run_config.get("pipeline"), dict):
        raise UserError(f"{run.config_path}: no text pipeline")
    pipeline = TextPipeline.from_dict(run_config["pipeline"])
    run.require_best_weights()
    return run_config, pipeline, run.read_vocab(model_config.vocab_size)


def _write_model(work: Path, run: RunDir, run_config: dict, vocab: Vocab, opset: int,
                 quantize: str | None, external_data: bool | None) -> BundleMeta:
    """Convert the run's model into work/MODEL_FILE (checked); the bundle.json of its graph
    (the caller adds the pipeline, source run and versions)."""
    start_tensorflow()
    from export import graph  # TensorFlow starts here
    from keraslm.runs import load_run_model

    model, config = load_run_model(run, fused=False)
    if external_data is None:
        external_data = 4 * config.num_parameters() > LARGE_MODEL_BYTES
    proto = graph.convert(model, config, opset, large=external_data, share_tied=not quantize)
    if quantize:
        quantization = _write_quantized(work, proto, model, config, external_data,
                                        run_config, vocab)
    else:
        _save_checked(proto, work / MODEL_FILE, external_data)
        quantization = None
    written = onnx.load(work / MODEL_FILE, load_external_data=False)
    inputs, outputs = graph.describe_io(written)
    return BundleMeta(model=config.to_dict(), pipeline={}, inputs=inputs, outputs=outputs,
                      opset=opset, external_data=tuple(graph.external_data_files(written)),
                      quantization=quantization, layer_sizes=config.layer_sizes())


def _source_run(run: RunDir) -> dict:
    return {
        "name": run.name,
        "path": str(run.path.resolve()),
        "config_sha1": sha1_of(run.config_path),
        "weights_sha1": sha1_of(run.best_weights_path),
    }


def _write_quantized(work: Path, proto: onnx.ModelProto, model: keras.Model,
                     config: LMConfig, external_data: bool, run_config: dict,
                     vocab: Vocab) -> dict:
    """Quantize `proto` (tied weights not yet shared) into work/MODEL_FILE, checked, and measure
    it against the float model a plain export would ship."""
    from export import graph
    from export import quantize as q  # onnxruntime: needed only here

    fp32 = unshared = work / "unshared" / MODEL_FILE
    _save_checked(proto, unshared, external_data)
    info = q.quantize_int8(unshared, work / MODEL_FILE, external_data=external_data)
    onnx.checker.check_model(str(work / MODEL_FILE))
    if config.tied:
        fp32 = work / "fp32" / MODEL_FILE
        shared = onnx.load(unshared)  # saving with external data emptied `proto`
        graph.share_tied_weights(shared, model, config)
        _save_checked(shared, fp32, external_data)
    info["measured"] = q.compare(fp32, work / MODEL_FILE, *q.sample_ids(run_config, vocab))
    for folder in {unshared.parent, fp32.parent}:
        shutil.rmtree(folder)
    return info


def _save_checked(proto: onnx.ModelProto, path: Path, external_data: bool) -> None:
    """Save (weights in DATA_FILE beside it if `external_data`; that moves them out of `proto`)
    and run the ONNX checker on the file, which also works beyond 2 GiB."""
    path.parent.mkdir(exist_ok=True)
    onnx.save_model(proto, path, save_as_external_data=external_data,
                    all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)


def _check_replaceable(out: Path) -> None:
    """Refuse to replace anything but an earlier bundle or an empty folder."""
    if out.is_file() or out.is_symlink():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / BUNDLE_FILE).is_file():
        raise UserError(f"{out}: exists and is not a bundle; refusing to replace it")


def _work_dir(out: Path) -> Path:
    """An empty temporary folder beside `out` (same file system, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the bundle the usual mode
        return work
    except OSError as err:
        raise UserError(f"cannot write the bundle {out}: {err.strerror or err}") from None


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` onto `target`, moving an existing bundle aside first and deleting it after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str]:
    versions = {"keraslm": keraslm.__version__}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.to_onnx",
        description="Export a training run's best weights to an ONNX bundle for serving.",
    )
    parser.add_argument("run", nargs="?", default=None,
                        help="run folder or name under runs/ (default: the newest run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="bundle folder to write (default: bundles/<run name>)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {MIN_OPSET}-{MAX_OPSET} (default {DEFAULT_OPSET})")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="store a dynamically quantized model and report its effect")
    parser.add_argument("--external-data", action="store_true", default=None,
                        help=f"store the weights in {DATA_FILE} (automatic above 1 GiB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        bundle = export_run(args.run, args.out, opset=args.opset, quantize=args.quantize,
                            external_data=args.external_data)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {bundle}")
    if args.quantize:
        from export.quantize import summary

        print(summary(BundleMeta.read(bundle / BUNDLE_FILE).quantization["measured"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
