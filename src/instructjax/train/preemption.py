"""Preemption: every process of a run agrees on the step at which to save and stop."""

from __future__ import annotations

import signal

import jax
import numpy as np


class Preemption:
    """Decides, the same way on every process, that a run should save and stop.

    Use as a context manager around the loop and call `should_stop(step)` once per step on
    every process. One process: SIGTERM sets a flag (the handler is installed inside the
    context only). Several processes with JAX's preemption service (started by
    jax.distributed.initialize; it catches SIGTERM itself): `reached_preemption_sync_point`,
    which makes every process answer True at the same step however the signal reached them.
    Several processes without that service: a local SIGTERM flag OR-ed across processes
    each step.
    """

    def __init__(self):
        self._received = False
        self._previous = None
        self._sync_manager = False

    def __enter__(self) -> "Preemption":
        # jax.distributed.initialize starts the service when this option is on (default).
        self._sync_manager = (jax.process_count() > 1 and jax.distributed.is_initialized()
                              and bool(jax.config.jax_enable_preemption_service))
        if not self._sync_manager:  # a Python handler would replace the service's own
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._received = True

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def should_stop(self, step: int) -> bool:
        """True when every process should save at `step` and exit (the same on all)."""
        from jax.experimental import multihost_utils
        if self._sync_manager:
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.int32(self._received))
            return bool(np.max(flags))
        return self._received
