"""The shared supervised loop: resume bit-identical, SIGTERM checkpoint, skip when finished,
fall back past a broken checkpoint. Uses a tiny Transformer and a synthetic data iterator so
these tests depend on nothing but the loop."""

import glob
import os
import signal
import struct

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructjax.model.config import ModelConfig
from instructjax.model.transformer import Transformer
from instructjax.parallel import mesh as mesh_lib
from instructjax.train.losses import lm_loss_fn
from instructjax.stages import settings
from instructjax.train import loop
from instructjax.train.metrics import read_metrics

CFG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_seq_len=16)
B, T = 4, 16


class SyntheticBatches:
    """Deterministic batches from (seed, position); position is the checkpointable state."""

    def __init__(self, seed=0, on_batch=None):
        self.seed, self.position, self.on_batch = seed, 0, on_batch

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        if self.on_batch is not None:
            self.on_batch(self.position)
        # a learnable pattern: token t+1 = token t + 1 (mod V)
        start = rng.integers(0, CFG.vocab_size, size=(B, 1))
        seq = (start + np.arange(T + 1)) % CFG.vocab_size
        return {"tokens": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
                "loss_mask": np.ones((B, T), np.float32),
                "segment_ids": np.ones((B, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


def train_cfg(**overrides):
    cfg = dict(steps=8, batch_size=B, learning_rate=1e-2, warmup_steps=2, decay="cosine",
               min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
               grad_accum_steps=1, eval_every=4, eval_batches=2, log_every=2,
               checkpoint_every=3, keep_checkpoints=5, async_checkpoint=False, max_bad_steps=0)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def run_loop(task, train: ml_collections.ConfigDict, mesh, workdir: str, *, seed: int = 0):
    """`loop.run_supervised` with a `config.train`-shaped ConfigDict, converted as the stages
    convert theirs (stages/settings.py)."""
    return loop.run_supervised(task, settings.loop_from(train, seed), settings.optim_from(train),
                               mesh, workdir)


def make_task(on_batch=None):
    model = Transformer(CFG)
    return loop.SupervisedTask(
        name="test",
        init_params_boxed=lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"],
        loss_fn=lm_loss_fn(model),
        make_train_batches=lambda: SyntheticBatches(on_batch=on_batch),
        make_eval_batches=lambda: [SyntheticBatches(seed=99).__next__() for _ in range(2)],
        tokens_per_batch=B * T)


@pytest.fixture(scope="module")
def mesh():
    return mesh_lib.make_mesh({"data": -1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mesh):
    workdir = str(tmp_path_factory.mktemp("full"))
    result = run_loop(make_task(), train_cfg(), mesh, workdir, seed=0)
    return workdir, jax.device_get(result.state)


def test_training_lowers_loss_and_writes_metrics(uninterrupted):
    workdir, state = uninterrupted
    rows = read_metrics(workdir)
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["loss"] < 0.8 * evals[0]["loss"]
    train = [r for r in rows if r["split"] == "train"]
    for key in ("loss", "grad_norm", "lr", "steps_per_sec", "tokens_per_sec"):
        assert key in train[0]
    assert int(state.step) == 8
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))


def test_sigterm_saves_and_resume_is_bit_identical(tmp_path, mesh, uninterrupted):
    _, expected = uninterrupted
    workdir = str(tmp_path)

    def kill_at_5(position):  # SIGTERM arrives while batch 5 is being fetched
        if position == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    first = run_loop(make_task(kill_at_5), train_cfg(), mesh, workdir, seed=0)
    assert first.preempted and first.step == 5 and not first.finished
    assert 5 in os.listdir(os.path.join(workdir, "checkpoints")) or \
        "5" in os.listdir(os.path.join(workdir, "checkpoints"))
    second = run_loop(make_task(), train_cfg(), mesh, workdir, seed=0)
    assert second.finished and second.step == 8
    # bit-identical: same data position, same RNG, same optimiser state
    chex.assert_trees_all_equal(jax.device_get(second.state), expected)
    steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
    assert steps == sorted(set(steps)), "resume duplicated metric rows"


def tensorboard_events(workdir):
    """The Event protos of a workdir's TensorBoard files (TFRecords: u64 length, u32 length
    crc, the record, u32 record crc)."""
    from tensorboardX.proto import event_pb2
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            yield event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4


def tensorboard_tags(workdir):
    """Scalar tags in the TensorBoard event files of a workdir."""
    return {value.tag for event in tensorboard_events(workdir) for value in event.summary.value}


def test_error_mid_run_commits_checkpoint_and_events_then_resumes(tmp_path, mesh,
                                                                   uninterrupted):
    """An exception inside the loop (a bad batch at step 5) still commits the asynchronous
    checkpoint of step 3 and flushes the TensorBoard events; the rerun resumes from step 3."""
    _, expected = uninterrupted
    workdir = str(tmp_path)

    def bad_batch_at_5(position):
        if position == 5:
            raise ValueError("malformed batch 5")

    with pytest.raises(ValueError, match="malformed batch 5"):
        run_loop(make_task(bad_batch_at_5), train_cfg(async_checkpoint=True), mesh,
                            workdir, seed=0)
    assert {"train/loss", "eval/loss"} <= tensorboard_tags(workdir)
    again = run_loop(make_task(), train_cfg(async_checkpoint=True), mesh, workdir,
                                seed=0)
    assert again.finished and again.step == 8
    chex.assert_trees_all_equal(jax.device_get(again.state), expected)


def test_finished_stage_is_skipped(tmp_path, mesh, capsys):
    workdir = str(tmp_path)
    run_loop(make_task(), train_cfg(steps=3), mesh, workdir, seed=0)
    capsys.readouterr()

    def fail(_):
        raise AssertionError("a finished stage must not train again")

    again = run_loop(make_task(fail), train_cfg(steps=3), mesh, workdir, seed=0)
    assert again.skipped
    assert "already finished" in capsys.readouterr().out


def test_broken_checkpoint_falls_back_to_previous(tmp_path, mesh, uninterrupted, capsys):
    _, expected = uninterrupted
    workdir = str(tmp_path)
    run_loop(make_task(), train_cfg(steps=6), mesh, workdir, seed=0)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [3, 6]
    # corrupt every file of the newest checkpoint's state
    for root, _, files in os.walk(os.path.join(ckpt_dir, "6", "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    capsys.readouterr()
    resumed = run_loop(make_task(), train_cfg(), mesh, workdir, seed=0)
    out = capsys.readouterr().out
    assert "broken" in out and "resuming from step 3" in out
    assert resumed.finished
    chex.assert_trees_all_equal(jax.device_get(resumed.state), expected)


def test_grad_accumulation_matches_full_batch(tmp_path, mesh):
    full = run_loop(make_task(), train_cfg(steps=2, eval_every=100),
                               mesh, str(tmp_path / "a"), seed=0)
    accum = run_loop(make_task(), train_cfg(steps=2, eval_every=100, grad_accum_steps=2),
                                mesh, str(tmp_path / "b"), seed=0)
    # float32 sums in a different order: agreement to ~1e-6 relative
    chex.assert_trees_all_close(jax.device_get(accum.state.params),
                                jax.device_get(full.state.params), rtol=1e-5, atol=1e-6)


def test_sigterm_during_eval_saves_consistent_step_and_resume_is_bit_identical(
        tmp_path, mesh, uninterrupted):
    """SIGTERM while the step-4 eval runs: the eval finishes and is logged once, step 4 is
    checkpointed, the run exits; resuming gives the uninterrupted run's state exactly."""
    _, expected = uninterrupted
    workdir = str(tmp_path)

    def eval_then_signal(params, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"probe": float(step)}

    task = make_task()
    task.extra_eval = eval_then_signal
    first = run_loop(task, train_cfg(), mesh, workdir, seed=0)
    assert first.preempted and first.step == 4
    assert "4" in os.listdir(os.path.join(workdir, "checkpoints"))
    task = make_task()
    task.extra_eval = lambda params, step: {"probe": float(step)}
    second = run_loop(task, train_cfg(), mesh, workdir, seed=0)
    assert second.finished and second.step == 8
    chex.assert_trees_all_equal(jax.device_get(second.state), expected)
    evals = [r["step"] for r in read_metrics(workdir) if r["split"] == "eval"]
    assert evals == [0, 4, 8], evals  # the interrupted eval is neither lost nor repeated


def test_attempt_killed_before_its_first_checkpoint_restarts_with_its_rows_kept_aside(
        tmp_path, mesh, uninterrupted):
    """No checkpoint yet: the rerun starts at step 0; the rows the first attempt logged are
    moved to metrics.jsonl.previous-* (not deleted, not mixed into the new run's rows)."""
    _, expected = uninterrupted
    workdir = str(tmp_path)

    def die_at_2(position):
        if position == 2:
            raise RuntimeError("simulated kill before the first checkpoint")

    with pytest.raises(RuntimeError, match="simulated kill"):
        run_loop(make_task(die_at_2), train_cfg(), mesh, workdir, seed=0)
    assert [r["step"] for r in read_metrics(workdir)] == [0]  # the step-0 eval
    result = run_loop(make_task(), train_cfg(), mesh, workdir, seed=0)
    chex.assert_trees_all_equal(jax.device_get(result.state), expected)
    aside = glob.glob(os.path.join(workdir, "metrics.jsonl.previous-*"))
    assert len(aside) == 1 and [r["step"] for r in read_metrics(aside[0])] == [0]
    evals = [r["step"] for r in read_metrics(workdir) if r["split"] == "eval"]
    assert evals == [0, 4, 8]


def test_logged_lr_follows_the_optimizer_count_after_skipped_steps():
    """A skipped step leaves optax's count (and so the schedule) where it was; the logged lr
    is the rate actually applied, not schedule(TrainState.step)."""
    import optax
    from instructjax.train import optim, step as step_lib
    from instructjax.train.state import TrainState
    cfg = optim.OptimConfig(learning_rate=1.0, total_steps=10, warmup_steps=10, decay="constant")
    tx, schedule = optim.make_optimizer(cfg), optim.make_schedule(cfg)
    params = {"w": jnp.ones((2,))}

    def loss_fn(p, batch, rng):
        return jnp.sum(p["w"] * batch["x"]), jnp.float32(1.0), {}

    train_step = jax.jit(step_lib.make_train_step(loss_fn, tx, schedule))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    lrs = []
    for x in (1.0, np.nan, np.nan, 1.0):
        state, metrics = train_step(state, {"x": jnp.full((2,), x, jnp.float32)})
        lrs.append(float(metrics["lr"]))
    # warmup: count 0 -> 0.0; then two skipped steps at count 1 (0.1, applied to nothing);
    # the next good step is at count 1 again -> 0.1, where schedule(TrainState.step) says 0.3
    np.testing.assert_allclose(lrs, [0.0, 0.1, 0.1, 0.1], atol=1e-6)
    assert int(state.step) == 4
    assert int(optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")[0][1]) == 2
