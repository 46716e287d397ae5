"""Checks that need 8 (fake CPU) devices run in a subprocess with XLA_FLAGS set before jax."""

import os
import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent("""
    import jax
    from instructjax.parallel import mesh as mesh_lib
    assert jax.device_count() == 8, jax.device_count()
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    try:
        mesh_lib.check_fits(mesh, global_batch=6, num_heads=4, num_kv_heads=2)
    except mesh_lib.MeshConfigError as e:
        assert "data x fsdp = 4" in str(e), e
    else:
        raise SystemExit("batch 6 on 4 batch shards was accepted")
    try:
        mesh_lib.check_fits(mesh, global_batch=8, num_heads=4, num_kv_heads=1)
    except mesh_lib.MeshConfigError as e:
        assert "tensor axis size 2" in str(e), e
    else:
        raise SystemExit("1 kv head on tensor=2 was accepted")
    print("OK")
""")


def test_fake_mesh_checks():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
