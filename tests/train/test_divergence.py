"""The divergence guard: a NaN injected at step k stops the run at k, naming the metric and
the data position, with no checkpoint of k or later; with train.max_bad_steps the bad batch
is skipped (params and optimiser state untouched) and the run finishes. Non-finite values
are logged as null + flag in JSONL and as numbers in TensorBoard."""

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.train import checkpoint as ckpt_lib
from instructjax.train import divergence
from instructjax.train.metrics import MetricsWriter, read_metrics
from test_loop import (B, SyntheticBatches, make_task, mesh, run_loop,  # noqa: F401 (fixture)
                       tensorboard_events, train_cfg)

BAD_POSITION = 5  # the 5th batch drawn, i.e. the batch of step 5


class PoisonedBatches(SyntheticBatches):
    """SyntheticBatches with a "poison" [B] float field: 1, or NaN in batch BAD_POSITION."""

    def __next__(self):
        batch = super().__next__()
        value = np.nan if self.position == BAD_POSITION else 1.0
        return {**batch, "poison": np.full((B,), value, np.float32)}


def poisoned_task():
    task = make_task()
    base_loss = task.loss_fn

    def loss_fn(params, batch, rng):
        loss_sum, weight, stats = base_loss(
            params, {k: v for k, v in batch.items() if k != "poison"}, rng)
        return loss_sum * jnp.max(batch["poison"]), weight, stats

    task.loss_fn = loss_fn
    task.make_train_batches = PoisonedBatches
    task.make_eval_batches = None
    return task


def checkpoint_steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_nan_at_step_k_stops_at_k_naming_metric_and_position(tmp_path, mesh):
    workdir = str(tmp_path)
    with pytest.raises(divergence.DivergenceError) as err:
        run_loop(poisoned_task(), train_cfg(checkpoint_every=2), mesh, workdir, seed=0)
    message = str(err.value)
    assert "step 5" in message and "loss=nan" in message and "grad_norm=nan" in message
    assert '"batch": 4' in message and '"position": 4' in message  # batch index + iterator
    assert "newest checkpoint is step 4" in message
    assert checkpoint_steps(workdir) == [2, 4]  # nothing from step 5 on
    assert not os.path.exists(os.path.join(workdir, ckpt_lib.PARAMS_DIR))
    # the bad step is in the metrics: null + flag in JSONL, decoded to NaN by the reader
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    bad = [r for r in raw if r["step"] == 5]
    assert bad and bad[0]["loss"] is None and bad[0]["nonfinite"]["loss"] == "nan"
    decoded = [r for r in read_metrics(workdir) if r["step"] == 5][0]
    assert math.isnan(decoded["loss"])


def test_resume_after_divergence_with_skip_budget_finishes(tmp_path, mesh):
    """Stopped at 5; rerun with max_bad_steps=1 resumes from 4, skips batch 5, finishes."""
    workdir = str(tmp_path)
    with pytest.raises(divergence.DivergenceError):
        run_loop(poisoned_task(), train_cfg(checkpoint_every=2), mesh, workdir,
                            seed=0)
    result = run_loop(poisoned_task(),
                                 train_cfg(checkpoint_every=1, max_bad_steps=1),
                                 mesh, workdir, seed=0)
    assert result.finished and result.step == 8
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result.state.params)))
    rows = [r for r in read_metrics(workdir) if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows if r["step"] == 8] == [1]


def test_skipped_step_leaves_params_and_optimizer_state_untouched(tmp_path, mesh):
    workdir = str(tmp_path)
    result = run_loop(poisoned_task(), train_cfg(checkpoint_every=1, keep_checkpoints=10,
                                                            max_bad_steps=2),
                                 mesh, workdir, seed=0)
    assert result.finished
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding), result.state)
        before = checkpointer.manager.restore(4, args=ckpt_lib.ocp.args.Composite(
            state=ckpt_lib.ocp.args.StandardRestore(target)))["state"]
        after = checkpointer.manager.restore(5, args=ckpt_lib.ocp.args.Composite(
            state=ckpt_lib.ocp.args.StandardRestore(target)))["state"]
    chex.assert_trees_all_equal(before.params, after.params)
    chex.assert_trees_all_equal(before.opt_state, after.opt_state)
    assert int(after.step) == 5  # the step counter (lr schedule, rng) moves on


def tensorboard_scalars(workdir, tag):
    """(step, value) of one scalar tag in a workdir's TensorBoard event files."""
    return [(event.step, value.simple_value) for event in tensorboard_events(workdir)
            for value in event.summary.value if value.tag == tag]


def test_nonfinite_values_are_numbers_in_tensorboard_and_null_in_jsonl(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        writer.write(1, "train", {"loss": float("nan"), "kl": float("inf"), "lr": 0.5})
        writer.write(2, "train", {"loss": 1.0, "kl": float("-inf"), "lr": 0.5})
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = json.loads(lines[0])  # strict JSON: no NaN literal
    assert "NaN" not in lines[0] and first["loss"] is None and first["kl"] is None
    assert first["nonfinite"] == {"loss": "nan", "kl": "inf"} and first["lr"] == 0.5
    rows = read_metrics(str(tmp_path))
    assert math.isnan(rows[0]["loss"]) and rows[0]["kl"] == math.inf
    assert rows[1]["kl"] == -math.inf and "nonfinite" not in rows[1]
    loss = dict(tensorboard_scalars(str(tmp_path), "train/loss"))
    assert math.isnan(loss[1]) and loss[2] == 1.0
    assert dict(tensorboard_scalars(str(tmp_path), "train/kl"))[1] == math.inf


def test_guard_counts_and_names():
    guard = divergence.BadStepGuard("s", max_bad_steps=1)
    assert not guard.check(1, {"loss": 1.0, "grad_norm": 2.0}, position={}, last_checkpoint=None)
    assert guard.check(2, {"loss": 1.0, "kl": math.inf}, position={"batch": 1},
                       last_checkpoint=None)
    with pytest.raises(divergence.DivergenceError, match=r"step 3: non-finite score=nan"):
        guard.check(3, {"score": math.nan}, position={"batch": 2}, last_checkpoint=2)
    with pytest.raises(ValueError, match="max_bad_steps"):
        divergence.BadStepGuard("s", max_bad_steps=-1)
