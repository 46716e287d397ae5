"""Tests for the tokenizer interface over sentencepiece `.model` files (ours and LLaMA 2 style)
and tokenizer.json directories (Qwen2, LLaMA 3, Mistral shaped): round trips, special ids,
pad rules, stream decoding, save_pretrained read back by transformers, pickling, errors."""

import json
import pickle
import warnings

import pytest

from instructjax.data import demo_corpus, jsonl, tokenizer_files, tokenizer_meta
from instructjax.data import tokenizer as tok_lib

EXTRA_TEXTS = [
    "你好，世界：这是一个测试。\n第二行，还有逗号。",
    "Hello, world: this is a test.\nSecond line, with commas.",
    "emoji 🤖🎉👍🏽 and rare 龘靐 chars 𝔘, 混合 mixed text 中文 and English！",
    "数字 0123456789 和 numbers 9876543210。",
]
ROUND_TRIP = [
    "苹果是红色的。",
    "The apple is red.",
    "用户：3 加 5 等于多少？\n小元：3 加 5 等于 8。",
    "emoji 🤖🎉 and rare 龘靐 chars 𝔘",
    "line one\nline two\n\n  indented line\n",
    "tab\tand full-width space　end，还有😀",
]
NAMES = ("own", "llama2", "qwen2", "llama3", "mistral")


def _auto_tokenizer():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is the reference for save_pretrained (pip install "
                               "-e .[dev])")
    return transformers.AutoTokenizer


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    paths = demo_corpus.write_demo_corpus(out, seed=0, num_train_docs=400, num_eval_docs=5)
    return [r["text"] for _, _, r in jsonl.read_jsonl(paths["train"])] + EXTRA_TEXTS


@pytest.fixture(scope="module")
def paths(texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a reduced vocabulary is fine here
        tok_lib.train_tokenizer(texts, out / "own.model", 600, seed=0)
    found = {"own": str(out / "own.model"),
             "llama2": tokenizer_files.build_llama2_spm_model(out / "llama2.model", texts)}
    for family in tokenizer_files.FAMILIES:
        found[family] = tokenizer_files.build_hf_tokenizer_dir(out / family, texts, family)
    return found


@pytest.fixture(scope="module")
def toks(paths):
    return {name: tok_lib.load_tokenizer(path) for name, path in paths.items()}


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_and_specials_decode_to_nothing(toks, name):
    tok = toks[name]
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.unk_id is None or tok.unk_id not in ids  # byte fallback / byte level
        assert tok.decode(ids) == text
        start = [tok.bos_id] if tok.bos_id is not None else []
        assert tok.decode(start + ids + [tok.eos_id, tok.pad_id, *tok.eos_ids]) == text


@pytest.mark.parametrize("name,expected", [
    ("own", dict(pad=0, unk=1, bos=2, eos=(3,), add_bos=True)),
    ("llama2", dict(pad=0, unk=0, bos=1, eos=(2,), add_bos=True)),  # no pad: unk pads
])
def test_sentencepiece_special_ids_are_read_from_the_model(toks, name, expected):
    tok = toks[name]
    got = dict(pad=tok.pad_id, unk=tok.unk_id, bos=tok.bos_id, eos=tok.eos_ids,
               add_bos=tok.add_bos)
    assert got == expected and tok.eos_id == expected["eos"][0]
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>") and tok.chat_template is None


def test_hf_special_ids_are_read_from_the_files(toks):
    qwen, llama3, mistral = toks["qwen2"], toks["llama3"], toks["mistral"]
    assert qwen.bos_id is None and not qwen.add_bos and qwen.unk_id is None
    assert [qwen.token_text(i) for i in qwen.eos_ids] == ["<|im_end|>", "<|endoftext|>"]
    # <|endoftext|> is the configured pad but also an EOS id: a reserved token pads instead.
    assert qwen.token_text(qwen.pad_id) == "<|fim_pad|>"
    assert llama3.bos_token == "<|begin_of_text|>" and llama3.add_bos
    assert [llama3.token_text(i) for i in llama3.eos_ids] == \
        ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]
    assert llama3.token_text(llama3.pad_id) == "<|finetune_right_pad_id|>"
    assert (mistral.bos_id, mistral.eos_ids, mistral.unk_id, mistral.pad_id) == (1, (2,), 0, 0)
    assert mistral.add_bos and mistral.special_tokens_map["bos_token"] == "<s>"
    # Special-token strings in text become their ids, as in transformers.
    ids = qwen.encode("<|im_start|>user\n你好<|im_end|>")
    assert (qwen.token_text(ids[0]), qwen.token_text(ids[-1])) == ("<|im_start|>", "<|im_end|>")
    for tok in toks.values():
        assert tok.pad_id not in tok.eos_ids


def test_hf_special_ids_match_transformers(paths, toks):
    auto = _auto_tokenizer()
    for family in tokenizer_files.FAMILIES:
        ref = auto.from_pretrained(paths[family], local_files_only=True)
        tok = toks[family]
        assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == \
            (ref.bos_token_id, ref.eos_token_id, ref.unk_token_id, len(ref))
        assert tok.special_tokens_map == ref.special_tokens_map
        assert tok.chat_template == ref.chat_template


def test_pad_rule_order():
    choose = tokenizer_meta.choose_pad_id
    base = dict(pad=None, unk=None, eos_ids=(9, 8), specials=[], vocab_size=20, where="t")
    assert choose(**{**base, "pad": 4, "unk": 5}, explicit=7) == 7
    assert choose(**{**base, "pad": 4, "unk": 5}, explicit=None) == 4
    assert choose(**{**base, "pad": 9, "unk": 5}, explicit=None) == 5  # pad is an EOS
    reserved = [(15, "<|reserved_special_token_3|>"), (12, "<|reserved_special_token_1|>"),
                (8, "<|pad|>")]
    assert choose(**{**base, "unk": 8, "specials": reserved}, explicit=None) == 12
    assert choose(**{**base, "specials": reserved + [(16, "<|fim_pad|>")]},
                  explicit=None) == 16
    with pytest.raises(ValueError, match="pass pad_id="):
        choose(**{**base, "pad": 9, "specials": [(3, "<|im_start|>")]}, explicit=None)
    for bad in (8, 20, -1):
        with pytest.raises(ValueError, match=rf"pad_id={bad} must be an id in \[0, 20\)"):
            choose(**base, explicit=bad)


def test_explicit_pad_id_wins_and_is_checked(paths):
    assert tok_lib.load_tokenizer(paths["qwen2"], pad_id=5).pad_id == 5
    assert tok_lib.load_tokenizer(paths["own"], pad_id=7).pad_id == 7
    qwen = tok_lib.load_tokenizer(paths["qwen2"])
    with pytest.raises(ValueError, match="other than the EOS ids"):
        tok_lib.load_tokenizer(paths["qwen2"], pad_id=qwen.eos_ids[1])


def test_no_pad_candidate_asks_for_an_explicit_pad_id(paths, tmp_path):
    config = json.loads(open(f"{paths['qwen2']}/tokenizer_config.json").read())
    spec = json.loads(open(f"{paths['qwen2']}/tokenizer.json").read())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if "fim" not in t["content"]]
    ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokenizer_meta.write_json(str(tmp_path / "tokenizer.json"), spec)
    tokenizer_meta.write_json(str(tmp_path / "tokenizer_config.json"), config)
    tokenizer_meta.write_json(str(tmp_path / "generation_config.json"),
                              {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
    with pytest.raises(ValueError, match=f"tokenizer {tmp_path} has no pad id.*pass pad_id="):
        tok_lib.load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_stream_decoding_never_splits_a_character(toks, texts, name):
    tok = toks[name]
    for text in ROUND_TRIP + texts[:40] + EXTRA_TEXTS:
        ids = tok.encode(text) + [tok.eos_id]
        decoder, pieces = tok.stream_decoder(), []
        for i in ids:
            piece = decoder.push(i)
            piece.encode("utf-8")  # a str with half a character would not encode
            assert "\ufffd" not in piece
            pieces.append(piece)
        pieces.append(decoder.flush())
        assert "".join(pieces) == tok.decode(ids)


def test_byte_fallback_pieces_wait_for_their_character(toks):
    for name in ("own", "llama2", "mistral"):
        tok = toks[name]
        ids = tok.encode_continuation("🦊")  # in no training text: byte fallback
        assert [tok.token_text(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x8A>"]
        decoder = tok.stream_decoder()
        assert [decoder.push(i) for i in ids] == ["", "", "", "🦊"]
        assert decoder.push(ids[0]) == ""
        assert set(decoder.flush()) == {"\ufffd"}  # a byte that never completed a character


@pytest.mark.parametrize("name", NAMES)
def test_encode_continuation_adds_no_space(toks, name):
    tok = toks[name]
    first, second = "用户：hello", "world 你好"
    ids = tok.encode(first) + tok.encode_continuation(second)
    assert tok.decode(ids) == first + second
    if name in ("own", "qwen2", "llama3"):  # no dummy prefix: the same as encode
        assert tok.encode_continuation(second) == tok.encode(second)
    else:
        assert tok.decode(tok.encode(first) + tok.encode(second)) == first + " " + second


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_loads_in_transformers_and_encodes_alike(toks, texts, name, tmp_path):
    auto = _auto_tokenizer()
    tok = toks[name]
    tok.save_pretrained(tmp_path)
    ref = auto.from_pretrained(str(tmp_path), local_files_only=True)
    corpus = texts + ROUND_TRIP + ["<s> and </s> <pad> as text", "  two leading spaces"]
    mismatches = [t for t in corpus if ref.encode(t, add_special_tokens=False) != tok.encode(t)]
    assert not mismatches, mismatches[:3]
    again = tok_lib.load_tokenizer(tmp_path)  # through tokenizer.json
    assert all(again.encode(t) == tok.encode(t) for t in corpus)
    assert (again.pad_id, again.bos_id, again.eos_ids, again.add_bos) == \
        (tok.pad_id, tok.bos_id, tok.eos_ids, tok.add_bos)


def test_sentencepiece_json_is_exact_on_the_whole_corpus(toks, texts, tmp_path):
    # The transformers check above covers the file; this one holds without transformers.
    toks["own"].save_pretrained(tmp_path)
    rebuilt = tok_lib.load_tokenizer(tmp_path)
    assert type(rebuilt).__name__ == "HFTokenizer"
    assert all(rebuilt.encode(t) == toks["own"].encode(t) for t in texts)


def test_sentencepiece_directory_reads_its_side_files(paths, texts, tmp_path):
    # A Hugging Face directory with only tokenizer.model (no tokenizer.json).
    (tmp_path / "tokenizer.model").write_bytes(open(paths["llama2"], "rb").read())
    tokenizer_meta.write_json(str(tmp_path / "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "legacy": False,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"})
    tokenizer_meta.write_json(str(tmp_path / "generation_config.json"),
                              {"eos_token_id": [2, 0]})
    with pytest.raises(ValueError, match="other than the EOS ids"):
        tok_lib.load_tokenizer(tmp_path, pad_id=0)  # unk is an EOS id here
    tok = tok_lib.load_tokenizer(tmp_path, pad_id=5)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == (1, (2, 0), 5, True)
    assert tok.chat_template.startswith("{{ bos_token }}")
    text = "<s>[INST] 你好 hello [/INST] world</s>"
    ids = tok.encode(text)
    assert (ids[0], ids[-1]) == (1, 2) and tok.decode(ids) == "[INST] 你好 hello [/INST] world"
    auto = _auto_tokenizer()
    ref = auto.from_pretrained(str(tmp_path), local_files_only=True)
    corpus = texts[:100] + ROUND_TRIP + [text, " leading space", "x<s>y</s>"]
    assert [ref.encode(t, add_special_tokens=False) for t in corpus] == \
        [tok.encode(t) for t in corpus]


@pytest.mark.parametrize("name", NAMES)
def test_pickle(toks, name):
    tok = toks[name]
    clone = pickle.loads(pickle.dumps(tok))
    text = "用户：你好\n小元：🤖 hello"
    assert clone.encode(text) == tok.encode(text)
    assert (clone.pad_id, clone.eos_ids, clone.chat_template) == \
        (tok.pad_id, tok.eos_ids, tok.chat_template)


def test_load_errors_name_the_path(paths, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        tok_lib.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot read tokenizer file {tmp_path}/tokenizer.json"):
        tok_lib.load_tokenizer(tmp_path)
    bad_config = tmp_path / "cfg"
    bad_config.mkdir()
    (bad_config / "tokenizer.json").write_text(open(f"{paths['qwen2']}/tokenizer.json").read())
    (bad_config / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=f"{bad_config}/tokenizer_config.json"):
        tok_lib.load_tokenizer(bad_config)
    (bad_config / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(ValueError, match="eos_token '<|nope|>' is not in the vocabulary"):
        tok_lib.load_tokenizer(bad_config)
    not_spm = tmp_path / "x.model"
    not_spm.write_bytes(b"IQ== 0\n")  # a tiktoken-style file, not a sentencepiece proto
    with pytest.raises(ValueError, match=f"tokenizer {not_spm} is not a sentencepiece model"):
        tok_lib.load_tokenizer(not_spm)
