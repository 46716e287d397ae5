"""Dialogue, comparison and prompt records, and the parsing of JSON records into them.

Legend: K responses per comparison.

Rendering these records as ChatYuan text, truncating them and encoding them as tokens is in
`chat_encoding`.

Record kinds and the JSON formats each accepts (other keys are ignored; files of them are
read by `dialogue_sources.read_records`):

  kind        format    record
  sft         pclue     {"input", "target"}: one user turn and its answer (pCLUE)
              messages  {"messages": [{"role", "content"}, ...]}, ending with an assistant turn
  comparison  ranked    {"prompt" | "messages", "responses": [K str], "ranking": [K int]}
              pair      {"prompt" | "messages", "chosen", "rejected"}          (K = 2)
              hh        {"chosen", "rejected"}: Anthropic HH transcripts        (K = 2)
  prompt      prompt    {"prompt"}
              messages  {"messages"}, ending with a user turn

Ranking: `ranking[i]` is the rank of `responses[i]`, 0 = best; it must be a list of K ints
forming a permutation of 0..K-1 (a wrong length, a tie or a gap is an error). The parsed
`Comparison.order` lists response indices best first: responses ["b", "a", "c"] with ranking
[1, 0, 2] give order (1, 0, 2). A chosen/rejected pair gives responses (chosen, rejected) and
order (0, 1).

Keys other than a format's own are ignored (real files carry ids and metadata: pCLUE's
"answer_choices" and "type", CValues' "id_" and "domain_*"), unless they are another format's
keys, which changes the detected format. A missing key is an error naming it, and naming a
present key that looks like its misspelling ("traget" for "target").

`fmt="auto"` picks the format from the keys (`detect_format`); naming a format skips that.
Messages have role "user", "assistant" or "system": at most one system message, first; after
it user and assistant turns alternate, starting with the user (ChatYuan's text form has no
way to show two turns of one speaker in a row, so that is an error, not a silent merge).
Contents are kept verbatim (pCLUE inputs keep their trailing "\\n答案："); empty contents are
allowed, and `empty_texts` names an empty final answer, response or question so that the
dataset builders can count such records (they are kept: see `dialogue_sources`). A "prompt"
string is one user turn, unless it is an HH transcript (starts with "\\n\\nHuman:"), which
is split into turns as below.

HH transcripts: turns start at "\\n\\nHuman:" and "\\n\\nAssistant:" (an inline "  Human:"
inside a turn is text, not a turn). The answer is what follows the first "\\n\\nAssistant:"
after the last "\\n\\nHuman:"; further "\\n\\nAssistant:" markers with no Human turn between
continue the same assistant turn and stay in its text verbatim (a few real transcripts have
them). Contents are stripped of the spaces around the markers. Chosen and rejected must share
the text up to and including that marker, else the record is an error. An empty answer is a
legitimate (usually poor) response and is kept.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any, Union

from instructjax.data import jsonl

ROLES = ("system", "user", "assistant")
KINDS = {"sft": ("pclue", "messages"), "comparison": ("ranked", "pair", "hh"),
         "prompt": ("prompt", "messages")}
_HH_HUMAN, _HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
# Every key some format reads, for the misspelling hint of `detect_format`.
_KNOWN_KEYS = ("messages", "input", "target", "prompt", "responses", "ranking", "chosen",
               "rejected")


# ------------------------------------------------------------------------------ records

@dataclasses.dataclass(frozen=True)
class Turn:
    """One message: role in ROLES, content str (may be empty)."""
    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; roles are {ROLES}")
        if not isinstance(self.content, str):
            raise ValueError(f"content must be str, got {type(self.content).__name__}")


def check_turns(turns: Sequence[Turn], last_role: str, what: str) -> None:
    """Checks the role order [system?] user, assistant, user, ... ending with `last_role`.

    Raises:
        ValueError: naming `what` (e.g. "a prompt") and the first turn out of order.
    """
    if not all(isinstance(t, Turn) for t in turns):
        raise ValueError(f"{what}: turns must be Turn objects")
    start = 1 if turns and turns[0].role == "system" else 0
    if len(turns) == start:
        raise ValueError(f"{what} has no user or assistant turns")
    for i in range(start, len(turns)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if turns[i].role == "system":
            raise ValueError(f"{what}: message {i} has role 'system'; a system message may "
                             "only come first")
        if turns[i].role != expected:
            raise ValueError(f"{what}: message {i} has role {turns[i].role!r} where "
                             f"{expected!r} belongs (user and assistant turns alternate, "
                             "starting with the user)")
    if turns[-1].role != last_role:
        raise ValueError(f"{what} must end with {_with_article(last_role)} turn, but ends "
                         f"with {turns[-1].role!r}")


def _with_article(role: str) -> str:
    return ("an " if role == "assistant" else "a ") + role


@dataclasses.dataclass(frozen=True)
class Dialogue:
    """An SFT example: turns `[system?] user, assistant, ..., assistant`."""
    turns: tuple[Turn, ...]

    def __post_init__(self):
        object.__setattr__(self, "turns", tuple(self.turns))
        check_turns(self.turns, "assistant", "a dialogue")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """K >= 2 responses to one context, ranked.

    Attributes:
        context: turns `[system?] user, assistant, ..., user`.
        responses: K answer texts.
        order: indices into `responses`, best first (a permutation of 0..K-1).
    """
    context: tuple[Turn, ...]
    responses: tuple[str, ...]
    order: tuple[int, ...]

    def __post_init__(self):
        for name in ("context", "responses", "order"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_turns(self.context, "user", "a comparison context")
        if len(self.responses) < 2 or not all(isinstance(r, str) for r in self.responses):
            raise ValueError(f"a comparison needs at least 2 str responses, got "
                             f"{len(self.responses)}")
        if sorted(self.order) != list(range(len(self.responses))):
            raise ValueError(f"order {self.order} is not a permutation of "
                             f"0..{len(self.responses) - 1}")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A PPO prompt: turns `[system?] user, assistant, ..., user`."""
    context: tuple[Turn, ...]

    def __post_init__(self):
        object.__setattr__(self, "context", tuple(self.context))
        check_turns(self.context, "user", "a prompt")


Record = Union[Dialogue, Comparison, Prompt]


def empty_texts(record: Record) -> tuple[str, ...]:
    """What a parsed record holds empty (or only whitespace) where its content matters.

    Returns:
        Names for messages: "answer" (a Dialogue's final assistant turn), "response i"
        (each empty response of a Comparison, i from 0), "question" (a Prompt's final user
        turn); () when nothing is empty.
    """
    if isinstance(record, Dialogue):
        return ("answer",) if not record.turns[-1].content.strip() else ()
    if isinstance(record, Comparison):
        return tuple(f"response {i}" for i, r in enumerate(record.responses) if not r.strip())
    return ("question",) if not record.context[-1].content.strip() else ()


# ------------------------------------------------------------------------------ parsing

def detect_format(record: dict[str, Any]) -> str:
    """The format name of a JSON record, from its keys (module docstring table).

    Raises:
        ValueError: no known format's keys, or keys of two context fields at once.
    """
    keys = set(record)
    if "prompt" in keys and "messages" in keys:
        raise ValueError("both 'prompt' and 'messages' given; keep one")
    if keys & {"responses", "ranking"}:
        return "ranked"
    if keys & {"chosen", "rejected"}:
        return "pair" if keys & {"prompt", "messages"} else "hh"
    if "messages" in keys:
        if keys & {"input", "target"}:
            raise ValueError("both 'messages' and pCLUE 'input'/'target' given; keep one")
        return "messages"
    if keys & {"input", "target"}:
        return "pclue"
    if "prompt" in keys:
        return "prompt"
    raise ValueError(f"unknown record format: keys {sorted(keys)}; expected 'messages', "
                     "'input'+'target', 'prompt', 'responses'+'ranking' or 'chosen'+'rejected'"
                     + jsonl.misspelling_hint(keys, _KNOWN_KEYS))


def _messages(value: Any) -> tuple[Turn, ...]:
    if not isinstance(value, list):
        raise ValueError(f"field 'messages' must be a list, got {type(value).__name__}")
    if not value:
        raise ValueError("field 'messages' is empty")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"message {i} has no {key!r} (keys {sorted(m)}"
                                 f"{jsonl.misspelling_hint(m, ('role', 'content'))})")
            if not isinstance(m[key], str):
                raise ValueError(f"message {i}: {key!r} must be str, got "
                                 f"{type(m[key]).__name__}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r}; roles are {ROLES}")
        turns.append(Turn(m["role"], m["content"]))
    return tuple(turns)


def _field(record: dict[str, Any], name: str, type_: type) -> Any:
    if name not in record:
        raise ValueError(f"missing field {name!r} (the record has {sorted(record)}"
                         f"{jsonl.misspelling_hint(record, [name])})")
    value = record[name]
    if not isinstance(value, type_) or isinstance(value, bool):
        raise ValueError(f"field {name!r} must be {type_.__name__}, got {type(value).__name__}")
    return value


def split_hh(text: str) -> tuple[str, tuple[Turn, ...], str | None]:
    """Splits an Anthropic HH transcript at its final answer (rules: module docstring).

    Args:
        text: `"\\n\\nHuman: q1\\n\\nAssistant: a1 ... \\n\\nHuman: qn\\n\\nAssistant: an"`
            (a leading "Human:" without the blank lines is accepted too).

    Returns:
        `(prefix, context, answer)`: the text up to and including the final answer's
        "\\n\\nAssistant:" marker, the turns before the answer (ending with the user turn), and
        the stripped answer; answer None when the transcript ends with a Human turn (then
        prefix is the whole text).

    Raises:
        ValueError: no leading Human turn, or two Human turns in a row.
    """
    if not text.startswith(_HH_HUMAN):
        if not text.lstrip().startswith("Human:"):
            raise ValueError("an HH transcript must start with '\\n\\nHuman:'")
        text = "\n\n" + text.lstrip()
    turns: list[Turn] = []
    segments = text.split(_HH_HUMAN)[1:]
    for i, segment in enumerate(segments):
        user, marker, assistant = segment.partition(_HH_ASSISTANT)
        turns.append(Turn("user", user.strip()))
        if i == len(segments) - 1:
            if not marker:
                return text, tuple(turns), None
            return text[:len(text) - len(assistant)], tuple(turns), assistant.strip()
        if not marker:
            raise ValueError(f"Human turn {i + 1} has no Assistant turn after it")
        turns.append(Turn("assistant", assistant.strip()))
    raise AssertionError("unreachable: a transcript starting with Human has a segment")


def _context(record: dict[str, Any]) -> tuple[tuple[Turn, ...], bool]:
    """(context turns, is an HH transcript) from "prompt" or "messages"."""
    if "messages" in record:
        return _messages(record["messages"]), False
    text = _field(record, "prompt", str)
    if not text.startswith(_HH_HUMAN):
        return (Turn("user", text),), False
    _, turns, answer = split_hh(text)
    if answer:
        raise ValueError("the HH prompt transcript continues after the first '\\n\\nAssistant:' "
                         "following its last '\\n\\nHuman:' (an assistant turn resumed "
                         "without a Human turn); a prompt must end with that marker")
    return turns, True


def _order_from_ranking(ranking: Any, k: int) -> tuple[int, ...]:
    if not isinstance(ranking, list) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranking):
        raise ValueError(f"field 'ranking' must be a list of ints, got {ranking!r}")
    if len(ranking) != k:
        raise ValueError(f"'ranking' has {len(ranking)} entries for {k} responses")
    ties = sorted(r for r, n in collections.Counter(ranking).items() if n > 1)
    if ties:
        raise ValueError(f"'ranking' {ranking} has ties (rank(s) {ties} given to several "
                         "responses); ties are not supported")
    if sorted(ranking) != list(range(k)):
        raise ValueError(f"'ranking' {ranking} must be a permutation of 0..{k - 1} "
                         "(0 = best)")
    return tuple(sorted(range(k), key=lambda i: ranking[i]))


def _parse(record: dict[str, Any], fmt: str) -> Record:
    """The record of format `fmt`; ValueError (without location) when malformed."""
    if fmt == "pclue":
        return Dialogue((Turn("user", _field(record, "input", str)),
                         Turn("assistant", _field(record, "target", str))))
    if fmt == "messages":
        turns = _messages(_field(record, "messages", list))
        last = turns[-1].role
        return Dialogue(turns) if last == "assistant" else Prompt(turns)
    if fmt == "prompt":
        return Prompt(_context(record)[0])
    if fmt == "ranked":
        responses = _field(record, "responses", list)
        if len(responses) < 2:
            raise ValueError(f"field 'responses' needs at least 2 answers to rank (K >= 2), "
                             f"got {len(responses)}")
        if not all(isinstance(r, str) for r in responses):
            raise ValueError("'responses' must be a list of str")
        order = _order_from_ranking(_field(record, "ranking", list), len(responses))
        return Comparison(_context(record)[0], responses, order)
    if fmt == "pair":
        context, is_hh = _context(record)
        answers = [_field(record, k, str) for k in ("chosen", "rejected")]
        return Comparison(context, [a.strip() for a in answers] if is_hh else answers, (0, 1))
    if fmt == "hh":
        chosen, rejected = (_field(record, k, str) for k in ("chosen", "rejected"))
        (prefix, context, answer), (prefix_r, _, answer_r) = split_hh(chosen), split_hh(rejected)
        if answer is None or answer_r is None:
            raise ValueError("an HH transcript does not end with an Assistant turn")
        if prefix != prefix_r:
            at = next((i for i, (a, b) in enumerate(zip(prefix, prefix_r)) if a != b),
                      min(len(prefix), len(prefix_r)))
            raise ValueError(f"chosen and rejected differ before their final answers (at "
                             f"character {at}: {prefix[at:at + 30]!r} vs "
                             f"{prefix_r[at:at + 30]!r})")
        return Comparison(context, (answer, answer_r), (0, 1))
    raise ValueError(f"unknown format {fmt!r}; formats: {sorted(set(sum(KINDS.values(), ())))}")


def parse_record(record: dict[str, Any], kind: str, *, fmt: str = "auto",
                 path: str = "<record>", line_no: int = 0) -> Record:
    """Parses one JSON record of a kind ("sft", "comparison" or "prompt").

    Args:
        record: a JSON object (dict).
        kind: which dataclass is wanted: "sft" -> Dialogue, "comparison" -> Comparison,
            "prompt" -> Prompt.
        fmt: a format of `KINDS[kind]`, or "auto" to detect it from the keys.
        path, line_no: where the record came from, for messages.

    Returns:
        The parsed `Dialogue`, `Comparison` or `Prompt`.

    Raises:
        ValueError: an unknown kind or a format not of that kind (caller errors).
        jsonl.DataFormatError: `"{path}:{line_no}: reason"` for any malformed record.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; kinds: {sorted(KINDS)}")
    if fmt != "auto" and fmt not in KINDS[kind]:
        raise ValueError(f"format {fmt!r} is not one of the {kind} formats {KINDS[kind]}")
    try:
        found = detect_format(record) if fmt == "auto" else fmt
        if found not in KINDS[kind]:
            raise ValueError(f"keys {sorted(record)} make a {found!r} record, not one of the "
                             f"{kind} formats {KINDS[kind]}")
        parsed = _parse(record, found)
        wanted = {"sft": Dialogue, "comparison": Comparison, "prompt": Prompt}[kind]
        if not isinstance(parsed, wanted):  # messages ending with the wrong role
            needs = "assistant" if kind == "sft" else "user"
            raise ValueError(f"{kind} messages must end with {_with_article(needs)} turn")
        return parsed
    except ValueError as e:
        raise jsonl.DataFormatError(f"{path}:{line_no}: {e}") from None
