"""Token lists -> fixed-shape arrays: documents packed into LM rows, prompts left-padded.

Legend: N packed rows, B batch, T sequence length (seq_len), P prompt length.

A packed batch is a dict of [N or B, T] arrays:
  tokens      int32    input ids
  targets     int32    next token of the same document, 0 where there is none
  loss_mask   float32  weight of predicting targets[t]; 0 on padding and at the last
                       token of every packed segment (its next token is not in the row)
  segment_ids int32    1, 2, 3, ... per packed document within a row; 0 = padding
  positions   int32    position within the segment, restarting at 0

Packing is greedy and keeps documents whole: a document goes into the current row if it
fits in the space left, else it starts a new row (the rest of the old row is padding). A
document longer than T is cut into T-token chunks first, each packed as its own segment (a
text of any length, e.g. a 10 MB line, is tokenized whole and then cut). `pack_documents`
packs a list at once; `loaders.LMBatchIterator` packs a stream with the same pieces.

Plain numpy: this module imports without grain and TFDS (the GPU image has neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def as_document(tokens: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
    """One document as (tokens int32 [n], loss weights float32 [n]).

    Raises:
        ValueError: tokens and weights differ in length.
    """
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    weights = np.asarray(weights, dtype=np.float32).reshape(-1)
    if tokens.shape != weights.shape:
        raise ValueError(f"a document has {tokens.shape[0]} tokens but "
                         f"{weights.shape[0]} loss weights")
    return tokens, weights


def document_chunks(tokens: np.ndarray, weights: np.ndarray, seq_len: int
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """A document (int32 [n], float32 [n]) as (tokens, weights) pieces of <= seq_len tokens."""
    return [(tokens[s:s + seq_len], weights[s:s + seq_len])
            for s in range(0, len(tokens), seq_len)]


def make_row(pieces: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int
             ) -> dict[str, np.ndarray]:
    """Lays pieces (each <= seq_len tokens, together <= seq_len) out as one row.

    Returns:
        A dict of `BATCH_KEYS` -> [T] arrays (dtypes: module docstring); no pieces give a
        padding row (segment 0, loss 0).
    """
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


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of `make_row` ([T] arrays) -> a batch dict of [len(rows), T] arrays."""
    return {k: np.stack([row[k] for row in rows]) for k in BATCH_KEYS}


def pack_documents(token_lists: Sequence[Sequence[int]],
                   loss_weights_lists: Sequence[Sequence[float]] | None,
                   seq_len: int) -> dict[str, np.ndarray]:
    """Packs tokenized documents into rows of length seq_len (greedy, in order).

    Args:
        token_lists: N_docs documents, each a sequence of ids, already with the BOS/EOS the
            caller wants (the LM loader adds both).
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
        for piece in document_chunks(*as_document(tokens, weights), seq_len):
            if used + len(piece[0]) > seq_len:
                rows.append(make_row(pieces, seq_len))
                pieces, used = [], 0
            pieces.append(piece)
            used += len(piece[0])
    if pieces or not rows:
        rows.append(make_row(pieces, seq_len))
    return stack_rows(rows)


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
