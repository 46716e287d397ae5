"""The demo dialogue task: arithmetic questions, its training data, and its hidden true score.

The task: answer "a 加 b 等于多少？" / "What is a plus b?" (`demo_arithmetic`) in the ChatYuan
dialogue format. `write_demo_task` writes its data: imperfect SFT demonstrations, comparisons
ranked by a hidden rule (`rank_key`), and PPO prompts. That data is text only; `true_score`
(answer correctness, with partial credit when close) checks an answer against the problem
and is for evaluation only: training sees only text and rankings.

Every split is drawn from its own `random.Random`, seeded from a string (which Python hashes
the same way on every version), so the same seed writes byte-identical files.
"""

from __future__ import annotations

import functools
import os
import random
import re

import numpy as np

from instructjax.data import formats, jsonl
from instructjax.data.demo_arithmetic import (MAX_OPERAND, ArithProblem, all_problems,
                                              arith_fact, arith_question, exchange_turns,
                                              sample_arith_problem, sample_lang)

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
            0 <= min(q.a, q.b) and max(q.a, q.b) <= MAX_OPERAND and (q.op == "+" or q.b <= q.a)]


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


def _heldout_problems(seed: int) -> frozenset[ArithProblem]:
    """A quarter of all problems (39 of 155), never used by the training splits of the task."""
    problems = all_problems()
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
                         for t in exchange_turns(pairs) + (formats.Turn("user", question),)]}


def _sft_record(rng: random.Random, heldout) -> dict:
    lang = sample_lang(rng)
    pairs = _history(rng, heldout, lang, _demonstration)
    p = _problem(rng, heldout, False)
    pairs.append((arith_question(p, lang), _demonstration(rng, p, lang)))
    return {"messages": [{"role": t.role, "content": t.content} for t in exchange_turns(pairs)]}


def _comparison_record(rng: random.Random, heldout) -> dict:
    """K = 4 answers with distinct |error| (correct in 70%), ranked by `rank_key`."""
    lang = sample_lang(rng)
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
    lang = sample_lang(rng)
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
        jsonl.write_jsonl(paths[name], [make(rng, heldout) for _ in range(count)])
    return paths
