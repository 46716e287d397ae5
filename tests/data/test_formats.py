"""Tests for data/formats.py (parsing), data/chat_encoding.py (rendering, truncation,
encoding) and data/dialogue_sources.py (TFDS round trips)."""

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from instructjax.data import chat_encoding, demo_corpus, demo_task, dialogue_sources, formats
from instructjax.data import jsonl, loaders, packing, text_sources
from instructjax.data import tokenizer as tok_lib
from instructjax.data.chat_encoding import ChatTemplate
from instructjax.data.formats import Comparison, Dialogue, Prompt, Turn

SHARED = "/work/shared/data"
HH_FILE = os.path.join(SHARED, "hh-rlhf", "harmless-base_test.jsonl.gz")
HH_PROMPTS = os.path.join(SHARED, "hh-rlhf", "harmless-base_test_prompts.jsonl")
PCLUE_FILE = os.path.join(SHARED, "pclue", "pCLUE_train_9.json")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED),
                                  reason=f"{SHARED} (real data samples) is absent")

U, A, S = "user", "assistant", "system"


def turns(*pairs):
    return tuple(Turn(role, text) for role, text in pairs)


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False))
                    + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = demo_corpus.write_demo_corpus(out, seed=0, num_train_docs=400, num_eval_docs=5)
    source = text_sources.build_text_source(corpus["train"], None, out / "tfds")["train"]
    texts = [source[i]["text"] for i in range(len(source))] + [
        "用户：你好，请介绍一下你自己。\n小元：我是小元，一个对话模型。",
        "系统：你是一个乐于助人的助手。", "What is the capital of France? Paris."]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a reduced vocabulary is fine here
        return tok_lib.train_tokenizer(texts, out / "tok.model", 500, seed=0)


# ------------------------------------------------------------------------------ rendering

def test_golden_single_and_multi_turn():
    t = ChatTemplate()
    single = turns((U, "你好"), (A, "你好！有什么可以帮你？"))
    assert chat_encoding.render_dialogue(single, t) == "用户：你好\n小元：你好！有什么可以帮你？"
    assert chat_encoding.render_prompt(single[:1], t) == "用户：你好\n小元："
    multi = turns((U, "1 加 2 等于多少？"), (A, "等于 3。"), (U, "再加 4 呢？"))
    assert chat_encoding.render_prompt(multi, t) == \
        "用户：1 加 2 等于多少？\n小元：等于 3。\n用户：再加 4 呢？\n小元："
    assert chat_encoding.render_dialogue(multi[:2]) == "用户：1 加 2 等于多少？\n小元：等于 3。"


def test_full_width_colon_and_no_trailing_space():
    text = chat_encoding.render_prompt(turns((U, "hi")))
    assert text.endswith("小元：") and "\uff1a" in text and ":" not in text
    assert ChatTemplate().cue == "小元\uff1a"


def test_custom_roles_and_system_turn():
    hh = ChatTemplate(user="Human", assistant="Assistant", sep="\n\n", colon=": ")
    ctx = turns((U, "hi"), (A, "hello"), (U, "bye?"))
    assert chat_encoding.render_prompt(ctx, hh) == \
        "Human: hi\n\nAssistant: hello\n\nHuman: bye?\n\nAssistant: "
    with_system = turns((S, "你是小元。"), (U, "你好"))
    assert chat_encoding.render_prompt(with_system) == "你是小元。\n用户：你好\n小元："
    assert chat_encoding.render_prompt(with_system, ChatTemplate(system="系统")) == \
        "系统：你是小元。\n用户：你好\n小元："
    with pytest.raises(ValueError, match="two different non-empty role names"):
        ChatTemplate(user="小元")


# ------------------------------------------------------------------------------ parsing

def _parse(record, kind, fmt="auto"):
    return formats.parse_record(record, kind, fmt=fmt, path="f.jsonl", line_no=7)


def test_parse_pclue_and_messages():
    d = _parse({"input": "问题？\n答案：", "target": "是的", "type": "nli"}, "sft")
    assert d == Dialogue(turns((U, "问题？\n答案："), (A, "是的")))
    assert chat_encoding.render_dialogue(d.turns) == "用户：问题？\n答案：\n小元：是的"
    msgs = [{"role": "system", "content": "规则"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "name": "x"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]
    assert _parse({"messages": msgs}, "sft").turns == turns(
        (S, "规则"), (U, "q1"), (A, "a1"), (U, "q2"), (A, ""))
    assert _parse({"messages": msgs[:4]}, "prompt") == Prompt(turns(
        (S, "规则"), (U, "q1"), (A, "a1"), (U, "q2")))
    assert _parse({"prompt": "你好", "id": 3}, "prompt") == Prompt(turns((U, "你好")))
    # An explicit format skips detection.
    assert _parse({"input": "q", "target": "a"}, "sft", fmt="pclue").turns[1].content == "a"
    with pytest.raises(ValueError, match="not one of the sft formats"):
        _parse({"input": "q", "target": "a"}, "sft", fmt="ranked")


def test_ranked_comparison_order():
    c = _parse({"prompt": "q", "responses": ["mid", "best", "worst"], "ranking": [1, 0, 2]},
               "comparison")
    assert c.order == (1, 0, 2) and [c.responses[i] for i in c.order] == ["best", "mid", "worst"]
    c = _parse({"messages": [{"role": "user", "content": "q"}],
                "responses": ["c", "a", "b"], "ranking": [2, 0, 1]}, "comparison")
    assert [c.responses[i] for i in c.order] == ["a", "b", "c"]
    assert c.context == turns((U, "q"))


@pytest.mark.parametrize("ranking,message", [
    ([0, 0, 1], r"ties \(rank\(s\) \[0\]"),
    ([0, 1], r"'ranking' has 2 entries for 3 responses"),
    ([0, 1, 3], r"permutation of 0\.\.2"),
    ([1, 2, 3], r"permutation of 0\.\.2"),
    ([0, True, 2], "list of ints"),
    ([0, "1", 2], "list of ints"),
])
def test_bad_rankings_name_file_and_line(ranking, message):
    record = {"prompt": "q", "responses": ["a", "b", "c"], "ranking": ranking}
    with pytest.raises(jsonl.DataFormatError, match=r"^f\.jsonl:7: .*" + message):
        _parse(record, "comparison")


def test_chosen_rejected_pairs():
    c = _parse({"prompt": "q", "chosen": "good", "rejected": "bad"}, "comparison")
    assert c == Comparison(turns((U, "q")), ("good", "bad"), (0, 1))
    c = _parse({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant",
                "content": "a1"}, {"role": "user", "content": "q2"}],
                "chosen": " good", "rejected": "bad"}, "comparison")
    assert c.context[-1] == Turn(U, "q2") and c.responses == (" good", "bad")
    # An HH-style prompt string is split into turns; its answers are stripped.
    c = _parse({"prompt": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: q\n\nAssistant:",
                "chosen": " good", "rejected": " bad"}, "comparison")
    assert c.context == turns((U, "hi"), (A, "yo"), (U, "q")) and c.responses == ("good", "bad")


def _hh(*turns_):
    return "".join(f"\n\n{'Human' if r == U else 'Assistant'}: {t}" for r, t in turns_)


def test_hh_multi_turn_empty_answer_and_inline_human():
    prefix = [(U, "What is a pen?"), (A, "A tool.  Human: (not a turn)"), (U, "And ink?")]
    record = {"chosen": _hh(*prefix, (A, "Liquid.  Human: Really?  Yes.")),
              "rejected": _hh(*prefix, (A, ""))}
    c = _parse(record, "comparison")
    assert c.context == turns((U, "What is a pen?"), (A, "A tool.  Human: (not a turn)"),
                              (U, "And ink?"))
    assert c.responses == ("Liquid.  Human: Really?  Yes.", "") and c.order == (0, 1)
    # A repeated Assistant marker without a Human turn between continues the answer.
    record = {"chosen": _hh((U, "q"), (A, "part one")) + "\n\nAssistant: part two",
              "rejected": _hh((U, "q"), (A, "other"))}
    assert _parse(record, "comparison").responses == (
        "part one\n\nAssistant: part two", "other")
    # A leading "Human:" without the blank lines is accepted.
    assert _parse({"chosen": "Human: q\n\nAssistant: a", "rejected": "Human: q\n\nAssistant: b"},
                  "comparison").responses == ("a", "b")


@pytest.mark.parametrize("chosen,rejected,message", [
    (_hh((U, "q1"), (A, "a")), _hh((U, "q2"), (A, "b")), "differ before their final answers"),
    (_hh((U, "q"), (A, "x"), (U, "r"), (A, "a")), _hh((U, "q"), (A, "y"), (U, "r"), (A, "b")),
     "differ before their final answers"),
    (_hh((U, "q"), (A, "a"), (U, "r")), _hh((U, "q"), (A, "b")),
     "does not end with an Assistant turn"),
    ("Assistant: hi", _hh((U, "q"), (A, "b")), "must start with"),
    (_hh((U, "q"), (U, "r"), (A, "a")), _hh((U, "q"), (U, "r"), (A, "b")),
     "Human turn 1 has no Assistant turn"),
])
def test_hh_errors(chosen, rejected, message):
    with pytest.raises(jsonl.DataFormatError, match=r"^f\.jsonl:7: .*" + message):
        _parse({"chosen": chosen, "rejected": rejected}, "comparison")


# Each malformed line is written as line 2 of bad.jsonl after a good line.
MALFORMED = [
    ("sft", '{"messages": [}', "invalid JSON"),
    ("sft", '[1, 2]', "expected a JSON object"),
    ("sft", {"text": "x"}, "unknown record format"),
    ("sft", {"input": "q"}, "missing field 'target'"),
    ("sft", {"input": "q", "target": 3}, "field 'target' must be str, got int"),
    ("sft", {"messages": []}, "'messages' is empty"),
    ("sft", {"messages": "hi"}, "'messages' must be list"),
    ("sft", {"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ("sft", {"messages": [{"role": "user"}]}, "message 0 has no 'content'"),
    ("sft", {"messages": [{"role": "user", "content": None}]}, "'content' must be str"),
    ("sft", {"messages": [{"role": "user", "content": "q"}]},
     "must end with an assistant turn"),
    ("sft", {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}]},
     "message 1 has role 'user' where 'assistant' belongs"),
    ("sft", {"messages": [{"role": "assistant", "content": "a"}]},
     "message 0 has role 'assistant' where 'user' belongs"),
    ("sft", {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
     "a system message may only come first"),
    ("sft", {"messages": [{"role": "system", "content": "s"}]}, "no user or assistant turns"),
    ("sft", {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]},
     "make a 'ranked' record, not one of the sft formats"),
    ("sft", {"messages": [], "input": "q", "target": "a"}, "both 'messages' and pCLUE"),
    ("prompt", {"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"}]},
     "must end with a user turn"),
    ("prompt", {"prompt": 5}, "field 'prompt' must be str"),
    ("prompt", {"prompt": "q", "messages": []}, "both 'prompt' and 'messages'"),
    ("comparison", {"prompt": "q", "responses": ["a"], "ranking": [0]}, "at least 2 answers"),
    ("comparison", {"prompt": "q", "responses": ["a", 1], "ranking": [0, 1]}, "list of str"),
    ("comparison", {"prompt": "q", "responses": ["a", "b"]}, "missing field 'ranking'"),
    ("comparison", {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}, "ties"),
    ("comparison", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ("comparison", {"chosen": "no transcript", "rejected": "x"}, "must start with"),
]


@pytest.mark.parametrize("kind,line,message", MALFORMED)
def test_every_malformed_record_names_file_and_line(tmp_path, kind, line, message):
    good = {"sft": {"input": "q", "target": "a"}, "prompt": {"prompt": "q"},
            "comparison": {"prompt": "q", "chosen": "a", "rejected": "b"}}[kind]
    path = _write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(jsonl.DataFormatError, match=r"bad\.jsonl:2: .*" + message):
        dialogue_sources.read_records(path, kind)


def test_skip_malformed_counts_and_reports(tmp_path):
    path = _write_lines(tmp_path / "mixed.jsonl", [
        {"input": "q1", "target": "a1"}, "{oops", {"messages": []}, "",
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
        b"\xff\xfe".decode("latin-1"), {"input": "q3", "target": "a3"}])
    with pytest.warns(UserWarning, match="skipped 3 malformed sft record"):
        records, skipped = dialogue_sources.read_records(path, "sft", skip_malformed=True)
    assert [r.turns[0].content for r in records] == ["q1", "q2", "q3"]
    assert [re.match(r".*mixed\.jsonl:(\d+):", s).group(1) for s in skipped] == ["2", "3", "6"]
    seen = []
    located = list(dialogue_sources.iter_records(path, "sft", on_skip=seen.append))
    assert [(line, r.turns[0].content) for _, line, r in located] == \
        [(1, "q1"), (5, "q2"), (7, "q3")] and len(seen) == 3


@needs_shared
def test_real_hh_sample_parses():
    records, skipped = dialogue_sources.read_records(HH_FILE, "comparison")
    assert len(records) == 2312 and not skipped
    assert sum(c.responses[0] == "" for c in records) == 4  # empty chosen answers, kept
    assert sum(c.responses[1] == "" for c in records) == 0
    # Inline "  Human:" stays inside answers (6 answers by our split, which keeps a resumed
    # Assistant turn in the answer; the data README counts 5 pairs with another split).
    assert sum(any("  Human:" in r for r in c.responses) for c in records) == 6
    assert sum(any("\n\nAssistant:" in r for r in c.responses) for c in records) == 5
    assert not any("\n\nHuman:" in r for c in records for r in c.responses)
    first = records[0]
    assert first.context[:3] == turns((U, "what are some pranks with a pen i can do?"),
                                      (A, "Are you looking for practical joke ideas?"),
                                      (U, "yep"))
    assert all(c.context[-1].role == U and c.order == (0, 1) for c in records)


@needs_shared
def test_real_hh_prompts_and_pclue_parse():
    with pytest.raises(jsonl.DataFormatError, match=r"prompts\.jsonl:1255: .*continues after"):
        dialogue_sources.read_records(HH_PROMPTS, "prompt")
    with pytest.warns(UserWarning, match="skipped 4"):
        prompts, skipped = dialogue_sources.read_records(HH_PROMPTS, "prompt", skip_malformed=True)
    assert len(prompts) == 2306 and len(skipped) == 4
    records, _ = dialogue_sources.read_records(PCLUE_FILE, "sft")
    assert len(records) == 705
    assert all(len(d.turns) == 2 and d.turns[1].content for d in records)
    assert sum(d.turns[0].content.endswith("\n答案：") for d in records) == 531


# ------------------------------------------------------------------------------ encoding

def _runs(tokens, weights):
    """Maximal runs of weight-1 tokens, as lists of ids."""
    runs, current = [], []
    for t, w in zip(tokens, weights):
        if w:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


DIALOGUES = [
    Dialogue(turns((U, "3 加 5 等于多少？"), (A, "3 加 5 等于 8。"))),
    Dialogue(turns((U, "What is 2 plus 2?"), (A, "4"), (U, "苹果是什么颜色的？"), (A, "红色。"))),
    Dialogue(turns((S, "你是小元。"), (U, "你好"), (A, ""), (U, "在吗？🤖"), (A, "在的！"))),
]


@pytest.mark.parametrize("dialogue", DIALOGUES)
def test_sft_tokens_decode_to_rendered_text_and_mask_answers(tok, dialogue):
    tokens, weights = chat_encoding.encode_sft(dialogue, tok, max_length=256)
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and weights[0] == 0
    assert tok.decode(tokens) == chat_encoding.render_dialogue(dialogue.turns)
    answers = [t.content for t in dialogue.turns if t.role == A]
    runs = _runs(tokens, weights)
    assert [tok.decode(r) for r in runs] == [a for a in answers[:-1] if a] + [answers[-1]]
    assert runs[-1][-1] == tok.eos_id and set(weights) <= {0.0, 1.0}
    # "last": only the final answer and EOS.
    tokens_l, weights_l = chat_encoding.encode_sft(dialogue, tok, max_length=256, train_on="last")
    assert tokens_l == tokens
    assert [tok.decode(r) for r in _runs(tokens_l, weights_l)] == [answers[-1]]
    assert _runs(tokens_l, weights_l)[-1][-1] == tok.eos_id
    # The cue tokens right before the final answer are never trained.
    cue_len = len(tok.encode("小元："))
    n_ans = len(tok.encode(answers[-1])) + 1
    assert weights[-n_ans - cue_len:-n_ans] == [0.0] * cue_len


def test_span_encoding_concatenates_to_the_whole_text(tok):
    for d in DIALOGUES:
        pieces = [tok.encode(t)
                  for t, _ in chat_encoding._spans(d.turns, ChatTemplate(), cue=False)]
        assert tok.decode([i for p in pieces for i in p]) == chat_encoding.render_dialogue(d.turns)
    # A single-turn prompt encodes exactly like its rendered text.
    prompt = Prompt(turns((U, "3 加 5 等于多少？")))
    assert chat_encoding.encode_prompt(prompt, tok, max_length=64) == \
        [tok.bos_id] + tok.encode("用户：3 加 5 等于多少？\n小元：")


def test_packed_sft_loss_mask_selects_exactly_answers_and_eos(tok):
    examples = [chat_encoding.encode_sft(d, tok, max_length=256, train_on=mode)
                for d in DIALOGUES for mode in ("all", "last")]
    packed = packing.pack_documents([t for t, _ in examples], [w for _, w in examples],
                                    seq_len=128)
    got = []
    for row in range(len(packed["tokens"])):
        seg, mask, targets = (packed[k][row] for k in ("segment_ids", "loss_mask", "targets"))
        for s in range(1, seg.max() + 1):
            got.append(targets[(seg == s) & (mask == 1)].tolist())
    expected = []
    for d in DIALOGUES:
        answers = [t.content for t in d.turns if t.role == A]
        for trained in (answers, answers[-1:]):
            expected.append([i for a in trained for i in tok.encode(a)] + [tok.eos_id])
    assert got == expected


LONG = Dialogue(turns(*[(U, f"问题 {i}：{i} 加 {i} 等于多少？") if j == 0 else
                        (A, f"{i} 加 {i} 等于 {2 * i}。") for i in range(6) for j in range(2)]))


def test_truncation_by_max_turns(tok):
    ctx = LONG.turns[:-1]
    for n in (1, 2, 6, 10):
        kept = chat_encoding.truncate_context(ctx, tok, ChatTemplate(), max_tokens=None,
                                              max_turns=n)
        assert kept == ctx[-(2 * min(n, 6) - 1):]
    tokens, weights = chat_encoding.encode_sft(LONG, tok, max_length=512, max_turns=2)
    assert tok.decode(tokens) == chat_encoding.render_dialogue(LONG.turns[-4:])
    assert len(_runs(tokens, weights)) == 2
    with pytest.raises(ValueError, match="max_turns"):
        chat_encoding.truncate_context(ctx, tok, ChatTemplate(), max_tokens=None, max_turns=0)


def test_truncation_by_length_drops_oldest_exchanges_first(tok):
    full_tokens, _ = chat_encoding.encode_sft(LONG, tok, max_length=1024)
    seen = set()
    for max_length in [*range(20, len(full_tokens), 7), len(full_tokens)]:
        tokens, weights = chat_encoding.encode_sft(LONG, tok, max_length=max_length)
        assert len(tokens) <= max_length and tokens[-1] == tok.eos_id
        text = tok.decode(tokens)
        assert text.endswith("\n小元：5 加 5 等于 10。")
        # What is kept is a suffix of whole exchanges, as long as possible.
        kept = [k for k in range(6) if chat_encoding.render_dialogue(LONG.turns[2 * k:]) == text]
        seen.add(min(kept, default=-1))
        if kept:
            k = kept[0]
            assert k == 0 or len(chat_encoding.encode_sft(Dialogue(LONG.turns[2 * (k - 1):]),
                                                          tok, max_length=1024)[0]) > max_length
        else:  # even the last exchange is too long: its question is cut from the left
            assert text.startswith("用户：") and "问题 5" not in text
            assert text.endswith("等于多少？\n小元：5 加 5 等于 10。")
        assert tok.decode(_runs(tokens, weights)[-1]) == "5 加 5 等于 10。"
    assert {-1, 0, 3, 5} <= seen  # question cut, all kept, and exchanges dropped


def test_long_last_question_is_cut_from_the_left(tok):
    question = "很长的背景。" * 40 + "最后的问题：3 加 5 等于多少？"
    prompt = Prompt(turns((S, "系统说明" * 10), (U, "早先的问题"), (A, "早先的回答"),
                          (U, question)))
    ids = chat_encoding.encode_prompt(prompt, tok, max_length=40)
    text = tok.decode(ids)
    assert len(ids) <= 40 and ids[0] == tok.bos_id
    assert text.startswith("用户：") and text.endswith("最后的问题：3 加 5 等于多少？\n小元：")
    assert "系统说明" not in text and "早先" not in text
    assert question.endswith(text[len("用户："):-len("\n小元：")])
    # A budget just big enough keeps the system turn and drops only the history.
    no_history = len(chat_encoding.encode_prompt(
        Prompt(prompt.context[:1] + prompt.context[-1:]), tok, max_length=10_000))
    kept = chat_encoding.truncate_context(prompt.context, tok, ChatTemplate(),
                                          max_tokens=no_history - 1)
    assert kept == (prompt.context[0], prompt.context[-1])
    with pytest.raises(ValueError, match="cannot hold the user prefix and the cue"):
        chat_encoding.encode_prompt(prompt, tok, max_length=3)


def test_sft_answer_too_long_is_cut_without_eos(tok):
    d = Dialogue(turns((U, "写一首诗。"), (A, "春眠不觉晓，处处闻啼鸟。" * 30)))
    tokens, weights = chat_encoding.encode_sft(d, tok, max_length=48)
    assert len(tokens) == 48 and tok.eos_id not in tokens
    assert tok.decode(tokens).startswith("用户：写一首诗。\n小元：春眠")
    assert sum(weights) == 48 - len([tok.bos_id] + tok.encode("用户：写一首诗。\n小元："))


def test_prompt_ids_match_sft_and_comparison_prefixes(tok):
    ctx = LONG.turns[:-1]
    prompt_ids = chat_encoding.encode_prompt(Prompt(ctx), tok, max_length=1024)
    sft_ids, _ = chat_encoding.encode_sft(LONG, tok, max_length=1024)
    assert sft_ids[:len(prompt_ids)] == prompt_ids
    comparison = Comparison(ctx, ("10", "5 加 5 等于 10。", "不知道"), (1, 0, 2))
    tokens, lengths, order = chat_encoding.encode_comparison(comparison, tok, max_length=1024)
    for k, response in enumerate(comparison.responses):
        row = tokens[k, :lengths[k]].tolist()
        assert row == prompt_ids + tok.encode(response) + [tok.eos_id]
    assert order.tolist() == [1, 0, 2]


def test_encode_comparison_shapes_padding_and_truncation(tok):
    ctx = LONG.turns[:-1]
    comparison = Comparison(ctx, ("10", "很长的回答。" * 50, ""), (0, 2, 1))
    tokens, lengths, order = chat_encoding.encode_comparison(comparison, tok, max_length=64)
    assert tokens.shape == (3, 64) and tokens.dtype == np.int32
    assert lengths.dtype == np.int32 and order.dtype == np.int32
    assert lengths[1] == 64 and order.tolist() == [0, 2, 1]
    for k in range(3):
        n = lengths[k]
        assert tokens[k, 0] == tok.bos_id and tokens[k, n - 1] == tok.eos_id
        assert (tokens[k, n:] == tok.pad_id).all()
    # One shared prompt: all rows agree up to the cue, which ends the prompt.
    texts = [tok.decode(tokens[k, :lengths[k]]) for k in range(3)]
    prompt = texts[0][:-len("10")]
    assert prompt.endswith("用户：问题 5：5 加 5 等于多少？\n小元：")
    assert texts[2] == prompt and texts[1].startswith(prompt + "很长的回答。")
    # With a long answer the prompt gets half of the room after BOS and EOS (31 ids here):
    # the last exchange fits it, the last two do not.
    assert len(tok.encode(prompt)) <= 31 < len(chat_encoding.encode_prompt(
        Prompt(ctx[-3:]), tok, max_length=1024)) - 1
    batch = chat_encoding.collate_comparisons(
        [(tokens, lengths, order), chat_encoding.encode_comparison(
            Comparison(ctx[-1:], ("a", "b"), (1, 0)), tok, max_length=64)])
    assert batch["tokens"].shape == (2, 3, 64) and batch["lengths"][1].tolist()[2] == 0
    assert batch["ranks"].tolist() == [[0, 2, 1], [1, 0, -1]]


# ------------------------------------------------------------------------------ TFDS

def test_tfds_round_trip_of_each_kind(tmp_path):
    sft = _write_lines(tmp_path / "sft.jsonl", [
        {"input": "问题\n答案：", "target": "是的"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": ""}]}] * 3)
    comparisons = _write_lines(tmp_path / "cmp.jsonl", [
        {"prompt": "q", "responses": ["b", "a", "c"], "ranking": [1, 0, 2]},
        {"prompt": "q2", "chosen": "y", "rejected": "n"},
        {"chosen": _hh((U, "hi"), (A, "yo"), (U, "q"), (A, "")),
         "rejected": _hh((U, "hi"), (A, "yo"), (U, "q"), (A, "no  Human: x"))}])
    prompts = _write_lines(tmp_path / "prompts.jsonl", [
        {"prompt": "你好"}, {"messages": [{"role": "user", "content": "q"}]}])
    data_dir = tmp_path / "tfds"
    cases = [(dialogue_sources.build_sft_source, sft, "sft"),
             (dialogue_sources.build_comparison_source, comparisons, "comparison"),
             (dialogue_sources.build_prompt_source, prompts, "prompt")]
    for build, path, kind in cases:
        expected, _ = dialogue_sources.read_records(path, kind)
        sources = build(path, path, data_dir)
        for split in ("train", "eval"):
            got = sources[split]
            assert [got[i] for i in range(len(got))] == expected, (kind, split)
            assert got.location(1) == f"{path}:2"
    held = dialogue_sources.build_sft_source(sft, None, data_dir, name="held", eval_percent=30)
    assert {k: len(v) for k, v in held.items()} == {"train": 4, "eval": 2}


def test_tfds_sources_report_malformed_records(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": 1}, "{x",
                                                 {"prompt": "b"}])
    with pytest.raises(jsonl.DataFormatError, match=r"p\.jsonl:2: field 'prompt' must be str"):
        dialogue_sources.build_prompt_source(path, None, tmp_path / "tfds")
    with pytest.warns(UserWarning, match="skipped 2 malformed prompt"):
        sources = dialogue_sources.build_prompt_source(path, None, tmp_path / "tfds",
                                                       skip_malformed=True)
    assert [sources["train"][i].context[0].content for i in range(2)] == ["a", "b"]
    assert sources["train"].location(1) == f"{path}:4"
    only_bad = _write_lines(tmp_path / "q.jsonl", ["{x"])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="holds no prompt records"):
        dialogue_sources.build_prompt_source(only_bad, None, tmp_path / "tfds", name="q",
                                             skip_malformed=True)


def test_modules_import_without_grain_and_tfds():
    """The GPU image has neither: parsing, rendering, encoding and the demo data import."""
    script = textwrap.dedent("""
        import sys
        sys.modules["grain"] = None  # makes `import grain` raise ImportError
        sys.modules["tensorflow_datasets"] = None
        from instructjax.data import chat_encoding, demo_corpus, demo_task, dialogue_sources
        from instructjax.data import formats
        print(chat_encoding.render_prompt((formats.Turn("user", "q"),)) == "用户：q\\n小元：")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True"]


def test_sft_source_through_grain_and_the_packing_iterator(tmp_path, tok):
    """TFDS source -> grain map(encode_sft) -> LMBatchIterator: loss only on answers + EOS."""
    grain = pytest.importorskip("grain")
    paths = demo_task.write_demo_task(tmp_path / "task", seed=0, num_sft=40, num_comparisons=2,
                                      num_prompts=2, num_eval=2, num_heldout=2)
    source = dialogue_sources.build_sft_source(paths["sft_train"], None, tmp_path / "tfds")
    source = source["train"]

    def to_document(dialogue):
        tokens, weights = chat_encoding.encode_sft(dialogue, tok, max_length=96)
        return {"tokens": np.asarray(tokens, np.int32),
                "loss_weights": np.asarray(weights, np.float32)}

    documents = grain.MapDataset.source(source).map(to_document).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
    batches = list(loaders.LMBatchIterator(iter(documents), seq_len=96, batch_size=4,
                                           config={}))
    trained = []
    for batch in batches:
        for row in range(4):
            seg, mask, targets = (batch[k][row] for k in ("segment_ids", "loss_mask", "targets"))
            for s in range(1, seg.max() + 1):
                trained.append(targets[(seg == s) & (mask == 1)].tolist())
    expected = [[i for t in source[n].turns if t.role == A for i in tok.encode(t.content)]
                + [tok.eos_id] for n in range(len(source))]
    assert trained == expected
