"""The bad-input sweep: every user data format against every fault a user file can have.

Each test goes through the functions a stage calls (`text_sources.build_text_source`,
`dialogue_sources.build_*_source`, `tokenizer.train_tokenizer`, `loaders.make_lm_batches`,
`chat_encoding.encode_*`) and asserts what the user sees: a `jsonl.DataFormatError` whose
message starts with `file:line:` (or the file, for a whole-file problem) and names the
field, or a record kept or left out with a count the caller can read and a warning.
docs/reliability.md ("Bad input files") lists the cases with these tests' ids.
"""

import json
import random
import re
import warnings

import pytest

from instructjax.data import chat_encoding, dialogue_sources, formats, jsonl, loaders
from instructjax.data import text_sources
from instructjax.data import tokenizer as tok_lib

DataFormatError = jsonl.DataFormatError


def _hh(question, answer):
    return f"\n\nHuman: {question}\n\nAssistant: {answer}"


# format -> (record kind, a good record with Chinese text, a second good record)
FORMATS = {
    "text": ("text", {"text": "第一篇：你好，世界。"}, {"text": "second document"}),
    "pclue": ("sft", {"input": "这句话是真的吗？\n答案：", "target": "是的"},
              {"input": "q2", "target": "a2"}),
    "messages": ("sft", {"messages": [{"role": "user", "content": "你好"},
                                      {"role": "assistant", "content": "你好！"}]},
                 {"messages": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a"}]}),
    "ranked": ("comparison", {"prompt": "哪个好？", "responses": ["乙", "甲", "丙"],
                              "ranking": [1, 0, 2]},
               {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]}),
    "pair": ("comparison", {"prompt": "哪个好？", "chosen": "好的", "rejected": "不好"},
             {"prompt": "q", "chosen": "y", "rejected": "n"}),
    "hh": ("comparison", {"chosen": _hh("你好", "你好！"), "rejected": _hh("你好", "走开")},
           {"chosen": _hh("q", "y"), "rejected": _hh("q", "n")}),
    "prompt": ("prompt", {"prompt": "为什么天是蓝的？"}, {"prompt": "q"}),
}
ALL = list(FORMATS)


def _write(path, lines, encoding="utf-8", prefix=""):
    """Writes records (dicts, dumped) or raw strings as lines; returns the path as str."""
    text = prefix + "".join(
        (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
        for line in lines)
    path.write_bytes(text.encode(encoding))
    return str(path)


def _build(fmt, path, tmp_path, **kwargs):
    """The splits a stage would get for `path` in format `fmt` (train only unless holdout)."""
    kind = FORMATS[fmt][0]
    data_dir = tmp_path / "tfds"
    if kind == "text":
        return text_sources.build_text_source(path, None, data_dir, **kwargs)
    build = {"sft": dialogue_sources.build_sft_source,
             "comparison": dialogue_sources.build_comparison_source,
             "prompt": dialogue_sources.build_prompt_source}[kind]
    return build(path, None, data_dir, **kwargs)


def _items(source):
    return [source[i] for i in range(len(source))]


def _expected(fmt, record):
    """What a stage reads back for a good record."""
    kind = FORMATS[fmt][0]
    return {"text": record["text"]} if kind == "text" else formats.parse_record(record, kind)


def _at(path, line):
    """Regex prefix of a record-level message."""
    return "^" + re.escape(f"{path}:{line}: ")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = ["用户：你好，请介绍一下你自己。\n小元：我是小元。", "What is the capital of France?",
             "为什么天是蓝的？因为瑞利散射。", "1 加 2 等于 3。 7 plus 2 equals 9."] * 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a reduced vocabulary is fine here
        return tok_lib.train_tokenizer(texts, out / "tok.model", 500, seed=0)


@pytest.fixture(scope="module")
def ten_mb_text():
    """A 10 MiB (UTF-8) text of mixed Chinese and English, no newline."""
    rng = random.Random(0)
    alphabet = "你好世界的是了我不人在他有这个上们来到时大地为子中 abcdefghij,.。，0123456789"
    block = "".join(rng.choice(alphabet) for _ in range(1 << 16))
    size = len(block.encode("utf-8"))
    return block * (10 * 2**20 // size + 1)


# ------------------------------------------------------------------------------ whole files

@pytest.mark.parametrize("content", [b"", b"\n\n   \n\r\n"], ids=["empty", "blank_lines"])
@pytest.mark.parametrize("fmt", ALL)
def test_empty_file_is_refused_naming_it(tmp_path, fmt, content):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match="^" + re.escape(f"{path}: the 'train' split ") +
                       r"holds no .*records \(the file is empty or holds only blank lines\)"):
        _build(fmt, str(path), tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n\n", b'{"text": ""}\n{"text": " "}\n'],
                         ids=["empty", "blank_lines", "empty_texts"])
def test_tokenizer_on_empty_corpus_names_the_file(tmp_path, content):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match="^" + re.escape(str(path)) +
                       ": the tokenizer corpus holds no text"):
        tok_lib.train_tokenizer(str(path), tmp_path / "t.model", 300, seed=0)
    # Given as documents, there is no file to name, and still a DataFormatError.
    with pytest.raises(DataFormatError, match="corpus holds no text"):
        tok_lib.train_tokenizer(["", "\n"], tmp_path / "t.model", 300, seed=0)


@pytest.mark.parametrize("fmt", ALL)
def test_holdout_of_a_one_record_file_names_the_file(tmp_path, fmt):
    path = _write(tmp_path / "one.jsonl", [FORMATS[fmt][1]])
    with pytest.raises(DataFormatError, match="^" + re.escape(
            f"{path}: holding out 5% of the 1 record(s) as the eval split leaves no train "
            "records") + ".*eval_percent=0"):
        _build(fmt, path, tmp_path, eval_percent=5)


def test_fewer_records_than_processes_is_a_data_error(tmp_path):
    path = _write(tmp_path / "one.jsonl", [FORMATS["text"][1]])
    source = _build("text", path, tmp_path)["train"]
    with pytest.raises(DataFormatError, match=r"shard 1 of 2 holds no documents.*at least 2"):
        loaders.make_lm_batches(source, None, seq_len=8, batch_size=1, seed=0,
                                shard_index=1, shard_count=2)


# ------------------------------------------------------------------------------ encodings

@pytest.mark.parametrize("fmt", ALL)
def test_gbk_file_is_refused_at_line_1(tmp_path, fmt):
    path = _write(tmp_path / "gbk.jsonl", [FORMATS[fmt][1]], encoding="gbk")
    with pytest.raises(DataFormatError, match=_at(path, 1) + r"invalid UTF-8 .*GBK"):
        _build(fmt, path, tmp_path)


@pytest.mark.parametrize("fmt", ALL)
def test_utf8_bom_is_accepted(tmp_path, fmt):
    _, first, second = FORMATS[fmt]
    path = _write(tmp_path / "bom.jsonl", [first, second], prefix="\ufeff")
    got = _items(_build(fmt, path, tmp_path)["train"])
    assert got == [_expected(fmt, first), _expected(fmt, second)]


# ------------------------------------------------------------------------------ fields

# format -> (a record with a misspelt required key, the regex its message must match)
MISSPELT = {
    "text": ({"txt": "x"}, r"missing field 'text' .*is 'txt' a misspelling of 'text'\?"),
    "pclue": ({"input": "q", "traget": "a"},
              r"missing field 'target' .*is 'traget' a misspelling of 'target'\?"),
    "messages": ({"mesages": [{"role": "user", "content": "q"}]},
                 r"unknown record format.*is 'mesages' a misspelling of 'messages'\?"),
    "messages_content": ({"messages": [{"role": "user", "contnet": "q"},
                                       {"role": "assistant", "content": "a"}]},
                         r"message 0 has no 'content' .*is 'contnet' a misspelling"),
    "ranked": ({"prompt": "q", "responses": ["a", "b"], "rankings": [0, 1]},
               r"missing field 'ranking' .*is 'rankings' a misspelling of 'ranking'\?"),
    "pair": ({"prompt": "q", "chosen": "a", "rejectd": "b"},
             r"missing field 'rejected' .*is 'rejectd' a misspelling of 'rejected'\?"),
    "hh": ({"chosen": _hh("q", "a"), "rejeted": _hh("q", "b")},
           r"missing field 'rejected' .*is 'rejeted' a misspelling of 'rejected'\?"),
    "prompt": ({"promt": "q"}, r"unknown record format.*is 'promt' a misspelling of 'prompt'"),
}


@pytest.mark.parametrize("case", list(MISSPELT))
def test_misspelt_required_field_is_named(tmp_path, case):
    fmt = case.split("_")[0]
    record, message = MISSPELT[case]
    path = _write(tmp_path / "typo.jsonl", [FORMATS[fmt][1], record])
    with pytest.raises(DataFormatError, match=_at(path, 2) + message):
        _build(fmt, path, tmp_path)


@pytest.mark.parametrize("fmt", ALL)
def test_unknown_extra_fields_are_ignored(tmp_path, fmt):
    first = FORMATS[fmt][1]
    extra = {**first, "id": 7, "meta": {"source": "crawl", "tags": [1, 2]}, "type": "nli",
             "answer_choices": ["是的", "不是"]}
    path = _write(tmp_path / "extra.jsonl", [extra])
    assert _items(_build(fmt, path, tmp_path)["train"]) == [_expected(fmt, first)]


# case -> (format, record, regex of the message after "file:2: ")
WRONG_TYPES = {
    "text_number": ("text", {"text": 5}, r"field 'text' must be str, got int"),
    "text_list": ("text", {"text": ["a", "b"]}, r"field 'text' must be str, got list"),
    "line_is_list": ("text", '["a", "b"]', r"expected a JSON object, got list"),
    "pclue_number": ("pclue", {"input": 1, "target": "a"}, r"field 'input' must be str, got int"),
    "messages_object": ("messages", {"messages": {"role": "user", "content": "q"}},
                        r"field 'messages' must be list, got dict"),
    "messages_item_str": ("messages", {"messages": ["q", "a"]},
                          r"message 0 must be an object, got str"),
    "messages_content_number": ("messages", {"messages": [{"role": "user", "content": 5}]},
                                r"message 0: 'content' must be str, got int"),
    "ranked_response_number": ("ranked", {"prompt": "q", "responses": ["a", 2],
                                          "ranking": [0, 1]},
                               r"'responses' must be a list of str"),
    "ranked_ranking_strings": ("ranked", {"prompt": "q", "responses": ["a", "b"],
                                          "ranking": ["0", "1"]},
                               r"field 'ranking' must be a list of ints"),
    "ranked_responses_object": ("ranked", {"prompt": "q", "responses": {"a": 0},
                                           "ranking": [0]},
                                r"field 'responses' must be list, got dict"),
    "pair_number": ("pair", {"prompt": "q", "chosen": 1, "rejected": "b"},
                    r"field 'chosen' must be str, got int"),
    "hh_list": ("hh", {"chosen": [_hh("q", "a")], "rejected": _hh("q", "b")},
                r"field 'chosen' must be str, got list"),
    "prompt_number": ("prompt", {"prompt": 5}, r"field 'prompt' must be str, got int"),
    "prompt_list": ("prompt", {"prompt": ["q"]}, r"field 'prompt' must be str, got list"),
    "prompt_line_is_list": ("prompt", '["q"]', r"expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_json_type_is_named(tmp_path, case):
    fmt, record, message = WRONG_TYPES[case]
    path = _write(tmp_path / "types.jsonl", [FORMATS[fmt][1], record])
    with pytest.raises(DataFormatError, match=_at(path, 2) + message):
        _build(fmt, path, tmp_path)


@pytest.mark.parametrize("responses", [["a"], []], ids=["k1", "k0"])
def test_ranking_with_fewer_than_two_responses_is_refused(tmp_path, responses):
    record = {"prompt": "q", "responses": responses, "ranking": list(range(len(responses)))}
    path = _write(tmp_path / "ranked.jsonl", [FORMATS["ranked"][1], record])
    with pytest.raises(DataFormatError, match=_at(path, 2) +
                       rf"field 'responses' needs at least 2 answers .*got {len(responses)}"):
        _build("ranked", path, tmp_path)


# ------------------------------------------------------------------------------ empty texts

@pytest.mark.parametrize("text", ["", " \n\t"], ids=["empty", "whitespace"])
def test_empty_pretraining_text_is_skipped_and_counted(tmp_path, text):
    path = _write(tmp_path / "t.jsonl", [{"text": "a"}, {"text": text}, {"text": "b"}])
    with pytest.warns(UserWarning, match=r"text/train: left out 1 record\(s\); first: " +
                      re.escape(f"{path}:2: empty 'text'")):
        sources = _build("text", path, tmp_path)
    assert _items(sources["train"]) == [{"text": "a"}, {"text": "b"}]
    assert sources["train"].skipped == jsonl.SkipReport(1, (f"{path}:2: empty 'text'",))
    # A cached build reports the same count.
    with pytest.warns(UserWarning, match="left out 1 record"):
        again = _build("text", path, tmp_path)
    assert again["train"].skipped.count == 1


def test_file_of_only_empty_texts_is_refused(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(DataFormatError, match="^" + re.escape(
            f"{path}: the 'train' split holds no records (all 2 left out, first: {path}:1: "
            "empty 'text')")):
        _build("text", path, tmp_path)


# case -> (format, record with an empty part, what the count names)
EMPTY_PARTS = {
    "pclue_target": ("pclue", {"input": "q", "target": ""}, "answer"),
    "messages_answer": ("messages", {"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": " "}]},
                        "answer"),
    "ranked_response": ("ranked", {"prompt": "q", "responses": ["", "b"], "ranking": [1, 0]},
                        "response 0"),
    "pair_chosen": ("pair", {"prompt": "q", "chosen": "", "rejected": "n"}, "response 0"),
    "pair_both": ("pair", {"prompt": "q", "chosen": "", "rejected": ""},
                  "response 0, response 1"),
    "hh_chosen": ("hh", {"chosen": _hh("q", ""), "rejected": _hh("q", "n")}, "response 0"),
    "prompt_question": ("prompt", {"prompt": ""}, "question"),
}


@pytest.mark.parametrize("case", list(EMPTY_PARTS))
def test_empty_answer_or_question_is_kept_and_counted(tmp_path, case):
    fmt, record, part = EMPTY_PARTS[case]
    path = _write(tmp_path / "e.jsonl", [FORMATS[fmt][1], record])
    with pytest.warns(UserWarning, match=r"kept 1 .* record\(s\) with an empty answer, "
                      r"response or question; first: " + re.escape(f"{path}:2: empty {part}")):
        sources = _build(fmt, path, tmp_path)
    train = sources["train"]
    assert _items(train) == [_expected(fmt, FORMATS[fmt][1]), _expected(fmt, record)]
    assert train.empty == jsonl.SkipReport(1, (f"{path}:2: empty {part}",))
    assert train.skipped.count == 0


# ------------------------------------------------------------------------------ long inputs

def _ends_with(ids, tail):
    return list(ids[-len(tail):]) == list(tail)


def test_overlong_prompt_is_truncated_and_counted(tmp_path, tok):
    question = "这是一个很长的问题。" * 300 + "最后：天是什么颜色？"
    path = _write(tmp_path / "p.jsonl", [{"prompt": question}, {"prompt": "短"}])
    source = _build("prompt", path, tmp_path)["train"]
    cut = []
    ids = [chat_encoding.encode_prompt(source[i], tok, max_length=48, on_truncate=cut.append)
           for i in range(len(source))]
    assert len(ids[0]) == 48 and len(cut) == 1  # only the long one is cut
    assert re.fullmatch(r"prompt cut from \d{3,} to 47 tokens", cut[0])
    # The left is cut: the end of the question and the cue survive.
    assert _ends_with(ids[0], tok.encode("天是什么颜色？\n小元："))


def test_overlong_sft_prompt_and_answer_are_truncated_and_counted(tmp_path, tok):
    long = "这是一个很长的问题。" * 300
    path = _write(tmp_path / "s.jsonl", [{"input": long + "结尾？", "target": "是的"},
                                         {"input": "q", "target": long}])
    source = _build("pclue", path, tmp_path)["train"]
    cut = []
    (tokens, weights), (tokens2, weights2) = [
        chat_encoding.encode_sft(source[i], tok, max_length=64, on_truncate=cut.append)
        for i in range(2)]
    assert len(tokens) <= 64 and tokens[-1] == tok.eos_id  # the answer fits, with its EOS
    assert re.fullmatch(r"prompt cut from \d{3,} to \d+ tokens", cut[0])
    assert len(tokens2) == 64 and tokens2[-1] != tok.eos_id  # the answer is cut, no EOS
    assert re.fullmatch(r"answer cut from \d{3,} to \d+ tokens \(no EOS\)", cut[1])
    assert len(cut) == 2


def test_overlong_comparison_is_truncated_and_counted(tmp_path, tok):
    long = "这是一个很长的问题。" * 300
    path = _write(tmp_path / "c.jsonl", [{"prompt": long, "chosen": "好", "rejected": long}])
    comparison = _build("pair", path, tmp_path)["train"][0]
    cut = []
    tokens, lengths, _ = chat_encoding.encode_comparison(comparison, tok, max_length=64,
                                                         on_truncate=cut.append)
    assert tokens.shape == (2, 64) and lengths.max() == 64
    assert all(tokens[k, lengths[k] - 1] == tok.eos_id for k in range(2))  # reward at EOS
    assert len(cut) == 1 and re.fullmatch(
        r"prompt cut from \d{3,} to \d+ tokens; response 1 cut from \d{3,} to \d+ tokens",
        cut[0])


def test_text_longer_than_seq_len_is_chunked(tmp_path, tok):
    text = "第一篇很长的文章。" * 100
    path = _write(tmp_path / "t.jsonl", [{"text": text}])
    source = _build("text", path, tmp_path)["train"]
    batches = list(loaders.make_lm_batches(source, tok, seq_len=32, batch_size=4, seed=0,
                                           num_epochs=1, shuffle=False))
    tokens = [t for b in batches for row, seg in zip(b["tokens"], b["segment_ids"])
              for t in row[seg > 0]]
    assert tokens == [tok.bos_id] + tok.encode(text) + [tok.eos_id]  # every token, in order


@pytest.mark.parametrize("fmt", ALL)
def test_10mb_line_is_accepted(tmp_path, tok, ten_mb_text, fmt):
    big = ten_mb_text
    record = {
        "text": {"text": big},
        "pclue": {"input": big + "？", "target": "是的"},  # cut from the left
        "messages": {"messages": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": big}]},  # cut, no EOS
        "ranked": {"prompt": "q", "responses": ["a", big], "ranking": [0, 1]},
        "pair": {"prompt": big, "chosen": "y", "rejected": "n"},
        "hh": {"chosen": _hh("q", big), "rejected": _hh("q", "n")},
        "prompt": {"prompt": big},
    }[fmt]
    path = _write(tmp_path / "big.jsonl", [record])
    assert (tmp_path / "big.jsonl").stat().st_size > 10 * 2**20
    source = _build(fmt, path, tmp_path)["train"]
    assert len(source) == 1
    cut = []
    if fmt == "text":
        batch = next(loaders.make_lm_batches(source, tok, seq_len=256, batch_size=2, seed=0,
                                             num_epochs=1, shuffle=False))
        # Cut into seq_len chunks: each row is one full chunk of the one document.
        assert (batch["segment_ids"] == 1).all() and (batch["positions"][:, -1] == 255).all()
        assert batch["tokens"][0, 0] == tok.bos_id
        assert list(batch["tokens"][0, 1:101]) == tok.encode(big[:2000])[:100]
        # The pretrain stage first trains its tokenizer on the same file.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a reduced vocabulary is fine here
            trained = tok_lib.train_tokenizer(path, tmp_path / "big.model", 500, seed=0)
        assert trained.vocab_size > 256
        return
    kind = FORMATS[fmt][0]
    if kind == "sft":
        tokens, _ = chat_encoding.encode_sft(source[0], tok, max_length=128,
                                             on_truncate=cut.append)
        assert len(tokens) <= 128
    elif kind == "comparison":
        tokens, _, _ = chat_encoding.encode_comparison(source[0], tok, max_length=128,
                                                       on_truncate=cut.append)
        assert tokens.shape[1] == 128
    else:
        assert len(chat_encoding.encode_prompt(source[0], tok, max_length=128,
                                               on_truncate=cut.append)) == 128
    assert len(cut) == 1 and " cut from " in cut[0]
