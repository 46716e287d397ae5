"""train/host_state.py: per-process JSON states gathered for a checkpoint and picked back out,
in one process and in 2 real CPU processes (jax.distributed, gloo); the supervised loop
saves them as a list and still resumes a checkpoint with the older single "data_state"."""

import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import _multiprocess as mp
from instructjax.model.config import ModelConfig
from instructjax.model.transformer import Transformer
from instructjax.parallel import mesh as mesh_lib
from instructjax.stages import settings
from instructjax.train import host_state, loop
from instructjax.train.losses import lm_loss_fn

# Each child gathers a state of a different length (padding must not leak into the JSON),
# then reports what it got.
CHILD = r"""
import json, sys
import jax
port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
from instructjax.train import host_state
mine = {"process": pid, "text": "用户" * (1 + 40 * pid), "nested": {"chunk": [pid, None, 1.5]}}
states = host_state.gather_process_states(mine)
result = {"states": states, "picked": host_state.state_for_this_process(states)}
for bad in ([states[0]], states[0]):  # saved by 1 process (list, legacy dict)
    try:
        host_state.state_for_this_process(bad)
        result.setdefault("errors", []).append(None)
    except host_state.ProcessCountMismatchError as err:
        result.setdefault("errors", []).append(str(err))
with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f)
"""


def test_one_process_is_the_identity():
    state = {"position": 3, "config": {"shard_index": 0}}
    gathered = host_state.gather_process_states(state)
    assert gathered == [state]
    assert host_state.state_for_this_process(gathered) == state


def test_a_single_state_checkpoint_stays_readable_by_one_process():
    legacy = {"data_state": {"position": 7}, "finished": False}
    assert host_state.state_for_this_process(legacy["data_state"]) == {"position": 7}
    assert host_state.state_from_meta(legacy, "data_states", legacy_key="data_state") == {
        "position": 7}
    new = {"data_states": [{"position": 8}], "data_state": {"position": 7}}
    assert host_state.state_from_meta(new, "data_states", legacy_key="data_state") == {
        "position": 8}


def test_another_process_count_is_refused_naming_both_counts():
    with pytest.raises(host_state.ProcessCountMismatchError,
                       match=r"2 process\(es\), but 1 are resuming"):
        host_state.state_for_this_process([{"a": 1}, {"a": 2}])


def test_two_processes_each_get_every_state_and_pick_their_own(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = mp.spawn(lambda i, port: [sys.executable, str(script), str(port), str(i),
                                      str(outs[i])], tmp_path, "gather")
    mp.checked(procs, mp.wait(procs, timeout=300))
    results = [json.loads(out.read_text(encoding="utf-8")) for out in outs]
    want = [{"process": i, "text": "用户" * (1 + 40 * i), "nested": {"chunk": [i, None, 1.5]}}
            for i in range(2)]
    for i, result in enumerate(results):
        assert result["states"] == want
        assert result["picked"] == want[i]
        list_error, dict_error = result["errors"]
        assert "1 process(es), but 2 are resuming" in list_error
        assert ("a single data position (written before per-process positions were saved), "
                "but 2 processes are resuming it") in dict_error


class CountingBatches:
    """Batches determined by their position (the checkpointable state); tiny LM rows."""

    def __init__(self):
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        seq = (self.position * 3 + np.arange(2 * 9).reshape(2, 9)) % 32
        self.position += 1
        ones = np.ones((2, 8), np.int32)
        return {"tokens": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
                "loss_mask": ones.astype(np.float32), "segment_ids": ones,
                "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8)).copy()}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


def run_loop(task, train, mesh, workdir, *, seed=0):
    return loop.run_supervised(task, settings.loop_from(train, seed), settings.optim_from(train),
                               mesh, workdir)


def _task():
    model = Transformer(ModelConfig(vocab_size=32, embed_dim=16, num_layers=1, num_heads=2,
                                    num_kv_heads=2, head_dim=8, mlp_dim=32, max_seq_len=8))
    return loop.SupervisedTask(
        name="host-state", loss_fn=lm_loss_fn(model), make_train_batches=CountingBatches,
        init_params_boxed=lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])


def _train_cfg(steps):
    return ml_collections.ConfigDict(dict(
        steps=steps, batch_size=2, learning_rate=1e-2, warmup_steps=1, decay="cosine",
        min_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
        grad_accum_steps=1, eval_every=100, eval_batches=1, log_every=1, checkpoint_every=2,
        keep_checkpoints=5, async_checkpoint=False, max_bad_steps=0))


def test_one_process_loop_saves_a_list_and_resumes_a_legacy_checkpoint(tmp_path):
    mesh = mesh_lib.make_mesh({"data": -1}, jax.devices()[:1])
    full = run_loop(_task(), _train_cfg(4), mesh, str(tmp_path / "full"), seed=0)

    workdir = str(tmp_path / "legacy")
    run_loop(_task(), _train_cfg(2), mesh, workdir, seed=0)
    meta_path = os.path.join(workdir, "checkpoints", "2", "meta", "metadata")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["data_states"] == [{"position": 2}]
    # Rewrite it as checkpoints were before per-process states: one "data_state" dict.
    meta["data_state"] = meta.pop("data_states")[0]
    meta["finished"] = False
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)

    resumed = run_loop(_task(), _train_cfg(4), mesh, workdir, seed=0)
    assert resumed.finished and resumed.step == 4
    chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(full.state))
