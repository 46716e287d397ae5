"""Read JSON-lines data files, reporting malformed records by file and line; write them.

Every data format of the project (text, SFT dialogues, comparisons, prompts) is one JSON
object per line. This module finds the files (a file, a glob or a directory), yields the
records with their location, and turns every problem into a `DataFormatError` whose message
starts with `path:line:` so a user can open the offending line directly; problems of a whole
file (no records at all) name the file instead. `read_jsonl_lenient` skips and reports bad
lines instead; `write_jsonl` writes records (the demo data) atomically.

What a reader accepts from any user file: UTF-8 only (another encoding, e.g. GBK, is refused
at the first line that is not valid UTF-8); a UTF-8 byte-order mark at the start of a file,
which Windows editors write, is dropped; blank lines are skipped (a 0-byte file or one of
blank lines yields no record, and the callers that need records refuse it naming the file);
lines of any length (one line is held in memory at a time).
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

PathSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

# Suffixes picked up when a directory is given; `.json` files are read as JSON lines too
# (pCLUE ships its JSON-lines files as `.json`).
DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz")
_GLOB_CHARS = ("*", "?", "[")


class DataFormatError(ValueError):
    """User data is unusable: a record (the message starts with `path:line:`) or a whole file
    or set of files (the message starts with their names). A ValueError, so existing handlers
    still catch it; the command line prints it as one `error:` line."""


@dataclasses.dataclass(frozen=True)
class SkipReport:
    """Records left out on purpose, so that nothing is dropped unseen.

    Attributes:
        count: how many records were left out.
        first: `"path:line: reason"` of the first few of them (at most `SHOWN`).
    """
    count: int = 0
    first: tuple[str, ...] = ()

    SHOWN = 10

    @classmethod
    def of(cls, messages: Sequence[str]) -> "SkipReport":
        """The report of a list of `"path:line: reason"` messages."""
        return cls(len(messages), tuple(messages[:cls.SHOWN]))

    def summary(self) -> str:
        """E.g. `"3 record(s); first: a.jsonl:4: empty text"` ("" when nothing was left out)."""
        return f"{self.count} record(s); first: {self.first[0]}" if self.count else ""


def describe_paths(paths: Iterable[str | os.PathLike]) -> str:
    """The files of a message: one path, or the first three and how many more."""
    paths = [os.fspath(p) for p in paths]
    if len(paths) <= 3:
        return ", ".join(paths)
    return f"{', '.join(paths[:3])} and {len(paths) - 3} more"


def no_lines_reason(paths: Sequence[str]) -> str:
    """Why files gave no record: "the file is empty or holds only blank lines" (or plural)."""
    if len(paths) == 1:
        return "the file is empty or holds only blank lines"
    return "the files are empty or hold only blank lines"


def misspelling_hint(present: Iterable[str], wanted: Iterable[str]) -> str:
    """`"; is 'txt' a misspelling of 'text'?"` for the first present key close to a wanted
    key that is absent, else "" (appended to a missing-field message)."""
    present, wanted = [k for k in present if isinstance(k, str)], list(wanted)
    missing = [w for w in wanted if w not in present]
    for key in present:
        if key in wanted:
            continue
        # 0.75 catches one-letter slips and swaps ('traget', 'Text') but not other words
        # that merely share letters ('text' is no misspelling of 'target').
        close = [w for w in missing
                 if difflib.SequenceMatcher(None, key.lower(), w).ratio() >= 0.75]
        if close:
            return f"; is {key!r} a misspelling of {close[0]!r}?"
    return ""


def resolve_paths(spec: PathSpec) -> list[str]:
    """Expands a data path spec into a list of existing files.

    Args:
        spec: a file path, a glob pattern (`*`, `?`, `[...]`, `**` recursive), a directory
            (its files ending in .jsonl, .json or .jsonl.gz, not recursive), or a sequence of
            these (expanded in the given order).

    Returns:
        File paths as strings; glob and directory matches are sorted so the order (and hence
        every shuffle seeded downstream) does not depend on the file system.

    Raises:
        FileNotFoundError: naming the spec when a file is missing, a glob matches no file or a
            directory holds no data file.
    """
    if isinstance(spec, (str, os.PathLike)):
        return _resolve_one(os.fspath(spec))
    paths = []
    for one in spec:
        paths.extend(_resolve_one(os.fspath(one)))
    if not paths:
        raise FileNotFoundError("empty list of data paths")
    return paths


def _resolve_one(spec: str) -> list[str]:
    if not spec:
        raise FileNotFoundError("empty data path")
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        files = sorted(
            os.path.join(spec, name) for name in os.listdir(spec)
            if name.endswith(DATA_SUFFIXES) and os.path.isfile(os.path.join(spec, name)))
        if not files:
            raise FileNotFoundError(
                f"directory {spec!r} holds no data files (looked for {', '.join(DATA_SUFFIXES)})")
        return files
    if any(c in spec for c in _GLOB_CHARS):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"no data files match the pattern {spec!r}")
        return files
    raise FileNotFoundError(f"data file not found: {spec!r}")


def read_jsonl(spec: PathSpec) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yields every record of JSON-lines files with its location.

    `.jsonl`, `.json` (one object per line) and gzip-compressed `.jsonl.gz` are read. Blank
    lines are skipped (they hold no record); anything else that is not a JSON object is an
    error, never dropped.

    Args:
        spec: a path spec as accepted by `resolve_paths`.

    Yields:
        `(path, line_no, record)` with `line_no` counted from 1 and `record` a dict.

    Raises:
        FileNotFoundError: from `resolve_paths`.
        DataFormatError: `"{path}:{line_no}: reason"` for invalid UTF-8, invalid JSON or a
            JSON value that is not an object.
    """
    for path in resolve_paths(spec):
        opener = gzip.open if path.endswith(".gz") else open
        # Binary mode, decoded per line, so that invalid UTF-8 is reported with its line.
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFormatError(
                        f"{path}:{line_no}: invalid UTF-8 ({e.reason}); data files must be "
                        "UTF-8: convert a GBK/GB18030 or UTF-16 file first, e.g. "
                        "`iconv -f GBK -t UTF-8`") from None
                if line_no == 1:
                    line = line.lstrip("\ufeff")  # a byte-order mark some editors write
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    hint = ""
                    if line_no == 1 and line.lstrip().startswith("["):
                        hint = " (this looks like a JSON array; expected one JSON object per line)"
                    raise DataFormatError(f"{path}:{line_no}: invalid JSON: {e.msg} "
                                          f"at column {e.colno}{hint}") from None
                if not isinstance(record, dict):
                    raise DataFormatError(
                        f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield path, line_no, record


def read_jsonl_lenient(spec: PathSpec, on_skip: Callable[[str], None]
                       ) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Like `read_jsonl`, but a line that is not a JSON object is skipped, not an error.

    Args:
        spec: a path spec as accepted by `resolve_paths`.
        on_skip: called with `"{path}:{line_no}: reason"` for every skipped line (invalid
            UTF-8 or JSON, a JSON value that is not an object), so nothing is dropped unseen.

    Yields:
        `(path, line_no, record)` as `read_jsonl` does, for the readable lines.
    """
    # read_jsonl's generator ends at its first error, so it cannot skip a bad line and
    # continue; its per-line checks (UTF-8, BOM, blank lines, JSON object) are mirrored here.
    for path in resolve_paths(spec):
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                    line = line.lstrip("\ufeff") if line_no == 1 else line
                    if not line.strip():
                        continue
                    record = json.loads(line)
                except ValueError as e:  # incl. UnicodeDecodeError, JSONDecodeError
                    on_skip(f"{path}:{line_no}: unreadable line ({type(e).__name__}: {e})")
                    continue
                if not isinstance(record, dict):
                    on_skip(f"{path}:{line_no}: expected a JSON object, got "
                            f"{type(record).__name__}")
                    continue
                yield path, line_no, record


def require_field(record: dict[str, Any], name: str, path: str, line_no: int,
                                type_: type | tuple[type, ...]) -> Any:
    """Returns `record[name]` after checking that it exists and has the expected type.

    Args:
        record: a JSON object as yielded by `read_jsonl`.
        name: the field name.
        path: the file the record came from (for the message).
        line_no: its line number (for the message).
        type_: the accepted Python type(s), e.g. `str`, `list`, `(int, float)`. `bool` is not
            accepted as a number unless `bool` is named, since JSON `true` is no count.

    Returns:
        The field value.

    Raises:
        DataFormatError: `"{path}:{line_no}: ..."` naming the missing or mistyped field (and
            a present key that looks like a misspelling of a missing one).
    """
    if name not in record:
        raise DataFormatError(f"{path}:{line_no}: missing field {name!r} (the record has "
                              f"{sorted(record)}{misspelling_hint(record, [name])})")
    value = record[name]
    types = type_ if isinstance(type_, tuple) else (type_,)
    is_bool_mismatch = isinstance(value, bool) and bool not in types
    if not isinstance(value, types) or is_bool_mismatch:
        expected = " or ".join(t.__name__ for t in types)
        raise DataFormatError(
            f"{path}:{line_no}: field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> None:
    """Writes records as UTF-8 JSON lines (non-ASCII kept as is), replacing `path` atomically."""
    # Per-process temporary name: processes of a multi-host run sharing a workdir may write
    # the same (identical) file at once; the atomic replace leaves one complete copy.
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp_path, path)
