"""CLI: per-document scores of a dataset — `python -m serve.dataset INPUT... --model B --out DIR`.

Every input shard (.jsonl, .parquet or .txt; files, globs, folders, or URIs pyarrow knows)
becomes one output shard in DIR with a row per document: id, num_tokens, num_oov,
log_likelihood, perplexity, error (and the cache's settings with --cache-size), then the
input's other fields. Shards already written are skipped, so a rerun finishes an interrupted
run. Exit status: 0 when every shard was written or skipped (documents with an error are in the
output, not failures), 1 for a mistake or a shard that could not be scored (said in one line,
`error: ...`), 2 for bad flags, 130 when interrupted. Never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from keraslm.errors import UserError
from serve.argtypes import int_at_least
from serve.bundle import DEFAULT_BUNDLES_ROOT, resolve_bundle
from serve.cache_flags import add_cache_flags, cache_settings
from serve.session import DEVICES

ENGINES = ("local", "ray")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.dataset",
                                description=__doc__.splitlines()[0].split(" — ")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".jsonl, .parquet or .txt files, globs or folders (searched "
                        "recursively), local or any URI pyarrow knows (s3://, gs://, hdfs://...)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the output shards, one per input (local or a URI)")
    p.add_argument("--model", default=None,
                   help=f"bundle folder or name under {DEFAULT_BUNDLES_ROOT}/ "
                        "(default: the newest bundle there)")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: worker processes on this machine; ray: a Ray cluster "
                        "(pip install 'keraslm[ray]')")
    p.add_argument("--workers", type=int_at_least(1), default=None,
                   help="worker processes (local: default one per core) or actors (ray)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the Ray cluster to join (default: $RAY_ADDRESS, else a local one "
                        "started for the run)")
    p.add_argument("--text-field", default="text", metavar="F",
                   help="the text's field (JSON Lines) or column (Parquet) (default: text)")
    p.add_argument("--id-field", default="id", metavar="F",
                   help="the id's field or column (default: id; absent: FILE:LINE, or "
                        "FILE:ROW from 0 for Parquet)")
    p.add_argument("--drop-fields", action="store_true",
                   help="write only the id and the scores, not the input's other fields")
    p.add_argument("--out-format", choices=("parquet", "jsonl"), default="parquet",
                   help="output shards as Parquet (default) or JSON Lines")
    p.add_argument("--format", choices=("tokens", "raw"), default=None,
                   help="read the text as WikiText-style tokens or raw text "
                        "(default: the bundle's own text pipeline)")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="invalid UTF-8: record the document with an error (strict) or read it "
                        "with U+FFFD in place of the bad bytes (replace)")
    p.add_argument("--max-document-bytes", type=int_at_least(1), default=None, metavar="N",
                   help="a longer document is recorded with an error, unread (default 4 MiB)")
    p.add_argument("--batch-size", type=int_at_least(1), default=20,
                   help="documents scored side by side by a worker (default 20)")
    p.add_argument("--chunk-bytes", type=int_at_least(1), default=None, metavar="N",
                   help="about how much input a unit of work covers (default 1 MiB)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="onnxruntime device (auto: CUDA when installed and present)")
    add_cache_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        _require_pyarrow()
        from serve.dataset.plan import DatasetOptions, expand_inputs

        defaults = {}
        if args.max_document_bytes is not None:
            defaults["max_document_bytes"] = args.max_document_bytes
        if args.chunk_bytes is not None:
            defaults["chunk_bytes"] = args.chunk_bytes
        options = DatasetOptions(
            text_field=args.text_field, id_field=args.id_field, keep_fields=not args.drop_fields,
            out_format=args.out_format, cache=cache_settings(args), errors=args.errors,
            text_format=args.format, batch_size=args.batch_size, device=args.device, **defaults)
        bundle = resolve_bundle(args.model)
        shards = expand_inputs(args.inputs, args.out, options)
        if args.engine == "ray":
            summary = _ray_engine().run(shards, os.fspath(bundle), options, args.workers,
                                        args.ray_address)
        else:
            from serve.dataset import local

            summary = local.run(shards, bundle, options, args.workers)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the shards written so far are whole; run again to score the rest",
              file=sys.stderr)
        return 130
    print(summary.line())
    return 1 if summary.failed else 0


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("scoring a dataset needs pyarrow: pip install 'keraslm[dataset]'") \
            from None


def _ray_engine():
    """serve.dataset.ray_engine, imported only when asked for (Ray is an extra).

    Its contract: `run(shards, bundle_path, options, workers, address) -> Summary`, with the
    shards of `expand_inputs`, the bundle's local folder, the DatasetOptions, the number of
    actors (None: its default) and the cluster's address (None: $RAY_ADDRESS or a local one);
    it scores with serve.dataset.scoring and writes with serve.dataset.output, as local.run.
    """
    try:
        return importlib.import_module("serve.dataset.ray_engine")
    except ModuleNotFoundError as err:
        if err.name == "serve.dataset.ray_engine":
            raise UserError("--engine ray is not available in this version of keraslm") \
                from None
        if err.name and err.name.split(".")[0] == "ray":
            raise UserError("--engine ray needs Ray: pip install 'keraslm[ray]'") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
