"""Sharded import on 8 fake CPU devices (data 1 x fsdp 4 x tensor 2): the same values as the
single-device import bit for bit, each param in its logical sharding, and every read from
disk just one device's slice. Runs in a subprocess: XLA_FLAGS must be set before jax starts.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from instructjax.model.hf import layout

SCRIPT = textwrap.dedent("""
    import math
    import jax
    import jax.numpy as jnp
    import numpy as np
    from instructjax.model.config import ModelConfig
    from instructjax.model.hf import (load_hf, load_hf_reward, save_hf, save_hf_reward,
                                      convert, layout, safetensors_io)
    from instructjax.model.heads import RewardModel
    from instructjax.model.transformer import Transformer, init_params
    from instructjax.parallel import mesh as mesh_lib

    assert jax.device_count() == 8, jax.device_count()
    MESH = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    ROOT = __import__("sys").argv[1]
    BASE = ModelConfig(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=128)

    # Every slice read from disk: (tensor name, ((start, stop), ...), full tensor shape).
    REQUESTS = []
    _read = safetensors_io.CheckpointReader.read
    def recording_read(self, name, index):
        REQUESTS.append((name, tuple((s.start, s.stop) for s in index), self.shape(name)))
        return _read(self, name, index)
    safetensors_io.CheckpointReader.read = recording_read

    def random_tree(tree, seed):
        rng = np.random.RandomState(seed)
        return jax.tree.map(lambda x: jnp.asarray(
            rng.standard_normal(x.shape).astype(np.float32) * 0.1 + 1.0, x.dtype), tree)

    def flat(tree):
        return [(tuple(str(k.key) for k in p), leaf)
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]

    def check_reads(sharded):
        # Per tensor: which requests hit it, and whether its param is split by the mesh.
        by_name = {}
        for name, bounds, shape in REQUESTS:
            by_name.setdefault(name, []).append((bounds, shape))
        for path, leaf in flat(sharded):
            if path[-2:] == ("head", "bias"):
                continue
            source = layout.param_source(path, leaf.shape)
            split = not leaf.sharding.is_fully_replicated
            for name in source.hf_names:
                reads = by_name.pop(name)
                shape = reads[0][1]
                sizes = [math.prod(b - a for a, b in bounds) for bounds, _ in reads]
                # Replicas share one read: together the reads cover the tensor exactly once.
                assert sum(sizes) == math.prod(shape), (name, reads)
                if split:
                    assert max(sizes) < math.prod(shape), (name, "read whole", reads)
                    distinct = {layout.normalize_index(index, leaf.shape) for index in
                                leaf.sharding.devices_indices_map(leaf.shape).values()}
                    assert len(reads) == len(distinct), (name, reads)
                else:
                    assert len(reads) == 1, (name, reads)
        assert not by_name, sorted(by_name)

    def check_same(single, sharded, module):
        _, specs = convert.abstract_params(module)
        want = jax.tree.leaves(mesh_lib.logical_to_sharding(specs, MESH),
                               is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))
        for (path, a), (_, b), sharding in zip(flat(single), flat(sharded), want):
            assert b.sharding == sharding, (path, b.sharding, sharding)
            assert a.dtype == b.dtype, path
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))

    def roundtrip(name, cfg, params, load, save, module, **kw):
        path = f"{ROOT}/{name}"
        save(params, cfg, path, **kw)
        single, cfg1, _ = load(path, scan_layers=cfg.scan_layers)
        REQUESTS.clear()
        sharded, cfg2, _ = load(path, mesh=MESH, scan_layers=cfg.scan_layers)
        assert cfg1 == cfg2
        check_same(single, sharded, module(cfg2))
        check_reads(sharded)
        # Sharded (global) arrays export to the same checkpoint.
        save(sharded, cfg2, path + "_again", **kw)
        again, _, _ = load(path + "_again", scan_layers=cfg.scan_layers)
        check_same(again, sharded, module(cfg2))
        split = sum(not l.sharding.is_fully_replicated for _, l in flat(sharded))
        print(name, "OK", len(REQUESTS), "reads", split, "split params")

    # Qwen2-style (qkv biases), untied, bfloat16 shards on disk -> float32 params.
    cfg = BASE.replace(qkv_bias=True, tie_embeddings=False)
    roundtrip("qwen2", cfg, random_tree(init_params(cfg, jax.random.key(0)), 0), load_hf,
              save_hf, Transformer, dtype="bfloat16", max_shard_bytes=40_000)
    # Qwen3-style (qk norms, replicated), tied, unrolled layers.
    cfg = BASE.replace(qk_norm=True, scan_layers=False)
    roundtrip("qwen3", cfg, random_tree(init_params(cfg, jax.random.key(1)), 1), load_hf,
              save_hf, Transformer)
    # A reward model: its head kernel is split over fsdp, its bias comes from config.json.
    cfg = BASE
    trunk = random_tree(init_params(cfg, jax.random.key(2)), 2)
    head = {"kernel": jnp.linspace(-1, 1, 64, dtype=jnp.float32),
            "bias": jnp.asarray(0.25, jnp.float32)}
    roundtrip("reward", cfg, {"trunk": trunk, "head": head}, load_hf_reward, save_hf_reward,
              RewardModel, info={"pad_token_id": 0})
    print("ALL OK")
""")


def test_sharded_import_equals_single_device_and_reads_only_slices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "ALL OK" in out.stdout, out.stdout


class _ArrayReader:
    """A CheckpointReader stand-in over in-memory HF tensors."""

    def __init__(self, tensors):
        self.tensors = tensors

    def read(self, name, index):
        return self.tensors[name][tuple(index)]


# (our param path, our full shape): q kernel [L, E, H, D], out kernel [L, H, D, E], k bias
# [L, K, D], lm_head [E, V], score [E]; E 6, H 4, K 2, D 4, V 10, L 3.
_PARAMS = [(("layers", "attn", "query", "kernel"), (3, 6, 4, 4)),
           (("layers", "attn", "out", "kernel"), (3, 4, 4, 6)),
           (("layers", "attn", "key", "bias"), (3, 2, 4)),
           (("lm_head", "kernel"), (6, 10)),
           (("head", "kernel"), (6,))]


@pytest.mark.parametrize("path, shape", _PARAMS)
def test_any_slice_reads_as_the_slice_of_the_whole(path, shape):
    source = layout.param_source(path, shape)
    per_layer = shape[1:] if source.stacked else shape
    rng = np.random.RandomState(0)
    tensors = {name: rng.randn(*layout.hf_shape(source.layout, per_layer)).astype(np.float32)
               for name in source.hf_names}
    reader = _ArrayReader(tensors)
    whole = layout.read_param(reader, source, shape, tuple(slice(None) for _ in shape),
                              np.float32)
    # Export is the inverse of import, layer by layer.
    for i, name in enumerate(source.hf_names):
        layer = whole[i] if source.stacked else whole
        np.testing.assert_array_equal(layout.to_hf(source.layout, layer, np.float32),
                                      tensors[name])
    for _ in range(20):
        # Random step-1 slices, head_dim (the last axis of q and the bias) cut too: the
        # fallback path that the mesh rules never need.
        index = tuple(slice(a, b + 1) for a, b in
                      (sorted(rng.randint(0, dim, 2)) for dim in shape))
        part = layout.read_param(reader, source, shape, index, np.float32)
        np.testing.assert_array_equal(part, whole[index])
