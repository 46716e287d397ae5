"""Tests for data/chat_template.py: Jinja chat templates rendered as transformers renders them,
and the SFT / reward / PPO encodings of chat_encoding with them (loss mask on exactly the
assistant spans, BOS and EOS once, prompts a prefix of the SFT sequence)."""

import pickle
import warnings

import pytest

from instructjax.data import chat_encoding, chat_template, tokenizer_files
from instructjax.data import tokenizer as tok_lib
from instructjax.data.formats import Comparison, Dialogue, Prompt, Turn

TEXTS = [
    "你好！有什么可以帮你？我是一个乐于助人的助手。今天天气很好，我们去公园散步吧。",
    "Hello! How can I help you today? The quick brown fox jumps over the lazy dog.",
    "3 加 5 等于 8。What is 3 plus 5? It equals 8. 讲个笑话吧，好的。",
    "Why did the robot cross the road? Because it was programmed to. 因为它被编程了。",
] * 20
DIALOGUE = (
    Turn("system", "你是一个乐于助人的助手。"),
    Turn("user", "你好！"),
    Turn("assistant", "你好，有什么可以帮你？"),
    Turn("user", "What is 3 plus 5?"),
    Turn("assistant", " 3 plus 5 equals 8. "),  # spaces the LLaMA 3 template trims
    Turn("user", "讲个笑话 🤖"),
    Turn("assistant", "Why did the robot cross the road? 🤖\n因为它被编程了。"),
)
MARKERS = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}


def _transformers():
    return pytest.importorskip(
        "transformers", reason="transformers' apply_chat_template is the reference (pip install "
                               "-e .[dev])")


def _messages(turns):
    return [{"role": t.role, "content": t.content} for t in turns]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = tmp_path_factory.mktemp("families")
    return {family: tokenizer_files.build_hf_tokenizer_dir(out / family, TEXTS, family,
                                                           vocab_size=400)
            for family in tokenizer_files.FAMILIES}


@pytest.fixture(scope="module")
def toks(dirs):
    return {family: tok_lib.load_tokenizer(path) for family, path in dirs.items()}


@pytest.fixture(scope="module")
def refs(dirs):
    auto = _transformers().AutoTokenizer
    return {family: auto.from_pretrained(path, local_files_only=True)
            for family, path in dirs.items()}


def _runs(tokens, weights):
    """Maximal runs of tokens with weight 1.0, in order."""
    runs, current = [], []
    for t, w in zip(tokens, weights):
        if w:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("family", tokenizer_files.FAMILIES)
def test_rendering_matches_transformers(toks, refs, family):
    template = chat_template.chat_template_for(toks[family], "model")
    for turns, cue in ((DIALOGUE, False), (DIALOGUE[:-1], True), (DIALOGUE[:-1], False),
                       (DIALOGUE[1:4], False)):
        expected = refs[family].apply_chat_template(_messages(turns), tokenize=False,
                                                    add_generation_prompt=cue)
        assert template.render(turns, add_generation_prompt=cue) == expected
        assert chat_encoding.render_prompt(turns, template) == \
            template.render(turns, add_generation_prompt=True)


@pytest.mark.parametrize("family", tokenizer_files.FAMILIES)
def test_sft_mask_covers_exactly_the_assistant_spans(toks, refs, family):
    tok, ref = toks[family], refs[family]
    template = chat_template.chat_template_for(tok, "model")
    tokens, weights = chat_encoding.encode_sft(Dialogue(DIALOGUE), tok, template,
                                               max_length=1024)
    # The whole sequence is transformers' tokenisation of the rendered dialogue, up to the
    # final end-of-turn marker (ChatML's trailing newline is not trained).
    whole = ref.apply_chat_template(_messages(DIALOGUE), tokenize=True, return_dict=False)
    assert tokens == whole[:len(tokens)] and len(whole) - len(tokens) <= 1
    contents = [t.content.strip() if family == "llama3" else t.content
                for t in DIALOGUE if t.role == "assistant"]
    runs = _runs(tokens, weights)
    assert [ref.decode(r, skip_special_tokens=False) for r in runs] == \
        [c + MARKERS[family] for c in contents]
    assert sum(weights) == sum(map(len, runs))  # no weight outside the runs
    # BOS once (from the template for LLaMA 3 and Mistral; Qwen has none), EOS once.
    assert tokens.count(tok.bos_id) == (0 if tok.bos_id is None else 1)
    assert tokens[-1] in tok.eos_ids and tokens[-2] not in tok.eos_ids
    last, weights_last = chat_encoding.encode_sft(Dialogue(DIALOGUE), tok, template,
                                                  max_length=1024, train_on="last")
    assert last == tokens and _runs(last, weights_last) == runs[-1:]


@pytest.mark.parametrize("family", tokenizer_files.FAMILIES)
def test_prompt_ids_are_the_sft_prefix(toks, refs, family):
    tok = toks[family]
    template = chat_template.chat_template_for(tok, "model")
    tokens, _ = chat_encoding.encode_sft(Dialogue(DIALOGUE), tok, template, max_length=1024)
    prompt = chat_encoding.encode_prompt(Prompt(DIALOGUE[:-1]), tok, template, max_length=1024)
    assert tokens[:len(prompt)] == prompt and len(prompt) < len(tokens)
    assert prompt == refs[family].apply_chat_template(
        _messages(DIALOGUE[:-1]), tokenize=True, return_dict=False, add_generation_prompt=True)


@pytest.mark.parametrize("family", tokenizer_files.FAMILIES)
def test_comparison_rows_end_at_the_end_of_turn_marker(toks, family):
    tok = toks[family]
    template = chat_template.chat_template_for(tok, "model")
    comparison = Comparison(DIALOGUE[:-1], ("好的。", "A much longer answer " * 100), (1, 0))
    tokens, lengths, _ = chat_encoding.encode_comparison(comparison, tok, template,
                                                         max_length=400)
    prompt = chat_encoding.encode_prompt(Prompt(DIALOGUE[:-1]), tok, template, max_length=400)
    marker = tok.encode(MARKERS[family])[-1]
    for row, length in zip(tokens, lengths):
        assert row[length - 1] == marker and row[length - 2] not in tok.eos_ids
        assert (row[length:] == tok.pad_id).all()
    assert lengths[1] == 400 and list(tokens[0, :len(prompt)]) == prompt  # cut, prompt kept


@pytest.mark.parametrize("family", tokenizer_files.FAMILIES)
def test_truncation_keeps_the_budget(toks, family):
    tok = toks[family]
    template = chat_template.chat_template_for(tok, "model")
    cuts = []
    tokens, weights = chat_encoding.encode_sft(Dialogue(DIALOGUE), tok, template,
                                               max_length=80, on_truncate=cuts.append)
    assert len(tokens) == len(weights) <= 80 and cuts
    prompt = chat_encoding.encode_prompt(Prompt(DIALOGUE[:-1]), tok, template, max_length=50,
                                         on_truncate=cuts.append)
    assert len(prompt) <= 50 and prompt[:1] == tokens[:1] and len(cuts) == 2


BROKEN = {
    # The generation prompt opens "assistant", the message itself is rendered as "bot".
    "prefix": ("{% for m in messages %}<|im_start|>{{ 'bot' if m.role == 'assistant' else "
               "m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    # Assistant messages are replaced by a placeholder.
    "content": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ '...' if m.role == "
                "'assistant' else m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


@pytest.mark.parametrize("kind,why", [("prefix", "is not a prefix"),
                                      ("content", "is not in the rendered text")])
def test_a_template_that_cannot_mark_the_answer_raises(toks, kind, why):
    template = chat_template.JinjaChatTemplate(BROKEN[kind], (("eos_token", "<|im_end|>"),),
                                               ("<|im_end|>",))
    with pytest.raises(chat_template.ChatTemplateError,
                       match=f"cannot mark the assistant's part of message 2: .*{why}"):
        chat_encoding.encode_sft(Dialogue(DIALOGUE), toks["qwen2"], template, max_length=512)


def test_jinja_environment_matches_transformers(toks, refs):
    source = (
        "{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}"
        "{% if loop.index >= 2 %}{% break %}{% endif %}{% endfor %}"
        "{{ {'b': 1, 'a': '中'} | tojson(indent=1, sort_keys=True) }}"
        "[{{ strftime_now('%Y') }}]{{ bos_token }}|{{ eos_token }}|{{ pad_token }}"
        "{% if add_generation_prompt %}<go>{% endif %}")
    template = chat_template.JinjaChatTemplate.from_tokenizer(toks["llama3"])
    template = chat_template.JinjaChatTemplate(source, template.special_tokens,
                                               template.end_markers)
    for cue in (False, True):
        assert template.render(DIALOGUE, add_generation_prompt=cue) == \
            refs["llama3"].apply_chat_template(_messages(DIALOGUE), chat_template=source,
                                               tokenize=False, add_generation_prompt=cue)


def test_template_errors_are_clear(toks, tmp_path):
    mistral = chat_template.chat_template_for(toks["mistral"], "model")
    with pytest.raises(chat_template.ChatTemplateError, match="roles must alternate"):
        mistral.render((Turn("user", "a"), Turn("user", "b")))
    with pytest.raises(chat_template.ChatTemplateError, match="syntax error at line 1"):
        chat_template.JinjaChatTemplate("{% for m in messages %}")
    assert chat_template.chat_template_for(toks["qwen2"], "chatyuan") == \
        chat_encoding.ChatTemplate()
    with pytest.raises(ValueError, match="kind must be one of"):
        chat_template.chat_template_for(toks["qwen2"], "chatml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a reduced vocabulary
        own = tok_lib.train_tokenizer(TEXTS, tmp_path / "own.model", 400, seed=0)
    with pytest.raises(ValueError, match=f"tokenizer {own.model_path} has no chat template"):
        chat_template.chat_template_for(own, "model")
    assert chat_template.model_chat_template(toks["qwen2"]) == \
        chat_template.chat_template_for(toks["qwen2"], "model")


def test_template_pickles_and_chatyuan_spans_are_unchanged(toks):
    template = chat_template.chat_template_for(toks["qwen2"], "model")
    clone = pickle.loads(pickle.dumps(template))
    assert clone.spans(DIALOGUE, cue=False) == template.spans(DIALOGUE, cue=False)
    assert template.cue == "<|im_start|>assistant\n"
    chatyuan = chat_encoding.ChatTemplate()
    assert chatyuan.spans(DIALOGUE[1:3], cue=True) == [
        ("用户：你好！\n小元：", False), ("你好，有什么可以帮你？", True), ("\n小元：", False)]
    assert chat_encoding._spans(DIALOGUE, chatyuan, cue=False) == \
        chatyuan.spans(DIALOGUE, cue=False)
    assert chatyuan.answer_text(DIALOGUE[:-1], "x") == "x"


def test_a_base_models_template_end_of_turn_ends_answers_and_generation(dirs, tmp_path):
    # Qwen2.5 base names only <|endoftext|> as its EOS, while its ChatML template closes
    # every answer with <|im_end|>: answers must be trained to end there and generation
    # must stop there, exactly as the rendered template says.
    import json
    import shutil
    base = tmp_path / "qwen2_base"
    shutil.copytree(dirs["qwen2"], base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    generation = json.loads((base / "generation_config.json").read_text())
    end_of_text = generation["eos_token_id"][1]
    generation["eos_token_id"] = end_of_text
    (base / "generation_config.json").write_text(json.dumps(generation))
    tok = tok_lib.load_tokenizer(base)
    im_end = tok.encode("<|im_end|>")
    assert len(im_end) == 1 and tok.eos_id == end_of_text
    assert tok.eos_ids == (end_of_text, im_end[0])
    template = chat_template.chat_template_for(tok, "model")
    tokens, weights = chat_encoding.encode_sft(Dialogue(DIALOGUE), tok, template,
                                               max_length=1024)
    assert tokens[-1] == im_end[0] and end_of_text not in tokens
    ref = _transformers().AutoTokenizer.from_pretrained(base, local_files_only=True)
    whole = ref.apply_chat_template(_messages(DIALOGUE), tokenize=True, return_dict=False)
    assert tokens == whole[:len(tokens)]
    assert all(r[-1] == im_end[0] for r in _runs(tokens, weights))
    assert chat_template.end_of_turn_token("{{ messages[0]['content'] }}", {}, ["<x>"]) is None
