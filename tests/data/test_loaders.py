"""Tests for data/loaders.py (grain LM iterator: packing, resume, sharding, epochs) on
in-memory and TFDS sources, and the data modules' imports without grain and TFDS."""

import json
import os
import random
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from instructjax.data import jsonl, loaders, packing, text_sources
from instructjax.data import tokenizer as tok_lib

BOS, EOS = 2, 3


class CharTokenizer:
    """A stand-in with the tokenizer interface the loaders use: one id per character."""
    bos_id, eos_id = BOS, EOS

    def encode(self, text):
        return [4 + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 4) for i in ids if i >= 4)


def _source(num_docs, seed=0, max_len=40):
    rng = random.Random(seed)
    return [{"text": f"d{i}:" + "".join(rng.choices("abcxyz", k=rng.randint(0, max_len)))}
            for i in range(num_docs)]


def _documents_in(batches, tokenizer=CharTokenizer()):
    """The texts of all documents in a stream of batches, in stream order."""
    tokens = []
    for batch in batches:
        for row_tokens, row_segments in zip(batch["tokens"], batch["segment_ids"]):
            tokens.extend(row_tokens[row_segments > 0].tolist())
    docs, current = [], None
    for t in tokens:
        if t == BOS:
            current = []
        elif t == EOS:
            docs.append(tokenizer.decode(current))
            current = None
        else:
            current.append(t)
    assert current is None, "a document was left unfinished"
    return docs


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            assert x[k].dtype == y[k].dtype


# ------------------------------------------------------------------------------ iterator

def test_iterator_batches_match_pack_documents_and_cover_each_doc_once():
    source = _source(50)
    it = loaders.make_lm_batches(source, CharTokenizer(), seq_len=32, batch_size=4, seed=0,
                                  num_epochs=1, shuffle=False)
    batches = list(it)
    for b in batches:
        assert set(b) == set(packing.BATCH_KEYS)
        assert all(v.shape == (4, 32) for v in b.values())
    tok = CharTokenizer()
    expected = packing.pack_documents(
        [[BOS] + tok.encode(r["text"]) + [EOS] for r in source], None, seq_len=32)
    n_rows = len(expected["tokens"])
    for k in packing.BATCH_KEYS:
        stacked = np.concatenate([b[k] for b in batches])
        np.testing.assert_array_equal(stacked[:n_rows], expected[k], err_msg=k)
        assert not stacked[n_rows:].any()  # the last batch is filled with padding rows
    assert _documents_in(batches) == [r["text"] for r in source]


def test_iterator_is_deterministic_by_seed_and_reshuffles_epochs():
    source = _source(40)
    make = lambda seed: loaders.make_lm_batches(  # pylint: disable=unnecessary-lambda-assignment
        source, CharTokenizer(), seq_len=32, batch_size=4, seed=seed, num_epochs=2)
    a, b, c = list(make(1)), list(make(1)), list(make(2))
    _assert_batches_equal(a, b)
    docs_a, docs_c = _documents_in(a), _documents_in(c)
    assert docs_a != docs_c
    texts = sorted(r["text"] for r in source)
    first, second = docs_a[:40], docs_a[40:]
    assert sorted(first) == texts and sorted(second) == texts  # each epoch sees every doc once
    assert first != second and first != [r["text"] for r in source]


def test_resume_from_state_gives_identical_batches():
    # Short rows and long documents, so some saved states sit inside a split document.
    source = _source(30, max_len=60)
    make = lambda: loaders.make_lm_batches(  # pylint: disable=unnecessary-lambda-assignment
        source, CharTokenizer(), seq_len=16, batch_size=3, seed=7)
    saw_mid_document = False
    for k in range(0, 12, 3):
        it = make()
        _take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
        saw_mid_document |= state["chunk"] > 0
        continued = _take(it, 25)  # crosses into the second epoch
        fresh = make()
        fresh.set_state(state)
        _assert_batches_equal(_take(fresh, 25), continued)
    assert saw_mid_document


def test_set_state_rejects_other_settings():
    source = _source(10)
    it = loaders.make_lm_batches(source, CharTokenizer(), seq_len=16, batch_size=2, seed=0)
    next(it)
    other = loaders.make_lm_batches(source, CharTokenizer(), seq_len=16, batch_size=2, seed=1)
    with pytest.raises(ValueError, match=r"other settings.*'seed': \(0, 1\)"):
        other.set_state(it.get_state())


def test_shards_are_disjoint_and_cover_the_source():
    source = _source(31)
    seen = []
    for shard in range(3):
        it = loaders.make_lm_batches(source, CharTokenizer(), seq_len=32, batch_size=2,
                                      seed=0, shard_index=shard, shard_count=3, num_epochs=1)
        seen.append(set(_documents_in(it)))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set.union(*seen) == {r["text"] for r in source}
    with pytest.raises(ValueError, match="shard_index"):
        loaders.make_lm_batches(source, CharTokenizer(), seq_len=32, batch_size=2, seed=0,
                                 shard_index=3, shard_count=3)


# ------------------------------------------------------------------------------ TFDS source

def test_end_to_end_tfds_source_real_tokenizer(tmp_path):
    texts = [f"用户：{i} 加 {i} 等于多少？\n小元：{i} 加 {i} 等于 {2 * i}。"
             for i in range(30)]
    path = str(tmp_path / "c.jsonl")
    jsonl.write_jsonl(path, [{"text": t} for t in texts])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a vocabulary reduced below 300 is fine here
        tok = tok_lib.train_tokenizer(texts, tmp_path / "tok.model", 300, seed=0)
    source = text_sources.build_text_source(path, None, tmp_path / "tfds", name="e2e")["train"]
    batches = list(loaders.make_lm_batches(source, tok, seq_len=64, batch_size=2, seed=0,
                                            num_epochs=1))
    assert sorted(_documents_in(batches, tok)) == sorted(texts)


# ------------------------------------------------------------------------------ imports

def test_modules_import_without_grain_and_tfds():
    """The GPU image has neither: packing, make_global_batch and the loop must still import."""
    script = textwrap.dedent("""
        import sys
        sys.modules["grain"] = None  # makes `import grain` raise ImportError
        sys.modules["tensorflow_datasets"] = None
        from instructjax.data import demo_corpus, demo_task, jsonl, loaders, packing
        from instructjax.data import text_sources, tfds_builders, tokenizer
        from instructjax.parallel.batch import make_global_batch
        assert packing.pack_documents([[2, 5, 3]], None, 4)["tokens"].shape == (1, 4)
        try:
            loaders.make_lm_batches([{"text": "a"}], None, seq_len=4, batch_size=1, seed=0)
        except ImportError:
            print("grain needed")
        try:
            text_sources.build_text_source("x.jsonl", None, "/nonexistent", name="n")
        except FileNotFoundError:
            print("paths checked first")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["grain", "needed", "paths", "checked", "first"]
