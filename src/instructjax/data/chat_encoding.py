"""Chat rendering (ChatYuan here, Hugging Face Jinja templates in `chat_template`), truncation
and token encoding of `formats` records.

Legend: K responses per comparison, T max_length.

The records (`Turn`, `Dialogue`, `Comparison`, `Prompt`) and the JSON formats they are parsed
from are in `formats`.

Rendering (ChatYuan's unified text, `ChatTemplate` defaults): turns `用户：{q}` and `小元：{a}`
joined by "\\n"; a prompt ends with the cue `小元：` (no trailing space), e.g.
`用户：你好\\n小元：你好！\\n用户：1 加 2 等于多少？\\n小元：`. A system turn renders as its
content alone (or `{system}：{content}` when the template names a system role).

Templates: the encoders take any object with `spans(turns, cue) -> [(text, is_answer)]`,
`answer_text(context, content) -> str` and `cue`: `ChatTemplate` here, or
`chat_template.JinjaChatTemplate` (a model's own template; its answer spans end with the
end-of-turn marker, e.g. <|im_end|>).

Tokens: a rendered text is encoded as the concatenation of the encodings of its maximal
non-answer spans and of each answer (spans after the first with the tokenizer's
`encode_continuation` where it has one, so a dummy-prefix tokenizer adds no space at span
boundaries; ours adds none anyway, so this decodes to the whole text). Answer tokens are then
exactly the loss tokens, and a prompt encodes the same way in SFT, reward-model and PPO
sequences.

BOS and EOS: a sequence starts with the tokenizer's BOS when it has one and adds it
(`add_bos`; not Qwen, which has none); a template that renders the BOS token itself (LLaMA 3,
Mistral) provides it, and no second one is added. An answer span that already ends with an
EOS id (the template's end-of-turn marker: <|im_end|>, <|eot_id|>, </s>) closes the sequence
with it; otherwise the tokenizer's EOS is appended (ChatYuan).

Truncation (`truncate_context`): keep the last `max_turns` exchanges (an exchange is a user
turn with the assistant answer after it; the final, unanswered user turn counts as one), then
drop the oldest exchanges until the rendered prompt with its cue fits; then drop the system
turn; if the last user turn alone is still too long, cut its text from the LEFT (the end holds
the question). The cue is never cut. With an answer (SFT, comparisons), when prompt and answer
do not both fit, the answer is cut on the right as far as needed to leave the prompt at least
half of the room, or all of it if the prompt is shorter; the prompt is truncated to the rest.

Over-long records are truncated, never refused: a prompt far longer than the context (a
10 MB question included) is cut as above at the cost of a few encodings of it. Truncation is
counted where the caller asks: `encode_sft`, `encode_comparison` and `encode_prompt` take
`on_truncate`, called once per record that had to be cut by the token budget with what was
cut, e.g. "prompt cut from 5000 to 61 tokens; answer cut from 90 to 2 tokens (no EOS)"
(dropping exchanges beyond `max_turns` is configured, not counted).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from instructjax.data.formats import Comparison, Dialogue, Prompt, Turn, check_turns

TRAIN_ON = ("all", "last")  # encode_sft: loss on every assistant turn, or the last one only
# A sentencepiece piece spans at most this many characters (its trainer's default
# max_sentencepiece_length), so a text of more than 16 * n characters never fits in n
# tokens: the left cut of an over-long question starts its search there.
_MAX_CHARS_PER_TOKEN = 16


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

    def spans(self, turns: Sequence[Turn], cue: bool) -> list[tuple[str, bool]]:
        """The rendered text (ending with the cue when `cue`) as (text, is_answer) spans:
        answer spans are assistant contents; maximal non-answer spans are merged."""
        spans: list[tuple[str, bool]] = []

        def add(text: str, is_answer: bool) -> None:
            if spans and not is_answer and not spans[-1][1]:
                spans[-1] = (spans[-1][0] + text, False)
            else:
                spans.append((text, is_answer))

        for i, turn in enumerate(turns):
            lead = self.sep if i else ""
            if turn.role == "assistant":
                add(lead + self.cue, False)
                add(turn.content, True)
            elif turn.role == "user":
                add(lead + self.user + self.colon + turn.content, False)
            else:
                name = self.system + self.colon if self.system else ""
                add(lead + name + turn.content, False)
        if cue:
            add((self.sep if turns else "") + self.cue, False)
        return spans

    def answer_text(self, context: Sequence[Turn], content: str) -> str:
        """The answer span of a reply after `context`: the content itself (str)."""
        del context  # the ChatYuan answer does not depend on the dialogue before it
        return content


class Template(Protocol):
    """What the encoders need of a template: `ChatTemplate`, `chat_template.JinjaChatTemplate`."""
    cue: str

    def spans(self, turns: Sequence[Turn], cue: bool) -> list[tuple[str, bool]]: ...

    def answer_text(self, context: Sequence[Turn], content: str) -> str: ...


def _spans(turns: Sequence[Turn], template: Template, cue: bool) -> list[tuple[str, bool]]:
    """`template.spans(turns, cue)`: the rendered text as (text, is_answer) spans."""
    return template.spans(turns, cue)


def render_dialogue(turns: Sequence[Turn], template: Template = ChatTemplate()) -> str:
    """`用户：q1\\n小元：a1\\n用户：q2\\n小元：a2` (str) for the given turns."""
    return "".join(text for text, _ in _spans(turns, template, cue=False))


def render_prompt(context: Sequence[Turn], template: Template = ChatTemplate()) -> str:
    """The context rendered and followed by the cue: `...\\n用户：q\\n小元：` (str)."""
    return "".join(text for text, _ in _spans(context, template, cue=True))


# ------------------------------------------------------------------------------ encoding

def _continue(tokenizer) -> Callable[[str], list[int]]:
    """The tokenizer's encoding of text that follows other text (no dummy-prefix space)."""
    return getattr(tokenizer, "encode_continuation", tokenizer.encode)


def _encode_turns(turns: Sequence[Turn], tokenizer, template: Template, cue: bool
                  ) -> tuple[list[int], list[bool], list[int]]:
    """(ids, is_answer flags, start) of the rendered turns: ids without BOS/EOS, `start` the
    BOS ids the sequence opens with ([bos] or []).

    A template that renders the BOS token itself (LLaMA 3, Mistral) yields it as the first
    id: it is moved to `start`, so no second BOS is added and token budgets count it as BOS.
    Otherwise `start` is [bos] when the tokenizer has a BOS and adds it (not Qwen).
    """
    ids: list[int] = []
    is_answer: list[bool] = []
    for k, (text, answer) in enumerate(template.spans(turns, cue)):
        piece = (_continue(tokenizer) if k else tokenizer.encode)(text)
        ids += piece
        is_answer += [answer] * len(piece)
    bos = tokenizer.bos_id
    if bos is not None and ids[:1] == [bos]:
        return ids[1:], is_answer[1:], [bos]
    return ids, is_answer, [bos] if bos is not None and getattr(tokenizer, "add_bos", True) else []


def _encode(turns: Sequence[Turn], tokenizer, template: Template, cue: bool
            ) -> tuple[list[int], list[bool]]:
    """Token ids (no BOS/EOS) of the rendered turns and whether each is an answer token."""
    return _encode_turns(turns, tokenizer, template, cue)[:2]


def _encode_answer(context: Sequence[Turn], content: str, tokenizer, template: Template
                   ) -> tuple[list[int], int]:
    """(ids of a reply's answer span without its closing EOS, the closing EOS id).

    A template whose answer span ends with an end-of-turn marker that is an EOS id
    (<|im_end|>, <|eot_id|>, </s>) closes with that id; otherwise with the tokenizer's EOS.
    """
    ids = _continue(tokenizer)(template.answer_text(context, content))
    if ids and ids[-1] in getattr(tokenizer, "eos_ids", (tokenizer.eos_id,)):
        return ids[:-1], ids[-1]
    return ids, tokenizer.eos_id


def _min_true(lo: int, hi: int, pred: Callable[[int], bool]) -> int:
    """Smallest x in [lo, hi] with pred(x), for pred monotone and pred(hi) True."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def truncate_context(context: Sequence[Turn], tokenizer, template: Template, *,
                     max_tokens: int | None, max_turns: int | None = None) -> tuple[Turn, ...]:
    """The context cut so that `render_prompt` of it encodes to at most max_tokens ids.

    Rules (module docstring): last `max_turns` exchanges; then oldest exchanges dropped; then
    the system turn; then the last user turn's text cut from the left. Token counts use the
    span encoding of `encode_prompt` without BOS.

    Args:
        context: turns ending with a user turn (e.g. `Prompt.context`).
        tokenizer: has `encode(str) -> list[int]`.
        template: the `ChatTemplate` or `chat_template.JinjaChatTemplate`.
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
    check_turns(context, "user", "a context")
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
    if len(starts) > 1 and fits(last):  # with one exchange, last is kept: known not to fit
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

    def cut_fits(k: int) -> bool:
        return fits(with_text(k))

    # Encoding a huge question ~log2(len) times would take seconds; a cut at or before this
    # bound leaves too many characters to fit, so only the tail is searched (and if a
    # tokenizer with longer pieces makes the bound fit after all, the range before it).
    bound = max(0, len(question) - _MAX_CHARS_PER_TOKEN * (max_tokens + 1))
    if bound and not cut_fits(bound):
        return with_text(_min_true(bound, len(question), cut_fits))
    return with_text(_min_true(0, bound or len(question), cut_fits))


OnTruncate = Callable[[str], None] | None  # gets what was cut in one record


class TruncationLog:
    """An `on_truncate` callback for a stage: counts cut records and says so as it goes.

    Prints one line at the 1st, 2nd, 4th, 8th, ... cut (never a line per record), naming the
    stage, the budget (e.g. "data.seq_len=128") and the first cut. Records are counted each
    time they are read, so a record cut in every epoch counts once per epoch. Thread-safe (the
    data pipeline encodes in a reader thread) and picklable (a copy counts on its own).
    """

    def __init__(self, stage: str, budget: str, *, echo: bool = True):
        self.stage, self.budget, self.echo = stage, budget, echo
        self.count, self.first = 0, None
        self._lock = threading.Lock()

    def __call__(self, detail: str) -> None:
        with self._lock:
            self.count += 1
            self.first = self.first or detail
            count = self.count
        if self.echo and count & (count - 1) == 0:  # a power of two
            print(f"warning: [{self.stage}] {count} record(s) cut so far to fit {self.budget} "
                  f"(first: {self.first})", flush=True)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _report(on_truncate: OnTruncate, cuts: Sequence[str]) -> None:
    """One call of `on_truncate` per record, with everything that was cut in it."""
    if cuts and on_truncate is not None:
        on_truncate("; ".join(cuts))


def _fit_prompt(context: Sequence[Turn], answer_len: int, tokenizer, template: Template,
                max_length: int, max_turns: int | None, cuts: list[str]
                ) -> tuple[list[int], list[bool], int, list[int]]:
    """(prompt ids, is_answer flags, room for answer + EOS, BOS ids) under the answer/prompt
    split; appends "prompt cut from A to B tokens" to `cuts` when the prompt was cut."""
    turns = truncate_context(context, tokenizer, template, max_tokens=None, max_turns=max_turns)
    ids, flags, start = _encode_turns(turns, tokenizer, template, cue=True)
    room = max_length - len(start)  # after BOS
    if room < 2:
        raise ValueError(f"max_length must be at least {2 + len(start)}, got {max_length}")
    if len(ids) + answer_len + 1 > room:
        budget = max(room - answer_len - 1, min(len(ids), (room - 1) // 2))
        full = len(ids)
        turns = truncate_context(turns, tokenizer, template, max_tokens=budget)
        ids, flags = _encode(turns, tokenizer, template, cue=True)
        if len(ids) < full:
            cuts.append(f"prompt cut from {full} to {len(ids)} tokens")
    return ids, flags, room - len(ids), start


def encode_sft(dialogue: Dialogue, tokenizer, template: Template = ChatTemplate(), *,
               max_length: int, max_turns: int | None = None, train_on: str = "all",
               on_truncate: OnTruncate = None) -> tuple[list[int], list[float]]:
    """Tokens and loss weights of one SFT dialogue: [bos] + rendered dialogue + [eos].

    BOS and EOS follow the template and tokenizer (module docstring): no BOS for a tokenizer
    without one (Qwen), the template's own BOS when it renders one; the final answer closes
    with the template's end-of-turn marker when that is an EOS id (<|im_end|>), else EOS.

    Args:
        dialogue: the `Dialogue`; its last turn is the answer trained on.
        tokenizer: has encode, bos_id, eos_id (and optionally encode_continuation, eos_ids,
            add_bos: `tokenizer.load_tokenizer`'s tokenizers).
        template: the `ChatTemplate` or `chat_template.JinjaChatTemplate`.
        max_length: at most this many tokens (truncation rules: module docstring). When
            the final answer has to be cut, the sequence ends without EOS (the model must not
            learn to stop there).
        max_turns: exchanges kept at most (the final one included), None = all.
        train_on: "all" trains every assistant answer kept, "last" only the final one.
        on_truncate: called once with what was cut when prompt or answer had to be cut.

    Returns:
        `(tokens, weights)`: lists of n <= max_length ints and floats; `weights[j]` is the
        weight of predicting token j (packing.pack_documents' convention): 1.0 on assistant
        answer tokens (not on the `小元：` cue) and on the final EOS, 0.0 elsewhere.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    answer, eos = _encode_answer(dialogue.turns[:-1], dialogue.turns[-1].content, tokenizer,
                                 template)
    cuts: list[str] = []
    ids, flags, room, start = _fit_prompt(dialogue.turns[:-1], len(answer), tokenizer,
                                          template, max_length, max_turns, cuts)
    history = 1.0 if train_on == "all" else 0.0
    tokens = start + ids
    weights = [0.0] * len(start) + [history if f else 0.0 for f in flags]
    if len(answer) + 1 > room:
        cuts.append(f"answer cut from {len(answer)} to {room} tokens (no EOS)")
    _report(on_truncate, cuts)
    if len(answer) + 1 <= room:
        return tokens + answer + [eos], weights + [1.0] * (len(answer) + 1)
    return tokens + answer[:room], weights + [1.0] * room


def encode_comparison(comparison: Comparison, tokenizer,
                      template: Template = ChatTemplate(), *, max_length: int,
                      max_turns: int | None = None, on_truncate: OnTruncate = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The K reward-model sequences of a comparison: [bos] + prompt + answer + [eos] each.

    All K share one prompt, truncated for the longest answer (module docstring); an answer
    that still does not fit is cut on the right and EOS stays last, so the reward, read at
    index length-1, is always read at an EOS (the template's end-of-turn id where it is one,
    as in `encode_sft`).

    Args:
        comparison: the `Comparison` (K responses).
        tokenizer: has encode, bos_id, eos_id, pad_id (see `encode_sft`).
        template: the `ChatTemplate` or `chat_template.JinjaChatTemplate`.
        max_length: T, the row length (at least 3).
        max_turns: exchanges of the context kept at most, None = all.
        on_truncate: called once with what was cut when the prompt or a response was cut.

    Returns:
        `(tokens, lengths, order)`: int32 [K, max_length] right-padded with the pad id,
        int32 [K] real lengths, int32 [K] `comparison.order` (indices, best first).
    """
    answers = [_encode_answer(comparison.context, r, tokenizer, template)
               for r in comparison.responses]
    cuts: list[str] = []
    ids, _, room, start = _fit_prompt(comparison.context, max(len(a) for a, _ in answers),
                                      tokenizer, template, max_length, max_turns, cuts)
    tokens = np.full((len(answers), max_length), tokenizer.pad_id, np.int32)
    lengths = np.zeros(len(answers), np.int32)
    for k, (answer, eos) in enumerate(answers):
        if len(answer) > room - 1:
            cuts.append(f"response {k} cut from {len(answer)} to {room - 1} tokens")
        seq = start + ids + answer[:room - 1] + [eos]
        tokens[k, :len(seq)] = seq
        lengths[k] = len(seq)
    _report(on_truncate, cuts)
    return tokens, lengths, np.asarray(comparison.order, np.int32)


def encode_prompt(prompt: Prompt, tokenizer, template: Template = ChatTemplate(), *,
                  max_length: int, max_turns: int | None = None,
                  on_truncate: OnTruncate = None) -> list[int]:
    """[bos] + render_prompt(context), truncated to at most max_length ids (list of int).

    Where no truncation differs, the ids equal the prompt part of `encode_sft` and
    `encode_comparison` sequences of the same context (one span encoding), so a policy sees
    at rollout the ids it was trained on. BOS as in `encode_sft`.

    Args:
        prompt: the `Prompt`.
        tokenizer: has encode and bos_id (see `encode_sft`).
        template: the `ChatTemplate` or `chat_template.JinjaChatTemplate`.
        max_length: at most this many ids, BOS included (truncation: module docstring).
        max_turns: exchanges kept at most, None = all.
        on_truncate: called once with what was cut when the prompt had to be cut.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    turns = truncate_context(prompt.context, tokenizer, template, max_tokens=None,
                             max_turns=max_turns)
    ids, _, start = _encode_turns(turns, tokenizer, template, cue=True)
    if len(ids) > max_length - len(start):
        full = len(ids)
        turns = truncate_context(turns, tokenizer, template, max_tokens=max_length - len(start))
        ids = _encode(turns, tokenizer, template, cue=True)[0]
        _report(on_truncate, [f"prompt cut from {full} to {len(ids)} tokens"])
    return start + ids


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


def _visible_text(ids: Sequence[int], tokenizer) -> str:
    """Text of `ids` with special tokens spelled out (decode drops them)."""
    out, run = [], []
    for token in ids:
        if tokenizer.decode([token]) == "" and tokenizer.token_text(token):
            out.append(tokenizer.decode(run))
            out.append(tokenizer.token_text(token))
            run = []
        else:
            run.append(token)
    return "".join(out) + tokenizer.decode(run)


def describe_encoding(tokens: Sequence[int], weights: Sequence[float], tokenizer) -> str:
    """A sequence as the model reads it, the trained tokens (weight > 0) inside ⟦ ⟧.

    For the eye, and for tests that check which template and mask a stage used: special
    tokens (BOS, <|im_start|>, EOS) are spelled out instead of dropped.
    """
    parts: list[str] = []
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or (weights[i] > 0) != (weights[start] > 0):
            text = _visible_text(tokens[start:i], tokenizer)
            parts.append(f"⟦{text}⟧" if weights[start] > 0 else text)
            start = i
    return "".join(parts)
