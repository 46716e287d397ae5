"""The built-in demo task: a generated Chinese/English corpus with structure a tiny model learns.

The corpus is built from a small fixed world (things and their colours, people and their
cities) and arithmetic facts, rendered by templates in both languages, as single-line
documents, multi-line documents and dialogues in the ChatYuan unified format
`用户：{question}\\n小元：{answer}` (full-width colon). Facts never contradict each other, so
a model that learns them lowers its loss on held-out documents.

The demo dialogue task (`write_demo_task`) asks the arithmetic questions in the dialogue
format: imperfect SFT demonstrations, comparisons ranked by a hidden rule, and PPO prompts.
`true_score` (answer correctness, with partial credit when close) is for evaluation only;
training sees only text and rankings.

Every generator takes a `random.Random` and is deterministic given it; `write_demo_corpus`
seeds one per split from a string, which Python hashes the same way on every version.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import re
from collections.abc import Callable, Iterator

import numpy as np

from instructjax.data import chat_encoding, formats, jsonl

USER_ROLE = "用户"
ASSISTANT_ROLE = "小元"

# (Chinese name, English name, Chinese colour, English colour)
_THINGS = (
    ("苹果", "apple", "红色", "red"),
    ("香蕉", "banana", "黄色", "yellow"),
    ("天空", "sky", "蓝色", "blue"),
    ("草地", "grass", "绿色", "green"),
    ("雪", "snow", "白色", "white"),
    ("煤炭", "coal", "黑色", "black"),
    ("橙子", "orange", "橙色", "orange"),
    ("葡萄", "grape", "紫色", "purple"),
)
# (Chinese name, English name, Chinese city, English city): person i lives in city i.
_PEOPLE = (
    ("小明", "Xiao Ming", "北京", "Beijing"),
    ("小红", "Xiao Hong", "上海", "Shanghai"),
    ("李雷", "Li Lei", "广州", "Guangzhou"),
    ("韩梅梅", "Han Meimei", "成都", "Chengdu"),
    ("王芳", "Wang Fang", "杭州", "Hangzhou"),
    ("张伟", "Zhang Wei", "西安", "Xi'an"),
)
_MAX_OPERAND = 9  # small enough for a ~1M-parameter model to learn every fact


# ---------------------------------------------------------------------------- arithmetic

@dataclasses.dataclass(frozen=True)
class ArithProblem:
    """`a op b` with op "+" or "-" (b <= a for "-", so answers are never negative)."""
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        """The correct result (an int >= 0)."""
        return self.a + self.b if self.op == "+" else self.a - self.b


def sample_arith_problem(rng: random.Random, max_operand: int = _MAX_OPERAND) -> ArithProblem:
    """A random addition or subtraction with operands in [0, max_operand]."""
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if rng.random() < 0.5:
        return ArithProblem(a, "+", b)
    return ArithProblem(max(a, b), "-", min(a, b))


def arith_fact(p: ArithProblem, lang: str, answer: int | None = None) -> str:
    """"3 加 5 等于 8。" / "3 plus 5 equals 8."; `answer` overrides the true answer."""
    result = p.answer if answer is None else answer
    if lang == "zh":
        return f"{p.a} {'加' if p.op == '+' else '减'} {p.b} 等于 {result}。"
    return f"{p.a} {'plus' if p.op == '+' else 'minus'} {p.b} equals {result}."


def arith_question(p: ArithProblem, lang: str) -> str:
    """"3 加 5 等于多少？" / "What is 3 plus 5?"."""
    if lang == "zh":
        return f"{p.a} {'加' if p.op == '+' else '减'} {p.b} 等于多少？"
    return f"What is {p.a} {'plus' if p.op == '+' else 'minus'} {p.b}?"


# ---------------------------------------------------------------------------- world facts

def _colour_fact(i: int, lang: str) -> str:
    zh, en, zh_colour, en_colour = _THINGS[i]
    return f"{zh}是{zh_colour}的。" if lang == "zh" else f"The {en} is {en_colour}."


def _colour_question(i: int, lang: str) -> str:
    zh, en, _, _ = _THINGS[i]
    return f"{zh}是什么颜色的？" if lang == "zh" else f"What colour is the {en}?"


def _city_fact(i: int, lang: str) -> str:
    zh, en, zh_city, en_city = _PEOPLE[i]
    return f"{zh}住在{zh_city}。" if lang == "zh" else f"{en} lives in {en_city}."


def _city_question(i: int, lang: str) -> str:
    zh, en, _, _ = _PEOPLE[i]
    return f"{zh}住在哪里？" if lang == "zh" else f"Where does {en} live?"


def _likes_fact(i: int, lang: str) -> str:
    # Person i likes thing (3 i mod 8): a fixed, learnable but non-trivial mapping.
    thing = _THINGS[(3 * i) % len(_THINGS)]
    zh, en = _PEOPLE[i][0], _PEOPLE[i][1]
    return f"{zh}喜欢{thing[0]}。" if lang == "zh" else f"{en} likes the {thing[1]}."


def _sample_fact(rng: random.Random, lang: str) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return _colour_fact(rng.randrange(len(_THINGS)), lang)
    if kind == 1:
        return _city_fact(rng.randrange(len(_PEOPLE)), lang)
    return _likes_fact(rng.randrange(len(_PEOPLE)), lang)


def sample_question_answer(rng: random.Random, lang: str) -> tuple[str, str]:
    """A (question, correct answer) pair: arithmetic, a thing's colour or a person's city."""
    kind = rng.randrange(3)
    if kind == 0:
        p = sample_arith_problem(rng)
        return arith_question(p, lang), arith_fact(p, lang)
    if kind == 1:
        i = rng.randrange(len(_THINGS))
        return _colour_question(i, lang), _colour_fact(i, lang)
    i = rng.randrange(len(_PEOPLE))
    return _city_question(i, lang), _city_fact(i, lang)


def render_dialogue(turns: list[tuple[str, str]], user: str = USER_ROLE,
                    assistant: str = ASSISTANT_ROLE) -> str:
    """`用户：q1\\n小元：a1\\n用户：q2\\n小元：a2` for turns [(q1, a1), (q2, a2)]."""
    return chat_encoding.render_dialogue(_turns(turns), chat_encoding.ChatTemplate(user, assistant))


# ---------------------------------------------------------------------------- documents

def _join(sentences: list[str], lang: str) -> str:
    return ("" if lang == "zh" else " ").join(sentences)


def _lang(rng: random.Random) -> str:
    return "zh" if rng.random() < 0.5 else "en"


def _doc_arithmetic(rng: random.Random) -> str:
    """Two to five arithmetic facts on one line, in one language."""
    lang = _lang(rng)
    return _join([arith_fact(sample_arith_problem(rng), lang)
                  for _ in range(rng.randint(2, 5))], lang)


def _doc_facts(rng: random.Random) -> str:
    """Two to four world facts on one line, in one language."""
    lang = _lang(rng)
    return _join([_sample_fact(rng, lang) for _ in range(rng.randint(2, 4))], lang)


def _doc_multiline(rng: random.Random) -> str:
    """A titled numbered list, or sentence-by-sentence translations, one per line."""
    if rng.random() < 0.5:
        lang = _lang(rng)
        title = "算术练习：" if lang == "zh" else "Arithmetic practice:"
        lines = [f"{n}. {arith_fact(sample_arith_problem(rng), lang)}"
                 for n in range(1, rng.randint(3, 6))]
        return "\n".join([title] + lines)
    lines = []
    for _ in range(rng.randint(1, 3)):
        state = rng.getstate()  # the same fact in both languages
        zh = _sample_fact(rng, "zh")
        rng.setstate(state)
        lines += [zh, _sample_fact(rng, "en")]
    return "\n".join(lines)


def _doc_dialogue(rng: random.Random) -> str:
    """One or two question/answer turns in the unified dialogue format."""
    lang = _lang(rng)
    return render_dialogue([sample_question_answer(rng, lang)
                            for _ in range(rng.randint(1, 2))])


# (generator, weight): the mixture documents are drawn from.
DOC_GENERATORS: tuple[tuple[Callable[[random.Random], str], float], ...] = (
    (_doc_arithmetic, 0.3),
    (_doc_facts, 0.25),
    (_doc_multiline, 0.2),
    (_doc_dialogue, 0.25),
)


def sample_document(rng: random.Random) -> str:
    """One demo document drawn from the `DOC_GENERATORS` mixture."""
    generators, weights = zip(*DOC_GENERATORS)
    return rng.choices(generators, weights=weights)[0](rng)


def _write_jsonl(path: str, records: list[dict]) -> None:
    # Per-process temporary name: processes of a multi-host run sharing a workdir may write
    # the same (identical) file at once; the atomic replace leaves one complete copy.
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp_path, path)


def write_demo_corpus(out_dir: str | os.PathLike, *, seed: int = 0,
                      num_train_docs: int = 5000, num_eval_docs: int = 200) -> dict[str, str]:
    """Writes the demo pretraining corpus as JSON-lines `{"text": ...}` files.

    The default size (5000 documents, ~145k tokens with a ~1k-piece demo tokenizer) lets a ~2M
    parameter model trained for ~300 steps of 16 x 128 tokens see every document a few
    times, which is enough for its held-out loss to fall far below the starting value.

    Args:
        out_dir: directory for the files (created if missing).
        seed: the same seed writes byte-identical files.
        num_train_docs: documents in the train split.
        num_eval_docs: documents in the eval split (drawn from a separate random stream).

    Returns:
        `{"train": path, "eval": path}`.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, count in (("train", num_train_docs), ("eval", num_eval_docs)):
        rng = random.Random(f"demo-corpus/{split}/{seed}")
        paths[split] = os.path.join(out_dir, f"demo_corpus_{split}.jsonl")
        _write_jsonl(paths[split], [{"text": sample_document(rng)} for _ in range(count)])
    return paths


def demo_text_iter(path: jsonl.PathSpec, text_field: str = "text") -> Iterator[str]:
    """Yields the text (str) of every record of JSON-lines files, e.g. to train a tokenizer.

    Raises:
        DataFormatError: naming file and line of a record without a str `text_field`.
    """
    for file_path, line_no, record in jsonl.read_jsonl(path):
        yield jsonl.require_field(record, text_field, file_path, line_no, str)


# ---------------------------------------------------------------------------- dialogue task
#
# The task: answer "a 加 b 等于多少？" / "What is a plus b?" in the dialogue format. Training
# data (SFT demonstrations, ranked comparisons, prompts) is text only; `true_score` checks
# the answer against the problem and is used only for evaluation.

_CORRECT_RATE = 0.65  # of SFT demonstration answers, like imperfect human demonstrations
_ANSWER_STYLES = {  # (style, weight); the first restates the problem like the corpus facts
    "zh": (("fact", 0.5), ("等于 {n}。", 0.2), ("答案是 {n}。", 0.15), ("{n}", 0.15)),
    "en": (("fact", 0.5), ("It equals {n}.", 0.2), ("The answer is {n}.", 0.15), ("{n}", 0.15)),
}
_NO_ANSWER = {"zh": ("我不知道。", "这个问题太难了。"), "en": ("I don't know.", "That is a hard one.")}
# Held-out problems: enough of them that the held-out score averages over many problems (with
# 10%, 15 problems, one problem answered differently moved the greedy score by ~0.07). With
# a quarter, the 200 held-out prompts ask all 39, 2-14 prompts each (subtractions with a != b
# are drawn twice as often as additions), so the greedy score still moves in steps of up to
# 0.07 per problem; the sampled score (several answers per prompt) is the smoother measure.
HELDOUT_FRACTION = 0.25
_COMPARISON_ERRORS = (1, 2, 3, 4, 5, 6, 8, 10)  # |answer - truth| of wrong candidates
_QUESTION_RES = (re.compile(r"(\d+) ([加减]) (\d+) 等于多少？"),
                 re.compile(r"What is (\d+) (plus|minus) (\d+)\?"))
# The answer number follows one of these markers ("7 加 9 等于 16。"); the last one wins, so
# an echoed question ("What is 3 plus 5? It equals 8.") is not read as the answer.
_MARKED_NUMBER_RE = re.compile(r"(?:等于|是|=|\bequals\b|\bis\b)\s*((?<!\d)-?\d+)")
_NUMBER_RE = re.compile(r"(?<!\d)-?\d+")


def _turns(pairs: list[tuple[str, str]]) -> tuple[formats.Turn, ...]:
    return tuple(formats.Turn(role, text) for q, a in pairs
                 for role, text in (("user", q), ("assistant", a)))


def arith_answer(p: ArithProblem, lang: str, value: int, style: str) -> str:
    """An answer text stating `value` for problem p in a style of `_ANSWER_STYLES[lang]`."""
    return arith_fact(p, lang, value) if style == "fact" else style.format(n=value)


def _sample_answer(rng: random.Random, p: ArithProblem, lang: str, value: int) -> str:
    styles, weights = zip(*_ANSWER_STYLES[lang])
    return arith_answer(p, lang, value, rng.choices(styles, weights=weights)[0])


def misquotes(p: ArithProblem, value: int) -> list[ArithProblem]:
    """Problems that change one operand of p so that their true answer is `value` (!= p's).

    "6 minus 3 equals 3." answers "What is 6 minus 2?" with a true fact about the wrong
    problem: the mistake a model that memorised the corpus facts makes when it is unsure.
    """
    a, b = p.a, p.b
    if p.op == "+":
        candidates = [ArithProblem(a, "+", value - a), ArithProblem(value - b, "+", b)]
    else:
        candidates = [ArithProblem(a, "-", a - value), ArithProblem(value + b, "-", b)]
    return [q for q in candidates if q != p and q.answer == value and
            0 <= min(q.a, q.b) and max(q.a, q.b) <= _MAX_OPERAND and (q.op == "+" or q.b <= q.a)]


def _wrong_answer(rng: random.Random, p: ArithProblem, lang: str, value: int) -> str:
    """A wrong answer stating `value`; a third of them misquote the problem (`misquotes`)."""
    options = misquotes(p, value)
    if options and rng.random() < 1 / 3:
        q = rng.choice(options)
        return arith_fact(q, lang)
    return _sample_answer(rng, p, lang, value)


def _correct_answer(rng: random.Random, p: ArithProblem, lang: str) -> str:
    return _sample_answer(rng, p, lang, p.answer)


def _demonstration(rng: random.Random, p: ArithProblem, lang: str) -> str:
    """A human-like answer: correct with probability 0.65, else off by 1 or 2."""
    if rng.random() < _CORRECT_RATE:
        return _correct_answer(rng, p, lang)
    error = rng.choice((-2, -1, 1, 2))
    value = p.answer + error if p.answer + error >= 0 else p.answer + abs(error)
    return _sample_answer(rng, p, lang, value)


def parse_problem(text: str) -> ArithProblem:
    """The problem of the LAST arithmetic question in a text (a question or rendered prompt).

    Raises:
        ValueError: the text asks no demo arithmetic question.
    """
    found = [m for regex in _QUESTION_RES for m in regex.finditer(text)]
    if not found:
        raise ValueError(f"no demo arithmetic question in {text[-80:]!r}")
    a, op, b = max(found, key=lambda m: m.start()).groups()
    return ArithProblem(int(a), "+" if op in ("加", "plus") else "-", int(b))


def parse_answer(response: str) -> int | None:
    """The answer number (int) of a response, None when it has no integer.

    It is the integer right after the last "等于", "是", "=", "equals" or "is" followed by
    one ("7 加 9 等于 16。" -> 16), else the first integer ("16" -> 16).
    """
    marked = _MARKED_NUMBER_RE.findall(response)
    if marked:
        return int(marked[-1])
    first = _NUMBER_RE.search(response)
    return int(first.group()) if first else None


def true_score(prompt: str | ArithProblem | formats.Prompt, response: str) -> float:
    """The hidden task score of a response, in [0, 1].

    1.0 for the correct answer; partial credit (5 - |error|) / 10 for a close one (0.4
    off by 1 down to 0.1 off by 4); 0.0 when off by 5 or more or when the response has no
    number (`parse_answer`). Training never sees it.

    Args:
        prompt: the problem, or a text / `formats.Prompt` whose last question is parsed.
        response: the assistant's answer text.
    """
    if isinstance(prompt, formats.Prompt):
        prompt = prompt.context[-1].content
    problem = prompt if isinstance(prompt, ArithProblem) else parse_problem(prompt)
    value = parse_answer(response)
    if value is None:
        return 0.0
    error = abs(value - problem.answer)
    return 1.0 if error == 0 else max(0.0, (5 - error) / 10)


def score_responses(prompts: list, responses: list[str]) -> np.ndarray:
    """`true_score` of each (prompt, response) pair: float32 [N] for N prompts and responses."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return np.asarray([true_score(p, r) for p, r in zip(prompts, responses)], np.float32)


def rank_key(problem: ArithProblem, response: str) -> tuple[float, int]:
    """Sort key of the hidden ranking rule: |error| (no number: infinite), then length."""
    value = parse_answer(response)
    return (float("inf") if value is None else abs(value - problem.answer), len(response))


def _all_problems() -> list[ArithProblem]:
    return [ArithProblem(a, op, b) for a in range(_MAX_OPERAND + 1)
            for b in range(_MAX_OPERAND + 1) for op in "+-" if op == "+" or b <= a]


def _heldout_problems(seed: int) -> frozenset[ArithProblem]:
    """A quarter of all problems (39 of 155), never used by the training splits of the task."""
    problems = _all_problems()
    return frozenset(random.Random(f"demo-task/heldout/{seed}").sample(
        problems, round(len(problems) * HELDOUT_FRACTION)))


def _problem(rng: random.Random, heldout: frozenset[ArithProblem], want_heldout: bool
             ) -> ArithProblem:
    while True:
        p = sample_arith_problem(rng)
        if (p in heldout) == want_heldout:
            return p


def _history(rng: random.Random, heldout, lang: str, answer) -> list[tuple[str, str]]:
    """0-2 earlier exchanges (60% none, 30% one, 10% two), answered by `answer(rng, p, lang)`."""
    n = rng.choices((0, 1, 2), weights=(0.6, 0.3, 0.1))[0]
    return [(arith_question(p, lang), answer(rng, p, lang))
            for p in (_problem(rng, heldout, False) for _ in range(n))]


def _context_record(pairs: list[tuple[str, str]], question: str) -> dict:
    if not pairs:
        return {"prompt": question}
    return {"messages": [{"role": t.role, "content": t.content}
                         for t in _turns(pairs) + (formats.Turn("user", question),)]}


def _sft_record(rng: random.Random, heldout) -> dict:
    lang = _lang(rng)
    pairs = _history(rng, heldout, lang, _demonstration)
    p = _problem(rng, heldout, False)
    pairs.append((arith_question(p, lang), _demonstration(rng, p, lang)))
    return {"messages": [{"role": t.role, "content": t.content} for t in _turns(pairs)]}


def _comparison_record(rng: random.Random, heldout) -> dict:
    """K = 4 answers with distinct |error| (correct in 70%), ranked by `rank_key`."""
    lang = _lang(rng)
    pairs = _history(rng, heldout, lang, _correct_answer)
    p = _problem(rng, heldout, False)
    # Off-by-1 and off-by-2 answers are in every comparison: they are the mistakes the SFT
    # policy makes (like its demonstrations), so the reward model must separate them from
    # the correct answer for PPO to learn anything (InstructGPT ranks the policy's own samples).
    errors = [1, 2, rng.choice(_COMPARISON_ERRORS[2:])] + [0 if rng.random() < 0.7 else
                                                          rng.choice((7, 9, 12))]
    responses = []
    for e in errors:
        value = p.answer + rng.choice((-e, e))
        value = value if value >= 0 else p.answer + e
        responses.append(_sample_answer(rng, p, lang, value) if e == 0
                         else _wrong_answer(rng, p, lang, value))
    if rng.random() < 0.15:  # sometimes a refusal without a number: ranked last
        responses[0] = rng.choice(_NO_ANSWER[lang])
    rng.shuffle(responses)
    order = sorted(range(len(responses)), key=lambda i: rank_key(p, responses[i]) + (i,))
    ranking = [order.index(i) for i in range(len(responses))]
    return dict(_context_record(pairs, arith_question(p, lang)), responses=responses,
                ranking=ranking)


def _prompt_record(rng: random.Random, heldout, want_heldout: bool) -> dict:
    lang = _lang(rng)
    pairs = _history(rng, heldout, lang, _correct_answer)
    return _context_record(pairs, arith_question(_problem(rng, heldout, want_heldout), lang))


def write_demo_task(out_dir: str | os.PathLike, *, seed: int = 0, num_sft: int = 3000,
                    num_comparisons: int = 6000, num_prompts: int = 1000, num_eval: int = 200,
                    num_heldout: int = 200) -> dict[str, str]:
    """Writes the demo dialogue task (arithmetic questions) as JSON-lines files.

    Files (formats: `formats` module docstring), each split from its own random stream:
      sft_train / sft_eval: `{"messages"}` dialogues, 40% with 1-2 earlier exchanges; every
          assistant answer is a demonstration: correct with probability 0.65, else off by 1
          or 2, in mixed styles ("7 加 9 等于 16。", "答案是 16。", "16", ...).
      comparisons_train / comparisons_eval: `{"prompt" | "messages", "responses",
          "ranking"}` with K = 4 answers of distinct |error| (one correct in 70% of them, a
          numberless refusal in 15%), ranked by `rank_key`: smaller |error| first, no
          number last; |errors| are distinct, so there are no ties.
      prompts_train / prompts_eval: `{"prompt"}` or `{"messages"}` PPO prompts (earlier
          exchanges answered correctly).
      prompts_heldout: prompts whose final question is one of the `HELDOUT_FRACTION` (a
          quarter) of all problems that no other file asks (the pretraining corpus may
          state them as facts).

    The default sizes suit a ~1M-parameter model on 2 CPU cores (a few minutes of SFT).
    With 6000 comparisons the tiny reward model (600 steps of 16) sees each about 1.6 times;
    with 2000 (5 epochs) it overfit: held-out pairwise accuracy 0.90 instead of 0.94, and
    0.83 instead of 0.84 on pairs of the SFT policy's own samples that differ in correctness.

    Args:
        out_dir: directory for the files (created if missing).
        seed: the same seed writes byte-identical files.
        num_sft, num_comparisons, num_prompts: train records of each kind.
        num_eval: records of each eval split; num_heldout: held-out prompts.

    Returns:
        {"sft_train", "sft_eval", "comparisons_train", "comparisons_eval", "prompts_train",
        "prompts_eval", "prompts_heldout"} -> path.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    heldout = _heldout_problems(seed)
    plans = {
        "sft_train": (num_sft, _sft_record), "sft_eval": (num_eval, _sft_record),
        "comparisons_train": (num_comparisons, _comparison_record),
        "comparisons_eval": (num_eval, _comparison_record),
        "prompts_train": (num_prompts, functools.partial(_prompt_record, want_heldout=False)),
        "prompts_eval": (num_eval, functools.partial(_prompt_record, want_heldout=False)),
        "prompts_heldout": (num_heldout, functools.partial(_prompt_record, want_heldout=True)),
    }
    paths = {}
    for name, (count, make) in plans.items():
        rng = random.Random(f"demo-task/{name}/{seed}")
        paths[name] = os.path.join(out_dir, f"demo_{name}.jsonl")
        _write_jsonl(paths[name], [make(rng, heldout) for _ in range(count)])
    return paths
