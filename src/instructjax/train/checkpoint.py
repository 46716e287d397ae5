"""Orbax checkpoints of the full training state plus JSON metadata (data position, status).

Each checkpoint holds two items: `state` (the TrainState pytree, sharded arrays) and `meta`
(JSON: the data iterator state, whether the stage finished, anything else the stage needs to
resume exactly).

What can go wrong, and what this module does about it (docs/reliability.md, "Checkpoints",
lists each case with its test):

- a checkpoint that cannot be read (truncated, emptied or missing files, broken JSON) is
  moved aside to `<step>.broken-<time>` with a printed warning, and the previous one is used,
  so a crash during a save never loses more than one interval;
- a checkpoint that is readable but holds another tree (the config changed, e.g.
  `model.embed_dim`) is not corruption: `CheckpointMismatchError` names the differing
  leaves and nothing is moved aside;
- a save that fails (e.g. no space left on device) raises `CheckpointSaveError` naming the
  step and the reason, from `save`, or for an asynchronous save from the next
  `save`/`wait`/`close`; the step is never committed and earlier checkpoints are untouched;
- a process killed mid-save leaves only orbax's `<step>.orbax-checkpoint-tmp*` directory,
  which is never listed as a step and is deleted by the next `Checkpointer` on the directory
  (in the background; its first save waits for that).

Callers catch `CheckpointMismatchError` (a `ValueError`) and `CheckpointSaveError` (a
`RuntimeError`); `experiments/run.py` prints either as a one-line user error.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

_MAX_LEAVES_SHOWN = 5  # the first few differing leaves say enough about which setting changed
_COMMIT_FILE = "commit_success.txt"  # orbax writes it just before the atomic rename


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose tree differs from the state being trained.

    Raised instead of quarantining: the checkpoint is fine, the config changed since it was
    written. `diffs` holds (leaf path, saved "shape dtype", expected "shape dtype") with
    "absent" for a leaf only one side has.
    """

    def __init__(self, directory: str, step: int, diffs: list[tuple[str, str, str]],
                 num_leaves: int):
        self.directory, self.step, self.diffs = directory, step, diffs
        shown = "; ".join(f"{path}: saved {saved}, expected {expected}"
                          for path, saved, expected in diffs[:_MAX_LEAVES_SHOWN])
        more = f" (and {len(diffs) - _MAX_LEAVES_SHOWN} more)" if len(diffs) > _MAX_LEAVES_SHOWN \
            else ""
        super().__init__(
            f"checkpoint step {step} in {directory} does not match the state being trained: "
            f"{len(diffs)} of {num_leaves} leaves differ: {shown}{more}. The config changed "
            "since the checkpoint was written (e.g. the model size); resume with the config it "
            "was written with, or train in a new workdir. Nothing was moved or deleted.")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written. The step was not committed (it is not listed by
    `all_steps` and never restored); earlier checkpoints are untouched.

    `errno` is the operating-system error number when one can be found in the cause
    (e.g. errno.ENOSPC), else None.
    """

    def __init__(self, directory: str, step: int | None, cause: BaseException):
        self.directory, self.step = directory, step
        self.errno = _errno_of(cause)
        reason = f"{os.strerror(self.errno)} [errno {self.errno}]" if self.errno \
            else f"{type(cause).__name__}"
        which = f"checkpoint step {step}" if step is not None else "a checkpoint"
        super().__init__(
            f"could not save {which} in {directory}: {reason}; the step was not committed and "
            f"earlier checkpoints are intact ({type(cause).__name__}: {str(cause)[:300]})")


def _errno_of(err: BaseException) -> int | None:
    """The OS error number behind `err`: an OSError in its chain, or the code tensorstore
    writes into its messages (`[os_error_code='28']`)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        match = re.search(r"os_error_code='(\d+)'|\[Errno (\d+)\]", str(err))
        if match:
            return int(match.group(1) or match.group(2))
        err = err.__cause__ or err.__context__
    return None


def _root_reason(err: BaseException, limit: int = 300) -> str:
    """'Type: message' of the innermost cause: orbax wraps tensorstore's precise reason
    (e.g. 'OUT_OF_RANGE: ... byte range ... not valid') in a generic Exception whose text
    is mostly a TensorStore spec."""
    seen = set()
    while (err.__cause__ or err.__context__) is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:limit]}"


def _unused_path(path: str) -> str:
    """`path`, or `path.N` for the first N not taken: two steps broken in the same second
    must not collide (os.replace onto a non-empty directory fails)."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        candidate, n = f"{path}.{n}", n + 1
    return candidate


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target shardings, for sharded restore."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _key_name(key: Any) -> str:
    """One path entry as orbax names it in the saved tree: dataclass fields and namedtuple
    fields are stored as dict keys, tuples as lists, so only the name or index is kept."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """{'params/embed/embedding': leaf} in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _dtype_kind(dtype: Any) -> str:
    """The class of a dtype within which orbax converts on restore without losing meaning.

    A float32 checkpoint restored into a bfloat16 target is allowed (orbax casts; e.g. the
    user switched the parameter dtype), but float <-> int or signed <-> unsigned is not: that
    is another tree, not a precision change.
    """
    for kind, base in (("bool", jnp.bool_), ("float", jnp.floating),
                       ("complex", jnp.complexfloating), ("int", jnp.signedinteger),
                       ("uint", jnp.unsignedinteger)):
        if jnp.issubdtype(dtype, base):
            return kind
    return str(dtype)


def _compatible(have: Any, want: Any) -> bool:
    """Whether saved leaf metadata `have` restores into `want` (same shape, same dtype class).

    A leaf saved without a dtype (a scalar or string in orbax's metadata) is judged by its
    shape alone: orbax converts those on restore.
    """
    if tuple(getattr(have, "shape", ())) != tuple(getattr(want, "shape", ())):
        return False
    have_dtype, want_dtype = getattr(have, "dtype", None), getattr(want, "dtype", None)
    return have_dtype is None or want_dtype is None or \
        _dtype_kind(have_dtype) == _dtype_kind(want_dtype)


def _describe(leaf: Any) -> str:
    """'(64, 32) float32' for an array or its metadata."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    shape_text = str(tuple(shape)) if shape is not None else "?"
    return f"{shape_text} {jnp.dtype(dtype).name if dtype is not None else '?'}"


def tree_differences(saved: Any, target: Any) -> list[tuple[str, str, str]]:
    """(path, saved, expected) for each leaf whose presence, shape or dtype class differs.

    Leaves are matched by path, so the order of the diffs follows `target` (params before the
    optimiser state), then leaves only the checkpoint has.
    """
    saved_leaves, target_leaves = _leaves_by_path(saved), _leaves_by_path(target)
    diffs = []
    for path, want in target_leaves.items():
        have = saved_leaves.get(path)
        if have is None:
            diffs.append((path, "absent", _describe(want)))
        elif not _compatible(have, want):
            diffs.append((path, _describe(have), _describe(want)))
    diffs.extend((path, _describe(have), "absent")
                 for path, have in saved_leaves.items() if path not in target_leaves)
    return diffs


def _is_out_of_memory(err: BaseException) -> bool:
    """Restoring into too little device memory is not a broken checkpoint; moving every
    checkpoint aside for it would silently restart the run."""
    text = str(err)
    # tensorstore also says RESOURCE_EXHAUSTED for a full disk, with the OS error code
    return isinstance(err, MemoryError) or \
        ("RESOURCE_EXHAUSTED" in text and "os_error_code" not in text)


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for (state, meta) checkpoints."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.async_save = async_save
        self._pending: int | None = None  # an asynchronous save not yet waited for
        self._failure_reported = False  # a failed save was raised since the last save began
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
                # a process killed mid-save leaves <step>.orbax-checkpoint-tmp*; orbax never
                # lists it, and this deletes it (in the background, before the first save)
                cleanup_tmp_directories=True))

    # ---- saving ----

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving (asynchronously when enabled); `meta` must be JSON-serialisable.

        Raises CheckpointSaveError when this save fails or, for asynchronous saves, when the
        previous one failed in the background.
        """
        self._wait_pending()
        self._failure_reported = False
        try:
            self.manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as err:  # OSError from Python writes, ValueError from tensorstore
            raise self._save_failed(int(step), err) from err
        if self.async_save:
            self._pending = int(step)

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed; raises CheckpointSaveError
        if it failed."""
        self._wait_pending()

    def _wait_pending(self) -> None:
        """Waits for the pending asynchronous save, so that its error names its own step."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # whatever the background commit raised
            raise self._save_failed(step, err) from err

    def _save_failed(self, step: int | None, err: BaseException) -> CheckpointSaveError:
        """Logs a failed save and forgets the uncommitted step; returns the error to raise."""
        error = CheckpointSaveError(self.directory, step, err)
        logging.error("%s", error)
        self._failure_reported = True
        self.manager.reload()  # the manager lists a step as soon as its save starts
        return error

    def close(self) -> None:
        """Waits for pending saves (raising CheckpointSaveError if one failed) and releases
        the manager."""
        try:
            self._wait_pending()
        finally:
            self._close_manager()

    def _close_manager(self) -> None:
        try:
            self.manager.close()
        except Exception as err:  # orbax's inner async layer can raise a failed commit again
            if not self._failure_reported:
                raise self._save_failed(None, err) from err
            # the same failed save, already raised to the caller: raising it again here
            # would only bury the first report under a second traceback
            logging.warning("checkpoint save failure raised again while closing %s: %s",
                            self.directory, err)

    # ---- reading ----

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending (an asynchronous save still being
        written is not listed)."""
        in_flight = self._pending if self._pending is not None \
            and not self._is_committed(self._pending) else None
        return sorted(s for s in self.manager.all_steps() if s != in_flight)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _is_committed(self, step: int) -> bool:
        return os.path.isfile(os.path.join(self._step_dir(step), _COMMIT_FILE))

    def restore_latest(self, target: Any) -> tuple[Any, dict, int] | None:
        """Restores the newest readable checkpoint into `target`'s shapes and shardings.

        `target` is a pytree of ShapeDtypeStructs with shardings (see
        `abstract_with_shardings`). Returns (state, meta, step) or None when there is none.
        Unreadable checkpoints are moved aside (see `_quarantine`) and the previous one is
        tried; a readable one whose tree differs from `target` raises
        CheckpointMismatchError and nothing more is moved.
        """
        try:
            for step in reversed(self.all_steps()):
                saved = self._read_or_quarantine(step, self._saved_tree, step)
                if saved is None:
                    continue
                diffs = tree_differences(saved, target)
                if diffs:
                    raise CheckpointMismatchError(self.directory, step, diffs,
                                                  len(_leaves_by_path(target)))
                restored = self._read_or_quarantine(step, self._restore, step, target)
                if restored is not None:
                    return restored["state"], dict(restored["meta"]), step
            return None
        finally:
            self.manager.reload()  # forget quarantined steps so they can be written again

    def _saved_tree(self, step: int) -> Any:
        """The saved state's tree of ArrayMetadata (shape, dtype; no array data is read)."""
        handler = ocp.StandardCheckpointHandler()
        try:
            return handler.metadata(epath.Path(self._step_dir(step)) / "state").tree
        finally:
            handler.close()

    def _restore(self, step: int, target: Any) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))

    def _read_or_quarantine(self, step: int, read, *args) -> Any:
        """`read(*args)`, or None after moving checkpoint `step` aside when it is unreadable."""
        try:
            return read(*args)
        except Exception as err:  # orbax/tensorstore raise many types for a broken file
            if _is_out_of_memory(err):
                raise
            self._quarantine(step, err)
            return None

    def _quarantine(self, step: int, err: Exception) -> None:
        """Moves an unreadable checkpoint aside (kept for inspection, never deleted)."""
        broken = self._step_dir(step)
        aside = _unused_path(f"{broken}.broken-{int(time.time())}")
        reason = _root_reason(err)
        logging.error("checkpoint %s is unreadable (%s); moved to %s", broken, reason, aside)
        print(f"warning: checkpoint step {step} in {self.directory} is broken ({reason}); "
              f"moved to {aside}, falling back to an earlier one", flush=True)
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

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        # Already leaving with an error (e.g. DivergenceError): a failed pending save is
        # reported beside it, never in its place.
        try:
            self.close()
        except CheckpointSaveError as save_error:
            print(f"warning: {save_error}", flush=True)
            logging.error("while handling %s: %s", exc_type.__name__, save_error)


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
