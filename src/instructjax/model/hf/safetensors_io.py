"""Hugging Face safetensors checkpoints on disk: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`; read slice by slice, written shard by shard.
"""
import json
import os
import re

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# safetensors' dtype names of the floating dtypes a checkpoint's weights may have.
FLOAT_DTYPES = ("F32", "BF16", "F16")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors are not the ones its config.json (or index) describes."""


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint directory, by name and slice.

    Shards are opened once each (safetensors memory-maps them), and `read` copies only the
    requested slice: a process loading a sharded model touches only the bytes it holds.
    Use as a context manager, or call `close`.
    """

    def __init__(self, directory):
        self.directory = directory
        self._handles = {}
        self._file_of = {}
        for file in _weight_files(directory):
            handle = self._open(file)
            for name in handle.keys():
                self._file_of[name] = file
        self._check_index(directory)

    def _open(self, file):
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.directory, file), framework="np")
        return self._handles[file]

    def _check_index(self, directory):
        index_path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(index_path):
            return
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        for name, file in weight_map.items():
            if self._file_of.get(name) != file:
                raise CheckpointMismatchError(f"tensor {name!r} is listed in {INDEX_FILE} under {file} but "
                               f"that file does not hold it")

    def names(self):
        """Set of all tensor names in the checkpoint."""
        return set(self._file_of)

    def shape(self, name):
        """Shape of tensor `name` as a tuple of ints (read from the header only)."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name):
        """safetensors dtype name of tensor `name`, e.g. "BF16" (header only)."""
        return self._slice(name).get_dtype()

    def read(self, name, index):
        """The slice `index` (a tuple of step-1 slices, one per dim) of tensor `name`.

        Returns:
            np.ndarray in the on-disk dtype (ml_dtypes.bfloat16 for BF16).
        """
        return self._slice(name)[tuple(index)]

    def _slice(self, name):
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        return self._open(self._file_of[name]).get_slice(name)

    def close(self):
        """Drops the open shard handles (their memory maps go with them)."""
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _weight_files(directory):
    """Names of the weight files of a checkpoint directory, checked to exist."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        for file in files:
            if not os.path.isfile(os.path.join(directory, file)):
                raise FileNotFoundError(f"shard file {file} named in {INDEX_FILE} is missing "
                                        f"from {directory}")
        return files
    if os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        return [WEIGHTS_FILE]
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")


def plan_shards(sizes, max_shard_bytes):
    """Groups tensors into consecutive shards of at most max_shard_bytes each.

    Args:
        sizes: list of (name, nbytes) in writing order.
        max_shard_bytes: shard size limit; a tensor larger than it gets a shard of its own.

    Returns:
        list of lists of names.
    """
    shards, current, current_bytes = [], [], 0
    for name, nbytes in sizes:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def remove_old_weights(directory):
    """Deletes the weight files an earlier save left in `directory` (as save_pretrained
    does): a stale index or shard would otherwise be read alongside the new weights."""
    for file in os.listdir(directory):
        if file in (WEIGHTS_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(file):
            os.remove(os.path.join(directory, file))


def write_checkpoint(directory, tensors, max_shard_bytes):
    """Writes tensors as model.safetensors, or as shards plus an index above max_shard_bytes.

    Tensors are produced one shard at a time, so at most one shard is in host memory.

    Args:
        directory: an existing directory.
        tensors: list of (name, nbytes, produce), produce() -> np.ndarray (C-contiguous is
            not required).
        max_shard_bytes: shard size limit.

    Returns:
        The names of the files written.
    """
    remove_old_weights(directory)
    producers = {name: produce for name, _, produce in tensors}
    shards = plan_shards([(name, nbytes) for name, nbytes, _ in tensors], max_shard_bytes)
    files = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, names in zip(files, shards):
        arrays = {name: np.ascontiguousarray(producers[name]()) for name in names}
        # transformers reads the "format" metadata to pick its loader; "pt" is what it writes.
        save_file(arrays, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes for _, nbytes, _ in tensors)},
                 "weight_map": weight_map}
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        files = files + [INDEX_FILE]
    return files
