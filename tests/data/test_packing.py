"""Tests for data/packing.py: documents packed into LM rows, prompts left-padded."""

import numpy as np
import pytest

from instructjax.data import packing


def test_pack_documents_hand_built_case():
    docs = [[10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36], [40]]
    weights = [[1, 1, 1], [1, 0, 1], [1, 1, 1, 1, 1, 0.5, 0.5], [1]]
    got = packing.pack_documents(docs, weights, seq_len=5)
    # [20, 21, 22] does not fit after [10, 11, 12]: new row. The 7-token doc is cut into
    # [30..34] (a full row) and [35, 36], which shares its row with [40].
    expected = {
        "tokens": [[10, 11, 12, 0, 0], [20, 21, 22, 0, 0], [30, 31, 32, 33, 34],
                   [35, 36, 40, 0, 0]],
        "segment_ids": [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 2, 0, 0]],
        "positions": [[0, 1, 2, 0, 0], [0, 1, 2, 0, 0], [0, 1, 2, 3, 4], [0, 1, 0, 0, 0]],
        "targets": [[11, 12, 0, 0, 0], [21, 22, 0, 0, 0], [31, 32, 33, 34, 0], [36, 0, 0, 0, 0]],
        "loss_mask": [[1, 1, 0, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0.5, 0, 0, 0, 0]],
    }
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], np.asarray(v), err_msg=k)
    assert got["loss_mask"].dtype == np.float32
    assert all(got[k].dtype == np.int32 for k in packing.BATCH_KEYS if k != "loss_mask")


def test_pack_documents_invariants_on_random_documents():
    rng = np.random.default_rng(0)
    seq_len = 16
    docs = [rng.integers(4, 100, size=rng.integers(1, 40)).tolist() for _ in range(60)]
    got = packing.pack_documents(docs, None, seq_len)
    tokens, seg, pos = got["tokens"], got["segment_ids"], got["positions"]
    targets, mask = got["targets"], got["loss_mask"]
    assert tokens.shape[1] == seq_len

    # Every token of every document appears exactly once, in order, as chunks <= seq_len.
    chunks = [d[s:s + seq_len] for d in docs for s in range(0, len(d), seq_len)]
    packed = [tokens[r][seg[r] == s].tolist() for r in range(len(tokens))
              for s in range(1, seg[r].max() + 1)]
    assert packed == chunks

    for r in range(len(tokens)):
        n = int((seg[r] > 0).sum())
        assert (seg[r][n:] == 0).all() and (seg[r][:n] > 0).all()  # padding only at the end
        assert seg[r][0] == 1 and (np.diff(seg[r][:n]) >= 0).all()
        assert (np.diff(seg[r][:n]) <= 1).all()
        for t in range(seq_len):
            same_next = t + 1 < seq_len and seg[r][t] > 0 and seg[r][t + 1] == seg[r][t]
            if same_next:
                assert targets[r][t] == tokens[r][t + 1] and mask[r][t] == 1
                assert pos[r][t + 1] == pos[r][t] + 1
            else:  # segment end or padding: no target crosses a segment boundary
                assert targets[r][t] == 0 and mask[r][t] == 0
            if seg[r][t] > 0 and (t == 0 or seg[r][t - 1] != seg[r][t]):
                assert pos[r][t] == 0


def test_pack_documents_errors():
    with pytest.raises(ValueError, match="3 tokens but 2 loss weights"):
        packing.pack_documents([[1, 2, 3]], [[1, 1]], seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        packing.pack_documents([[1, 2, 3]], None, seq_len=1)


def test_left_pad_keeps_the_end_of_long_sequences():
    tokens, mask = packing.left_pad([[5, 6], [7, 8, 9, 10], []], pad_id=0, length=3)
    np.testing.assert_array_equal(tokens, [[0, 5, 6], [8, 9, 10], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 1], [0, 0, 0]])
    assert tokens.dtype == mask.dtype == np.int32
    tokens, mask = packing.left_pad([[5], [6, 7]], pad_id=1)  # P = the longest sequence
    np.testing.assert_array_equal(tokens, [[1, 5], [6, 7]])
    np.testing.assert_array_equal(mask, [[0, 1], [1, 1]])
