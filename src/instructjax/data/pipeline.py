"""Documents -> packed, batched LM training arrays; per-process batches -> global jax.Arrays.

Legend: N packed rows, B batch, T sequence length (seq_len).

A batch is a dict of [B, T] arrays (docs/interfaces-draft.md, "Batches"):
  tokens      int32    input ids
  targets     int32    next token of the same document, 0 where there is none
  loss_mask   float32  weight of predicting targets[t]; 0 on padding and at the last
                       token of every packed segment (its next token is not in the row)
  segment_ids int32    1, 2, 3, ... per packed document within a row; 0 = padding
  positions   int32    position within the segment, restarting at 0

Packing is greedy and keeps documents whole: a document goes into the current row if it
fits in the space left, else it starts a new row (the rest of the old row is padding). A
document longer than T is cut into T-token chunks first, each packed as its own segment (a
text of any length, e.g. a 10 MB line, is tokenized whole and then cut).

`make_lm_batches` runs in-process, without worker processes: grain does
source -> this process's shard -> shuffle(seed, reshuffled each epoch) -> repeat ->
tokenize ([bos] + text + [eos]) in one prefetch thread; `LMBatchIterator` packs the
documents into rows and batches. Its state is a small JSON-able dict, saved in
checkpoints, so a resumed run sees exactly the batches it would have seen. grain is
imported only there, so this module (packing, `make_global_batch`) also imports on
machines without grain.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructjax.data.jsonl import DataFormatError

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_STATE_FORMAT = 1


# ------------------------------------------------------------------------------ packing

def _chunks(tokens: np.ndarray, weights: np.ndarray, seq_len: int):
    """A document as a list of (tokens, weights) pieces of at most seq_len tokens."""
    return [(tokens[s:s + seq_len], weights[s:s + seq_len])
            for s in range(0, len(tokens), seq_len)]


def _as_document(tokens: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    weights = np.asarray(weights, dtype=np.float32).reshape(-1)
    if tokens.shape != weights.shape:
        raise ValueError(f"a document has {tokens.shape[0]} tokens but "
                         f"{weights.shape[0]} loss weights")
    return tokens, weights


def _make_row(pieces: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int
              ) -> dict[str, np.ndarray]:
    """Lays pieces (each <= seq_len tokens, together <= seq_len) out as one [T] row."""
    row = {"tokens": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.float32),
           "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32)}
    start = 0
    for segment, (tokens, weights) in enumerate(pieces, start=1):
        end = start + len(tokens)
        row["tokens"][start:end] = tokens
        row["segment_ids"][start:end] = segment
        row["positions"][start:end] = np.arange(len(tokens))
        # Within a segment, position t predicts token t+1 with that token's loss weight;
        # the segment's last position has no target in this row and stays masked.
        row["targets"][start:end - 1] = tokens[1:]
        row["loss_mask"][start:end - 1] = weights[1:]
        start = end
    return row


def pack_documents(token_lists: Sequence[Sequence[int]],
                   loss_weights_lists: Sequence[Sequence[float]] | None,
                   seq_len: int) -> dict[str, np.ndarray]:
    """Packs tokenized documents into rows of length seq_len (greedy, in order).

    Args:
        token_lists: N_docs documents, each a sequence of ids, already with the BOS/EOS the
            caller wants (the pipeline adds both).
        loss_weights_lists: one weight per token, same lengths: `weights[j]` is the weight of
            the loss for predicting token j from the tokens before it (so `weights[0]` is
            never used). None means all ones (plain LM).
        seq_len: T.

    Returns:
        A batch dict (module docstring) of [N, T] arrays, N >= 1 rows (one padding row
        when there are no tokens at all). Every token of every document appears exactly
        once, in document order.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if loss_weights_lists is None:
        loss_weights_lists = [np.ones(len(t), np.float32) for t in token_lists]
    if len(loss_weights_lists) != len(token_lists):
        raise ValueError(f"{len(token_lists)} documents but {len(loss_weights_lists)} "
                         "loss weight lists")
    rows, pieces, used = [], [], 0
    for tokens, weights in zip(token_lists, loss_weights_lists):
        for piece in _chunks(*_as_document(tokens, weights), seq_len):
            if used + len(piece[0]) > seq_len:
                rows.append(_make_row(pieces, seq_len))
                pieces, used = [], 0
            pieces.append(piece)
            used += len(piece[0])
    if pieces or not rows:
        rows.append(_make_row(pieces, seq_len))
    return {k: np.stack([row[k] for row in rows]) for k in BATCH_KEYS}


# ------------------------------------------------------------------------------ batches

def _tokenize(record: Mapping[str, Any], *, tokenizer, text_field: str) -> dict[str, np.ndarray]:
    """{"tokens": int32 [n], "loss_weights": float32 [n]} for [bos] + text + [eos]."""
    if text_field not in record:
        raise ValueError(f"record has no field {text_field!r} (fields: {sorted(record)})")
    text = record[text_field]
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    ids = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
    return {"tokens": np.asarray(ids, np.int32), "loss_weights": np.ones(len(ids), np.float32)}


class LMBatchIterator:
    """Packs a stream of tokenized documents into [B, T] batches; checkpointable.

    Documents come from a grain iterator of {"tokens": int32 [n], "loss_weights": float32
    [n]}; rows are packed with the same greedy rule as `pack_documents`.

    `get_state()` returns a JSON-serialisable dict: the document iterator's state before
    the first document not yet fully packed, and how many of its chunks were packed. On
    `set_state` that document is read (and tokenized) again and packing resumes at that
    chunk, so an iterator made with the same arguments continues with exactly the batches
    the saved one would have produced next. A state saved with other arguments is rejected.
    """

    def __init__(self, documents, *, seq_len: int, batch_size: int, config: dict[str, Any]):
        self._documents = documents
        self._seq_len = seq_len
        self._batch_size = batch_size
        self._config = config
        self._doc_state = copy.deepcopy(documents.get_state())
        self._doc_chunks: list | None = None  # chunks of the pending document, if any
        self._next_chunk = 0

    def _read_document(self) -> bool:
        self._doc_state = copy.deepcopy(self._documents.get_state())
        try:
            doc = next(self._documents)
        except StopIteration:
            return False
        tokens, weights = _as_document(doc["tokens"], doc["loss_weights"])
        self._doc_chunks, self._next_chunk = _chunks(tokens, weights, self._seq_len), 0
        return True

    def _next_row(self) -> dict[str, np.ndarray] | None:
        """The next packed [T] row, or None when the documents are exhausted."""
        pieces, used = [], 0
        while True:
            if self._doc_chunks is None and not self._read_document():
                break
            piece = self._doc_chunks[self._next_chunk]
            if pieces and used + len(piece[0]) > self._seq_len:
                break  # the piece stays pending: it starts the next row
            pieces.append(piece)
            used += len(piece[0])
            self._next_chunk += 1
            if self._next_chunk == len(self._doc_chunks):
                self._doc_chunks = None
        return _make_row(pieces, self._seq_len) if pieces else None

    def __iter__(self) -> LMBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self._batch_size:
            row = self._next_row()
            if row is None:
                break
            rows.append(row)
        if not rows:
            raise StopIteration
        # After the last document, fill the batch with padding rows (segment 0, loss 0)
        # so that every batch has the same shape and nothing recompiles.
        rows += [_make_row([], self._seq_len)] * (self._batch_size - len(rows))
        return {k: np.stack([row[k] for row in rows]) for k in BATCH_KEYS}

    def get_state(self) -> dict[str, Any]:
        """{"format": 1, "config": {...arguments...}, "documents": {...}, "chunk": int}."""
        if self._doc_chunks is None:  # nothing pending: resume right after the last doc
            documents, chunk = self._documents.get_state(), 0
        else:
            documents, chunk = self._doc_state, self._next_chunk
        return {"format": _STATE_FORMAT, "config": dict(self._config),
                "documents": copy.deepcopy(documents), "chunk": chunk}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a state from `get_state` (possibly after a JSON round trip)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown data iterator state format {state.get('format')!r}")
        saved = state["config"]
        diffs = {k: (saved.get(k), v) for k, v in self._config.items() if saved.get(k) != v}
        if diffs:
            raise ValueError("data iterator state was saved with other settings "
                             f"(name: (saved, now)): {diffs}")
        self._documents.set_state(copy.deepcopy(state["documents"]))
        self._doc_chunks, self._next_chunk = None, 0
        if state["chunk"]:
            if not self._read_document():
                raise ValueError("data iterator state points past the end of the data")
            self._next_chunk = state["chunk"]


def _empty_shard_error(source: Sequence[Any], shard_index: int, shard_count: int,
                       what: str) -> DataFormatError:
    # Too little user data for the number of processes, hence a data error (one line at the
    # command line), naming the source (its repr names the dataset and split).
    return DataFormatError(f"{source!r}: shard {shard_index} of {shard_count} holds no "
                           f"{what} (the source has {len(source)}); give at least "
                           f"{shard_count} records or run fewer processes")


def make_lm_batches(source: Sequence[Mapping[str, Any]], tokenizer, *, seq_len: int,
                    batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                    num_epochs: int | None = None, text_field: str = "text",
                    shuffle: bool = True, to_document=None) -> LMBatchIterator:
    """Packed LM batches from a random-access source of text records.

    Args:
        source: random access records (`len(source)`, `source[i]` -> dict with a str
            `text_field`), e.g. a split from `tfds_builders.build_text_source`.
        tokenizer: a `tokenizer.Tokenizer` (encode, bos_id, eos_id).
        seq_len: T.
        batch_size: B, rows per batch on this process.
        seed: shuffle seed (each epoch is shuffled differently, deterministically).
        shard_index: this process's shard, in [0, shard_count).
        shard_count: number of shards (usually jax.process_count()); shard i takes
            documents i, i + shard_count, ... of the source, so shards are disjoint.
        num_epochs: passes over this shard; None repeats forever.
        text_field: the record field holding the text.
        shuffle: False reads documents in source order (e.g. for evaluation).
        to_document: record -> {"tokens": int32 [n], "loss_weights": float32 [n]}; the
            default tokenizes `text_field` as [bos] + text + [eos], all weights 1. SFT passes
            one that renders a dialogue and weights only the answer tokens (+ EOS).

    Returns:
        An `LMBatchIterator` yielding batch dicts of [B, T] numpy arrays (module
        docstring). With finite epochs the last batch is filled up with all-padding rows
        (loss_mask 0), so every batch has the same shape.
    """
    import grain  # pylint: disable=import-outside-toplevel  (absent on the GPU image)

    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise _empty_shard_error(source, shard_index, shard_count, "documents")
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs)
    if to_document is None:
        to_document = functools.partial(_tokenize, tokenizer=tokenizer, text_field=text_field)
    ds = ds.map(to_document)
    # One reader thread tokenizes ahead while the main thread trains; more threads would
    # only compete for the 2-core machines the tiny configs target.
    documents = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64))
    config = {"seq_len": seq_len, "batch_size": batch_size, "seed": seed,
              "shard_index": shard_index, "shard_count": shard_count,
              "num_epochs": num_epochs, "text_field": text_field, "shuffle": shuffle,
              "num_documents": len(source)}
    return LMBatchIterator(documents.__iter__(), seq_len=seq_len, batch_size=batch_size,
                           config=config)


# ------------------------------------------------------------------------------ devices

def make_global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                      batch_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
    """Assembles every process's batch into global arrays sharded over the batch dim.

    Args:
        host_batch: this process's batch, arrays [B_local, ...] with the same B_local.
        mesh: the device mesh.
        batch_axes: mesh axes the batch dim is split over.

    Returns:
        Same keys, jax.Arrays of shape [B_local * process_count, ...] with sharding
        `NamedSharding(mesh, P(batch_axes))` (other dims replicated).

    Raises:
        ValueError: an unknown mesh axis, ragged batch sizes, or a global batch that does
            not divide evenly over the devices along `batch_axes`.
    """
    batch_axes = tuple(batch_axes)
    unknown = [a for a in batch_axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"batch axes {unknown} are not mesh axes {tuple(mesh.shape)}")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in host_batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"host batch arrays need one common leading batch dim, got {sizes}")
    local_batch = next(iter(sizes.values()))
    global_batch = local_batch * jax.process_count()
    num_shards = math.prod(mesh.shape[a] for a in batch_axes)
    if global_batch % num_shards:
        raise ValueError(
            f"global batch {global_batch} ({local_batch} per process x "
            f"{jax.process_count()} processes) is not divisible by {num_shards}, the number "
            f"of devices along mesh axes {batch_axes} "
            f"({ {a: mesh.shape[a] for a in batch_axes} }); change the batch size or mesh")
    sharding = NamedSharding(mesh, P(batch_axes))
    return {k: jax.make_array_from_process_local_data(
                sharding, np.asarray(v), (global_batch,) + np.shape(v)[1:])
            for k, v in host_batch.items()}


# ------------------------------------------------------------------------------ prompts

def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists for generation: -> (tokens int32 [B, P], mask int32 [B, P]).

    P = `length` or the longest sequence; a longer sequence keeps its last P tokens (the
    end of a prompt holds the question and the assistant cue). mask is 1 on real tokens.
    """
    length = length or max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        seq = list(seq)[-length:]
        if seq:
            tokens[row, length - len(seq):] = seq
            mask[row, length - len(seq):] = 1
    return tokens, mask


# ------------------------------------------------------------------------------ unpacked

class ExampleBatchIterator:
    """Batches of fixed-shape examples (e.g. reward-model comparisons), checkpointable.

    Yields dicts of numpy arrays [B, ...]. With finite epochs the last batch is completed
    with `pad_example` copies (which must carry zero loss weight), so shapes never change.
    """

    def __init__(self, examples, *, batch_size: int, pad_example: dict[str, np.ndarray]):
        self._examples, self._batch_size, self._pad = examples, batch_size, pad_example
        self._exhausted = False

    def __iter__(self) -> "ExampleBatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self._batch_size and not self._exhausted:
            try:
                rows.append(next(self._examples))
            except StopIteration:
                self._exhausted = True
        if not rows:
            raise StopIteration
        rows += [self._pad] * (self._batch_size - len(rows))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        """JSON-able position (grain's iterator state)."""
        return {"format": _STATE_FORMAT, "examples": self._examples.get_state(),
                "exhausted": self._exhausted}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position from `get_state` of an iterator built the same way."""
        self._examples.set_state(copy.deepcopy(dict(state["examples"])))
        self._exhausted = bool(state["exhausted"])


def make_example_batches(source: Sequence[Any], to_example, *, batch_size: int, seed: int,
                         pad_example: dict[str, np.ndarray], shard_index: int = 0,
                         shard_count: int = 1, num_epochs: int | None = None,
                         shuffle: bool = True) -> ExampleBatchIterator:
    """Shuffled, sharded, repeated batches of `to_example(record)` dicts (no packing).

    `to_example` must be picklable (a top-level function or a functools.partial of one) and
    return a dict of fixed-shape numpy arrays.
    """
    import grain  # pylint: disable=import-outside-toplevel  (absent on the GPU image)

    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise _empty_shard_error(source, shard_index, shard_count, "examples")
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs).map(to_example)
    return ExampleBatchIterator(iter(ds), batch_size=batch_size, pad_example=pad_example)
