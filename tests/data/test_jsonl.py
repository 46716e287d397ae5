"""Tests for data/jsonl.py: finding files, reading records, errors that name file:line."""

import gzip
import json
import os

import pytest

from instructjax.data import jsonl

SHARED_PCLUE = "/work/shared/data/pclue/pCLUE_train_9.json"


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_reads_jsonl_json_and_gz_with_locations(tmp_path):
    a = _write(tmp_path / "a.jsonl", ['{"text": "一"}', "", '{"text": "two"}'])
    b = _write(tmp_path / "b.json", ['{"text": "三：，。"}'])
    c = str(tmp_path / "c.jsonl.gz")
    with gzip.open(c, "wt", encoding="utf-8") as f:
        f.write('{"text": "four\\nlines"}\n')
    got = list(jsonl.read_jsonl(str(tmp_path)))
    assert got == [(a, 1, {"text": "一"}), (a, 3, {"text": "two"}),
                   (b, 1, {"text": "三：，。"}), (c, 1, {"text": "four\nlines"})]


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "file.jsonl", ['{"text": "ok"}', '{"text": "ok"}', '{"text": oops}'])
    records = jsonl.read_jsonl(path)
    assert next(records)[1] == 1
    with pytest.raises(jsonl.DataFormatError, match=r"file\.jsonl:3: invalid JSON"):
        list(records)


def test_non_object_and_bad_utf8_are_errors(tmp_path):
    path = _write(tmp_path / "file.jsonl", ['{"text": "ok"}', '[1, 2]'])
    with pytest.raises(jsonl.DataFormatError, match=r"file\.jsonl:2: expected a JSON object"):
        list(jsonl.read_jsonl(path))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(jsonl.DataFormatError, match=r"bad\.jsonl:2: invalid UTF-8"):
        list(jsonl.read_jsonl(str(bad)))


def test_json_array_file_gets_a_hint(tmp_path):
    path = _write(tmp_path / "arr.json", ["[", '  {"text": "a"}', "]"])
    with pytest.raises(jsonl.DataFormatError, match=r"arr\.json:1: .*JSON array"):
        list(jsonl.read_jsonl(path))


def test_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"text": "a"}\n'.encode("utf-8"))
    assert [r for _, _, r in jsonl.read_jsonl(str(path))] == [{"text": "a"}]


def test_resolve_paths_file_glob_dir_and_list(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.json", "notes.txt"):
        _write(tmp_path / name, ['{"text": "x"}'])
    sub = tmp_path / "sub"
    sub.mkdir()
    deep = _write(sub / "d.jsonl", ['{"text": "x"}'])
    d = str(tmp_path)
    assert jsonl.resolve_paths(os.path.join(d, "b.jsonl")) == [os.path.join(d, "b.jsonl")]
    assert jsonl.resolve_paths(d) == [os.path.join(d, n) for n in ("a.jsonl", "b.jsonl", "c.json")]
    assert jsonl.resolve_paths(os.path.join(d, "*.jsonl")) == [
        os.path.join(d, "a.jsonl"), os.path.join(d, "b.jsonl")]
    assert jsonl.resolve_paths(os.path.join(d, "**", "d.jsonl")) == [deep]
    assert jsonl.resolve_paths([os.path.join(d, "c.json"), sub]) == [
        os.path.join(d, "c.json"), deep]


def test_missing_paths_are_errors_naming_the_spec(tmp_path):
    missing = str(tmp_path / "nope" / "train.jsonl")
    with pytest.raises(FileNotFoundError, match="nope/train.jsonl"):
        jsonl.resolve_paths(missing)
    with pytest.raises(FileNotFoundError, match=r"no data files match .*\*\.jsonl"):
        jsonl.resolve_paths(str(tmp_path / "*.jsonl"))
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        jsonl.resolve_paths(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope/train.jsonl"):
        list(jsonl.read_jsonl(missing))


def test_require_field_names_file_line_and_field():
    record = {"text": "hi", "n": True, "k": 3}
    assert jsonl.require_field(record, "text", "f.jsonl", 7, str) == "hi"
    assert jsonl.require_field(record, "k", "f.jsonl", 7, (int, float)) == 3
    with pytest.raises(jsonl.DataFormatError, match=r"f\.jsonl:7: missing field 'target'"):
        jsonl.require_field(record, "target", "f.jsonl", 7, str)
    with pytest.raises(jsonl.DataFormatError, match=r"f\.jsonl:7: field 'k' must be str, got int"):
        jsonl.require_field(record, "k", "f.jsonl", 7, str)
    # JSON true is not a count.
    with pytest.raises(jsonl.DataFormatError, match=r"f\.jsonl:7: field 'n' must be int"):
        jsonl.require_field(record, "n", "f.jsonl", 7, int)


@pytest.mark.skipif(not os.path.isdir("/work/shared"),
                    reason="/work/shared (real data samples, not part of the project) is absent")
def test_reads_real_pclue_sample():
    """Real data nobody here wrote: the pCLUE sample in /work/shared/data (705 records)."""
    records = list(jsonl.read_jsonl(SHARED_PCLUE))
    assert len(records) == 705
    assert [line for _, line, _ in records] == list(range(1, 706))
    for path, line_no, record in records:
        jsonl.require_field(record, "input", path, line_no, str)
        jsonl.require_field(record, "target", path, line_no, str)
    assert sum(r["input"].endswith("答案：") for _, _, r in records) > 600
    assert json.dumps(records[0][2], ensure_ascii=False).count("：") >= 1
