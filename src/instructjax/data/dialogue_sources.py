"""Dialogue, comparison and prompt records from local JSON-lines files, and TFDS datasets.

`iter_records` / `read_records` parse files into the `formats` dataclasses; every malformed
line is an error naming its `file:line`, or, when asked, skipped and reported.

The `build_*_source` functions build TFDS datasets: they parse the input files as above (on
every call, so every call reports what it skipped) and store the parsed records' examples
directly with `tfds_builders.build_example_source` (array_record, cached by the examples'
content: the same inputs reuse the built dataset). Reading a split back gives the `formats`
dataclasses.

Stored features: `roles`, `contents` (text lists: the dialogue's turns, or the context of a
comparison or prompt) and `source` (text, "path:line" of the input record); comparisons add
`responses` (text list) and `order` (int list, best first).

Bad input, as the builders answer it (the stages call them with `skip_malformed=False`):
  malformed line (bad UTF-8 or JSON, missing or mistyped field, K < 2, bad ranking, ...)
      `jsonl.DataFormatError` "path:line: reason"; with skip_malformed, skipped, counted
      in `ParsedSource.skipped` and warned about.
  empty final answer / response / question (`formats.empty_texts`)
      kept (an empty answer is a legitimate, usually poor, response: HH-RLHF has some),
      counted in `ParsedSource.empty` and warned about.
  no records in a split (0-byte file, only blank lines, everything skipped), or a holdout
      that would take every record: `jsonl.DataFormatError` naming the input files.
Over-long contexts and answers are cut when encoded (`chat_encoding`), not here.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from instructjax.data import formats, jsonl, tfds_builders

_FEATURES = {
    "sft": {"roles": "text_list", "contents": "text_list", "source": "text"},
    "comparison": {"roles": "text_list", "contents": "text_list", "responses": "text_list",
                   "order": "int_list", "source": "text"},
    "prompt": {"roles": "text_list", "contents": "text_list", "source": "text"},
}
# Part of the TFDS cache key: bump when the stored form of a record changes meaning.
_EXAMPLE_VERSION = 1


# ------------------------------------------------------------------------------ reading

def iter_records(spec: jsonl.PathSpec, kind: str, *, fmt: str = "auto",
                 on_skip: Callable[[str], None] | None = None
                 ) -> Iterator[tuple[str, int, formats.Record]]:
    """Yields `(path, line_no, record)` for every record of JSON-lines files.

    Args:
        spec: a path spec (`jsonl.resolve_paths`): file, glob, directory or list.
        kind: "sft", "comparison" or "prompt" (see `formats.parse_record`).
        fmt: a format name or "auto".
        on_skip: None (default) raises on the first malformed line; a callable skips every
            malformed line (bad UTF-8 or JSON, wrong keys or types, bad ranking, ...) and is
            called with its `"path:line: reason"` message, so nothing is dropped unseen.

    Raises:
        FileNotFoundError: the spec matches no file.
        jsonl.DataFormatError: `"path:line: reason"` (only when `on_skip` is None).
    """
    lines = jsonl.read_jsonl(spec) if on_skip is None else jsonl.read_jsonl_lenient(spec, on_skip)
    for path, line_no, record in lines:
        try:
            yield path, line_no, formats.parse_record(record, kind, fmt=fmt, path=path,
                                                      line_no=line_no)
        except jsonl.DataFormatError as e:
            if on_skip is None:
                raise
            on_skip(str(e))


def read_records(spec: jsonl.PathSpec, kind: str, *, fmt: str = "auto",
                 skip_malformed: bool = False) -> tuple[list[formats.Record], list[str]]:
    """All records of JSON-lines files, parsed (see `iter_records`).

    Returns:
        `(records, skipped)`: the parsed `formats` dataclasses in file order, and one `"path:line:
        reason"` message per skipped line (empty unless `skip_malformed`; a warning states
        the count when there are any).
    """
    skipped: list[str] = []
    records = [r for _, _, r in iter_records(
        spec, kind, fmt=fmt, on_skip=skipped.append if skip_malformed else None)]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} malformed {kind} record(s) of {spec!r}; first: "
                      f"{skipped[0]}", stacklevel=2)
    return records, skipped


# ------------------------------------------------------------------------------ TFDS

def record_to_example(record: formats.Record, source: str = "") -> dict[str, Any]:
    """The stored (JSON-able) form of a parsed record; `source` is its "path:line"."""
    turns = record.turns if isinstance(record, formats.Dialogue) else record.context
    example = {"roles": [t.role for t in turns], "contents": [t.content for t in turns]}
    if isinstance(record, formats.Comparison):
        example.update(responses=list(record.responses), order=list(record.order))
    example["source"] = source
    return example


def example_to_record(kind: str, example: Mapping[str, Any]) -> formats.Record:
    """Inverse of `record_to_example` for a record kind ("sft", "comparison", "prompt")."""
    turns = tuple(formats.Turn(r, c) for r, c in zip(example["roles"], example["contents"]))
    if kind == "sft":
        return formats.Dialogue(turns)
    if kind == "comparison":
        return formats.Comparison(turns, tuple(example["responses"]), tuple(example["order"]))
    if kind == "prompt":
        return formats.Prompt(turns)
    raise ValueError(f"unknown record kind {kind!r}; kinds: {sorted(formats.KINDS)}")


class ParsedSource:
    """Random-access split whose items are `formats` dataclasses (Dialogue, Comparison or
    Prompt); satisfies grain's RandomAccessDataSource protocol.

    Attributes:
        kind: "sft", "comparison" or "prompt".
        skipped: `jsonl.SkipReport` of malformed lines skipped (only with skip_malformed).
        empty: `jsonl.SkipReport` of records kept with an empty answer, response or
            question (`formats.empty_texts`).
    Both count the input files of the split they were given for (a held-out split: none).
    """

    def __init__(self, source: tfds_builders.RecordSource, kind: str,
                 skipped: jsonl.SkipReport = jsonl.SkipReport(),
                 empty: jsonl.SkipReport = jsonl.SkipReport()):
        self._source = source
        self.kind = kind
        self.skipped = skipped
        self.empty = empty

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> formats.Record:
        return example_to_record(self.kind, self._source[index])

    def location(self, index: int) -> str:
        """"path:line" of the input record behind item `index`."""
        return self._source[index]["source"]

    def __repr__(self) -> str:
        return f"ParsedSource({self.kind}, {self._source!r})"


@dataclasses.dataclass(frozen=True)
class _ParsedSplit:
    """One split's input parsed: its stored `examples` (`record_to_example`, in file order),
    the `skipped` (malformed) and `empty` (kept) `"path:line: reason"` messages."""
    examples: list[dict[str, Any]]
    skipped: tuple[str, ...] = ()
    empty: tuple[str, ...] = ()


def _parse_split(kind: str, split: str, paths: jsonl.PathSpec, fmt: str,
                 skip_malformed: bool) -> _ParsedSplit:
    """Parses one split's files into examples (raises/warns: module docstring)."""
    skipped: list[str] = []
    empty: list[str] = []
    examples = []
    for path, line_no, record in iter_records(
            paths, kind, fmt=fmt, on_skip=skipped.append if skip_malformed else None):
        empty_parts = formats.empty_texts(record)
        if empty_parts:
            empty.append(f"{path}:{line_no}: empty {', '.join(empty_parts)}")
        examples.append(record_to_example(record, f"{path}:{line_no}"))
    if skipped:
        warnings.warn(f"{split} split: skipped {len(skipped)} malformed {kind} record(s); "
                      f"first: {skipped[0]}", stacklevel=3)
    if empty:
        warnings.warn(f"{split} split: kept {len(empty)} {kind} record(s) with an empty "
                      f"answer, response or question; first: {empty[0]}", stacklevel=3)
    if not examples:
        files = jsonl.resolve_paths(paths)
        why = (f"{len(skipped)} malformed line(s) skipped, first: {skipped[0]}" if skipped
               else jsonl.no_lines_reason(files))
        raise jsonl.DataFormatError(f"{jsonl.describe_paths(files)}: the {split!r} split "
                                    f"holds no {kind} records ({why})")
    return _ParsedSplit(examples, tuple(skipped), tuple(empty))


def build_parsed_source(kind: str, train_paths: jsonl.PathSpec,
                        eval_paths: jsonl.PathSpec | None, data_dir: str | os.PathLike, *,
                        name: str, fmt: str = "auto", eval_percent: int = 0,
                        skip_malformed: bool = False) -> dict[str, ParsedSource]:
    """Builds (once) a dataset of one record kind with splits "train" and "eval".

    Args:
        kind: "sft", "comparison" or "prompt" (see `formats.parse_record`).
        train_paths: path spec of the train JSON-lines files (`jsonl.resolve_paths`).
        eval_paths: path spec of the eval files, or None (empty counts as None).
        data_dir: cache root; the dataset goes to `data_dir/name/`.
        name: dataset name (a plain directory name).
        fmt: input format (`formats.KINDS[kind]`) or "auto" (detected per record).
        eval_percent: without eval_paths, the last `eval_percent`% of the train records (in
            file order, at least one) form the eval split; 0 = no eval split.
        skip_malformed: skip malformed records (with a warning giving the count and the
            first message) instead of raising.

    Returns:
        {"train": ParsedSource, "eval": ParsedSource} ("eval" only when there is one); the
        order of records is the order of the input lines; `.skipped` and `.empty` count the
        malformed lines skipped and the records kept with empty texts (module docstring).

    Raises:
        FileNotFoundError: a path spec matches no file.
        jsonl.DataFormatError: a malformed record, naming the input `file:line`; a split
            left without records, or a holdout that would take them all, naming the files.
        ValueError: a bad name, kind or format.
    """
    if kind not in _FEATURES:
        raise ValueError(f"unknown record kind {kind!r}; kinds: {sorted(_FEATURES)}")
    tfds_builders.check_dataset_name(name)
    split_paths: dict[str, Any] = {"train": train_paths}
    if eval_paths:
        split_paths["eval"] = eval_paths
    parsed = {split: _parse_split(kind, split, paths, fmt, skip_malformed)
              for split, paths in split_paths.items()}
    files = {split: jsonl.resolve_paths(paths) for split, paths in split_paths.items()}
    holdout = ("train", "eval", eval_percent) if eval_percent and not eval_paths else None
    if holdout:  # the last records, in file order; the held-out split reports nothing
        train = parsed["train"]
        kept, _ = tfds_builders.holdout_sizes(len(train.examples), eval_percent,
                                              files["train"])
        parsed = {"train": dataclasses.replace(train, examples=train.examples[:kept]),
                  "eval": _ParsedSplit(train.examples[kept:])}
    sources = tfds_builders.build_example_source(
        f"{kind}:v{_EXAMPLE_VERSION}", _FEATURES[kind],
        {split: p.examples for split, p in parsed.items()}, data_dir, name=name,
        metadata=dict(kind=kind, holdout=holdout, files={
            split: [os.path.abspath(p) for p in ps] for split, ps in files.items()}))
    return {split: ParsedSource(source, kind, jsonl.SkipReport.of(parsed[split].skipped),
                                jsonl.SkipReport.of(parsed[split].empty))
            for split, source in sources.items()}


def build_sft_source(train_paths: jsonl.PathSpec, eval_paths: jsonl.PathSpec | None,
                     data_dir: str | os.PathLike, *, name: str = "sft", fmt: str = "auto",
                     eval_percent: int = 0, skip_malformed: bool = False
                     ) -> dict[str, ParsedSource]:
    """SFT dialogues (pCLUE or messages records) -> splits of `formats.Dialogue`.

    Arguments and errors as in `build_parsed_source`.
    """
    return build_parsed_source("sft", train_paths, eval_paths, data_dir, name=name, fmt=fmt,
                               eval_percent=eval_percent, skip_malformed=skip_malformed)


def build_comparison_source(train_paths: jsonl.PathSpec, eval_paths: jsonl.PathSpec | None,
                            data_dir: str | os.PathLike, *, name: str = "comparisons",
                            fmt: str = "auto", eval_percent: int = 0,
                            skip_malformed: bool = False) -> dict[str, ParsedSource]:
    """Comparisons (ranked, pair or HH records) -> splits of `formats.Comparison`.

    Arguments and errors as in `build_parsed_source`.
    """
    return build_parsed_source("comparison", train_paths, eval_paths, data_dir, name=name,
                               fmt=fmt, eval_percent=eval_percent,
                               skip_malformed=skip_malformed)


def build_prompt_source(train_paths: jsonl.PathSpec, eval_paths: jsonl.PathSpec | None,
                        data_dir: str | os.PathLike, *, name: str = "prompts",
                        fmt: str = "auto", eval_percent: int = 0,
                        skip_malformed: bool = False) -> dict[str, ParsedSource]:
    """PPO prompts (prompt or messages records) -> splits of `formats.Prompt`.

    Arguments and errors as in `build_parsed_source`.
    """
    return build_parsed_source("prompt", train_paths, eval_paths, data_dir, name=name,
                               fmt=fmt, eval_percent=eval_percent,
                               skip_malformed=skip_malformed)
