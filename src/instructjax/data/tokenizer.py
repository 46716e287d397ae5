"""Tokenizers: train our sentencepiece model; load it, a LLaMA 2 style `.model` or a Hugging
Face directory (`load_tokenizer`); encode, decode, stream-decode, save for transformers.

Training settings are chosen so text survives a round trip unchanged: identity
normalisation (NFKC would turn the full-width "：" of the dialogue format into ":"), no
whitespace collapsing, no dummy-prefix space (so encoding a prompt and a response
separately and concatenating the ids decodes to the concatenated text), newline as a
user-defined piece, digits split one per piece (arithmetic), and byte fallback so any rare
character or emoji is encoded as UTF-8 bytes instead of <unk>.

Every tokenizer `load_tokenizer` returns (`Tokenizer` here, `hf_tokenizer.HFTokenizer` for a
tokenizer.json) has the same interface: encode(str) -> list[int] (no BOS/EOS),
encode_continuation(str), decode(ids) -> str, stream_decoder(), token_text(id),
save_pretrained(dir), and vocab_size, pad_id, unk_id, bos_id, eos_id, eos_ids, add_bos,
chat_template, special_tokens_map, bos_token, eos_token, model_path.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sentencepiece as spm

from instructjax.data import hf_tokenizer, jsonl, spm_convert
from instructjax.data import tokenizer_meta as meta_lib
from instructjax.data.stream_decode import StreamDecoder

# The special ids of every model trained here; other models' are read from their files.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"  # a sentencepiece model's name in a Hugging Face directory

# sentencepiece skips (with only a log line) sentences longer than max_sentence_length
# bytes. Texts are fed line by line and long lines cut into windows of this many characters
# (at most 4 UTF-8 bytes each), so no training text is dropped.
_MAX_CHARS_PER_SENTENCE = 4096
_MAX_SENTENCE_BYTES = 4 * _MAX_CHARS_PER_SENTENCE


class Tokenizer:
    """A sentencepiece `.model` with the project's tokenizer interface.

    Special ids are read from the model: ours have pad 0, unk 1, bos 2, eos 3; LLaMA 2 style
    models have no pad (pad -1), unk 0, bos 1, eos 2, so their pad id falls back to unk
    (`tokenizer_meta.choose_pad_id`). A tokenizer.model inside a Hugging Face directory
    (`meta` given) takes its named tokens, EOS ids, add_bos_token and chat template from the
    side files, and reads special-token strings such as "<s>" in text as their ids, as
    transformers does; a bare `.model` file encodes all text as text.

    `encode` adds no BOS/EOS: callers (the packing pipeline, dialogue rendering) decide.
    Picklable (the model bytes travel along), so it can be sent to data worker processes.
    """

    def __init__(self, model_path: str | os.PathLike, *, pad_id: int | None = None,
                 meta: meta_lib.TokenizerMeta | None = None):
        self._model_path = os.fspath(model_path)
        try:
            with open(self._model_path, "rb") as f:
                proto = f.read()
        except OSError as err:
            raise FileNotFoundError(f"cannot read tokenizer model {self._model_path}: "
                                    f"{err}") from err
        self._init_from_proto(proto, pad_id, meta)

    def _init_from_proto(self, proto: bytes, pad_id: int | None,
                         meta: meta_lib.TokenizerMeta | None) -> None:
        self._proto, self._explicit_pad, self._meta = proto, pad_id, meta
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
            self._model = spm_convert.parse_proto(proto)
        except (RuntimeError, ValueError) as err:
            raise jsonl.DataFormatError(f"tokenizer {self._model_path} is not a sentencepiece "
                                        f"model: {err}") from err
        self._special_re, self._special_ids = self._special_pattern()
        self._unk = self._sp.unk_id()
        self._bos = self._named_id("bos_token", self._sp.bos_id())
        eos = self._named_id("eos_token", self._sp.eos_id())
        if eos is None:
            raise jsonl.DataFormatError(f"tokenizer {self._model_path} has no EOS id")
        self._eos_ids = meta_lib.eos_tuple(eos, meta.generation_eos_ids() if meta else ())
        self._pad = meta_lib.choose_pad_id(
            explicit=pad_id, pad=self._named_id("pad_token", self._sp.pad_id()),
            unk=self._unk, eos_ids=self._eos_ids, specials=self._control_pieces(),
            vocab_size=self.vocab_size, where=self._model_path)
        add_bos = meta.add_bos_token() if meta else None
        self._add_bos = self._bos is not None and add_bos is not False
        self._adds_prefix = self._model.normalizer_spec.add_dummy_prefix

    def _control_pieces(self, *, user_defined: bool = True) -> list[tuple[int, str]]:
        """(id, piece) of the control, unknown and (optionally) user-defined pieces."""
        kinds = spm_convert.SPECIAL_KINDS + ((spm_convert.USER_DEFINED,) if user_defined else ())
        return [(i, p.piece) for i, p in enumerate(self._model.pieces) if p.type in kinds]

    def _piece_id(self, text: str, what: str) -> int:
        token_id = self._sp.piece_to_id(text)
        if self._sp.id_to_piece(token_id) != text:
            raise jsonl.DataFormatError(f"tokenizer {self._model_path}: {what} {text!r} is not "
                                        "in the sentencepiece vocabulary")
        return token_id

    def _named_id(self, name: str, model_id: int) -> int | None:
        """The id of named token `name`: from the side files when they name it, else the
        model's (`model_id`, -1 = none)."""
        meta = self._meta
        if meta is not None and (name in meta.config or name in meta.special_map):
            text = meta.token(name)
            return None if text is None else self._piece_id(text, name)
        return model_id if model_id >= 0 else None

    def _special_pattern(self) -> tuple[re.Pattern | None, dict[str, int]]:
        """The regex of special-token strings read as ids in text, and their ids."""
        meta = self._meta
        if meta is None or meta.config.get("split_special_tokens"):
            return None, {}
        beyond = sorted(i for i in meta.added_tokens() if i >= self._sp.vocab_size())
        if beyond:
            raise jsonl.DataFormatError(
                f"tokenizer {self._model_path}: {meta_lib.CONFIG_FILE} adds tokens past the "
                f"sentencepiece vocabulary (ids {beyond[:5]}); give the directory a "
                "tokenizer.json")
        names = {text: i for i, text in self._control_pieces(user_defined=False)}
        for text in meta.named_tokens().values():
            names[text] = self._piece_id(text, "special token")
        if not names:
            return None, {}
        pattern = "|".join(re.escape(t) for t in sorted(names, key=len, reverse=True))
        return re.compile(pattern), names

    def __getstate__(self) -> dict:
        return {"model_path": self._model_path, "proto": self._proto,
                "pad_id": self._explicit_pad, "meta": self._meta}

    def __setstate__(self, state: dict) -> None:
        self._model_path = state["model_path"]
        self._init_from_proto(state["proto"], state.get("pad_id"), state.get("meta"))

    # -------------------------------------------------------------------------- encoding

    def _encode_text(self, text: str, continuation: bool) -> list[int]:
        if not text:
            return []
        # Reading special tokens in text is transformers' behaviour, so is its Metaspace
        # rule: no dummy prefix before text that starts with a space (or its "▁").
        if self._special_re is not None and text.startswith((" ", "▁")):
            continuation = True
        if continuation and self._adds_prefix:
            return hf_tokenizer.encode_without_prefix(self._encode_text_start, text)
        return self._sp.encode(text, out_type=int)

    def _encode_text_start(self, text: str) -> list[int]:
        return self._encode_text(text, continuation=False)

    def _encode(self, text: str, continuation: bool) -> list[int]:
        if self._special_re is None:
            return self._encode_text(text, continuation)
        ids: list[int] = []
        pos = 0
        # As transformers' Metaspace "first" scheme: only text at the very start gets the
        # dummy prefix; text after a special token continues the string.
        for match in self._special_re.finditer(text):
            ids += self._encode_text(text[pos:match.start()], continuation or pos > 0)
            ids.append(self._special_ids[match.group()])
            pos = match.end()
        return ids + self._encode_text(text[pos:], continuation or pos > 0)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (a str), without BOS/EOS; ids are ints in [0, vocab_size)."""
        return self._encode(text, continuation=False)

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` that continues earlier text: `encode` without the dummy-prefix space
        a LLaMA 2 style model puts at the start of a string (same as `encode` for ours)."""
        return self._encode(text, continuation=True)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (list or 1-D int array); pad/bos/eos ids decode to "".

        Ids past the vocabulary (a model's vocab is often padded beyond the tokenizer's, and
        an undertrained model can sample those rows) decode as the unknown piece.
        """
        size = self.vocab_size
        skip = {self._pad, self._bos, *self._eos_ids}
        return self._sp.decode([i if 0 <= i < size else self._unk
                                for i in map(int, ids) if i not in skip])

    def stream_decoder(self) -> StreamDecoder:
        """A `StreamDecoder` whose push(id) -> str never splits a UTF-8 character."""
        return StreamDecoder(self.decode)

    def token_text(self, token_id: int) -> str:
        """The vocabulary piece of one id, e.g. "▁plus", "<0xF0>", "\\n" or "</s>"."""
        return self._sp.id_to_piece(int(token_id))

    id_to_piece = token_text

    # ------------------------------------------------------------------------ attributes

    @property
    def vocab_size(self) -> int:
        """Number of ids V (all ids are in [0, V))."""
        return self._sp.vocab_size()

    @property
    def model_path(self) -> str:
        """Path of the `.model` file this tokenizer was loaded from."""
        return self._model_path

    @property
    def pad_id(self) -> int:
        """The padding id (ours: 0); never a training target and never an EOS id."""
        return self._pad

    @property
    def unk_id(self) -> int:
        """The id of unknown pieces (ours: 1); rare with byte fallback."""
        return self._unk

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id (ours: 2), or None."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """The primary end-of-sequence id (ours: 3)."""
        return self._eos_ids[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: eos_id, then generation_config.json's."""
        return self._eos_ids

    @property
    def add_bos(self) -> bool:
        """Whether sequences start with BOS (ours: True)."""
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template of the model's directory, or None (ours have none)."""
        return None if self._meta is None else self._meta.chat_template

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """{"bos_token": "<s>", "eos_token": "</s>", ...}: the named special tokens."""
        if self._meta is not None:
            return self._meta.named_tokens()
        named = {"bos_token": self._bos, "eos_token": self.eos_id, "unk_token": self._unk,
                 "pad_token": self._sp.pad_id()}
        return {k: self.token_text(i) for k, i in named.items() if i is not None and i >= 0}

    @property
    def bos_token(self) -> str | None:
        """The BOS piece ("<s>"), or None."""
        return None if self._bos is None else self.token_text(self._bos)

    @property
    def eos_token(self) -> str:
        """The primary EOS piece ("</s>")."""
        return self.token_text(self.eos_id)

    def __repr__(self) -> str:
        return f"Tokenizer({self._model_path!r}, vocab_size={self.vocab_size})"

    # ----------------------------------------------------------------------------- saving

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Writes a Hugging Face tokenizer directory: tokenizer.json (an exact rebuild of the
        model, `spm_convert`), tokenizer.model (the model itself), tokenizer_config.json,
        special_tokens_map.json and, where absent, generation_config.json.

        `transformers.AutoTokenizer.from_pretrained(directory)` loads it offline and encodes
        like `encode`; its config sets split_special_tokens when `encode` reads "<s>" in text
        as text. `load_tokenizer(directory)` reads it back (through tokenizer.json).

        Returns:
            The paths written (list of str).

        Raises:
            ValueError: for a model whose normalisation tokenizer.json cannot reproduce.
        """
        directory = os.fspath(directory)
        backend = spm_convert.tokenizer_from_proto(self._proto, self._model_path,
                                                   parse_special=self._special_re is not None)
        os.makedirs(directory, exist_ok=True)
        json_path = os.path.join(directory, hf_tokenizer.TOKENIZER_JSON)
        backend.save(json_path)
        model_path = os.path.join(directory, TOKENIZER_FILE)
        with open(model_path, "wb") as f:
            f.write(self._proto)
        named = self.special_tokens_map
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **named,
                  "pad_token": self.token_text(self._pad), "add_bos_token": self._add_bos,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "split_special_tokens": self._special_re is None}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return [json_path, model_path] + meta_lib.write_side_files(
            directory, {meta_lib.CONFIG_FILE: config, meta_lib.SPECIAL_MAP_FILE: named},
            template_file=None, bos_id=self._bos, eos_ids=self._eos_ids, pad_id=self._pad)


AnyTokenizer = Tokenizer | hf_tokenizer.HFTokenizer


def load_tokenizer(path: str | os.PathLike, *, pad_id: int | None = None) -> AnyTokenizer:
    """Loads a tokenizer: a sentencepiece `.model` file, or a Hugging Face directory.

    A directory is read through its tokenizer.json when it has one (`hf_tokenizer`), else its
    tokenizer.model, with the side files tokenizer_config.json, special_tokens_map.json,
    generation_config.json and chat_template.jinja when present (`tokenizer_meta`).

    Args:
        path: the `.model` file, a tokenizer.json file, or a directory (str or PathLike).
        pad_id: an explicit pad id; None picks one by `tokenizer_meta`'s rule.

    Returns:
        A `Tokenizer` (sentencepiece) or an `hf_tokenizer.HFTokenizer`; both have encode,
        encode_continuation, decode, stream_decoder, save_pretrained, vocab_size, pad_id,
        unk_id, bos_id, eos_id, eos_ids, add_bos, chat_template and special_tokens_map.

    Raises:
        FileNotFoundError: naming `path` when it does not exist, or a directory with neither
            tokenizer.json nor tokenizer.model.
        ValueError: an unreadable file (naming it), or no usable pad id (pass pad_id=).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, hf_tokenizer.TOKENIZER_JSON)):
            return hf_tokenizer.HFTokenizer(path, pad_id=pad_id)
        model = os.path.join(path, TOKENIZER_FILE)
        if os.path.isfile(model):
            return Tokenizer(model, pad_id=pad_id, meta=meta_lib.read_meta(path))
        raise FileNotFoundError(f"tokenizer directory {path!r} holds neither "
                                f"{hf_tokenizer.TOKENIZER_JSON} nor {TOKENIZER_FILE}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model not found: {path!r}")
    if os.path.basename(path) == hf_tokenizer.TOKENIZER_JSON:
        return hf_tokenizer.HFTokenizer(os.path.dirname(path) or ".", pad_id=pad_id)
    return Tokenizer(path, pad_id=pad_id)


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    # Splitting at newlines loses nothing: "\n" is a user-defined piece, which BPE/unigram
    # never merge with neighbours, so no merge could cross a line boundary anyway.
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _MAX_CHARS_PER_SENTENCE):
                yield line[start:start + _MAX_CHARS_PER_SENTENCE]


def _is_path_spec(value: Any) -> bool:
    if isinstance(value, (str, os.PathLike)):
        return True
    # A list of documents never looks like this; a list of paths with a missing file still
    # does (by its suffix), so it fails loudly instead of training on the path strings.
    return (isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(p, os.PathLike) or (isinstance(p, str) and (
            p.endswith(jsonl.DATA_SUFFIXES) or os.path.exists(p))) for p in value))


def _texts_from_files(spec: jsonl.PathSpec, text_field: str) -> Iterator[str]:
    # Whitespace-only texts are left out, as the pretraining dataset leaves them out
    # (text_sources.text_spec), so both see the same corpus.
    for path, line_no, record in jsonl.read_jsonl(spec):
        text = jsonl.require_field(record, text_field, path, line_no, str)
        if text.strip():
            yield text


def _no_text_message(files: list[str] | None, text_field: str) -> str:
    if files is None:
        return "train_tokenizer: the corpus holds no text (every document given is empty)"
    return (f"{jsonl.describe_paths(files)}: the tokenizer corpus holds no text (no record, "
            f"or only empty {text_field!r} fields); give at least one non-empty text")


def train_tokenizer(
    texts_or_files: Iterable[str] | str | os.PathLike | Sequence[os.PathLike],
    model_path: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    seed: int,
    character_coverage: float = 0.9995,
    text_field: str = "text",
    max_lines: int = 2_000_000,
) -> Tokenizer:
    """Trains a sentencepiece model in-process, writes it to `model_path` and loads it.

    Args:
        texts_or_files: either a path spec of JSON-lines files whose `text_field` holds the
            text (a str or os.PathLike file/glob/directory, or a list of them in which every
            item is os.PathLike, an existing path or a name ending in .jsonl/.json/.jsonl.gz;
            see `jsonl.resolve_paths`), or any other iterable of str documents.
        model_path: where the `.model` file is written (parent directories are created).
        vocab_size: requested number of ids. A corpus too small for it yields a smaller
            vocabulary (with a warning), so read `Tokenizer.vocab_size` afterwards.
        model_type: "bpe" or "unigram".
        seed: seeds sentencepiece's sampling of training sentences; with the same corpus and
            seed the written model is identical.
        character_coverage: fraction of characters covered by single-character pieces; the
            rarest rest is encoded with byte fallback.
        text_field: the field read from JSON-lines records.
        max_lines: at most this many training lines are sampled (seeded) from the corpus.

    Returns:
        The trained `Tokenizer`, with pad=0, unk=1, bos=2, eos=3.

    Raises:
        jsonl.DataFormatError (a ValueError): the corpus holds no text, naming its files
            (0-byte files, blank lines and empty texts are no text); a malformed record
            (`jsonl.read_jsonl`, `jsonl.require_field`), naming `file:line`.
        ValueError: an unknown model type.
        jsonl.DataFormatError: a vocabulary too small for the required pieces (256 bytes +
            specials + characters), naming the corpus files and tokenizer.vocab_size.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    files = None
    if _is_path_spec(texts_or_files):
        files = jsonl.resolve_paths(texts_or_files)
        texts = _texts_from_files(files, text_field)
    else:
        texts = texts_or_files
    sentences = _training_sentences(texts)
    first = next(sentences, None)
    if first is None:
        raise jsonl.DataFormatError(_no_text_message(files, text_field))

    def all_sentences():
        yield first
        yield from sentences

    # Global in the sentencepiece library, hence set right before training.
    spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_writer=proto,
            model_type=model_type,
            vocab_size=vocab_size,
            # Small corpora cannot fill a large vocabulary: take what exists, warn below.
            hard_vocab_limit=False,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            input_sentence_size=max_lines,
            shuffle_input_sentence=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            # One thread: multi-threaded training may order merges of equal counts
            # differently from run to run.
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. vocab_size below 256 byte pieces + specials + characters
        corpus = f" on {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}" if files else ""
        raise jsonl.DataFormatError(
            f"training the tokenizer{corpus} failed with tokenizer.vocab_size={vocab_size}: "
            f"{e}") from e

    model_path = os.fspath(model_path)
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    tmp_path = model_path + ".tmp"
    with open(tmp_path, "wb") as f:
        f.write(proto.getvalue())
    os.replace(tmp_path, model_path)  # atomic: a crash never leaves half a model behind
    tokenizer = Tokenizer(model_path)
    if tokenizer.vocab_size < vocab_size:
        warnings.warn(
            f"tokenizer vocabulary reduced from the requested {vocab_size} to "
            f"{tokenizer.vocab_size}: the corpus is too small for more pieces "
            f"(model written to {model_path})", stacklevel=2)
    return tokenizer
