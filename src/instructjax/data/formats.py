"""Dialogue, comparison and prompt records: parse JSON records, render ChatYuan text, encode.

Legend: K responses per comparison, T max_length.

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

`fmt="auto"` picks the format from the keys (`detect_format`); naming a format skips that.
Messages have role "user", "assistant" or "system": at most one system message, first; after
it user and assistant turns alternate, starting with the user (ChatYuan's text form has no
way to show two turns of one speaker in a row, so that is an error, not a silent merge).
Contents are kept verbatim (pCLUE inputs keep their trailing "\\n答案："); empty contents are
allowed. A "prompt" string is one user turn, unless it is an HH transcript (starts with
"\\n\\nHuman:"), which is split into turns as below.

HH transcripts: turns start at "\\n\\nHuman:" and "\\n\\nAssistant:" (an inline "  Human:"
inside a turn is text, not a turn). The answer is what follows the first "\\n\\nAssistant:"
after the last "\\n\\nHuman:"; further "\\n\\nAssistant:" markers with no Human turn between
continue the same assistant turn and stay in its text verbatim (a few real transcripts have
them). Contents are stripped of the spaces around the markers. Chosen and rejected must share
the text up to and including that marker, else the record is an error. An empty answer is a
legitimate (usually poor) response and is kept.

Rendering (ChatYuan's unified text, `ChatTemplate` defaults): turns `用户：{q}` and `小元：{a}`
joined by "\\n"; a prompt ends with the cue `小元：` (no trailing space), e.g.
`用户：你好\\n小元：你好！\\n用户：1 加 2 等于多少？\\n小元：`. A system turn renders as its
content alone (or `{system}：{content}` when the template names a system role).

Tokens: a rendered text is encoded as the concatenation of the encodings of its maximal
non-answer spans and of each answer (the tokenizer adds no dummy-prefix space, so this decodes
to the whole text). Answer tokens are then exactly the loss tokens, and a prompt encodes the
same way in SFT, reward-model and PPO sequences.

Truncation (`truncate_context`): keep the last `max_turns` exchanges (an exchange is a user
turn with the assistant answer after it; the final, unanswered user turn counts as one), then
drop the oldest exchanges until the rendered prompt with its cue fits; then drop the system
turn; if the last user turn alone is still too long, cut its text from the LEFT (the end holds
the question). The cue is never cut. With an answer (SFT, comparisons), when prompt and answer
do not both fit, the answer is cut on the right as far as needed to leave the prompt at least
half of the room, or all of it if the prompt is shorter; the prompt is truncated to the rest.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np

from instructjax.data import jsonl

ROLES = ("system", "user", "assistant")
KINDS = {"sft": ("pclue", "messages"), "comparison": ("ranked", "pair", "hh"),
         "prompt": ("prompt", "messages")}
TRAIN_ON = ("all", "last")
_HH_HUMAN, _HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


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


def _check_turns(turns: tuple[Turn, ...], last_role: str, what: str) -> None:
    """[system?] user, assistant, user, ... ending with `last_role`; ValueError otherwise."""
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
        _check_turns(self.turns, "assistant", "a dialogue")


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
        _check_turns(self.context, "user", "a comparison context")
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
        _check_turns(self.context, "user", "a prompt")


Record = Union[Dialogue, Comparison, Prompt]


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
                     "'input'+'target', 'prompt', 'responses'+'ranking' or 'chosen'+'rejected'")


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
                raise ValueError(f"message {i} has no {key!r} (keys {sorted(m)})")
            if not isinstance(m[key], str):
                raise ValueError(f"message {i}: {key!r} must be str, got "
                                 f"{type(m[key]).__name__}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r}; roles are {ROLES}")
        turns.append(Turn(m["role"], m["content"]))
    return tuple(turns)


def _field(record: dict[str, Any], name: str, type_: type) -> Any:
    if name not in record:
        raise ValueError(f"missing field {name!r} (the record has {sorted(record)})")
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
            raise ValueError(f"'responses' needs at least 2 answers, got {len(responses)}")
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


# ------------------------------------------------------------------------------ rendering

@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How turns become text: `{user}{colon}{q}{sep}{assistant}{colon}{a}`.

    `system` names the system role; empty renders a system turn as its bare content.
    """
    user: str = "用户"
    assistant: str = "小元"
    sep: str = "\n"
    colon: str = "："
    system: str = ""

    def __post_init__(self):
        if not self.user or not self.assistant or self.user == self.assistant:
            raise ValueError(f"ChatTemplate needs two different non-empty role names, got "
                             f"user={self.user!r}, assistant={self.assistant!r}")

    @property
    def cue(self) -> str:
        """The assistant cue that ends a prompt, e.g. "小元："."""
        return self.assistant + self.colon


def _spans(turns: Sequence[Turn], template: ChatTemplate, cue: bool) -> list[tuple[str, bool]]:
    """The rendered text as (text, is_answer) spans; maximal non-answer spans merged."""
    spans: list[tuple[str, bool]] = []

    def add(text: str, is_answer: bool) -> None:
        if spans and not is_answer and not spans[-1][1]:
            spans[-1] = (spans[-1][0] + text, False)
        else:
            spans.append((text, is_answer))

    for i, turn in enumerate(turns):
        lead = template.sep if i else ""
        if turn.role == "assistant":
            add(lead + template.cue, False)
            add(turn.content, True)
        elif turn.role == "user":
            add(lead + template.user + template.colon + turn.content, False)
        else:
            name = template.system + template.colon if template.system else ""
            add(lead + name + turn.content, False)
    if cue:
        add((template.sep if turns else "") + template.cue, False)
    return spans


def render_dialogue(turns: Sequence[Turn], template: ChatTemplate = ChatTemplate()) -> str:
    """`用户：q1\\n小元：a1\\n用户：q2\\n小元：a2` (str) for the given turns."""
    return "".join(text for text, _ in _spans(turns, template, cue=False))


def render_prompt(context: Sequence[Turn], template: ChatTemplate = ChatTemplate()) -> str:
    """The context rendered and followed by the cue: `...\\n用户：q\\n小元：` (str)."""
    return "".join(text for text, _ in _spans(context, template, cue=True))


# ------------------------------------------------------------------------------ encoding

def _encode(turns: Sequence[Turn], tokenizer, template: ChatTemplate, cue: bool
            ) -> tuple[list[int], list[bool]]:
    """Token ids (no BOS/EOS) of the rendered turns and whether each is an answer token."""
    ids: list[int] = []
    is_answer: list[bool] = []
    for text, answer in _spans(turns, template, cue):
        piece = tokenizer.encode(text)
        ids += piece
        is_answer += [answer] * len(piece)
    return ids, is_answer


def _min_true(lo: int, hi: int, pred: Callable[[int], bool]) -> int:
    """Smallest x in [lo, hi] with pred(x), for pred monotone and pred(hi) True."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def truncate_context(context: Sequence[Turn], tokenizer, template: ChatTemplate, *,
                     max_tokens: int | None, max_turns: int | None = None) -> tuple[Turn, ...]:
    """The context cut so that `render_prompt` of it encodes to at most max_tokens ids.

    Rules (module docstring): last `max_turns` exchanges; then oldest exchanges dropped; then
    the system turn; then the last user turn's text cut from the left. Token counts use the
    span encoding of `encode_prompt` without BOS.

    Args:
        context: turns ending with a user turn (e.g. `Prompt.context`).
        tokenizer: has `encode(str) -> list[int]`.
        template: the `ChatTemplate`.
        max_tokens: the budget in ids; None = no token limit.
        max_turns: exchanges to keep at most (>= 1), None = all.

    Returns:
        The kept turns (a suffix of the context, plus the system turn when it fits; only the
        last user turn's content may be shortened).

    Raises:
        ValueError: a context not ending with a user turn, max_turns < 1, or a budget too
            small for the role prefix and cue with an empty question.
    """
    context = tuple(context)
    _check_turns(context, "user", "a context")
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be None or >= 1, got {max_turns}")
    system = context[:1] if context[0].role == "system" else ()
    rest = context[len(system):]
    starts = [i for i, t in enumerate(rest) if t.role == "user"]  # one per exchange
    if max_turns is not None:
        starts = starts[-max_turns:]
    kept = system + rest[starts[0]:]
    if max_tokens is None:
        return kept

    def fits(turns: tuple[Turn, ...]) -> bool:
        return len(_encode(turns, tokenizer, template, cue=True)[0]) <= max_tokens

    if fits(kept):
        return kept
    last = system + rest[starts[-1]:]
    if fits(last):
        first = _min_true(0, len(starts) - 1, lambda s: fits(system + rest[starts[s]:]))
        return system + rest[starts[first]:]
    question = rest[-1].content

    def with_text(k: int) -> tuple[Turn, ...]:
        return (Turn("user", question[k:]),)

    if system and fits(rest[-1:]):
        return rest[-1:]
    if not fits(with_text(len(question))):
        raise ValueError(f"max_tokens={max_tokens} cannot hold the user prefix and the cue "
                         f"{template.cue!r} even with an empty question")
    return with_text(_min_true(0, len(question), lambda k: fits(with_text(k))))


def _fit_prompt(context: Sequence[Turn], answer_len: int, tokenizer, template: ChatTemplate,
                max_length: int, max_turns: int | None) -> tuple[list[int], list[bool], int]:
    """(prompt ids, is_answer flags, room for answer + EOS) under the answer/prompt split."""
    room = max_length - 1  # after BOS
    if room < 2:
        raise ValueError(f"max_length must be at least 3, got {max_length}")
    turns = truncate_context(context, tokenizer, template, max_tokens=None, max_turns=max_turns)
    ids, flags = _encode(turns, tokenizer, template, cue=True)
    if len(ids) + answer_len + 1 > room:
        budget = max(room - answer_len - 1, min(len(ids), (room - 1) // 2))
        turns = truncate_context(turns, tokenizer, template, max_tokens=budget)
        ids, flags = _encode(turns, tokenizer, template, cue=True)
    return ids, flags, room - len(ids)


def encode_sft(dialogue: Dialogue, tokenizer, template: ChatTemplate = ChatTemplate(), *,
               max_length: int, max_turns: int | None = None, train_on: str = "all"
               ) -> tuple[list[int], list[float]]:
    """Tokens and loss weights of one SFT dialogue: [bos] + rendered dialogue + [eos].

    Args:
        dialogue: the `Dialogue`; its last turn is the answer trained on.
        tokenizer: has encode, bos_id, eos_id.
        template: the `ChatTemplate`.
        max_length: at most this many tokens (truncation rules: module docstring). When
            the final answer has to be cut, the sequence ends without EOS (the model must not
            learn to stop there).
        max_turns: exchanges kept at most (the final one included), None = all.
        train_on: "all" trains every assistant answer kept, "last" only the final one.

    Returns:
        `(tokens, weights)`: lists of n <= max_length ints and floats; `weights[j]` is the
        weight of predicting token j (pipeline.pack_documents' convention): 1.0 on assistant
        answer tokens (not on the `小元：` cue) and on the final EOS, 0.0 elsewhere.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    answer = tokenizer.encode(dialogue.turns[-1].content)
    ids, flags, room = _fit_prompt(dialogue.turns[:-1], len(answer), tokenizer, template,
                                   max_length, max_turns)
    history = 1.0 if train_on == "all" else 0.0
    tokens = [tokenizer.bos_id] + ids
    weights = [0.0] + [history if f else 0.0 for f in flags]
    if len(answer) + 1 <= room:
        return tokens + answer + [tokenizer.eos_id], weights + [1.0] * (len(answer) + 1)
    return tokens + answer[:room], weights + [1.0] * room


def encode_comparison(comparison: Comparison, tokenizer,
                      template: ChatTemplate = ChatTemplate(), *, max_length: int,
                      max_turns: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The K reward-model sequences of a comparison: [bos] + prompt + answer + [eos] each.

    All K share one prompt, truncated for the longest answer (module docstring); an answer
    that still does not fit is cut on the right and EOS stays last, so the reward, read at
    index length-1, is always read at an EOS.

    Args:
        comparison: the `Comparison` (K responses).
        tokenizer: has encode, bos_id, eos_id, pad_id.
        template: the `ChatTemplate`.
        max_length: T, the row length (at least 3).
        max_turns: exchanges of the context kept at most, None = all.

    Returns:
        `(tokens, lengths, order)`: int32 [K, max_length] right-padded with the pad id,
        int32 [K] real lengths, int32 [K] `comparison.order` (indices, best first).
    """
    answers = [tokenizer.encode(r) for r in comparison.responses]
    ids, _, room = _fit_prompt(comparison.context, max(map(len, answers)), tokenizer,
                               template, max_length, max_turns)
    tokens = np.full((len(answers), max_length), tokenizer.pad_id, np.int32)
    lengths = np.zeros(len(answers), np.int32)
    for k, answer in enumerate(answers):
        seq = [tokenizer.bos_id] + ids + answer[:room - 1] + [tokenizer.eos_id]
        tokens[k, :len(seq)] = seq
        lengths[k] = len(seq)
    return tokens, lengths, np.asarray(comparison.order, np.int32)


def encode_prompt(prompt: Prompt, tokenizer, template: ChatTemplate = ChatTemplate(), *,
                  max_length: int, max_turns: int | None = None) -> list[int]:
    """[bos] + render_prompt(context), truncated to at most max_length ids (list of int).

    Where no truncation differs, the ids equal the prompt part of `encode_sft` and
    `encode_comparison` sequences of the same context (one span encoding), so a policy sees
    at rollout the ids it was trained on.

    Args:
        prompt: the `Prompt`.
        tokenizer: has encode and bos_id.
        template: the `ChatTemplate`.
        max_length: at most this many ids, BOS included (truncation: module docstring).
        max_turns: exchanges kept at most, None = all.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    turns = truncate_context(prompt.context, tokenizer, template, max_tokens=max_length - 1,
                             max_turns=max_turns)
    return [tokenizer.bos_id] + _encode(turns, tokenizer, template, cue=True)[0]


def collate_comparisons(examples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                        num_responses: int | None = None) -> dict[str, np.ndarray]:
    """Stacks `encode_comparison` outputs with different K into one batch.

    Args:
        examples: B tuples `(tokens [K_b, T], lengths [K_b], order [K_b])`, one T.
        num_responses: K, at least every K_b; None = the largest K_b.

    Returns:
        {"tokens": int32 [B, K, T] (pad id 0 in missing responses), "lengths": int32 [B, K]
        (0 = missing), "ranks": int32 [B, K] (rank of each response, 0 = best, -1 =
        missing)}. Response i beats j when both ranks are >= 0 and ranks[i] < ranks[j].
    """
    if not examples:
        raise ValueError("collate_comparisons needs at least one example")
    k_max = max(len(o) for _, _, o in examples) if num_responses is None else num_responses
    seq_len = examples[0][0].shape[1]
    tokens = np.zeros((len(examples), k_max, seq_len), np.int32)
    lengths = np.zeros((len(examples), k_max), np.int32)
    ranks = np.full((len(examples), k_max), -1, np.int32)
    for b, (tok, length, order) in enumerate(examples):
        if len(order) > k_max or tok.shape[1] != seq_len:
            raise ValueError(f"example {b} has shape {tok.shape}; expected at most {k_max} "
                             f"responses of length {seq_len}")
        tokens[b, :len(order)] = tok
        lengths[b, :len(order)] = length
        ranks[b, np.asarray(order)] = np.arange(len(order))
    return {"tokens": tokens, "lengths": lengths, "ranks": ranks}
