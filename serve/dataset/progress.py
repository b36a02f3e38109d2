"""What a run tells its user: a progress line on a terminal while it scores, a summary at the end.

Both engines use these. The progress line (documents, tokens/s, share of the input done, ETA)
is redrawn in place at most a few times a second, and only when its stream is a terminal: a log
file or a pipe gets the summary alone.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc

from serve.dataset.plan import Shard

REDRAW_SECONDS = 0.2
SHOWN_SKIPS = 5  # a rerun names this many skipped outputs, then counts the rest


def tally(table: pa.Table) -> tuple[int, int, int]:
    """(documents, documents with an error, tokens scored) of an output table."""
    errors = pc.count(table["error"]).as_py()  # the non-null ones
    tokens = pc.sum(table["num_tokens"]).as_py() or 0
    return table.num_rows, errors, tokens


@dataclass
class Summary:
    """A run's outcome: shards written, skipped (already written) and failed (with why),
    and the documents, errors and tokens of the written ones."""

    written: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    documents: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def add(self, tables: list[pa.Table]) -> None:
        """Count a written shard of these tables."""
        self.written += 1
        for table in tables:
            documents, errors, tokens = tally(table)
            self.documents += documents
            self.errors += errors
            self.tokens += tokens

    def fail(self, shard: Shard, reason: str) -> None:
        self.failures.append(f"{shard.name}: {reason}")

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        speed = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"shards: {self.written} written, {self.skipped} skipped (already written), "
                f"{self.failed} failed; documents: {self.documents:,} ({self.errors:,} with an "
                f"error); tokens: {self.tokens:,}; {speed:,.0f} tokens/s ({self.seconds:.1f} s)")


def report_skipped(skipped: list[Shard], stream: TextIO | None = None) -> None:
    """Say (on `stream`, default standard error) which shards a rerun skips because their
    output exists."""
    if not skipped:
        return
    stream = sys.stderr if stream is None else stream
    names = ", ".join(s.output for s in skipped[:SHOWN_SKIPS])
    more = f" and {len(skipped) - SHOWN_SKIPS} more" if len(skipped) > SHOWN_SKIPS else ""
    print(f"skipping {len(skipped)} shard(s) already written: {names}{more}", file=stream)


class Progress:
    """A progress line on `stream` when it is a terminal (or `enabled`): documents, tokens/s,
    the share of `total_bytes` of input done and the time left at this pace."""

    def __init__(self, total_bytes: int, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.total = max(1, total_bytes)
        self.stream = stream = sys.stderr if stream is None else stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.started = self._drawn = time.perf_counter()
        self.done_bytes = 0.0
        self.documents = self.tokens = 0
        self._width = 0

    def advance(self, table: pa.Table, nbytes: float) -> None:
        """A chunk of `nbytes` of input is scored into `table`."""
        documents, _, tokens = tally(table)
        self.documents += documents
        self.tokens += tokens
        self.done_bytes += nbytes
        now = time.perf_counter()
        if self.enabled and now - self._drawn >= REDRAW_SECONDS:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.started
        share = min(1.0, self.done_bytes / self.total)
        eta = elapsed * (1 - share) / share if share > 0 else None
        text = (f"{self.documents:,} documents  {self.tokens / max(elapsed, 1e-9):,.0f} "
                f"tokens/s  {100 * share:.0f}%  ETA {_duration(eta)}")
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        """Clear the line (the summary takes its place)."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
