"""The built-in demo pretraining corpus: generated Chinese/English text a tiny model can learn.

The corpus is built from a small fixed world (things and their colours, people and their
cities) and arithmetic facts (`demo_arithmetic`), rendered by templates in both languages,
as single-line documents, multi-line documents and dialogues in the ChatYuan unified format
`用户：{question}\\n小元：{answer}` (full-width colon). Facts never contradict each other, so
a model that learns them lowers its loss on held-out documents.

Every generator takes a `random.Random` and is deterministic given it; `write_demo_corpus`
seeds one per split from a string, which Python hashes the same way on every version.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

from instructjax.data import chat_encoding, jsonl
from instructjax.data.demo_arithmetic import (arith_fact, arith_question, exchange_turns,
                                              sample_arith_problem, sample_lang)

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
    return chat_encoding.render_dialogue(exchange_turns(turns),
                                         chat_encoding.ChatTemplate(user, assistant))


# ---------------------------------------------------------------------------- documents

def _join(sentences: list[str], lang: str) -> str:
    return ("" if lang == "zh" else " ").join(sentences)


def _doc_arithmetic(rng: random.Random) -> str:
    """Two to five arithmetic facts on one line, in one language."""
    lang = sample_lang(rng)
    return _join([arith_fact(sample_arith_problem(rng), lang)
                  for _ in range(rng.randint(2, 5))], lang)


def _doc_facts(rng: random.Random) -> str:
    """Two to four world facts on one line, in one language."""
    lang = sample_lang(rng)
    return _join([_sample_fact(rng, lang) for _ in range(rng.randint(2, 4))], lang)


def _doc_multiline(rng: random.Random) -> str:
    """A titled numbered list, or sentence-by-sentence translations, one per line."""
    if rng.random() < 0.5:
        lang = sample_lang(rng)
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
    lang = sample_lang(rng)
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
        jsonl.write_jsonl(paths[split], [{"text": sample_document(rng)} for _ in range(count)])
    return paths
