"""Run Mosaic GPU (Hopper) Pallas kernels on CPU: jax's GPU interpreter plus a few rules.

jax ships an interpreter for Mosaic GPU kernels (`InterpretGPUParams`: simulated shared
memory, warpgroups as threads, TMA copies and mbarriers). It lacks part of what the Hopper
flash-attention kernels use. In jax 0.10.2 its wgmma rule takes both operands from shared
memory without a transpose (S = Q K^T reads K through a transposed view; P V takes P from
registers), and it has no rule for storing into a wgmma accumulator (the running output
before each P V matmul), for register layout casts, or for `plgpu.load` (the backward's row
statistics). jax 0.11 added transposed views, layout casts and `plgpu.load`, but still
reads both wgmma operands from shared memory, does not race-check them, and has no
accumulator store. `extended_gpu_interpreter()` adds, on either version:

- wgmma with a register (array) left operand and index-then-transpose views of either
  shared-memory operand: acc += a @ b computed in float32 like the hardware, with the
  operand reads race-checked;
- `wgmma_accumulator_store` (and on 0.10 `plgpu.load`), rewritten into the ref swap / get
  the interpreter has, so they stay in its token chain (ordered after the TMA copies and
  the barrier waits before them);
- on 0.10, `layout_cast` (which thread holds which register element): the identity;
- on 0.11, two corrections to its race model. A wgmma operand read or a `plgpu.load` is
  checked as a completed read (`_completed_read_011`), so a slot released by an mbarrier
  arrive after the read may be refilled by TMA without a proxy fence, as in
  FlashAttention-3 and jax's own Hopper attention. And the access history of shared
  memory and registers ends with each block (`_forget_block_local_history`): 0.11 gives
  every block fresh clocks but reuses their allocation keys, so block n+1's accesses
  would all look unordered with block n's.

Everything else (TMA, barriers, the three warpgroups, the grid) is jax's own interpreter:
a barrier phase a thread skips is an error, shared memory starts as NaN (a read before a
slot's first copy poisons the result), and the happens-before race detector is on, with the
wgmma operand reads above checked too (a slot released to the producer before a warpgroup's
last read of it is reported; `races_found()`). What it cannot see: it completes TMA copies
at once and runs wgmma synchronously (an in-flight matmul is never overtaken), treats
register limits (`set_max_registers`) as no-ops, and a deadlock hangs rather than fails.
The rules use interpreter internals; if jax moves them, `extended_gpu_interpreter` fails
loudly instead of running the kernels some other way.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np

from jax._src import callback
from jax._src import core as jax_core
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu import core as gpu_core
from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax._src.state import primitives as state_primitives
from jax._src.state import types as state_types

_Interpreter = jaxpr_interpret.JaxprInterpreter
# jax 0.11 reorganised the interpreter: threads are named by a MeshLocation and a Thread
# object, accesses carry their transposes, and RefUnion members resolve through resolve_ref.
_JAX_011_INTERPRETER = hasattr(jaxpr_interpret, "resolve_ref")


def _thread_context(device_id, grid_point_coords, thread_id):
    memory = gpu_callbacks._get_shared_memory()
    info = interpret_utils.GPULoggingInfo(
        device_id=int(device_id), grid_point_coords=tuple(int(x) for x in grid_point_coords),
        thread_id=int(thread_id), source_info=None)
    return memory, memory.get_global_thread_id(int(device_id), int(thread_id)), info


def _read_view(memory, thread, info, key_array, transforms):
    """Contents of a shared-memory view: indexers first, then at most one transpose.

    The read goes through the race detector like the interpreter's own reads, so a TMA copy
    into a slot that a wgmma of another warpgroup may still be reading is reported.
    """
    transforms = gpu_callbacks._remove_noop_transforms(transforms)
    is_transpose = [isinstance(t, state_types.TransposeTransform) for t in transforms]
    if any(later < earlier for earlier, later in zip(is_transpose, is_transpose[1:])):
        raise NotImplementedError(f"an index after a transpose in {transforms}")
    indexers = [t for t, tr in zip(transforms, is_transpose) if not tr]
    transposes = [t for t, tr in zip(transforms, is_transpose) if tr]
    key = gpu_callbacks.HostAllocationKey.from_array(key_array)
    read_range = interpret_utils.to_range(jax.tree.map(int, indexers))
    value, _, clock = memory.get_buffer_content(key, read_range, thread, logging_info=info)
    if memory.detect_races:
        gpu_callbacks.get_races().check_read(info.device_id, info.thread_id, clock, key,
                                             read_range)
    for t in transposes:
        value = np.transpose(value, t.permutation)
    return value


def _wgmma_callback(*, token, device_id, grid_point_coords, thread_id, acc, acc_transforms,
                    a, a_transforms, a_in_registers, b, b_transforms, acc_dtype):
    memory, thread, info = _thread_context(device_id, grid_point_coords, thread_id)
    lhs = np.asarray(a) if a_in_registers else _read_view(memory, thread, info, a, a_transforms)
    rhs = _read_view(memory, thread, info, b, b_transforms)
    acc_key = gpu_callbacks.HostAllocationKey.from_array(acc)
    acc_range = interpret_utils.to_range(
        jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
    current, _, _ = memory.get_buffer_content(acc_key, acc_range, thread, logging_info=info)
    result = current + np.matmul(lhs.astype(np.float32), rhs.astype(np.float32)).astype(acc_dtype)
    memory.store_buffer_content(acc_key, acc_range, result, thread, logging_info=info)
    return token


def _wgmma_operands(eqn, get_invals):
    """(acc, a, b, their transforms, whether a is a register array) of a wgmma equation."""
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    acc_t, a_t, b_t = jax.tree.unflatten(
        jax.tree_util.treedef_tuple((eqn.params["acc_transforms_tree"] or empty,
                                     eqn.params["a_transforms_tree"] or empty,
                                     eqn.params["b_transforms_tree"] or empty)), leaves)
    a_in_registers = not isinstance(eqn.invars[1].aval, state_types.AbstractRef)
    return acc, a, b, acc_t, a_t, b_t, a_in_registers


def _interpret_wgmma(self, eqn, token, get_invals):
    acc, a, b, acc_t, a_t, b_t, a_in_registers = _wgmma_operands(eqn, get_invals)
    token = callback.io_callback(
        functools.partial(_wgmma_callback, acc_dtype=eqn.invars[0].aval.dtype,
                          a_in_registers=a_in_registers),
        gpu_callbacks.TOKEN_SHAPE_DTYPE, token=token, device_id=self.device_info.device_id,
        grid_point_coords=self.grid_point_coords, thread_id=self.thread_id, acc=acc,
        acc_transforms=acc_t, a=a, a_transforms=a_t, b=b, b_transforms=b_t, ordered=True)
    return token, []


def _completed_read_011(memory, thread, info, key_array, transforms):
    """Contents of a view, read to completion by `thread` (jax 0.11 interpreter).

    A wgmma operand read or a `plgpu.load` has finished once the warpgroup goes on: its
    values are in registers or the accumulator. Such a read is therefore checked with the
    warpgroup's async-proxy clock after a tick on both proxies, as jax's own tcgen05
    (Blackwell) rule does for tensor-core reads. It is then strictly after the TMA load it
    waited for, and strictly before a TMA refill that waits for the warpgroup's later
    release. That is the ordering FlashAttention-3, CUTLASS's TMA pipelines and jax's own
    Hopper attention kernels rely on: they release a slot with an mbarrier arrive and no
    proxy fence. jax 0.11 checks a plain read with the generic-proxy clock, which such a
    release never carries to the async proxy, so each refill would be reported.
    """
    key = gpu_callbacks.HostAllocationKey.from_array(key_array)
    access = memory.access(
        key, jax.tree.map(int, gpu_callbacks._remove_noop_transforms(transforms)))
    value, _, _ = memory.get_buffer_content(key, access, thread, increment_clock=False,
                                            logging_info=info)
    if memory.detect_races:
        with memory.lock:
            clocks = memory.clocks[thread]
            clocks.inc(memory.thread_to_vc_position(thread))
            read_clock = clocks.async_smem_clock.copy()
        gpu_callbacks.get_races().check_read(thread, read_clock, key, access)
    return value


def _wgmma_callback_011(*, token, mesh_location, thread, acc, acc_transforms, a,
                        a_transforms, a_in_registers, b, b_transforms, acc_dtype):
    memory = gpu_callbacks._get_shared_memory()
    info = gpu_callbacks.memory.GPULoggingInfo(mesh_location, thread, None)
    read = functools.partial(_completed_read_011, memory, thread, info)
    lhs = np.asarray(a) if a_in_registers else read(a, a_transforms)
    rhs = read(b, b_transforms)
    acc_key = gpu_callbacks.HostAllocationKey.from_array(acc)
    acc_access = memory.access(
        acc_key, jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
    current, _, _ = memory.get_buffer_content(acc_key, acc_access, thread, logging_info=info)
    result = current + np.matmul(lhs.astype(np.float32), rhs.astype(np.float32)).astype(acc_dtype)
    memory.store_buffer_content(acc_key, acc_access, result, thread, logging_info=info)
    return token


def _load_callback_011(*, token, mesh_location, thread, ref, transforms):
    memory = gpu_callbacks._get_shared_memory()
    info = gpu_callbacks.memory.GPULoggingInfo(mesh_location, thread, None)
    return token, _completed_read_011(memory, thread, info, ref, transforms)


def _interpret_load_011(original):
    def interpret(self, eqn, token, get_invals):
        if eqn.primitive is not gpu_primitives.load_p:
            return original(self, eqn, token, get_invals)
        ref, *leaves = get_invals()
        ref, transforms = jaxpr_interpret.resolve_ref(
            eqn.invars[0].aval, ref, jax.tree.unflatten(eqn.params["tree"], leaves))
        return callback.io_callback(
            _load_callback_011, (gpu_callbacks.TOKEN_SHAPE_DTYPE, eqn.outvars[0].aval),
            token=token, mesh_location=self.mesh_location, thread=self.thread, ref=ref,
            transforms=transforms, ordered=True)
    return interpret


def _interpret_wgmma_011(self, eqn, token, get_invals):
    acc, a, b, acc_t, a_t, b_t, a_in_registers = _wgmma_operands(eqn, get_invals)
    acc, acc_t = jaxpr_interpret.resolve_ref(eqn.invars[0].aval, acc, acc_t)
    if not a_in_registers:
        a, a_t = jaxpr_interpret.resolve_ref(eqn.invars[1].aval, a, a_t)
    b, b_t = jaxpr_interpret.resolve_ref(eqn.invars[2].aval, b, b_t)
    token = callback.io_callback(
        functools.partial(_wgmma_callback_011, acc_dtype=eqn.invars[0].aval.dtype,
                          a_in_registers=a_in_registers),
        gpu_callbacks.TOKEN_SHAPE_DTYPE, token=token, mesh_location=self.mesh_location,
        thread=self.thread, acc=acc, acc_transforms=acc_t, a=a, a_transforms=a_t, b=b,
        b_transforms=b_t, ordered=True)
    return token, []


def _forget_block_local_history(original):
    """jax 0.11 runs the grid's blocks one after another and gives each a fresh vector
    clock, but keeps every shared-memory and register access in the race history, and
    reuses those allocation keys in the next block: each access of block n+1 then looks
    unordered with block n's and is reported as a race. On a GPU those memories belong to
    one block, so their history ends with it; global-memory history is kept (two blocks
    writing the same output rows is still reported)."""
    def reset_per_cluster_state(self):
        original(self)
        races = gpu_callbacks._races
        if races is None:
            return
        gmem = gpu_callbacks.memory.get_memory_space_idx(gpu_core.MemorySpace.GMEM)
        with races.lock:
            for table in (races.reads, races.writes, races.union_accesses):
                for key in [k for k in table if k.memory_space_id != gmem]:
                    del table[key]
    return reset_per_cluster_state


def _interpret_layout_cast(original):
    def interpret(self, eqn, get_invals):
        if eqn.primitive is gpu_core.layout_cast_p:
            # A register layout only says which thread holds which element.
            (value,) = get_invals()
            return value
        return original(self, eqn, get_invals)
    return interpret


def _as_ref_access(eqn):
    """Memory primitives the interpreter lacks, as the ref get / swap it has.

    Rewriting the equation (rather than adding a callback) keeps the access in the
    interpreter's token chain, which is what orders it after the TMA copies and barrier
    waits before it.
    """
    if eqn.primitive is gpu_primitives.load_p and not _JAX_011_INTERPRETER:
        return eqn.replace(primitive=state_primitives.get_p,
                           params={"tree": eqn.params["tree"]})
    if eqn.primitive is gpu_primitives.wgmma_accumulator_store_p:
        acc, value = eqn.invars
        return eqn.replace(primitive=state_primitives.swap_p, invars=[acc, value],
                           outvars=[jax_core.DropVar(value.aval)],
                           params={"tree": jax.tree.structure(())})
    return eqn


def _interpret_rewritten(original):
    def interpret(self, jaxpr, token, *args):
        return original(self, jaxpr.replace(eqns=[_as_ref_access(e) for e in jaxpr.eqns]),
                        token, *args)
    return interpret


@contextlib.contextmanager
def extended_gpu_interpreter():
    """Context in which Mosaic GPU kernels run on CPU with the rules above.

    Yields the `interpret=` argument for `plgpu.kernel` (an `InterpretGPUParams` with the
    happens-before race detector on); `races_found()` tells whether it reported any.
    """
    names = ("_interpret_wgmma_ref_p", "_interpret_arithmetic_primitive", "interpret")
    if _JAX_011_INTERPRETER:
        names += ("_interpret_get_p",)
    for name in names:
        if not hasattr(_Interpreter, name):
            raise RuntimeError(f"jax's Mosaic GPU interpreter has no {name}: update "
                               f"{__name__} for this jax version ({jax.__version__})")
    saved = {name: getattr(_Interpreter, name) for name in names}
    _Interpreter.interpret = _interpret_rewritten(saved["interpret"])
    if _JAX_011_INTERPRETER:
        shared_memory = gpu_callbacks.memory.GPUSharedMemory
        saved_reset = shared_memory.reset_per_cluster_state
        shared_memory.reset_per_cluster_state = _forget_block_local_history(saved_reset)
        _Interpreter._interpret_wgmma_ref_p = _interpret_wgmma_011
        _Interpreter._interpret_get_p = _interpret_load_011(saved["_interpret_get_p"])
    else:
        _Interpreter._interpret_wgmma_ref_p = _interpret_wgmma
        _Interpreter._interpret_arithmetic_primitive = _interpret_layout_cast(
            saved["_interpret_arithmetic_primitive"])
    try:
        yield InterpretGPUParams(detect_races=True)
    finally:
        for name, method in saved.items():
            setattr(_Interpreter, name, method)
        if _JAX_011_INTERPRETER:
            shared_memory.reset_per_cluster_state = saved_reset


def races_found() -> bool:
    """Whether the race detector reported a race in the last interpreted kernel."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    return interpret_pallas_call.get_races().races_found
