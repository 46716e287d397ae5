"""Tests for data/tokenizer.py (training, round trips, errors) and the demo corpus."""

import collections
import json
import pickle
import re
import warnings

import pytest

from instructjax.data import demo_corpus, jsonl, text_sources
from instructjax.data import tokenizer as tok_lib

EXTRA_TEXTS = [
    "你好，世界：这是一个测试。\n第二行，还有逗号。",
    "Hello, world: this is a test.\nSecond line, with commas.",
    "数字 0123456789 和 numbers 9876543210。",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    paths = demo_corpus.write_demo_corpus(out, seed=0, num_train_docs=800, num_eval_docs=20)
    # The texts pretraining reads: the corpus's TFDS train split.
    source = text_sources.build_text_source(paths["train"], None, out / "tfds")["train"]
    texts = [source[i]["text"] for i in range(len(source))] + EXTRA_TEXTS
    return out, paths, texts


@pytest.fixture(scope="module")
def tokenizer(corpus):
    out, _, texts = corpus
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vocabulary may be reduced; tested below
        return tok_lib.train_tokenizer(texts, out / "tok.model", 600, seed=0)


ROUND_TRIP_CASES = [
    "苹果是红色的。",
    "The apple is red.",
    "用户：3 加 5 等于多少？\n小元：3 加 5 等于 8。",
    "mixed 中文 and English，带全角标点：，。？",
    "line one\nline two\n\n  indented line\n",
    "  leading and  double  spaces ",
    "1234567890 + 98765 = 99999",
    "emoji 🤖🎉 and rare 龘靐 chars 𝔘",
    "tab\tand full-width space　end",
]


@pytest.mark.parametrize("text", ROUND_TRIP_CASES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.unk_id not in ids  # byte fallback: nothing becomes <unk>
    assert tokenizer.decode(ids) == text


def test_no_bos_eos_and_special_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    ids = tokenizer.encode("苹果是红色的。")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id, tokenizer.pad_id]) == \
        "苹果是红色的。"


def test_full_width_punctuation_is_not_normalised(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("用户：小元。")]
    assert "：" in pieces and "。" in pieces  # frequent in the corpus: own pieces
    # NFKC would map "，" to "," and "：" to ":"; identity normalisation keeps them apart.
    for full, ascii_ in (("，", ","), ("：", ":"), ("？", "?")):
        assert tokenizer.encode(full) != tokenizer.encode(ascii_)
        assert tokenizer.decode(tokenizer.encode(full)) == full


def test_newline_and_digits_are_own_pieces(tokenizer):
    assert tokenizer.encode("\n") == tokenizer.encode("\n\n")[:1]
    assert tokenizer.id_to_piece(tokenizer.encode("\n")[0]) == "\n"
    digit_pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("12345")]
    assert len(digit_pieces) == 5  # split_digits: one piece (or byte) per digit


def test_rare_characters_use_byte_fallback(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("🤖")]
    assert pieces == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]


def test_concatenated_encodings_decode_to_concatenated_text(tokenizer):
    # No dummy-prefix space: prompt and response can be encoded separately.
    prompt, response = "用户：What is 2 plus 2?\n小元：", "2 plus 2 equals 4."
    assert tokenizer.decode(tokenizer.encode(prompt) + tokenizer.encode(response)) == \
        prompt + response


def test_training_is_deterministic_and_files_match_texts(corpus, tokenizer, tmp_path):
    _, paths, texts = corpus
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = tok_lib.train_tokenizer(texts, tmp_path / "again.model", 600, seed=0)
        from_file = tok_lib.train_tokenizer(paths["train"], tmp_path / "file.model", 600, seed=0)
        from_list = tok_lib.train_tokenizer([paths["train"]], tmp_path / "list.model", 600,
                                            seed=0, max_lines=100_000)
        from_texts = tok_lib.train_tokenizer(texts[:-len(EXTRA_TEXTS)], tmp_path / "texts.model",
                                             600, seed=0)
    with open(tokenizer.model_path, "rb") as f1, open(again.model_path, "rb") as f2:
        assert f1.read() == f2.read()
    with open(from_file.model_path, "rb") as f1, open(from_texts.model_path, "rb") as f2:
        assert f1.read() == f2.read()
    # max_lines is recorded in the model file, so compare the vocabularies here.
    assert [from_list.id_to_piece(i) for i in range(from_list.vocab_size)] == \
        [from_texts.id_to_piece(i) for i in range(from_texts.vocab_size)]


def test_small_corpus_reduces_vocab_with_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"reduced from the requested 4000 to \d+"):
        tok = tok_lib.train_tokenizer(["3 加 5 等于 8。", "7 plus 2 equals 9."] * 10,
                                      tmp_path / "small.model", 4000, seed=0)
    assert 256 < tok.vocab_size < 4000
    assert tok.decode(tok.encode("7 加 2 等于 9。")) == "7 加 2 等于 9。"


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        tok_lib.train_tokenizer(["", "\n"], tmp_path / "t.model", 300, seed=0)
    # A list of paths with a missing file fails loudly (never trains on the path strings).
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tok_lib.train_tokenizer([str(tmp_path / "missing.jsonl")], tmp_path / "t.model", 300,
                                seed=0)
    with pytest.raises(ValueError, match="model_type"):
        tok_lib.train_tokenizer(["abc"], tmp_path / "t.model", 300, seed=0, model_type="word2")


def test_load_and_pickle(tokenizer, tmp_path):
    loaded = tok_lib.load_tokenizer(tokenizer.model_path)
    text = "用户：你好\n小元：🤖"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.model_path == tokenizer.model_path
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(text) == tokenizer.encode(text)


def test_load_missing_model_is_clear_error(tmp_path):
    missing = tmp_path / "no_such_dir" / "tok.model"
    with pytest.raises(FileNotFoundError,
                       match="tokenizer model not found: .*no_such_dir/tok.model"):
        tok_lib.load_tokenizer(missing)


# ------------------------------------------------------------------------- demo corpus

def test_demo_corpus_is_deterministic(tmp_path):
    a = demo_corpus.write_demo_corpus(tmp_path / "a", seed=3, num_train_docs=50, num_eval_docs=5)
    b = demo_corpus.write_demo_corpus(tmp_path / "b", seed=3, num_train_docs=50, num_eval_docs=5)
    c = demo_corpus.write_demo_corpus(tmp_path / "c", seed=4, num_train_docs=50, num_eval_docs=5)
    read = lambda p: open(p, "rb").read()  # pylint: disable=unnecessary-lambda-assignment
    assert read(a["train"]) == read(b["train"]) and read(a["eval"]) == read(b["eval"])
    assert read(a["train"]) != read(c["train"])
    assert read(a["train"]) != read(a["eval"])
    assert sum(1 for _ in jsonl.read_jsonl(a["train"])) == 50


def test_demo_corpus_facts_are_true_and_formats_mixed(corpus):
    _, _, texts = corpus
    texts = texts[:-len(EXTRA_TEXTS)]
    zh = re.findall(r"(\d+) ([加减]) (\d+) 等于 (\d+)。", "\n".join(texts))
    en = re.findall(r"(\d+) (plus|minus) (\d+) equals (\d+)\.", "\n".join(texts))
    assert len(zh) > 100 and len(en) > 100
    for a, op, b, c in zh + en:
        assert int(c) == (int(a) + int(b) if op in ("加", "plus") else int(a) - int(b))
    kinds = collections.Counter(
        "dialogue" if t.startswith("用户：") else "multiline" if "\n" in t else "line"
        for t in texts)
    assert min(kinds.values()) > 100, kinds
    dialogue = next(t for t in texts if t.startswith("用户："))
    turn = r"用户：[^\n]+\n小元：[^\n]+"
    assert re.fullmatch(f"{turn}(\n{turn})*", dialogue)
    # Facts never contradict: each person lives in exactly one city.
    cities = collections.defaultdict(set)
    for person, city in re.findall(r"(\w+)住在(\w+)。", "\n".join(texts)):
        cities[person].add(city)
    assert cities and all(len(c) == 1 for c in cities.values())
    assert json.dumps(texts[0], ensure_ascii=False)


def test_decode_maps_ids_past_the_vocabulary_to_unknown(tmp_path):
    tok = tok_lib.train_tokenizer(["你好 world\n1 加 2 等于 3。"] * 50, str(tmp_path / "t.model"), 300,
                                    seed=0)
    ids = tok.encode("world")
    assert tok.decode(ids + [tok.vocab_size + 5]) == tok.decode(ids + [tok.unk_id])
