"""Tests for the demo dialogue task in data/demo_task.py: files, hidden ranking, true score
(and the demo corpus's dialogues, data/demo_corpus.py, which must score as correct)."""

import collections
import random
import re

import numpy as np
import pytest

from instructjax.data import chat_encoding, demo_arithmetic, demo_corpus, demo_task
from instructjax.data import dialogue_sources, formats

KINDS = {"sft_train": "sft", "sft_eval": "sft", "comparisons_train": "comparison",
         "comparisons_eval": "comparison", "prompts_train": "prompt", "prompts_eval": "prompt",
         "prompts_heldout": "prompt"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    paths = demo_task.write_demo_task(tmp_path_factory.mktemp("task"), seed=0)
    return paths, {name: dialogue_sources.read_records(path, KINDS[name])[0]
                   for name, path in paths.items()}


def _exchanges(dialogue):
    return [(dialogue.turns[i].content, dialogue.turns[i + 1].content)
            for i in range(0, len(dialogue.turns), 2)]


def test_files_parse_with_the_intended_sizes(task):
    paths, records = task
    assert set(paths) == set(KINDS)
    assert {name: len(r) for name, r in records.items()} == {
        "sft_train": 3000, "sft_eval": 200, "comparisons_train": 6000,
        "comparisons_eval": 200, "prompts_train": 1000, "prompts_eval": 200,
        "prompts_heldout": 200}
    turns = collections.Counter(len(d.turns) // 2 for d in records["sft_train"])
    assert 0.5 < turns[1] / 3000 < 0.7 and turns[2] > 600 and turns[3] > 150
    assert all(len(c.responses) == 4 for c in records["comparisons_train"])
    assert any(len(p.context) > 1 for p in records["prompts_train"])


def test_sft_answers_are_imperfect_demonstrations(task):
    _, records = task
    errors, styles = [], collections.Counter()
    for d in records["sft_train"]:
        for question, answer in _exchanges(d):
            problem = demo_task.parse_problem(question)
            errors.append(abs(demo_task.parse_answer(answer) - problem.answer))
            restates = answer.startswith(f"{problem.a} ")  # "7 加 9 等于 16。"
            styles["fact" if restates else re.sub(r"\d+", "N", answer)] += 1
    correct = errors.count(0) / len(errors)
    assert 0.6 <= correct <= 0.7, correct
    assert max(errors) == 2  # wrong answers are close
    assert set(styles) == {"fact", "N", "等于 N。", "答案是 N。", "It equals N.",
                           "The answer is N."}
    assert 0.4 < styles["fact"] / len(errors) < 0.6


def test_rankings_follow_the_true_score(task):
    _, records = task
    best_correct = 0
    comparisons = records["comparisons_train"] + records["comparisons_eval"]
    for c in comparisons:
        problem = demo_task.parse_problem(c.context[-1].content)
        ranked = [c.responses[i] for i in c.order]
        scores = [demo_task.true_score(problem, r) for r in ranked]
        assert scores == sorted(scores, reverse=True)
        keys = [demo_task.rank_key(problem, r) for r in ranked]
        assert keys == sorted(keys) and len(set(k[0] for k in keys)) == 4  # no ties
        best_correct += scores[0] == 1.0
    # The best answer is not always in the same position.
    positions = collections.Counter(c.order[0] for c in records["comparisons_train"])
    train = len(records["comparisons_train"])
    assert len(positions) == 4 and min(positions.values()) > 0.7 * train / 4
    assert 0.6 < best_correct / len(comparisons) < 0.8


def test_misquotes_are_true_facts_about_a_neighbouring_problem():
    A = demo_arithmetic.ArithProblem  # pylint: disable=invalid-name
    p = A(6, "-", 2)
    assert set(demo_task.misquotes(p, 3)) == {A(6, "-", 3), A(5, "-", 2)}
    assert demo_task.misquotes(A(9, "+", 9), 17) == [A(9, "+", 8), A(8, "+", 9)]
    assert demo_task.misquotes(A(9, "+", 0), 10) == [A(9, "+", 1)]
    for p in demo_arithmetic.all_problems():
        for value in range(19):
            for q in demo_task.misquotes(p, value):
                assert q.answer == value != p.answer and max(q.a, q.b) <= 9
                assert (q.a == p.a) + (q.b == p.b) == 1 and q.op == p.op


def test_comparisons_hold_misquoted_wrong_answers(task):
    """Some wrong answers restate a different problem truthfully ("6 minus 3 equals 3." for
    "6 minus 2"): the reward model must rank them by the question asked, not by the fact."""
    _, records = task
    misquoted = 0
    for c in records["comparisons_train"]:
        problem = demo_task.parse_problem(c.context[-1].content)
        for r in c.responses:
            head = re.match(r"(\d+) (?:加|减|plus|minus) (\d+)", r)
            if head and (int(head[1]), int(head[2])) != (problem.a, problem.b):
                misquoted += 1
                assert demo_task.true_score(problem, r) < 1.0
    assert 0.1 < misquoted / (3 * len(records["comparisons_train"])) < 0.3, misquoted


def test_true_score_hand_cases():
    problem = demo_arithmetic.ArithProblem(7, "+", 5)
    for correct in ("12", "12。", "7 加 5 等于 12。", "答案是 12。", "7 plus 5 equals 12.",
                    "The answer is 12.", "What is 7 plus 5? It equals 12.", "7+5=12"):
        assert demo_task.true_score(problem, correct) == 1.0, correct
    assert demo_task.true_score(problem, "11") == 0.4
    assert demo_task.true_score(problem, "14") == 0.3
    assert demo_task.true_score(problem, "等于 8。") == 0.1
    assert demo_task.true_score(problem, "17") == 0.0
    assert demo_task.true_score(problem, "-12") == 0.0
    for no_number in ("", "我不知道。", "I don't know.", "十二"):
        assert demo_task.true_score(problem, no_number) == 0.0
    # The problem may come as text: a question or a whole rendered prompt (last question).
    assert demo_task.true_score("7 加 5 等于多少？", "12") == 1.0
    prompt = chat_encoding.render_prompt((formats.Turn("user", "What is 1 plus 1?"),
                                          formats.Turn("assistant", "2"),
                                          formats.Turn("user", "What is 9 minus 4?")))
    assert demo_task.true_score(prompt, "5") == 1.0 and demo_task.true_score(prompt, "2") < 1.0
    assert demo_task.true_score(formats.Prompt((formats.Turn("user", "20 减 20 等于多少？"),)),
                           "0") == 1.0
    scores = demo_task.score_responses(["7 加 5 等于多少？", problem, prompt], ["12", "no", "6"])
    assert scores.dtype == np.float32 and scores.tolist() == pytest.approx([1.0, 0.0, 0.4])
    with pytest.raises(ValueError, match="no demo arithmetic question"):
        demo_task.true_score("你好", "12")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        demo_task.score_responses(["a", "b"], ["1"])


def test_heldout_prompts_ask_problems_no_training_file_asks(task):
    _, records = task
    heldout = {demo_task.parse_problem(p.context[-1].content) for p in records["prompts_heldout"]}
    seen = set()
    for name, recs in records.items():
        if name == "prompts_heldout":
            continue
        for r in recs:
            context = r.turns if isinstance(r, formats.Dialogue) else r.context
            seen |= {demo_task.parse_problem(t.content) for t in context if t.role == "user"}
    # 100 additions + 55 subtractions (operands 0-9)
    num_problems = len(demo_arithmetic.all_problems())
    assert len(heldout) == round(num_problems * demo_task.HELDOUT_FRACTION) and not heldout & seen
    assert len(seen) == num_problems - len(heldout)  # every other problem is trained on


def test_deterministic_by_seed(tmp_path):
    sizes = dict(num_sft=50, num_comparisons=30, num_prompts=20, num_eval=10, num_heldout=10)
    a = demo_task.write_demo_task(tmp_path / "a", seed=1, **sizes)
    b = demo_task.write_demo_task(tmp_path / "b", seed=1, **sizes)
    c = demo_task.write_demo_task(tmp_path / "c", seed=2, **sizes)
    read = lambda p: open(p, "rb").read()  # pylint: disable=unnecessary-lambda-assignment
    for name in a:
        assert read(a[name]) == read(b[name]) and read(a[name]) != read(c[name]), name


def test_pretraining_corpus_shows_the_dialogue_format():
    rng = random.Random(0)
    docs = [demo_corpus.sample_document(rng) for _ in range(400)]
    dialogues = [d for d in docs if d.startswith("用户：")]
    arithmetic = [d for d in dialogues if re.search(r"等于多少？|What is \d+", d)]
    assert len(arithmetic) > 10
    for d in arithmetic:  # correct answers, rendered exactly as chat_encoding renders turns
        lines = d.split("\n")
        pairs = [(lines[i][3:], lines[i + 1][3:]) for i in range(0, len(lines), 2)]
        assert chat_encoding.render_dialogue(demo_arithmetic.exchange_turns(pairs)) == d
        for question, answer in pairs:
            if re.search(r"等于多少？|What is \d+ (plus|minus)", question):
                assert demo_task.true_score(question, answer) == 1.0
