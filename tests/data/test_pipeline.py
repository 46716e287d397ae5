"""Tests for data/pipeline.py (packing, grain iterator, resume, sharding, global batches)
and data/tfds_builders.py (build, read back, cache)."""

import json
import os
import random
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from instructjax.data import jsonl, pipeline, tfds_builders
from instructjax.data import tokenizer as tok_lib

BOS, EOS = 2, 3


class CharTokenizer:
    """A stand-in with the tokenizer interface the pipeline uses: one id per character."""
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


# ------------------------------------------------------------------------------ packing

def test_pack_documents_hand_built_case():
    docs = [[10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36], [40]]
    weights = [[1, 1, 1], [1, 0, 1], [1, 1, 1, 1, 1, 0.5, 0.5], [1]]
    got = pipeline.pack_documents(docs, weights, seq_len=5)
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
    assert all(got[k].dtype == np.int32 for k in pipeline.BATCH_KEYS if k != "loss_mask")


def test_pack_documents_invariants_on_random_documents():
    rng = np.random.default_rng(0)
    seq_len = 16
    docs = [rng.integers(4, 100, size=rng.integers(1, 40)).tolist() for _ in range(60)]
    got = pipeline.pack_documents(docs, None, seq_len)
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
        pipeline.pack_documents([[1, 2, 3]], [[1, 1]], seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        pipeline.pack_documents([[1, 2, 3]], None, seq_len=1)


# ------------------------------------------------------------------------------ iterator

def test_iterator_batches_match_pack_documents_and_cover_each_doc_once():
    source = _source(50)
    it = pipeline.make_lm_batches(source, CharTokenizer(), seq_len=32, batch_size=4, seed=0,
                                  num_epochs=1, shuffle=False)
    batches = list(it)
    for b in batches:
        assert set(b) == set(pipeline.BATCH_KEYS)
        assert all(v.shape == (4, 32) for v in b.values())
    tok = CharTokenizer()
    expected = pipeline.pack_documents(
        [[BOS] + tok.encode(r["text"]) + [EOS] for r in source], None, seq_len=32)
    n_rows = len(expected["tokens"])
    for k in pipeline.BATCH_KEYS:
        stacked = np.concatenate([b[k] for b in batches])
        np.testing.assert_array_equal(stacked[:n_rows], expected[k], err_msg=k)
        assert not stacked[n_rows:].any()  # the last batch is filled with padding rows
    assert _documents_in(batches) == [r["text"] for r in source]


def test_iterator_is_deterministic_by_seed_and_reshuffles_epochs():
    source = _source(40)
    make = lambda seed: pipeline.make_lm_batches(  # pylint: disable=unnecessary-lambda-assignment
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
    make = lambda: pipeline.make_lm_batches(  # pylint: disable=unnecessary-lambda-assignment
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
    it = pipeline.make_lm_batches(source, CharTokenizer(), seq_len=16, batch_size=2, seed=0)
    next(it)
    other = pipeline.make_lm_batches(source, CharTokenizer(), seq_len=16, batch_size=2, seed=1)
    with pytest.raises(ValueError, match=r"other settings.*'seed': \(0, 1\)"):
        other.set_state(it.get_state())


def test_shards_are_disjoint_and_cover_the_source():
    source = _source(31)
    seen = []
    for shard in range(3):
        it = pipeline.make_lm_batches(source, CharTokenizer(), seq_len=32, batch_size=2,
                                      seed=0, shard_index=shard, shard_count=3, num_epochs=1)
        seen.append(set(_documents_in(it)))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set.union(*seen) == {r["text"] for r in source}
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.make_lm_batches(source, CharTokenizer(), seq_len=32, batch_size=2, seed=0,
                                 shard_index=3, shard_count=3)


# ------------------------------------------------------------------------------ TFDS

def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def test_tfds_text_source_round_trips_and_is_reused(tmp_path):
    train = [{"text": f"第{i}行：你好，world {i}\n第二行", "id": i} for i in range(37)]
    _write_jsonl(tmp_path / "train-a.jsonl", train[:20])
    _write_jsonl(tmp_path / "train-b.jsonl", train[20:])
    eval_path = _write_jsonl(tmp_path / "eval.jsonl", [{"text": "评估 🤖"}])
    data_dir = tmp_path / "tfds"
    sources = tfds_builders.build_text_source(str(tmp_path / "train-*.jsonl"), eval_path,
                                              data_dir, name="toy")
    assert tfds_builders.split_sizes(sources) == {"train": 37, "eval": 1}
    assert [sources["train"][i] for i in range(37)] == [{"text": r["text"]} for r in train]
    assert sources["eval"][0] == {"text": "评估 🤖"}
    # Same inputs: the built files are reused, not rewritten.
    built = [os.path.join(d, f) for d, _, fs in os.walk(data_dir) for f in fs]
    assert any(".array_record" in p for p in built)
    mtimes = {p: os.stat(p).st_mtime_ns for p in built}
    again = tfds_builders.build_text_source(str(tmp_path / "train-*.jsonl"), eval_path,
                                            data_dir, name="toy")
    assert {p: os.stat(p).st_mtime_ns for p in built} == mtimes
    assert [again["train"][i] for i in range(37)] == [sources["train"][i] for i in range(37)]


def test_tfds_custom_text_field_and_train_only(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"body": "一"}, {"body": "two"}])
    sources = tfds_builders.build_text_source(path, None, tmp_path / "tfds", name="b",
                                              text_field="body")
    assert list(sources) == ["train"]
    assert [sources["train"][i] for i in range(2)] == [{"text": "一"}, {"text": "two"}]


def test_tfds_eval_percent_holds_out_the_last_records(tmp_path):
    records = [{"text": f"r{i}"} for i in range(40)]
    path = _write_jsonl(tmp_path / "t.jsonl", records[:25])
    path_b = _write_jsonl(tmp_path / "u.jsonl", records[25:])
    sources = tfds_builders.build_text_source([path, path_b], None, tmp_path / "tfds",
                                              eval_percent=10)  # default name "text"
    assert tfds_builders.split_sizes(sources) == {"train": 36, "eval": 4}
    assert [sources["train"][i]["text"] for i in range(36)] == [f"r{i}" for i in range(36)]
    assert [sources["eval"][i]["text"] for i in range(4)] == ["r36", "r37", "r38", "r39"]
    assert os.path.isdir(tmp_path / "tfds" / "text")
    # Given eval files win over eval_percent.
    given = tfds_builders.build_text_source(path, path_b, tmp_path / "tfds", eval_percent=10)
    assert tfds_builders.split_sizes(given) == {"train": 25, "eval": 15}
    # At least one record is held out, and never all of them.
    one = _write_jsonl(tmp_path / "one.jsonl", records[:3])
    assert tfds_builders.split_sizes(tfds_builders.build_text_source(
        one, "", tmp_path / "tfds", eval_percent=5)) == {"train": 2, "eval": 1}
    single = _write_jsonl(tmp_path / "single.jsonl", records[:1])
    with pytest.raises(ValueError, match="leaves no train records"):
        tfds_builders.build_text_source(single, None, tmp_path / "tfds", eval_percent=5)


def test_tfds_malformed_record_names_file_and_line_then_retry_works(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}, {"txt": "c"}])
    with pytest.raises(jsonl.DataFormatError, match=r"train\.jsonl:3: missing field 'text'"):
        tfds_builders.build_text_source(path, None, tmp_path / "tfds", name="bad")
    with open(path, "a", encoding="utf-8") as f:
        f.write("{broken\n")
    with pytest.raises(jsonl.DataFormatError, match=r"train\.jsonl:3: missing field"):
        tfds_builders.build_text_source(path, None, tmp_path / "tfds", name="bad")
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    sources = tfds_builders.build_text_source(path, None, tmp_path / "tfds", name="bad")
    assert len(sources["train"]) == 2 and sources["train"][1] == {"text": "b"}


def test_tfds_rebuilds_when_inputs_change(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    first = tfds_builders.build_text_source(path, None, tmp_path / "tfds", name="d")
    _write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "new"}])
    second = tfds_builders.build_text_source(path, None, tmp_path / "tfds", name="d")
    assert len(first["train"]) == 1 and len(second["train"]) == 2
    assert len(os.listdir(tmp_path / "tfds" / "d")) == 2


def test_end_to_end_tfds_source_real_tokenizer(tmp_path):
    texts = [f"用户：{i} 加 {i} 等于多少？\n小元：{i} 加 {i} 等于 {2 * i}。"
             for i in range(30)]
    path = _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a vocabulary reduced below 300 is fine here
        tok = tok_lib.train_tokenizer(texts, tmp_path / "tok.model", 300, seed=0)
    source = tfds_builders.build_text_source(path, None, tmp_path / "tfds", name="e2e")["train"]
    batches = list(pipeline.make_lm_batches(source, tok, seq_len=64, batch_size=2, seed=0,
                                            num_epochs=1))
    assert sorted(_documents_in(batches, tok)) == sorted(texts)


# ------------------------------------------------------------------------------ devices

def test_make_global_batch_single_device():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    host = pipeline.pack_documents([[2, 5, 6, 3]] * 4, None, seq_len=8)
    batch = pipeline.make_global_batch(host, mesh)
    assert set(batch) == set(pipeline.BATCH_KEYS)
    for k, v in batch.items():
        assert isinstance(v, jax.Array) and v.shape == host[k].shape and v.dtype == host[k].dtype
        assert v.sharding.spec == P(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(v), host[k])
    with pytest.raises(ValueError, match="not mesh axes"):
        pipeline.make_global_batch(host, mesh, batch_axes=("batch",))
    with pytest.raises(ValueError, match="common leading batch dim"):
        pipeline.make_global_batch({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, mesh)


def test_make_global_batch_on_eight_fake_devices():
    """Sharded placement and the divisibility error on a fresh process with 8 CPU devices."""
    script = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import Mesh
        from instructjax.data import pipeline
        assert len(jax.devices()) == 8
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
        host = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
        out = pipeline.make_global_batch(host, mesh)["tokens"]
        assert out.shape == (8, 5)
        assert sorted(s.data.shape for s in out.addressable_shards) == [(2, 5)] * 8
        np.testing.assert_array_equal(np.asarray(out), host["tokens"])
        try:
            pipeline.make_global_batch({"tokens": np.zeros((6, 5), np.int32)}, mesh)
        except ValueError as e:
            print("ERROR:", e)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ERROR: global batch 6 (6 per process x 1 processes) is not divisible by 4" in \
        result.stdout
    assert "('data', 'fsdp')" in result.stdout


def test_modules_import_without_grain_and_tfds():
    """The GPU image has neither: packing, make_global_batch and the loop must still import."""
    script = textwrap.dedent("""
        import sys
        sys.modules["grain"] = None  # makes `import grain` raise ImportError
        sys.modules["tensorflow_datasets"] = None
        from instructjax.data import demo, jsonl, pipeline, tfds_builders, tokenizer
        assert pipeline.pack_documents([[2, 5, 3]], None, 4)["tokens"].shape == (1, 4)
        try:
            pipeline.make_lm_batches([{"text": "a"}], None, seq_len=4, batch_size=1, seed=0)
        except ImportError:
            print("grain needed")
        try:
            tfds_builders.build_text_source("x.jsonl", None, "/nonexistent", name="n")
        except FileNotFoundError:
            print("paths checked first")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["grain", "needed", "paths", "checked", "first"]
