"""The arithmetic both demo data sets are about: problems, and their Chinese and English texts.

The pretraining corpus (`demo_corpus`) states these problems as facts ("3 加 5 等于 8。"); the
dialogue task (`demo_task`) asks them as questions ("What is 3 plus 5?") and scores the
answers. Both draw problems, languages and question/answer turns from here, so that a fact
the corpus states is word for word the answer the task wants.

Every sampler takes a `random.Random` and is deterministic given it.
"""

from __future__ import annotations

import dataclasses
import random

from instructjax.data import formats

MAX_OPERAND = 9  # small enough for a ~1M-parameter model to learn every fact


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


def sample_arith_problem(rng: random.Random, max_operand: int = MAX_OPERAND) -> ArithProblem:
    """A random addition or subtraction with operands in [0, max_operand]."""
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if rng.random() < 0.5:
        return ArithProblem(a, "+", b)
    return ArithProblem(max(a, b), "-", min(a, b))


def all_problems() -> list[ArithProblem]:
    """Every problem with operands in [0, MAX_OPERAND]: 100 additions + 55 subtractions."""
    return [ArithProblem(a, op, b) for a in range(MAX_OPERAND + 1)
            for b in range(MAX_OPERAND + 1) for op in "+-" if op == "+" or b <= a]


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


def sample_lang(rng: random.Random) -> str:
    """"zh" or "en", each with probability 0.5: the language of one demo text."""
    return "zh" if rng.random() < 0.5 else "en"


def exchange_turns(pairs: list[tuple[str, str]]) -> tuple[formats.Turn, ...]:
    """[(question, answer), ...] -> the turns user, assistant, user, assistant, ..."""
    return tuple(formats.Turn(role, text) for q, a in pairs
                 for role, text in (("user", q), ("assistant", a)))
