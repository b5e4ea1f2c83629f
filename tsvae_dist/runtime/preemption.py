"""Preemption and time limits: a signal only sets a flag; the training loop acts on it.

The handler does no I/O and no collective: it may run on any rank at any moment (Slurm sends
USR1/USR2 ahead of a time limit, TERM on partition preemption). The loop agrees on the flag across
ranks at the next step boundary, saves one checkpoint and raises `Preempted`; the job wrapper
(`pipeline.task.StageTask`) then requeues.

The job wrapper installs a flag as the first thing a job does, and the trainer installs its own
later: the later flag shares the earlier one's state, so a signal that arrives in between (while
the stage loads its data, say) is not lost.
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
        self._received: list[str] = []  # names of the signals caught, in order (shared with later flags)

    def install(self) -> StopFlag:
        """Install the handlers (main thread only; elsewhere the flag is settable by hand only)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.signal(sig, self._handle)
                owner = getattr(previous, "__self__", None)
                if isinstance(owner, StopFlag) and owner is not self:
                    self._event, self._received = owner._event, owner._received
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self._received.append(signal.Signals(signum).name)
        self._event.set()

    @property
    def signal_name(self) -> str | None:
        """The last signal caught, or None (not set, or set by hand)."""
        return self._received[-1] if self._received else None

    @property
    def signals(self) -> tuple[str, ...]:
        """Every signal caught so far, in order."""
        return tuple(self._received)

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is set (from another thread); True when it is."""
        return self._event.wait(timeout)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """For a rank's helper processes (a DataLoader's `worker_init_fn`): ignore USR1, USR2 and TERM.

    On preemption Slurm signals every process of the job, workers included; torch's workers die on
    a TERM their parent did not send, and the rank then fails in the middle of its checkpoint. The
    rank itself handles the signal and shuts its workers down.
    """
    for sig in StopFlag.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
