"""A sentencepiece tokenizer for mixed Chinese/English text: train, load, encode, decode.

Training settings are chosen so text survives a round trip unchanged: identity
normalisation (NFKC would turn the full-width "：" of the dialogue format into ":"), no
whitespace collapsing, no dummy-prefix space (so encoding a prompt and a response
separately and concatenating the ids decodes to the concatenated text), newline as a
user-defined piece, digits split one per piece (arithmetic), and byte fallback so any rare
character or emoji is encoded as UTF-8 bytes instead of <unk>.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sentencepiece as spm

from instructjax.data import jsonl

# The agreed special ids; every model trained here has them and `Tokenizer` checks them.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# sentencepiece skips (with only a log line) sentences longer than max_sentence_length
# bytes. Texts are fed line by line and long lines cut into windows of this many characters
# (at most 4 UTF-8 bytes each), so no training text is dropped.
_MAX_CHARS_PER_SENTENCE = 4096
_MAX_SENTENCE_BYTES = 4 * _MAX_CHARS_PER_SENTENCE


class Tokenizer:
    """A loaded sentencepiece model with the project's special ids.

    `encode` adds no BOS/EOS: callers (the packing pipeline, dialogue rendering) decide.
    Picklable (the model bytes travel along), so it can be sent to data worker processes.
    """

    def __init__(self, model_path: str | os.PathLike):
        self._model_path = os.fspath(model_path)
        with open(self._model_path, "rb") as f:
            self._init_from_proto(f.read())

    def _init_from_proto(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        got = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise jsonl.DataFormatError(
                f"tokenizer {self._model_path}: special ids (pad, unk, bos, eos) are {got}, "
                f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; train it with train_tokenizer")

    def __getstate__(self) -> dict:
        return {"model_path": self._model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._model_path = state["model_path"]
        self._init_from_proto(state["proto"])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (a str), without BOS/EOS; ids are ints in [0, vocab_size)."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (list or 1-D int array); pad/bos/eos ids decode to "".

        Ids past the vocabulary (a model's vocab is often padded beyond the tokenizer's, and
        an undertrained model can sample those rows) decode as the unknown piece.
        """
        size = self.vocab_size
        return self._sp.decode([int(i) if 0 <= int(i) < size else self.unk_id for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id, e.g. "▁plus", "<0xF0>" or "\\n" (for debugging)."""
        return self._sp.id_to_piece(int(token_id))

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
        """The padding id (0); never a training target."""
        return PAD_ID

    @property
    def unk_id(self) -> int:
        """The id of unknown pieces (1); rare with byte fallback."""
        return UNK_ID

    @property
    def bos_id(self) -> int:
        """The beginning-of-sequence id (2)."""
        return BOS_ID

    @property
    def eos_id(self) -> int:
        """The end-of-sequence id (3)."""
        return EOS_ID

    def __repr__(self) -> str:
        return f"Tokenizer({self._model_path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer trained by `train_tokenizer` from its `.model` file.

    Raises:
        FileNotFoundError: naming `path` when the file does not exist.
        ValueError: when the model's special ids differ from the agreed ones.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model not found: {path!r}")
    return Tokenizer(path)


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
