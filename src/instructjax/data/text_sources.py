"""Pretraining text datasets: JSON-lines files streamed into TFDS, cached by content.

`build_text_source` reads the `text_field` of every record (`text_spec`) into a TFDS dataset
(`tfds_builders`) with splits "train" and "eval". The generic part, `build_jsonl_source`,
streams files through a `RecordSpec`: the stored features and how a JSON record becomes an
example (validating it, with file:line in every error). A build is cached under
`data_dir/<name>/<fingerprint>/`, where the fingerprint hashes the spec and the content of
the input files (not their mtimes): the same inputs reuse it, changed inputs build a fresh
copy beside it. On a cache hit the files are hashed, not parsed again.

Bad input: a malformed record is a `jsonl.DataFormatError` naming `file:line` (nothing is
marked complete, so the next call retries). A record the spec leaves out on purpose
(`SkipRecord`, e.g. an empty pretraining text) is counted: the split's `RecordSource.skipped`
holds the count and the first few `file:line: reason` messages, saved beside the build so a
cached build reports it too, and a warning states it on every call. A split left without
records (empty files, files of blank lines, every record skipped, a holdout that takes
everything) is a `DataFormatError` naming the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from instructjax.data import jsonl, tfds_builders
from instructjax.data.tfds_builders import RecordSource

_SKIPPED_FILE = "skipped-{split}.json"  # beside the TFDS data, one per split


class SkipRecord(Exception):
    """Raised by a `RecordSpec.to_example` to leave a record out (counted, not an error); the
    message is `"path:line: reason"`."""


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """How JSON records of one format are stored.

    Attributes:
        name: identifies the format and its options in the cache key; change it whenever
            `to_example` changes meaning.
        features: example field -> kind, one of `tfds_builders.FEATURE_KINDS` ("text" is
            read back as str, "int"/"float" as Python numbers, "*_list" as lists).
        to_example: `(record, path, line_no) -> example dict` with exactly the `features`
            keys; raises `jsonl.DataFormatError` naming `path:line_no` for a bad record, or
            `SkipRecord` for one to leave out (counted in `RecordSource.skipped`).
    """
    name: str
    features: Mapping[str, str]
    to_example: Callable[[dict[str, Any], str, int], dict[str, Any]]

    def __post_init__(self):
        tfds_builders.check_features(self.name, self.features)


def text_spec(text_field: str = "text") -> RecordSpec:
    """Pretraining text: the str field `text_field` of each record, stored as "text".

    Other fields are ignored. A missing or non-str field is an error; an empty or
    whitespace-only text is skipped and counted (it would train only "BOS then EOS").
    A text of any length is kept whole; packing cuts it into seq_len chunks.
    """
    def to_example(record: dict[str, Any], path: str, line_no: int) -> dict[str, Any]:
        text = jsonl.require_field(record, text_field, path, line_no, str)
        if not text.strip():
            raise SkipRecord(f"{path}:{line_no}: empty {text_field!r}")
        return {"text": text}
    # ":skip-empty" keeps builds made before empty texts were skipped out of the cache.
    return RecordSpec(name=f"text:{text_field}:skip-empty", features={"text": "text"},
                      to_example=to_example)


def _kept_examples(spec: RecordSpec, files: Sequence[str], skipped: list[str] | None = None):
    """Yields `(path, line_no, example)` for the records of `files` that the spec keeps;
    appends the message of each left-out one to `skipped` when given."""
    for path, line_no, record in jsonl.read_jsonl(files):
        try:
            example = spec.to_example(record, path, line_no)
        except SkipRecord as e:
            if skipped is not None:
                skipped.append(str(e))
            continue
        yield path, line_no, example


def _write_skipped(builder_dir: str, split: str, messages: Sequence[str]) -> None:
    report = jsonl.SkipReport.of(messages)
    os.makedirs(builder_dir, exist_ok=True)
    path = os.path.join(builder_dir, _SKIPPED_FILE.format(split=split))
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump({"count": report.count, "first": list(report.first)}, f, ensure_ascii=False)
    os.replace(tmp_path, path)


def _read_skipped(builder_dir: str, split: str) -> jsonl.SkipReport:
    path = os.path.join(builder_dir, _SKIPPED_FILE.format(split=split))
    if not os.path.exists(path):  # a held-out split counts nothing
        return jsonl.SkipReport()
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return jsonl.SkipReport(int(saved["count"]), tuple(saved["first"]))


def _file_splits(spec: RecordSpec, split_files: Mapping[str, list[str]],
                 holdout: tuple[str, str, int] | None, report_dir: str) -> dict[str, Any]:
    """The split generators of `build_jsonl_source` (made only when TFDS builds)."""
    plans = {split: (split, files, 0, None) for split, files in split_files.items()}
    if holdout is not None:
        from_split, new_split, percent = holdout
        files = split_files[from_split]
        # Counted by the same reading and skipping rules as the examples (and so malformed
        # records fail here, before anything is written).
        total = sum(1 for _ in _kept_examples(spec, files))
        kept, _ = tfds_builders.holdout_sizes(total, percent, files)
        plans[from_split] = (from_split, files, 0, kept)
        plans[new_split] = (new_split, files, kept, None)
    return {split: _file_examples(spec, *plan, report_dir) for split, plan in plans.items()}


def _file_examples(spec: RecordSpec, split: str, files: list[str], start: int,
                   stop: int | None, report_dir: str):
    """Yields (key, example) of kept records start..stop-1 (stop None: to the end) of `files`,
    then saves the split's skip report in `report_dir`."""
    file_index = {path: i for i, path in enumerate(files)}
    skipped: list[str] = []
    count = 0
    for index, (path, line_no, example) in enumerate(_kept_examples(spec, files, skipped)):
        if index < start or (stop is not None and index >= stop):
            continue
        count += 1
        # Keys sort in reading order, which disable_shuffling keeps.
        yield f"{file_index[path]:05d}:{line_no:010d}", example
    if count == 0:  # TFDS would fail with a bare assertion
        why = (f"all {len(skipped)} left out, first: {skipped[0]}" if skipped else
               jsonl.no_lines_reason(files))
        raise jsonl.DataFormatError(
            f"{jsonl.describe_paths(files)}: the {split!r} split holds no records ({why})")
    # Written before TFDS marks the build complete, so a cached build has it.
    _write_skipped(report_dir, split, skipped if start == 0 else [])


def _fingerprint(spec: RecordSpec, split_files: Mapping[str, list[str]],
                 holdout: tuple[str, str, int] | None) -> str:
    # Content, not mtimes: the demo corpus is rewritten (identically) on every run and must
    # still hit the cache.
    h = hashlib.sha256(json.dumps(
        {"spec": spec.name, "features": dict(spec.features),
         "version": tfds_builders.BUILDER_VERSION, "holdout": holdout}, sort_keys=True).encode())
    for split in sorted(split_files):
        h.update(f"\0split={split}".encode())
        for path in split_files[split]:
            h.update(f"\0file={os.path.basename(path)}\0".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def build_jsonl_source(spec: RecordSpec, split_paths: Mapping[str, jsonl.PathSpec],
                       data_dir: str | os.PathLike, *, name: str,
                       holdout: tuple[str, str, int] | None = None) -> dict[str, RecordSource]:
    """Builds (once) a TFDS dataset from JSON-lines files and returns its splits.

    Args:
        spec: the record format.
        split_paths: split name -> path spec (file, glob, directory or list; see
            `jsonl.resolve_paths`).
        data_dir: cache root; the dataset goes to `data_dir/name/<fingerprint>/`.
        name: dataset name (a directory name).
        holdout: optional `(from_split, new_split, percent)`: the last `percent`% of
            `from_split`'s records (in reading order, at least one) form `new_split`
            instead.

    Returns:
        split -> `RecordSource` of example dicts with `spec.features` keys.

    Raises:
        FileNotFoundError: a path spec matches no file.
        ValueError: a bad name or holdout argument.
        jsonl.DataFormatError: a malformed record, naming `file:line` (nothing is written
            as complete, so the next call retries); a split without records or a holdout
            that would leave none, naming the files.

    Warns:
        UserWarning: per split whose spec left records out, with the count and the first.
    """
    tfds_builders.check_dataset_name(name)
    split_files = {split: jsonl.resolve_paths(p) for split, p in split_paths.items()}
    splits = list(split_files)
    if holdout is not None:
        holdout = (str(holdout[0]), str(holdout[1]), int(holdout[2]))
        if holdout[0] not in split_files or holdout[1] in split_files or \
                not 0 < holdout[2] < 100:
            raise ValueError(f"holdout {holdout}: needs an existing split, a new split name "
                             "and 0 < percent < 100")
        splits.append(holdout[1])
    builder_dir = os.path.join(os.fspath(data_dir), name,
                               _fingerprint(spec, split_files, holdout))
    files = {s: [os.path.abspath(p) for p in ps] for s, ps in split_files.items()}
    sources = tfds_builders.build_dataset(
        builder_dir, description=f"{spec.name} records from local JSON-lines files",
        features=spec.features, metadata=dict(spec=spec.name, files=files, holdout=holdout),
        # The skip reports go beside the TFDS data, in the directory of this build.
        make_splits=lambda: _file_splits(spec, split_files, holdout, builder_dir))
    out = {}
    for split in splits:
        skipped = _read_skipped(builder_dir, split)
        if skipped.count:
            warnings.warn(f"{name}/{split}: left out {skipped.summary()}", stacklevel=2)
        out[split] = RecordSource(sources[split], spec.features, f"{name}/{split}", skipped)
    return out


def build_text_source(train_paths: jsonl.PathSpec, eval_paths: jsonl.PathSpec | None,
                      data_dir: str | os.PathLike, *, name: str = "text",
                      text_field: str = "text", eval_percent: int = 0
                      ) -> dict[str, RecordSource]:
    """Builds (once) a pretraining text dataset with splits "train" and "eval".

    Args:
        train_paths: path spec of the train JSON-lines files.
        eval_paths: path spec of the eval files, or None (empty counts as None).
        data_dir: cache root (see `build_jsonl_source`).
        name: dataset name (a directory under data_dir).
        text_field: the record field holding the text.
        eval_percent: without eval_paths, the last `eval_percent`% of the train records
            (at least one) become the eval split; 0 = no eval split. Ignored when
            eval_paths is given.

    Returns:
        {"train": source, "eval": source} ("eval" only when there is one); each
        `source[i]` is `{"text": str}` and `len(source)` is the number of records;
        `source.skipped` counts the empty texts left out (`text_spec`).

    Raises:
        jsonl.DataFormatError: as in `build_jsonl_source` (a record without a str
            `text_field`, a split without texts, a holdout that would take them all).
    """
    split_paths: dict[str, Any] = {"train": train_paths}
    holdout = None
    if eval_paths:
        split_paths["eval"] = eval_paths
    elif eval_percent:
        holdout = ("train", "eval", eval_percent)
    return build_jsonl_source(text_spec(text_field), split_paths, data_dir, name=name,
                              holdout=holdout)
