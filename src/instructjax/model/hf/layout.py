"""Where each of our params lives in a Hugging Face checkpoint, and the index arithmetic that
reads any slice of a param from just the slice of the HF tensors that holds it.

Our kernels are [in..., out...] with head axes kept apart; HF's nn.Linear weights are
[out, in] with heads flattened, e.g. q_proj [H*D, E] for our query kernel [E, H, D]. A
`Layout` relates the two through a "view" of the HF tensor with its flattened axes split
(q_proj viewed as [H, D, E]):
  groups  how many view axes each HF axis flattens, in order (q_proj: (2, 1)); 0 marks an
          HF axis of size 1 that we drop (score.weight [1, E] -> our [E]);
  perm    the view axis behind each of our axes (query kernel: (2, 0, 1)), i.e.
          ours = view.transpose(perm).
Our scanned params stack the layers on a leading [L] axis; HF names each layer's tensor.

Letters: L layers, E embed, H query heads, K kv heads, D head dim, F mlp, V vocab.
"""
import dataclasses
import math
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one of our per-layer params is laid out in its HF tensor (see the module doc)."""

    groups: tuple[int, ...]
    perm: tuple[int, ...]


_IN_TO_HEADS = Layout(groups=(2, 1), perm=(2, 0, 1))   # ours [E, N, D] <- HF [N*D, E]
_HEADS_TO_OUT = Layout(groups=(1, 2), perm=(1, 2, 0))  # ours [H, D, E] <- HF [E, H*D]
_HEAD_BIAS = Layout(groups=(2,), perm=(0, 1))          # ours [N, D]    <- HF [N*D]
_DENSE = Layout(groups=(1, 1), perm=(1, 0))            # ours [I, O]    <- HF [O, I]
_ROWS = Layout(groups=(1, 1), perm=(0, 1))             # ours [V, E]    <- HF [V, E]
_VECTOR = Layout(groups=(1,), perm=(0,))               # ours [X]       <- HF [X]
_SCORE = Layout(groups=(0, 1), perm=(0,))              # ours [E]       <- HF [1, E]

# Our param path within one block -> HF name within "model.layers.{i}." and its layout.
_LAYER_TENSORS = {
    ("attn", "query", "kernel"): ("self_attn.q_proj.weight", _IN_TO_HEADS),
    ("attn", "key", "kernel"): ("self_attn.k_proj.weight", _IN_TO_HEADS),
    ("attn", "value", "kernel"): ("self_attn.v_proj.weight", _IN_TO_HEADS),
    ("attn", "query", "bias"): ("self_attn.q_proj.bias", _HEAD_BIAS),
    ("attn", "key", "bias"): ("self_attn.k_proj.bias", _HEAD_BIAS),
    ("attn", "value", "bias"): ("self_attn.v_proj.bias", _HEAD_BIAS),
    ("attn", "out", "kernel"): ("self_attn.o_proj.weight", _HEADS_TO_OUT),
    ("attn", "query_norm", "scale"): ("self_attn.q_norm.weight", _VECTOR),
    ("attn", "key_norm", "scale"): ("self_attn.k_norm.weight", _VECTOR),
    ("attn_norm", "scale"): ("input_layernorm.weight", _VECTOR),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _VECTOR),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", _DENSE),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", _DENSE),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", _DENSE),
}
_TOP_TENSORS = {
    ("embed", "embedding"): ("model.embed_tokens.weight", _ROWS),
    ("final_norm", "scale"): ("model.norm.weight", _VECTOR),
    ("lm_head", "kernel"): ("lm_head.weight", _DENSE),
    # The reward model's scalar head (model/heads.py) is a sequence classifier's score.
    ("head", "kernel"): ("score.weight", _SCORE),
}
# Our reward model keeps the Transformer's params under "trunk"; HF's "model." prefix
# already names the trunk in both CausalLM and SequenceClassification checkpoints.
_TRUNK = "trunk"
_UNROLLED_LAYER = re.compile(r"layers_(\d+)")


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """The HF tensors behind one of our params.

    path: our param path, e.g. ("layers", "attn", "query", "kernel").
    hf_names: the HF tensor of each layer when `stacked` (our leaf is [L, ...]), else one.
    layout: how each HF tensor maps to our (per-layer) array.
    """

    path: tuple[str, ...]
    hf_names: tuple[str, ...]
    stacked: bool
    layout: Layout


def param_source(path, shape):
    """ParamSource of our param at `path` (a tuple of dict keys) with `shape`.

    Raises:
        KeyError: naming a param no HF tensor holds.
    """
    rel = path[1:] if path[0] == _TRUNK else path
    if rel[0] == "layers" and rel[1:] in _LAYER_TENSORS:
        name, layout = _LAYER_TENSORS[rel[1:]]
        return ParamSource(path, tuple(f"model.layers.{i}.{name}" for i in range(shape[0])),
                           True, layout)
    match = _UNROLLED_LAYER.fullmatch(rel[0])
    if match and rel[1:] in _LAYER_TENSORS:
        name, layout = _LAYER_TENSORS[rel[1:]]
        return ParamSource(path, (f"model.layers.{match.group(1)}.{name}",), False, layout)
    if rel in _TOP_TENSORS:
        name, layout = _TOP_TENSORS[rel]
        return ParamSource(path, (name,), False, layout)
    raise KeyError(f"no Hugging Face tensor holds our param {'/'.join(path)}")


def _view_shape(layout, shape):
    """Shape of the HF view of our per-layer array of `shape`."""
    return tuple(shape[layout.perm.index(axis)] for axis in range(len(layout.perm)))


def hf_shape(layout, shape):
    """Shape of the HF tensor holding our per-layer array of `shape`."""
    view, dims, axis = _view_shape(layout, shape), [], 0
    for n in layout.groups:
        dims.append(math.prod(view[axis:axis + n]))
        axis += n
    return tuple(dims)


def normalize_index(index, shape):
    """A tuple of slices (jax's callback indices, may hold None bounds) as (start, stop) pairs.

    Raises:
        ValueError: on a strided slice (shardings never produce one).
    """
    out = []
    for sl, dim in zip(index, shape):
        start, stop, step = sl.indices(dim)
        if step != 1:
            raise ValueError(f"strided index {sl} is not supported")
        out.append((start, stop))
    return tuple(out)


def hf_read_index(layout, shape, bounds):
    """Which slice of the HF tensor holds bounds of our per-layer array, and how to finish.

    Each HF axis is sliced on the leading view axis of its group, and its other view axes
    are read whole and cut afterwards: exact whenever those inner axes are not split, as
    for head_dim, which our mesh rules never shard.

    Args:
        layout: the param's Layout.
        shape: our per-layer shape.
        bounds: ((start, stop), ...) per axis of ours (normalize_index).

    Returns:
        (hf_index: tuple of slices into the HF tensor, read_shape: the read block viewed
        with split axes, local: tuple of slices cutting the inner view axes).
    """
    view = _view_shape(layout, shape)
    view_bounds = [None] * len(view)
    for ours_axis, view_axis in enumerate(layout.perm):
        view_bounds[view_axis] = bounds[ours_axis]
    hf_index, read_shape, local, axis = [], [], [], 0
    for n in layout.groups:
        if n == 0:
            hf_index.append(slice(0, 1))
            continue
        (start, stop), inner = view_bounds[axis], math.prod(view[axis + 1:axis + n])
        hf_index.append(slice(start * inner, stop * inner))
        read_shape += [stop - start, *view[axis + 1:axis + n]]
        local += [slice(None)] + [slice(*b) for b in view_bounds[axis + 1:axis + n]]
        axis += n
    return tuple(hf_index), tuple(read_shape), tuple(local)


# XLA:CPU adopts a host buffer that starts on a 64-byte boundary as a device buffer instead
# of copying it (seen with jax 0.10.2; numpy's large allocations are only 16-byte aligned).
# Fresh memory costs a page fault per page on first touch, which on a small VM took longer
# than reading and converting the bytes: params built aligned are materialised once.
_ALIGN = 64


def aligned_empty(shape, dtype):
    """np.empty(shape, dtype) whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def read_param(reader, source, shape, index, dtype):
    """Slice `index` of our param from the HF tensors of `source`, via `reader.read`.

    Args:
        reader: safetensors_io.CheckpointReader (anything with read(name, index)).
        source: the param's ParamSource.
        shape: our full param shape ([L, ...] when stacked).
        index: tuple of slices, one per dim of `shape` (a jax shard's index).
        dtype: numpy dtype of the result.

    Returns:
        np.ndarray of the sliced shape in `dtype`, C-contiguous and 64-byte aligned.
    """
    bounds = normalize_index(index, shape)
    out = aligned_empty(tuple(stop - start for start, stop in bounds), dtype)
    if not source.stacked:
        _read_layer_into(out, reader, source.hf_names[0], source.layout, shape, bounds)
        return out
    for j, layer in enumerate(range(*bounds[0])):
        _read_layer_into(out[j], reader, source.hf_names[layer], source.layout, shape[1:],
                         bounds[1:])
    return out


def _read_layer_into(out, reader, name, layout, shape, bounds):
    """Reads one layer's slice into `out` (C-contiguous, our layout), cast to out.dtype."""
    hf_index, read_shape, local = hf_read_index(layout, shape, bounds)
    block = reader.read(name, hf_index)
    order = _hf_order(layout)
    if order is None or block.reshape(read_shape)[local].shape != read_shape:
        # An inner view axis is cut (never under our mesh rules): the plain, slower copy.
        out[...] = block.reshape(read_shape)[local].transpose(layout.perm)
        return
    kept = block.reshape([dim for dim, n in zip(block.shape, layout.groups) if n])
    copy_permuted(out.reshape([kept.shape[axis] for axis in order]), kept, order)


def _hf_order(layout):
    """Our axes as a permutation of the HF tensor's axes (those of nonzero group size,
    renumbered), when `perm` keeps each HF axis' view axes together and in order, as every
    layout here does; else None."""
    view_axes, start = [], 0  # the view axes of each HF axis that has any
    for n in layout.groups:
        if n:
            view_axes.append(tuple(range(start, start + n)))
        start += n
    owner = {view_axis: i for i, axes in enumerate(view_axes) for view_axis in axes}
    order = tuple(dict.fromkeys(owner[view_axis] for view_axis in layout.perm))
    expanded = tuple(view_axis for i in order for view_axis in view_axes[i])
    return order if expanded == layout.perm else None


# Source rows per block of a 2-D transposing copy: measured fastest on this CPU (~6x a
# single numpy copy of a large transposed matrix, whose strided writes miss the cache).
_TRANSPOSE_ROWS = 16


def copy_permuted(dst, src, order):
    """dst[...] = src.transpose(order), cast to dst.dtype; 2-D transposes in row blocks.

    Args:
        dst: array of shape [src.shape[a] for a in order] (written in place).
        src: array.
        order: permutation of src's axes.
    """
    if src.dtype == dst.dtype and src.dtype.itemsize in (2, 4):
        # Same dtype: move raw bits (numpy's loops for ml_dtypes' bfloat16 are generic).
        bits = np.dtype(f"u{src.dtype.itemsize}")
        src, dst = src.view(bits), dst.view(bits)
    if order == tuple(range(src.ndim)):
        dst[...] = src
    elif order == (1, 0):
        for i in range(0, src.shape[0], _TRANSPOSE_ROWS):
            dst[:, i:i + _TRANSPOSE_ROWS] = src[i:i + _TRANSPOSE_ROWS].T
    else:
        dst[...] = src.transpose(order)


def to_hf(layout, array, dtype):
    """Our per-layer array -> the HF tensor (np.ndarray in `dtype`) of `layout`."""
    out = np.empty(hf_shape(layout, array.shape), dtype)
    order = _hf_order(layout)
    if order is None:
        out[...] = array.transpose(np.argsort(layout.perm)).reshape(out.shape)
        return out
    kept = out.reshape([dim for dim, n in zip(out.shape, layout.groups) if n])
    inverse = tuple(int(a) for a in np.argsort(order))
    copy_permuted(kept, array.reshape([kept.shape[axis] for axis in order]), inverse)
    return out
