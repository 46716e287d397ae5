"""The rollout's decoding copy of the params: fsdp removed from every sharding, values cast."""
import os
import subprocess
import sys
import textwrap

from jax.sharding import PartitionSpec as P

from instructjax.parallel import mesh as mesh_lib


def test_spec_without_axis():
    drop = mesh_lib.spec_without_axis
    assert drop(P("fsdp", "tensor"), "fsdp") == P(None, "tensor")
    assert drop(P(("data", "fsdp"), None), "fsdp") == P("data", None)
    assert drop(P(("data", "fsdp", "tensor")), "fsdp") == P(("data", "tensor"))
    assert drop(P(), "fsdp") == P()
    assert drop(P("tensor", None), "fsdp") == P("tensor", None)


def test_decoding_copy_on_eight_devices():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from instructjax.parallel import mesh as mesh_lib
        mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
        w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("fsdp", "tensor")))
        n = jax.device_put(jnp.arange(8), NamedSharding(mesh, P("fsdp")))
        params = {"w": w, "n": n}
        copy = mesh_lib.make_decoding_copy(jax.tree.map(lambda x: x.sharding, params),
                                           "bfloat16")(params)
        assert copy["w"].dtype == jnp.bfloat16 and copy["n"].dtype == n.dtype
        assert copy["w"].sharding.spec == P(None, "tensor"), copy["w"].sharding.spec
        assert copy["n"].sharding.spec == P(None)
        # each device holds all rows (gathered over fsdp), half the columns (tensor)
        assert copy["w"].addressable_shards[0].data.shape == (8, 4)
        np.testing.assert_array_equal(np.asarray(copy["w"], np.float32), np.asarray(w))
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
