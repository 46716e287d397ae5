"""Small tokenizer directories shaped like Qwen2, LLaMA 3 and Mistral ones, built locally.

No download is possible in tests, so these train a tokenizer on the given texts and write the
files a Hugging Face checkpoint ships, with each family's special tokens, settings and chat
template (written here from the published prompt formats):

  qwen2    byte-level BPE (NFC, Qwen's split regex); <|endoftext|>, <|im_start|>, <|im_end|>
           and FIM tokens; no BOS; eos <|im_end|>, pad <|endoftext|>; generation stops at
           <|im_end|> or <|endoftext|>; ChatML with a default system message.
  llama3   byte-level BPE (LLaMA 3's split regex, whole-word vocabulary hits); <|begin_of_text|>
           added as BOS by the post-processor; <|start_header_id|>, <|end_header_id|>,
           <|eot_id|>, <|eom_id|>, <|finetune_right_pad_id|>, reserved tokens; eos <|eot_id|>,
           generation stops at <|end_of_text|>, <|eom_id|>, <|eot_id|>; LLaMA 3 instruct
           headers, contents trimmed.
  mistral  sentencepiece-style BPE with byte fallback and a "▁" prefix at the start of a
           text (what transformers' LlamaTokenizer class, named by Mistral's config, builds);
           <unk>, <s>, </s>; add BOS; [INST] instruct format, the system message in front of
           the first user message.

`build_llama2_spm_model` writes a LLaMA 2 style sentencepiece `.model` (no pad, unk 0, bos 1,
eos 2, dummy prefix). Used by tests of the tokenizers and chat templates, the weight importer
and the chat command.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Sequence

import sentencepiece as spm
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors, trainers)

from instructjax.data import tokenizer_meta as meta_lib

FAMILIES = ("qwen2", "llama3", "mistral")

_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                 r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML: every message as <|im_start|>{role}\n{content}<|im_end|>\n; a default system message
# when the dialogue has none; the generation prompt opens an assistant message.
CHATML_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# LLaMA 3 instruct: BOS, then per message a role header, a blank line, the trimmed content
# and <|eot_id|>; the generation prompt is the assistant header.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}")

# Mistral instruct: <s>[INST] {user} [/INST] {answer}</s>[INST] ...; an optional system
# message goes in front of the first user message; roles must alternate.
MISTRAL_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system is not none %}"
    "{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}")

_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>",
                  "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                    "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_3|>")
_MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>")


def _shuffled(texts: Sequence[str], seed: int) -> list[str]:
    """The texts in a seeded order (the trainers break count ties by what they saw first)."""
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("tokenizer_files: the training texts hold no text")
    random.Random(seed).shuffle(texts)
    return texts


def _byte_level(texts: Sequence[str], split: str, vocab_size: int, *, nfc: bool,
                ignore_merges: bool) -> Tokenizer:
    """A byte-level BPE trained on texts, pre-tokenised by the `split` regex as GPT-4-era
    tokenizers do; every byte is in the vocabulary, so nothing is unknown."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _metaspace_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A sentencepiece-style BPE: <unk> <s> </s>, the 256 <0xNN> byte pieces, then pieces
    learnt on "▁"-joined words; characters outside the vocabulary fall back to bytes."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁",
                                                         prepend_scheme="always", split=True)
    # limit_alphabet leaves rare characters (emoji) to byte fallback, as in LLaMA 2's vocab.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  limit_alphabet=300)
    trainer_tok.train_from_iterator(texts, trainer)
    learnt = json.loads(trainer_tok.to_str())["model"]
    pieces = list(_MISTRAL_SPECIALS) + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1])]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1,
                                                                     right=0)])
    return tok


def _add_specials(tok: Tokenizer, specials: Sequence[str]) -> dict[str, int]:
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return {s: tok.token_to_id(s) for s in specials}


def _added_tokens_decoder(ids: dict[str, int]) -> dict[str, dict]:
    return {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for s, i in ids.items()}


def _qwen2(texts: Sequence[str], vocab_size: int) -> tuple[Tokenizer, dict, dict]:
    tok = _byte_level(texts, _QWEN_SPLIT, vocab_size, nfc=True, ignore_merges=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    ids = _add_specials(tok, _QWEN_SPECIALS)
    config = {"add_prefix_space": False, "added_tokens_decoder": _added_tokens_decoder(ids),
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
              "bos_token": None, "chat_template": CHATML_TEMPLATE,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
              "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
              "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
              "unk_token": None}
    generation = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                  "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    return tok, config, generation


def _llama3(texts: Sequence[str], vocab_size: int) -> tuple[Tokenizer, dict, dict]:
    tok = _byte_level(texts, _LLAMA3_SPLIT, vocab_size, nfc=False, ignore_merges=True)
    ids = _add_specials(tok, _LLAMA3_SPECIALS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, ids[bos])])])
    config = {"added_tokens_decoder": _added_tokens_decoder(ids), "bos_token": bos,
              "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": False,
              "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    generation = {"bos_token_id": ids[bos], "eos_token_id": [
        ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}
    return tok, config, generation


def _mistral(texts: Sequence[str], vocab_size: int) -> tuple[Tokenizer, dict, dict]:
    tok = _metaspace_bpe(texts, vocab_size)
    ids = _add_specials(tok, _MISTRAL_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", ids["<s>"])])
    config = {"add_bos_token": True, "add_eos_token": False,
              "added_tokens_decoder": _added_tokens_decoder(ids), "bos_token": "<s>",
              "chat_template": MISTRAL_TEMPLATE, "clean_up_tokenization_spaces": False,
              "eos_token": "</s>", "legacy": False, "model_max_length": 32768,
              "pad_token": None, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}
    generation = {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]}
    return tok, config, generation


_BUILDERS = {"qwen2": _qwen2, "llama3": _llama3, "mistral": _mistral}


def build_hf_tokenizer_dir(out_dir: str | os.PathLike, texts: Sequence[str], family: str, *,
                           vocab_size: int = 800, seed: int = 0) -> str:
    """Trains a tokenizer on `texts` and writes a `family`-shaped Hugging Face directory.

    Args:
        out_dir: the directory to write (created); gets tokenizer.json, tokenizer_config.json
            (with the chat template) and generation_config.json (the EOS ids).
        texts: training documents (list of str).
        family: "qwen2", "llama3" or "mistral" (module docstring).
        vocab_size: the learnt vocabulary size before the special tokens are added (the
            byte-level families need more than 256, mistral more than 259).
        seed: orders the texts before training (same texts and seed, same files).

    Returns:
        out_dir as a str.

    Raises:
        ValueError: an unknown family or texts with no text.
    """
    if family not in _BUILDERS:
        raise ValueError(f"tokenizer family must be one of {FAMILIES}, got {family!r}")
    tok, config, generation = _BUILDERS[family](_shuffled(texts, seed), vocab_size)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    meta_lib.write_json(os.path.join(out_dir, meta_lib.CONFIG_FILE), config)
    meta_lib.write_json(os.path.join(out_dir, meta_lib.GENERATION_FILE), generation)
    return out_dir


def build_llama2_spm_model(path: str | os.PathLike, texts: Sequence[str], *,
                           vocab_size: int = 600, seed: int = 0) -> str:
    """Trains a LLaMA 2 style sentencepiece BPE `.model` on `texts` and writes it to `path`.

    Settings as LLaMA 2's tokenizer: no pad id (-1), unk 0, bos 1, eos 2; a dummy-prefix
    space; identity normalisation with whitespace kept; digits split; byte fallback.

    Returns:
        path as a str.
    """
    texts = _shuffled(texts, seed)
    spm.set_random_generator_seed(seed)  # global in the library, hence set right before
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for t in texts for line in t.split("\n") if line]),
        model_writer=proto, model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, pad_id=-1, unk_id=0, bos_id=1, eos_id=2,
        num_threads=1, minloglevel=2)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    return path
