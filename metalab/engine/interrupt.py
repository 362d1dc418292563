"""Ctrl-C during meta-training: finish the step, keep a checkpoint, stop; a second Ctrl-C stops at once.

A ``KeyboardInterrupt`` raised in the middle of a step can land inside the optimiser's update,
so the weights in memory are not a state worth saving; the run folder keeps only its last
periodic checkpoint. :class:`StopRequest` turns the first Ctrl-C into a request that the training
loop honours between steps, where the weights are whole, so nothing since the last checkpoint is
lost.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """While entered, SIGINT sets :attr:`requested` instead of raising ``KeyboardInterrupt``
    (a second SIGINT raises it, for a user who cannot wait for the step to end).

    It stays out of the way where it cannot help or would harm: ``enabled=False`` (e.g. under
    ``torchrun``, where ranks would stop at different steps), off the main thread, and where
    SIGINT is not Python's default handler (ignored in a background job, or a caller's own).
    """

    def __init__(self, enabled: bool = True, message: str = "stopping after this step and keeping a checkpoint "
                                                             "(Ctrl-C again to stop at once)") -> None:
        self.enabled, self.message, self.requested = enabled, message, False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write(f"\n{self.message}\n")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
