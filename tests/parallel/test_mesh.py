"""Mesh shape resolution and the up-front divisibility checks."""

import jax
import pytest

from instructjax.parallel import mesh as mesh_lib


def test_resolve_fills_minus_one():
    assert mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert mesh_lib.resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
    assert mesh_lib.resolve_mesh_shape({"data": -1}, 1) == (1, 1, 1)


@pytest.mark.parametrize("sizes,devices,fragment", [
    ({"data": -1, "fsdp": -1}, 8, "at most one"),
    ({"data": 3, "fsdp": -1}, 8, "do not divide"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, "needs 4 devices"),
    ({"data": 1, "pipeline": 2}, 2, "unknown mesh axes ['pipeline']"),
])
def test_resolve_errors_name_the_problem(sizes, devices, fragment):
    with pytest.raises(mesh_lib.MeshConfigError, match=None) as info:
        mesh_lib.resolve_mesh_shape(sizes, devices)
    assert fragment in str(info.value)


def test_check_fits_batch_and_heads():
    mesh = mesh_lib.make_mesh({"data": -1}, jax.devices()[:1])
    mesh_lib.check_fits(mesh, global_batch=4, num_heads=4, num_kv_heads=2)
    with pytest.raises(mesh_lib.MeshConfigError, match="grad_accum_steps 3"):
        mesh_lib.check_fits(mesh, global_batch=4, num_heads=4, num_kv_heads=2, micro_batches=3)


def test_rules_cover_every_logical_name_once():
    names = [name for name, _ in mesh_lib.LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names))
    for required in ("embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers",
                     "activation_batch", "activation_embed"):
        assert required in names
