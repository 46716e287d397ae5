"""A Hugging Face tokenizer directory (tokenizer.json + side files) read with `tokenizers`.

Qwen2/2.5/3, LLaMA 2/3 and Mistral checkpoints ship a tokenizer.json; this reads it with the
`tokenizers` library as transformers' fast tokenizers do, so `encode` gives the ids
`AutoTokenizer.encode(text, add_special_tokens=False)` gives: special-token strings such as
<|im_start|> in the text become their ids. Special ids, EOS ids, BOS use, pad and chat
template come from the side files (`tokenizer_meta`).

`encode_continuation` exists for span-by-span encoding (chat_encoding): tokenizers with a
dummy prefix (Metaspace prepend, LLaMA 2 and Mistral) put "▁" before every encoded string,
which inside a dialogue would add a space at each span boundary.

One known difference: transformers 5 does not run a LLaMA 2 / Mistral tokenizer.json as it
is but rebuilds its pipeline from the LlamaTokenizer class (a Metaspace "first" prefix). Files
converted by older transformers ("legacy": a Prepend normaliser) then get "▁" after each
special token here, where transformers 5 adds none. Files written by `tokenizer_files` or
re-saved by transformers 5 agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from instructjax.data import tokenizer_meta as meta_lib
from instructjax.data.stream_decode import StreamDecoder

TOKENIZER_JSON = "tokenizer.json"
_HAS_FAST_ENCODE = hasattr(BackendTokenizer, "encode_batch_fast")  # tokenizers >= 0.21


def encode_without_prefix(encode: Callable[[str], list[int]], text: str) -> list[int]:
    """`encode(text)` without the dummy-prefix space at its start (list of int).

    Encodes "\\n" + text and drops the ids of "\\n" (the prefix goes before the newline); when
    the newline merges with the text, falls back to encode(text).
    """
    newline = encode("\n")
    ids = encode("\n" + text)
    return ids[len(newline):] if ids[:len(newline)] == newline else encode(text)


def _adds_prefix(node: Any) -> bool:
    """Whether a tokenizer.json pipeline (a JSON value) puts a space before each string."""
    if isinstance(node, list):
        return any(_adds_prefix(n) for n in node)
    if not isinstance(node, dict):
        return False
    kind = node.get("type")
    if kind == "Metaspace":
        return node.get("prepend_scheme", "always" if node.get("add_prefix_space") else
                        "never") != "never"
    if kind == "ByteLevel" and node.get("add_prefix_space"):
        return True
    if kind == "Prepend":
        return True
    return any(_adds_prefix(node.get(key)) for key in ("normalizers", "pretokenizers"))


def _first_template_token(post_processor: Any) -> str | None:
    """The special token a TemplateProcessing post-processor puts first, if any."""
    if not isinstance(post_processor, dict):
        return None
    if post_processor.get("type") == "Sequence":
        firsts = [_first_template_token(p) for p in post_processor.get("processors", [])]
        return next((f for f in firsts if f is not None), None)
    if post_processor.get("type") == "TemplateProcessing":
        single = post_processor.get("single") or [{}]
        return single[0].get("SpecialToken", {}).get("id")
    return None


class HFTokenizer:
    """A tokenizer.json tokenizer with the project's tokenizer interface.

    Attributes (read-only properties): vocab_size, pad_id, unk_id (None if absent), bos_id
    (None for Qwen), eos_id (primary), eos_ids (tuple of every id that ends generation),
    add_bos, chat_template (str or None), special_tokens_map ({"bos_token": str, ...}),
    bos_token / eos_token (str or None), model_path (the directory). Picklable.
    """

    def __init__(self, directory: str | os.PathLike, *, pad_id: int | None = None):
        directory = os.fspath(directory)
        path = os.path.join(directory, TOKENIZER_JSON)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise FileNotFoundError(f"cannot read tokenizer file {path}: {err}") from err
        self._init(directory, text, meta_lib.read_meta(directory), pad_id)

    def _init(self, directory: str, text: str, meta: meta_lib.TokenizerMeta,
              pad_id: int | None) -> None:
        self._dir, self._json, self._meta, self._explicit_pad = directory, text, meta, pad_id
        where = os.path.join(directory, TOKENIZER_JSON)
        try:
            self._tok = BackendTokenizer.from_str(text)
            spec = json.loads(text)
        except Exception as err:  # the Rust parser raises a bare Exception
            raise ValueError(f"cannot read tokenizer file {where}: {err}") from err
        self._tok.encode_special_tokens = bool(meta.config.get("split_special_tokens", False))
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self._specials = [(int(t["id"]), str(t["content"])) for t in spec.get("added_tokens", [])
                          if t.get("special")]
        self._adds_prefix = _adds_prefix([spec.get("normalizer"), spec.get("pre_tokenizer")])
        self._bos = self._named_id("bos_token",
                                   default=_first_template_token(spec.get("post_processor")))
        self._unk = self._named_id("unk_token", default=spec.get("model", {}).get("unk_token"))
        self._eos_ids = self._read_eos_ids()
        self._pad = meta_lib.choose_pad_id(
            explicit=pad_id, pad=self._named_id("pad_token"), unk=self._unk,
            eos_ids=self._eos_ids, specials=self._specials, vocab_size=self._vocab_size,
            where=directory)
        add_bos = meta.add_bos_token()
        if add_bos is None:
            first = _first_template_token(spec.get("post_processor"))
            add_bos = self._bos is not None and first == self.token_text(self._bos)
        self._add_bos = add_bos and self._bos is not None

    def _named_id(self, name: str, default: str | None = None) -> int | None:
        """The id of named special token `name` from the side files (or `default`), or None."""
        text = self._meta.token(name)
        text = default if text is None and name not in self._meta.config else text
        if text is None:
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise ValueError(f"tokenizer {self._dir}: {name} {text!r} is not in the vocabulary "
                             f"of {TOKENIZER_JSON}")
        return token_id

    def _read_eos_ids(self) -> tuple[int, ...]:
        extra = list(self._meta.generation_eos_ids())
        primary = self._named_id("eos_token")
        if primary is None and not extra:
            raise ValueError(f"tokenizer {self._dir} names no EOS token: set eos_token in "
                             f"{meta_lib.CONFIG_FILE} or eos_token_id in "
                             f"{meta_lib.GENERATION_FILE}")
        end_of_turn = self._template_end_of_turn()
        if end_of_turn is not None and end_of_turn not in extra:
            extra.append(end_of_turn)
        return meta_lib.eos_tuple(extra[0] if primary is None else primary, tuple(extra))

    def _template_end_of_turn(self) -> int | None:
        """The id of the special token the chat template ends an answer with (ChatML's
        <|im_end|>), which ends generation too, whatever EOS the files name."""
        if not self._meta.chat_template:
            return None
        from instructjax.data.chat_template import end_of_turn_token
        text = end_of_turn_token(self._meta.chat_template, self._meta.named_tokens(),
                                 [t for _, t in self._specials])
        return None if text is None else self._tok.token_to_id(text)

    def __getstate__(self) -> dict:
        return {"dir": self._dir, "json": self._json, "meta": self._meta,
                "pad_id": self._explicit_pad}

    def __setstate__(self, state: dict) -> None:
        self._init(state["dir"], state["json"], state["meta"], state["pad_id"])

    # -------------------------------------------------------------------------- encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (str) without BOS/EOS; special-token strings become their ids."""
        if _HAS_FAST_ENCODE:  # the same ids without character offsets: ~3x faster
            return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` that continues earlier text: `encode` without a dummy-prefix space."""
        if not self._adds_prefix:
            return self.encode(text)
        return encode_without_prefix(self.encode, text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (list or 1-D int array), skipping special, pad, BOS and EOS ids.

        Ids past the vocabulary decode as the unknown token, or to "" when there is none.
        """
        skip = {self._pad, self._bos, *self._eos_ids}
        kept = []
        for i in map(int, ids):
            if i in skip:
                continue
            if not 0 <= i < self._vocab_size or self._tok.id_to_token(i) is None:
                if self._unk is None:
                    continue
                i = self._unk
            kept.append(i)
        return self._tok.decode(kept, skip_special_tokens=True)

    def stream_decoder(self) -> StreamDecoder:
        """A `StreamDecoder` whose push(id) -> str never splits a UTF-8 character."""
        return StreamDecoder(self.decode)

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary entry of an id (e.g. "<|im_end|>", "Ġthe"), None if unused."""
        return self._tok.id_to_token(int(token_id))

    id_to_piece = token_text

    # ------------------------------------------------------------------------ attributes

    @property
    def vocab_size(self) -> int:
        """V: every id is in [0, V) (added tokens included)."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """The padding id (tokenizer_meta's rule); never an EOS id."""
        return self._pad

    @property
    def unk_id(self) -> int | None:
        """The unknown token's id, or None (byte-level tokenizers have none)."""
        return self._unk

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id, or None (Qwen has none)."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """The primary end-of-sequence id (tokenizer_config eos_token)."""
        return self._eos_ids[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (eos_id first, then generation_config's)."""
        return self._eos_ids

    @property
    def add_bos(self) -> bool:
        """Whether sequences start with BOS (add_bos_token, else the post-processor)."""
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template of the directory, or None."""
        return self._meta.chat_template

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """{"bos_token": str, "eos_token": str, ...}: the named tokens the files set."""
        return self._meta.named_tokens()

    @property
    def bos_token(self) -> str | None:
        """The BOS token's text, or None."""
        return None if self._bos is None else self.token_text(self._bos)

    @property
    def eos_token(self) -> str:
        """The primary EOS token's text."""
        return self.token_text(self.eos_id)

    @property
    def model_path(self) -> str:
        """The directory this tokenizer was loaded from."""
        return self._dir

    def __repr__(self) -> str:
        return f"HFTokenizer({self._dir!r}, vocab_size={self.vocab_size})"

    # ----------------------------------------------------------------------------- saving

    def _config_for_saving(self) -> dict[str, Any]:
        if self._meta.config:
            # the pad this tokenizer chose (tokenizer_meta.choose_pad_id), so transformers
            # pads with the id config.json records
            return {**self._meta.config, "pad_token": self.token_text(self._pad)}
        # A bare tokenizer.json: TokenizersBackend loads it as it is.
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "add_bos_token": self._add_bos, "clean_up_tokenization_spaces": False}
        for name, token_id in (("bos_token", self._bos), ("eos_token", self.eos_id),
                               ("unk_token", self._unk), ("pad_token", self._pad)):
            config[name] = None if token_id is None else self.token_text(token_id)
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Writes tokenizer.json, tokenizer_config.json and the other side files read.

        `transformers.AutoTokenizer.from_pretrained(directory)` then encodes like this
        tokenizer. generation_config.json (the EOS ids) is written only where the directory
        has none (a model's own file stays authoritative).

        Returns:
            The paths written (list of str).
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_JSON)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self._json)
        written = [path]
        files = {meta_lib.CONFIG_FILE: self._config_for_saving(),
                 meta_lib.SPECIAL_MAP_FILE: dict(self._meta.special_map)}
        written += meta_lib.write_side_files(
            directory, files, template_file=self._meta.chat_template
            if os.path.isfile(os.path.join(self._dir, meta_lib.TEMPLATE_FILE)) else None,
            bos_id=self._bos, eos_ids=self._eos_ids, pad_id=self._pad)
        return written

