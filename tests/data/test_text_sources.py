"""Tests for data/text_sources.py on data/tfds_builders.py: pretraining text files built into
TFDS datasets, read back, held out, cached by content and rebuilt when they change."""

import json
import os

import pytest

from instructjax.data import jsonl, text_sources


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def _sizes(sources):
    """Records per split, as the built TFDS sources report them."""
    return {split: len(source) for split, source in sources.items()}


def test_tfds_text_source_round_trips_and_is_reused(tmp_path):
    train = [{"text": f"第{i}行：你好，world {i}\n第二行", "id": i} for i in range(37)]
    _write_jsonl(tmp_path / "train-a.jsonl", train[:20])
    _write_jsonl(tmp_path / "train-b.jsonl", train[20:])
    eval_path = _write_jsonl(tmp_path / "eval.jsonl", [{"text": "评估 🤖"}])
    data_dir = tmp_path / "tfds"
    sources = text_sources.build_text_source(str(tmp_path / "train-*.jsonl"), eval_path,
                                              data_dir, name="toy")
    assert _sizes(sources) == {"train": 37, "eval": 1}
    assert [sources["train"][i] for i in range(37)] == [{"text": r["text"]} for r in train]
    assert sources["eval"][0] == {"text": "评估 🤖"}
    # Same inputs: the built files are reused, not rewritten.
    built = [os.path.join(d, f) for d, _, fs in os.walk(data_dir) for f in fs]
    assert any(".array_record" in p for p in built)
    mtimes = {p: os.stat(p).st_mtime_ns for p in built}
    again = text_sources.build_text_source(str(tmp_path / "train-*.jsonl"), eval_path,
                                            data_dir, name="toy")
    assert {p: os.stat(p).st_mtime_ns for p in built} == mtimes
    assert [again["train"][i] for i in range(37)] == [sources["train"][i] for i in range(37)]


def test_tfds_custom_text_field_and_train_only(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"body": "一"}, {"body": "two"}])
    sources = text_sources.build_text_source(path, None, tmp_path / "tfds", name="b",
                                              text_field="body")
    assert list(sources) == ["train"]
    assert [sources["train"][i] for i in range(2)] == [{"text": "一"}, {"text": "two"}]


def test_tfds_eval_percent_holds_out_the_last_records(tmp_path):
    records = [{"text": f"r{i}"} for i in range(40)]
    path = _write_jsonl(tmp_path / "t.jsonl", records[:25])
    path_b = _write_jsonl(tmp_path / "u.jsonl", records[25:])
    sources = text_sources.build_text_source([path, path_b], None, tmp_path / "tfds",
                                              eval_percent=10)  # default name "text"
    assert _sizes(sources) == {"train": 36, "eval": 4}
    assert [sources["train"][i]["text"] for i in range(36)] == [f"r{i}" for i in range(36)]
    assert [sources["eval"][i]["text"] for i in range(4)] == ["r36", "r37", "r38", "r39"]
    assert os.path.isdir(tmp_path / "tfds" / "text")
    # Given eval files win over eval_percent.
    given = text_sources.build_text_source(path, path_b, tmp_path / "tfds", eval_percent=10)
    assert _sizes(given) == {"train": 25, "eval": 15}
    # At least one record is held out, and never all of them.
    one = _write_jsonl(tmp_path / "one.jsonl", records[:3])
    assert _sizes(text_sources.build_text_source(
        one, "", tmp_path / "tfds", eval_percent=5)) == {"train": 2, "eval": 1}
    single = _write_jsonl(tmp_path / "single.jsonl", records[:1])
    with pytest.raises(ValueError, match="leaves no train records"):
        text_sources.build_text_source(single, None, tmp_path / "tfds", eval_percent=5)


def test_tfds_malformed_record_names_file_and_line_then_retry_works(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}, {"txt": "c"}])
    with pytest.raises(jsonl.DataFormatError, match=r"train\.jsonl:3: missing field 'text'"):
        text_sources.build_text_source(path, None, tmp_path / "tfds", name="bad")
    with open(path, "a", encoding="utf-8") as f:
        f.write("{broken\n")
    with pytest.raises(jsonl.DataFormatError, match=r"train\.jsonl:3: missing field"):
        text_sources.build_text_source(path, None, tmp_path / "tfds", name="bad")
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    sources = text_sources.build_text_source(path, None, tmp_path / "tfds", name="bad")
    assert len(sources["train"]) == 2 and sources["train"][1] == {"text": "b"}


def test_tfds_rebuilds_when_inputs_change(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    first = text_sources.build_text_source(path, None, tmp_path / "tfds", name="d")
    _write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "new"}])
    second = text_sources.build_text_source(path, None, tmp_path / "tfds", name="d")
    assert len(first["train"]) == 1 and len(second["train"]) == 2
    assert len(os.listdir(tmp_path / "tfds" / "d")) == 2
