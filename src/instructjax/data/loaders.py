"""Grain loaders: random-access sources -> checkpointable iterators of host batches.

Legend: B batch, T sequence length (seq_len).

`make_lm_batches` yields packed LM batches (dict of [B, T] arrays, `packing` module
docstring): grain does source -> this process's shard -> shuffle(seed, reshuffled each
epoch) -> repeat -> tokenize ([bos] + text + [eos]) in one prefetch thread, in-process,
without worker processes; `LMBatchIterator` packs the documents into rows and batches.
`make_example_batches` yields batches of fixed-shape examples without packing (reward-model
comparisons, PPO prompts). Both iterators' states are small JSON-able dicts, saved in
checkpoints, so a resumed run sees exactly the batches it would have seen.

grain is imported inside the two `make_*` functions only, so this module imports on
machines without it (the GPU image).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from instructjax.data import packing
from instructjax.data.jsonl import DataFormatError

_STATE_FORMAT = 1


# ------------------------------------------------------------------------------ packed LM

def _tokenize(record: Mapping[str, Any], *, tokenizer, text_field: str) -> dict[str, np.ndarray]:
    """{"tokens": int32 [n], "loss_weights": float32 [n]} for [bos] + text + [eos]; no BOS
    for tokenizers whose models read none (Qwen: `add_bos` False)."""
    if text_field not in record:
        raise ValueError(f"record has no field {text_field!r} (fields: {sorted(record)})")
    text = record[text_field]
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) else []
    ids = bos + tokenizer.encode(text) + [tokenizer.eos_id]
    return {"tokens": np.asarray(ids, np.int32), "loss_weights": np.ones(len(ids), np.float32)}


class LMBatchIterator:
    """Packs a stream of tokenized documents into [B, T] batches; checkpointable.

    Documents come from a grain iterator of {"tokens": int32 [n], "loss_weights": float32
    [n]}; rows are packed with the same greedy rule as `packing.pack_documents`.

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
        tokens, weights = packing.as_document(doc["tokens"], doc["loss_weights"])
        self._doc_chunks = packing.document_chunks(tokens, weights, self._seq_len)
        self._next_chunk = 0
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
        return packing.make_row(pieces, self._seq_len) if pieces else None

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
        rows += [packing.make_row([], self._seq_len)] * (self._batch_size - len(rows))
        return packing.stack_rows(rows)

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
            `text_field`), e.g. a split from `text_sources.build_text_source`.
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
        An `LMBatchIterator` yielding batch dicts of [B, T] numpy arrays (`packing`
        module docstring). With finite epochs the last batch is filled up with all-padding rows
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
    return a dict of fixed-shape numpy arrays; batches stack them: key -> [B, ...] with the
    example's dtype. Sharding, shuffling and epochs work as in `make_lm_batches`.

    Returns:
        An `ExampleBatchIterator`; with finite epochs the last batch is filled up with
        `pad_example` (which must carry zero loss weight), so every batch has the same shape.
    """
    import grain  # pylint: disable=import-outside-toplevel  (absent on the GPU image)

    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise _empty_shard_error(source, shard_index, shard_count, "examples")
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs).map(to_example)
    return ExampleBatchIterator(iter(ds), batch_size=batch_size, pad_example=pad_example)
