"""Preemption and time limits: a signal only sets a flag; the training loop acts on it.

The handler does no I/O and no collective: it may run on any rank at any moment (Slurm sends
USR1/USR2 ahead of a time limit, TERM on partition preemption). The loop agrees on the flag across
ranks at the next step boundary, saves one checkpoint and raises `Preempted`; the launcher's job
wrapper then requeues.
"""

from __future__ import annotations

import signal
import threading


class Preempted(Exception):
    """Training stopped at a step boundary after a stop signal; a checkpoint has been written."""


class StopFlag:
    """Set by SIGUSR1, SIGUSR2 or SIGTERM (or by hand); read by the training loop each step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> StopFlag:
        """Install the handlers (main thread only; elsewhere the flag is settable by hand only)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()
