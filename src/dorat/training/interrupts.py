"""Stops that wait for the step in progress: inside the training loop a SIGTERM (a scheduler's
stop: Slurm's time limit, preemption, scancel) or Ctrl-C is held until the current batch's
update is complete, so the trainer can checkpoint the middle of the epoch and then stop the way
the process's own handler says (``Terminated``, ``KeyboardInterrupt``). A second Ctrl-C does not
wait; a second SIGTERM does (a scheduler signals the whole process group, and a compare parent
forwards its own to its workers; SIGKILL follows it anyway). Handlers are only swapped on the
main thread, and only where Python code handles the signal today (a signal the process ignores,
or one that kills it outright, is left alone).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_ALSO: set[int] = set()


def also_hold(sig: int) -> None:
    """Hold ``sig`` too: a signal whose handler ends the process, such as submitit's requeue on
    SIGUSR2 at a Slurm time limit or preemption (it checkpoints the job and calls sys.exit)."""
    _ALSO.add(sig)


class HeldStops:
    """``held.hold()`` ... ``if held.pending is not None: (checkpoint); held.stop()`` ...
    ``held.release()``; or ``with HeldStops() as held:`` around the same."""

    def __init__(self) -> None:
        self.enabled = threading.current_thread() is threading.main_thread()
        self.previous: dict[int, Any] = {}
        self.pending: int | None = None

    def __enter__(self) -> HeldStops:
        self.hold()
        return self

    def hold(self) -> None:
        """From now on SIGINT and SIGTERM wait for ``stop``."""
        if self.enabled and not self.previous:
            for sig in (*SIGNALS, *sorted(_ALSO)):
                handler = signal.getsignal(sig)
                if callable(handler):
                    self.previous[sig] = handler
                    signal.signal(sig, self._hold)

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is None:
            self.pending = signum
            return
        if signum == signal.SIGINT:  # a second Ctrl-C: the process's own handler, now
            self.pending = signum
            self.release()
        # SIGTERM again: a process group's or a parent's copy of the first

    def stop(self) -> None:
        """Act on the held signal as the process's own handler would (usually: raise); if the
        handler returns, stops are held again."""
        self.release()
        self.hold()

    def release(self) -> None:
        """The process's own handlers again; a signal still held is delivered to its handler
        now (so a stop that came after the last look is not lost)."""
        signum, self.pending = self.pending, None
        handler = self.previous.get(signum) if signum is not None else None
        for sig, h in self.previous.items():
            signal.signal(sig, h)
        self.previous = {}
        if handler is not None:
            handler(signum, None)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
