"""Per-document scores of whole datasets: many shards of JSON Lines, Parquet or text.

    python -m serve.dataset INPUT... --model BUNDLE --out DIR [--engine local|ray]

The steps, which every engine calls in the same way (so their outputs are the same):
- serve.dataset.plan: `DatasetOptions`, `expand_inputs` (inputs -> `Shard`s), `plan_chunks`
  (a shard -> `Chunk`s of about a megabyte), `shard_done` (its output exists: skip it);
- serve.dataset.scoring: `open_scorer` (a worker's Scorer), `score_chunk` (a chunk -> a table);
- serve.dataset.output: `write_shard` (a shard's tables -> its output, atomically);
- serve.dataset.progress: the progress line and the run's `Summary`.
Engines: serve.dataset.local (worker processes on this machine), serve.dataset.ray_engine (Ray
Data). This package imports pyarrow (the `dataset` extra), never TensorFlow; importing the
package itself imports nothing, so the CLI can say that pyarrow is missing in one line.
"""
