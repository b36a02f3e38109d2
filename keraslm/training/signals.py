"""Ctrl-C and SIGTERM as requests to stop at the next consistent point of training.

A signal handler that raised would interrupt whatever Python is doing: for instance between a
step updating the weights and the loop recording that the step was done, so the checkpoint saved
on the way out would replay that batch. Here the handler only records the request; the epoch loop
checks it after a step's bookkeeping (and after the end of an epoch), saves and stops. A second
signal stops at once, without saving: the previous checkpoint is intact, since every save is
atomic.
"""

from __future__ import annotations

import signal
import threading

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells do


class Stopped(Exception):
    """Training stopped on a signal after saving what `message` says."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.signum, 1)


class StopRequest:
    """Records SIGINT and SIGTERM while active (a context manager), instead of raising.

    SIGINT is left alone when the process started with it ignored (a shell's background job).
    Outside the main thread no handler can be installed, and no request is ever recorded.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_STATUS:
                previous = signal.getsignal(signum)
                if signum == signal.SIGINT and previous == signal.SIG_IGN:
                    continue
                self._previous[signum] = previous
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
