"""Tests for parallel/batch.py: per-process host batches -> sharded global arrays."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from instructjax.data import packing
from instructjax.parallel.batch import make_global_batch


def test_make_global_batch_single_device():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    host = packing.pack_documents([[2, 5, 6, 3]] * 4, None, seq_len=8)
    batch = make_global_batch(host, mesh)
    assert set(batch) == set(packing.BATCH_KEYS)
    for k, v in batch.items():
        assert isinstance(v, jax.Array) and v.shape == host[k].shape and v.dtype == host[k].dtype
        assert v.sharding.spec == P(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(v), host[k])
    with pytest.raises(ValueError, match="not mesh axes"):
        make_global_batch(host, mesh, batch_axes=("batch",))
    with pytest.raises(ValueError, match="common leading batch dim"):
        make_global_batch({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, mesh)


def test_make_global_batch_on_eight_fake_devices():
    """Sharded placement and the divisibility error on a fresh process with 8 CPU devices."""
    script = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import Mesh
        from instructjax.parallel.batch import make_global_batch
        assert len(jax.devices()) == 8
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
        host = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
        out = make_global_batch(host, mesh)["tokens"]
        assert out.shape == (8, 5)
        assert sorted(s.data.shape for s in out.addressable_shards) == [(2, 5)] * 8
        np.testing.assert_array_equal(np.asarray(out), host["tokens"])
        try:
            make_global_batch({"tokens": np.zeros((6, 5), np.int32)}, mesh)
        except ValueError as e:
            print("ERROR:", e)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ERROR: global batch 6 (6 per process x 1 processes) is not divisible by 4" in \
        result.stdout
    assert "('data', 'fsdp')" in result.stdout
