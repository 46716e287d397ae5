"""Per-process host state (data iterator positions) in a checkpoint written by process 0.

Orbax writes a checkpoint's JSON metadata from process 0 only, but each process reads its
own shard of the data, so each has its own iterator position. `gather_process_states`
collects every process's JSON-able dict onto every process before the save (a collective:
every process calls it at the same step), and `state_for_this_process` picks this process's
entry back out on resume.
"""

from __future__ import annotations

import json

import jax
import numpy as np


class ProcessCountMismatchError(ValueError):
    """A checkpoint's per-process states were saved by another number of processes."""


def _encode(state: dict) -> np.ndarray:
    """state -> uint8 [n] of its JSON (UTF-8)."""
    return np.frombuffer(json.dumps(state, sort_keys=True).encode("utf-8"), np.uint8)


def _decode(buffer: np.ndarray) -> dict:
    """uint8 [n] of JSON -> the dict it encodes."""
    return json.loads(np.asarray(buffer, np.uint8).tobytes().decode("utf-8"))


def gather_process_states(state: dict) -> list[dict]:
    """Every process's `state`, indexed by process, on every process.

    Args:
      state: a JSON-serialisable dict of this process (e.g. `iterator.get_state()`).
    Returns:
      list[dict] of length jax.process_count(); entry i is process i's state. With one
      process it is `[state]` and nothing is communicated.
    """
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils
    encoded = _encode(state)
    # process_allgather needs one shape on every process: agree on the longest first.
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(encoded.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [_decode(gathered[i, : int(n)]) for i, n in enumerate(lengths)]


def state_for_this_process(saved: list[dict] | dict) -> dict:
    """This process's entry of a `gather_process_states` list read back from a checkpoint.

    Args:
      saved: the list saved by `gather_process_states`, or a single dict (checkpoints from
        before per-process states, written by one process).
    Returns:
      dict, the state process `jax.process_index()` saved.
    Raises:
      ProcessCountMismatchError: the checkpoint was written by another number of processes
        (each state belongs to one process's data shard, so it cannot be redistributed).
    """
    count = jax.process_count()
    if isinstance(saved, dict):
        if count != 1:  # it holds process 0's position only: the others' are lost
            raise ProcessCountMismatchError(
                "the checkpoint holds a single data position (written before per-process "
                f"positions were saved), but {count} processes are resuming it; resume it with "
                "1 process")
        return saved
    if len(saved) != count:
        raise ProcessCountMismatchError(
            f"the checkpoint holds data positions of {len(saved)} process(es), but {count} "
            f"are resuming it; resume it with {len(saved)} process(es): each position "
            "belongs to its own process's data shard")
    return saved[jax.process_index()]


def state_from_meta(meta: dict, key: str, legacy_key: str) -> dict:
    """This process's state from checkpoint metadata: `meta[key]` (a per-process list), or
    `meta[legacy_key]` (one dict, written before per-process states) if `key` is absent.

    Args:
      meta: the checkpoint's JSON metadata.
      key: where `gather_process_states`'s list was saved, e.g. "data_states".
      legacy_key: the single-state key older checkpoints used, e.g. "data_state".
    Returns:
      dict, see `state_for_this_process` (which raises on a process-count mismatch).
    """
    return state_for_this_process(meta[key] if key in meta else meta[legacy_key])
