"""The built-in demo task: a generated Chinese/English corpus with structure a tiny model learns.

The corpus is built from a small fixed world (things and their colours, people and their
cities) and arithmetic facts, rendered by templates in both languages, as single-line
documents, multi-line documents and dialogues in the ChatYuan unified format
`用户：{question}\\n小元：{answer}` (full-width colon). Facts never contradict each other, so
a model that learns them lowers its loss on held-out documents; the arithmetic and
question/answer pieces are reused by the demo dialogue task (true score = correctness).

Every generator takes a `random.Random` and is deterministic given it; `write_demo_corpus`
seeds one per split from a string, which Python hashes the same way on every version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterator

from instructjax.data import jsonl

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
_MAX_OPERAND = 20


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
    return "\n".join(f"{user}：{q}\n{assistant}：{a}" for q, a in turns)


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
    tmp_path = path + ".tmp"
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
