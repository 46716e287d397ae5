"""Orbax checkpoints of the full training state plus JSON metadata (data position, status).

Each checkpoint holds two items: `state` (the TrainState pytree, sharded arrays) and `meta`
(JSON: the data iterator state, whether the stage finished, anything else the stage needs to
resume exactly). A checkpoint that cannot be read is refused with a logged reason and the
previous one is used, so a crash during a save never loses more than one interval.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target shardings, for sharded restore."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for (state, meta) checkpoints."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True))

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving (asynchronously when enabled); `meta` must be JSON-serialisable."""
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        return sorted(self.manager.all_steps())

    def restore_latest(self, target: Any) -> tuple[Any, dict, int] | None:
        """Restores the newest readable checkpoint into `target`'s shapes and shardings.

        `target` is a pytree of ShapeDtypeStructs with shardings (see
        `abstract_with_shardings`). Returns (state, meta, step) or None when there is none.
        """
        result = None
        for step in reversed(self.all_steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            except Exception as err:  # orbax/tensorstore raise many types for a broken file
                self._quarantine(step, err)
                continue
            result = restored["state"], dict(restored["meta"]), step
            break
        self.manager.reload()  # forget quarantined steps so they can be written again
        return result

    def _quarantine(self, step: int, err: Exception) -> None:
        """Moves an unreadable checkpoint aside (kept for inspection, never deleted)."""
        broken = os.path.join(self.directory, str(step))
        aside = f"{broken}.broken-{int(time.time())}"
        logging.error("checkpoint %s is unreadable (%s: %s); moved to %s",
                      broken, type(err).__name__, err, aside)
        print(f"warning: checkpoint step {step} in {self.directory} is broken "
              f"({type(err).__name__}: {str(err)[:200]}); moved to {aside}, "
              "falling back to an earlier one", flush=True)
        if jax.process_index() == 0 and os.path.isdir(broken):
            os.replace(broken, aside)

    def restore_meta(self, step: int | None = None) -> dict | None:
        """Only the JSON metadata of checkpoint `step` (default latest); None if absent."""
        steps = self.all_steps()
        if not steps:
            return None
        step = steps[-1] if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


PARAMS_DIR = "params"  # a finished stage's exported parameters, read by later stages


def export_params(workdir: str, params: Any) -> str:
    """Writes `params` to WORKDIR/params (synchronously) for later stages; returns the path."""
    path = os.path.join(os.path.abspath(workdir), PARAMS_DIR)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def load_params(workdir: str, target: Any) -> Any:
    """Reads WORKDIR/params into `target` (ShapeDtypeStructs with shardings).

    A missing export is a clear FileNotFoundError naming the stage directory.
    """
    path = os.path.join(os.path.abspath(workdir), PARAMS_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{workdir} has no exported parameters ({path}); has that stage finished?")
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(path, target)
    finally:
        checkpointer.close()
