"""Fault injection for checkpoints: each test breaks a save or a saved checkpoint and checks
that nothing committed is lost and that the failure is reported, never hidden.

Covered: SIGKILL in the middle of a write, a truncated or emptied newest checkpoint, broken
JSON metadata, no space left on the device (injected at orbax's Python writes, and a real full
tmpfs where mounting is permitted), and a state of another shape (a changed config), which
must not be treated as corruption. docs/reliability.md ("Checkpoints") lists them.
"""

import dataclasses
import errno
import glob
import os
import shutil
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import pytest
from etils import epath

from instructjax.model.transformer import Transformer
from instructjax.train import checkpoint as ckpt_lib
from instructjax.train import optim
from instructjax.train import state as state_lib
from instructjax.train.checkpoint import CheckpointMismatchError, CheckpointSaveError
from instructjax.train.losses import lm_loss_fn
from instructjax.stages import settings
from test_loop import B, CFG, T, SyntheticBatches, make_task, mesh, run_loop, train_cfg  # noqa: F401

ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"


# ---- helpers ----

def init_fn(cfg):
    model = Transformer(cfg)
    return lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]


def state_and_target(cfg, mesh):
    """A concrete TrainState for `cfg` and its restore target (ShapeDtypeStructs)."""
    tx = optim.make_optimizer(settings.optim_from(train_cfg()))
    abstract, shardings = state_lib.state_shardings(init_fn(cfg), tx, mesh)
    state = state_lib.create_state(init_fn(cfg), tx, shardings, 0, None)
    return state, ckpt_lib.abstract_with_shardings(abstract, shardings)


@pytest.fixture(scope="module")
def small(mesh):
    """(state, target) of the tiny test Transformer, shared by the tests of this module."""
    return state_and_target(CFG, mesh)


def with_step(state, step):
    """`state` whose step counter says `step`, so each checkpoint is recognisable."""
    return dataclasses.replace(state, step=jnp.asarray(step, jnp.int32))


def save_steps(directory, state, steps, *, async_save=False):
    """Commits checkpoints `steps` (each with meta {"step": s}) and closes the writer."""
    with ckpt_lib.Checkpointer(directory, async_save=async_save) as checkpointer:
        for step in steps:
            checkpointer.save(step, with_step(state, step), {"step": step})


def assert_restores(directory, target, state, step):
    """The newest checkpoint in `directory` is `step` and holds exactly `state` at `step`."""
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        restored, meta, got = checkpointer.restore_latest(target)
    assert (got, meta) == (step, {"step": step})
    chex.assert_trees_all_equal(jax.device_get(restored),
                                jax.device_get(with_step(state, step)))


def files_under(path):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)


def broken_dirs(directory):
    return sorted(glob.glob(os.path.join(directory, "*.broken-*")))


def tmp_dirs(directory):
    return sorted(glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*")))


# ---- killed in the middle of a save ----

# The child commits step 1, then is SIGKILLed while step 2 is being written: its JSON item
# write signals the parent and stalls, after the state arrays have started to be written.
CHILD = textwrap.dedent("""
    import os, sys, time
    import jax.numpy as jnp
    from etils import epath
    from instructjax.train import checkpoint as ckpt_lib

    directory, marker, async_save = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    state = {"w": jnp.arange(4096, dtype=jnp.float32), "b": jnp.ones((7,), jnp.int32)}
    checkpointer = ckpt_lib.Checkpointer(directory, async_save=async_save)
    checkpointer.save(1, state, {"step": 1})
    checkpointer.wait()

    path_cls = type(epath.Path(directory))
    original_write = path_cls.write_text

    def stalled_write(self, *args, **kwargs):
        if "2.orbax-checkpoint-tmp" in str(self) and self.name == "metadata":
            open(marker, "w").close()
            time.sleep(120)  # SIGKILL arrives here
        return original_write(self, *args, **kwargs)

    path_cls.write_text = stalled_write
    checkpointer.save(2, {"w": state["w"] * 2, "b": state["b"]}, {"step": 2})
    checkpointer.wait()
""")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_mid_save_keeps_complete_checkpoints(tmp_path, async_save):
    """Only committed steps are listed and restored; the partial step-2 directory is ignored,
    then deleted when the next Checkpointer starts its first save."""
    directory, marker = str(tmp_path / "ckpt"), str(tmp_path / "writing")
    child = subprocess.Popen([sys.executable, "-c", CHILD, directory, marker,
                              "1" if async_save else "0"])
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker):
            assert child.poll() is None, f"child exited early with {child.returncode}"
            assert time.monotonic() < deadline, "child never reached the step-2 write"
            time.sleep(0.02)
        assert tmp_dirs(directory), "the kill must land while step 2 is a tmp dir"
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -9

    state = {"w": jnp.arange(4096, dtype=jnp.float32), "b": jnp.ones((7,), jnp.int32)}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        assert checkpointer.all_steps() == [1]
        restored, meta, step = checkpointer.restore_latest(target)
        assert (step, meta) == (1, {"step": 1})
        chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
        # the step killed mid-write can be written again, and the leftover is gone
        checkpointer.save(2, {"w": state["w"] * 3, "b": state["b"]}, {"step": 2})
        checkpointer.wait()
        assert checkpointer.all_steps() == [1, 2]
    assert tmp_dirs(directory) == [] and broken_dirs(directory) == []
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        restored, meta, step = checkpointer.restore_latest(target)
    assert (step, meta) == (2, {"step": 2})
    chex.assert_trees_all_equal(jax.device_get(restored["w"]), jax.device_get(state["w"] * 3))


# ---- unreadable newest checkpoint ----

def truncate_largest_array_file(step_dir):
    """Cuts the biggest array data file of the state to half its size."""
    path = max(files_under(os.path.join(step_dir, "state")), key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 2)
    return os.path.relpath(path, step_dir), os.path.getsize(path)


def zero_every_file(step_dir):
    for path in files_under(step_dir):
        os.truncate(path, 0)


def empty_directory(step_dir):
    for entry in os.listdir(step_dir):
        path = os.path.join(step_dir, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def break_meta_json(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        f.write('{"step": ')


def assert_fell_back(directory, target, state, capsys, broken_step, good_step):
    """restore_latest used `good_step`, warned naming `broken_step`, and moved it aside."""
    capsys.readouterr()
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        restored, meta, step = checkpointer.restore_latest(target)
        assert checkpointer.all_steps() == [good_step]
    out = capsys.readouterr().out
    assert (step, meta) == (good_step, {"step": good_step})
    chex.assert_trees_all_equal(jax.device_get(restored),
                                jax.device_get(with_step(state, good_step)))
    assert f"checkpoint step {broken_step} in {directory} is broken" in out
    assert "falling back to an earlier one" in out
    aside = broken_dirs(directory)
    assert [os.path.basename(p).split(".")[0] for p in aside] == [str(broken_step)]
    assert f"moved to {aside[0]}" in out
    return aside[0]


def test_truncated_newest_falls_back_and_keeps_it_aside(tmp_path, small, capsys):
    state, target = small
    directory = str(tmp_path)
    save_steps(directory, state, [1, 2])
    relpath, size = truncate_largest_array_file(os.path.join(directory, "2"))
    aside = assert_fell_back(directory, target, state, capsys, broken_step=2, good_step=1)
    assert os.path.getsize(os.path.join(aside, relpath)) == size  # moved, not deleted


@pytest.mark.parametrize("fault", [zero_every_file, empty_directory, break_meta_json],
                         ids=["zero_length_files", "empty_directory", "broken_meta_json"])
def test_emptied_newest_falls_back_and_keeps_it_aside(tmp_path, small, capsys, fault):
    state, target = small
    directory = str(tmp_path)
    save_steps(directory, state, [1, 2])
    kept = [os.path.relpath(p, os.path.join(directory, "2"))
            for p in files_under(os.path.join(directory, "2"))]
    fault(os.path.join(directory, "2"))
    aside = assert_fell_back(directory, target, state, capsys, broken_step=2, good_step=1)
    assert [os.path.relpath(p, aside) for p in files_under(aside)] == \
        ([] if fault is empty_directory else kept)


def test_two_broken_newest_both_kept_aside(tmp_path, small, capsys):
    """Two steps broken in the same second get distinct names; the oldest good one is used."""
    state, target = small
    directory = str(tmp_path)
    save_steps(directory, state, [1, 2, 3])
    truncate_largest_array_file(os.path.join(directory, "3"))
    zero_every_file(os.path.join(directory, "2"))
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        _, meta, step = checkpointer.restore_latest(target)
    out = capsys.readouterr().out
    assert (step, meta) == (1, {"step": 1})
    assert "checkpoint step 3" in out and "checkpoint step 2" in out
    assert sorted(os.path.basename(p).split(".")[0] for p in broken_dirs(directory)) == \
        ["2", "3"]


# ---- a state of another shape: the config changed, the checkpoint is fine ----

def task_with(cfg):
    """make_task's supervised task for a model of config `cfg`."""
    model = Transformer(cfg)
    return dataclasses.replace(make_task(), init_params_boxed=init_fn(cfg),
                               loss_fn=lm_loss_fn(model))


def test_shape_mismatch_raises_and_moves_nothing(tmp_path, mesh, capsys):
    """Resuming with embed_dim 48 over a run saved with 32 stops with the differing leaves;
    every checkpoint stays where it is and restores with the config it was written with."""
    workdir = str(tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    run_loop(make_task(), train_cfg(steps=3), mesh, workdir, seed=0)
    before = sorted(os.listdir(directory))
    wider = dataclasses.replace(CFG, embed_dim=48)
    with pytest.raises(CheckpointMismatchError) as caught:
        run_loop(task_with(wider), train_cfg(steps=6), mesh, workdir, seed=0)
    message = str(caught.value)
    assert caught.value.step == 3 and directory in message and "step 3" in message
    assert "params/embed/embedding: saved (64, 32) float32, expected (64, 48) float32" \
        in message
    assert "broken" not in capsys.readouterr().out
    assert sorted(os.listdir(directory)) == before and broken_dirs(directory) == []
    _, target = state_and_target(CFG, mesh)
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        _, meta, step = checkpointer.restore_latest(target)
    assert step == 3 and meta["finished"]


def test_unreadable_newest_then_mismatch_raises_mismatch(tmp_path, small, mesh, capsys):
    """The broken newest is moved aside; the readable older one of another shape is not
    restored into the wrong tree, nor moved."""
    state, _ = small
    directory = str(tmp_path)
    save_steps(directory, state, [1, 2])
    zero_every_file(os.path.join(directory, "2"))
    _, wider_target = state_and_target(dataclasses.replace(CFG, embed_dim=48), mesh)
    with ckpt_lib.Checkpointer(directory) as checkpointer:
        with pytest.raises(CheckpointMismatchError, match="step 1 .*params/embed/embedding"):
            checkpointer.restore_latest(wider_target)
        assert checkpointer.all_steps() == [1]
    assert "checkpoint step 2" in capsys.readouterr().out
    assert [os.path.basename(p).split(".")[0] for p in broken_dirs(directory)] == ["2"]


def test_tree_differences_lists_structure_and_dtype_changes(small):
    state, target = small
    saved = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    assert ckpt_lib.tree_differences(saved, target) == []
    # float32 -> bfloat16 is a precision change orbax casts; int32 -> float32 is another tree
    as_bf16 = dataclasses.replace(saved, params=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), saved.params))
    assert ckpt_lib.tree_differences(as_bf16, target) == []
    step_float = dataclasses.replace(saved, step=jax.ShapeDtypeStruct((), jnp.float32))
    assert ckpt_lib.tree_differences(step_float, target) == [("step", "() float32", "() int32")]
    no_rng = {"step": saved.step, "params": saved.params, "opt_state": saved.opt_state}
    assert ckpt_lib.tree_differences(no_rng, target) == [("rng", "absent", "(2,) uint32")]


# ---- no space left on device ----

@pytest.fixture
def disk_full_for_step(monkeypatch):
    """Makes orbax's Python file writes (epath write_text: the step's metadata, the JSON
    item, the array metadata) under `<step>.orbax-checkpoint-tmp` fail with ENOSPC.
    Tensorstore's own C++ writes are untouched; the real-tmpfs test covers those."""
    def install(step):
        path_cls = type(epath.Path("/"))
        original = path_cls.write_text

        def write_text(self, *args, **kwargs):
            if f"/{step}.orbax-checkpoint-tmp" in str(self):
                raise OSError(errno.ENOSPC, ENOSPC_TEXT, str(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(path_cls, "write_text", write_text)
        return monkeypatch.undo
    return install


def assert_save_error(err, directory, step):
    assert isinstance(err, CheckpointSaveError) and err.errno == errno.ENOSPC
    assert err.step == step
    assert f"checkpoint step {step} in {directory}" in str(err)
    assert ENOSPC_TEXT in str(err)


def test_enospc_sync_save_raises_and_keeps_previous(tmp_path, small, disk_full_for_step):
    state, target = small
    directory = str(tmp_path)
    with ckpt_lib.Checkpointer(directory, async_save=False) as checkpointer:
        checkpointer.save(1, with_step(state, 1), {"step": 1})
        disk_freed = disk_full_for_step(2)
        with pytest.raises(CheckpointSaveError) as caught:
            checkpointer.save(2, with_step(state, 2), {"step": 2})
        disk_freed()
        assert_save_error(caught.value, directory, 2)
        assert checkpointer.all_steps() == [1]
    assert_restores(directory, target, state, 1)


@pytest.mark.parametrize("surfaces_at", ["save", "wait", "close"])
def test_enospc_async_save_surfaces_later(tmp_path, small, disk_full_for_step, surfaces_at):
    """A background save that fails is reported by the next save, wait or close, naming its
    own step; a save that reports it does not start."""
    state, target = small
    directory = str(tmp_path)
    checkpointer = ckpt_lib.Checkpointer(directory, async_save=True)
    try:
        checkpointer.save(1, with_step(state, 1), {"step": 1})
        checkpointer.wait()
        disk_freed = disk_full_for_step(2)
        checkpointer.save(2, with_step(state, 2), {"step": 2})  # fails in the background
        assert checkpointer.all_steps() == [1]  # in flight: not listed
        with pytest.raises(CheckpointSaveError) as caught:
            if surfaces_at == "save":
                checkpointer.save(3, with_step(state, 3), {"step": 3})
            elif surfaces_at == "wait":
                checkpointer.wait()
            else:
                checkpointer.close()
        disk_freed()
        assert_save_error(caught.value, directory, 2)
        assert checkpointer.all_steps() == [1]
    finally:
        checkpointer.close()  # a failure already raised is not raised twice
    assert_restores(directory, target, state, 1)


def test_failed_background_save_does_not_replace_the_error_being_raised(
        tmp_path, small, disk_full_for_step, capsys):
    """Leaving the `with` block on an error (e.g. a DivergenceError) while a background save
    failed: the caller sees its own error; the save failure is printed beside it."""
    state, _ = small
    directory = str(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with ckpt_lib.Checkpointer(directory, async_save=True) as checkpointer:
            checkpointer.save(1, with_step(state, 1), {"step": 1})
            checkpointer.wait()
            disk_freed = disk_full_for_step(2)
            checkpointer.save(2, with_step(state, 2), {"step": 2})  # fails in the background
            raise ZeroDivisionError("the run's own error")
    disk_freed()
    assert f"could not save checkpoint step 2 in {directory}" in capsys.readouterr().out


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs, a real disk that fills up; skipped where mounting is not permitted."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill_disk(directory):
    """Writes a file until the disk is full; returns its path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return path


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("free_kib", [0, 32], ids=["python_write", "tensorstore_write"])
def test_real_enospc_on_full_tmpfs(tiny_tmpfs, small, async_save, free_kib):
    """A really full disk: with nothing free orbax's first Python write fails, with 32 KiB
    free tensorstore's own C++ writes do. Either way the same CheckpointSaveError, and once
    space is freed the run saves again."""
    state, target = small
    directory = os.path.join(tiny_tmpfs, "ckpt")
    with ckpt_lib.Checkpointer(directory, async_save=async_save) as checkpointer:
        checkpointer.save(1, with_step(state, 1), {"step": 1})
        checkpointer.wait()
        filler = fill_disk(tiny_tmpfs)
        os.truncate(filler, os.path.getsize(filler) - free_kib * 1024)
        with pytest.raises(CheckpointSaveError) as caught:
            checkpointer.save(2, with_step(state, 2), {"step": 2})
            checkpointer.wait()
        assert_save_error(caught.value, directory, 2)
        if free_kib:  # tensorstore reports ENOSPC as a status in a ValueError's text
            assert "RESOURCE_EXHAUSTED" in str(caught.value.__cause__)
        assert checkpointer.all_steps() == [1]
        os.remove(filler)
    assert_restores(directory, target, state, 1)
    # space is back: the next save commits, the failed step's leftover is cleaned up
    with ckpt_lib.Checkpointer(directory, async_save=async_save) as checkpointer:
        checkpointer.save(3, with_step(state, 3), {"step": 3})
    assert tmp_dirs(directory) == []
    assert_restores(directory, target, state, 3)
