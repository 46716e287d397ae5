"""What a Hugging Face tokenizer directory says beside its vocabulary, and the pad id rule.

Files read, all optional:
  tokenizer_config.json    named special tokens (`bos_token`, `eos_token`, ...; a string or
                           an AddedToken dict), `add_bos_token`, `chat_template` (a string or
                           a list of {"name", "template"}), `added_tokens_decoder`;
  special_tokens_map.json  named special tokens the config does not name;
  generation_config.json   `eos_token_id` (an int or a list: every id that ends generation,
                           e.g. LLaMA 3 instruct's <|eot_id|> and <|end_of_text|>);
  chat_template.jinja      the chat template (transformers now saves it here instead of in the
                           config), preferred over the config's.

Pad id rule (`choose_pad_id`), first that applies:
  1. an explicit pad id (must not be an EOS id);
  2. the tokenizer's pad token, unless it is an EOS id (Qwen pads with <|endoftext|>, which
     its generation config also lists as EOS): the rollout writes pad after a row's EOS and
     must tell the two apart;
  3. the unknown token, unless it is an EOS id (LLaMA 2: <unk> = 0);
  4. a reserved special token: one whose text names padding (LLaMA 3.1's
     <|finetune_right_pad_id|>, Qwen 2.5's <|fim_pad|>), else the lowest
     <|reserved_special_token_N|> (LLaMA 3.0);
  5. otherwise an error asking for an explicit pad id.
Padding positions are masked out of attention and loss, so any id other than an EOS works;
these rules only pick one that never occurs in ordinary text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
GENERATION_FILE = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"

_RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")


@dataclasses.dataclass(frozen=True)
class TokenizerMeta:
    """The side files of a tokenizer directory (each {} / None when absent)."""
    directory: str = ""
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    special_map: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    generation: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    chat_template: str | None = None

    def token(self, name: str) -> str | None:
        """The string of named special token `name` (e.g. "eos_token"), or None."""
        value = self.config[name] if name in self.config else self.special_map.get(name)
        return token_string(value, f"{self.directory}/{CONFIG_FILE}: {name}")

    def named_tokens(self) -> dict[str, str]:
        """{name: string} of the named special tokens that are set (chat template variables)."""
        tokens = {name: self.token(name) for name in NAMED_TOKENS}
        return {name: value for name, value in tokens.items() if value is not None}

    def add_bos_token(self) -> bool | None:
        """tokenizer_config.json `add_bos_token` (bool), or None when it is not given."""
        value = self.config.get("add_bos_token")
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{self.directory}/{CONFIG_FILE}: add_bos_token must be true or "
                             f"false, got {value!r}")
        return value

    def generation_eos_ids(self) -> tuple[int, ...]:
        """generation_config.json `eos_token_id` as a tuple of ints (() when absent)."""
        value = self.generation.get("eos_token_id")
        values = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"{self.directory}/{GENERATION_FILE}: eos_token_id must be an id "
                             f"or a list of ids, got {value!r}")
        return tuple(values)

    def added_tokens(self) -> dict[int, tuple[str, bool]]:
        """tokenizer_config.json `added_tokens_decoder` as {id: (text, special)}."""
        entries = self.config.get("added_tokens_decoder") or {}
        where = f"{self.directory}/{CONFIG_FILE}: added_tokens_decoder"
        try:
            return {int(i): (str(e["content"]), bool(e.get("special", False)))
                    for i, e in entries.items()}
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: entries must be {{id: {{\"content\": str, ...}}}} "
                             f"({err!r})") from err


def token_string(value: Any, where: str) -> str | None:
    """A special token's text from a config value: a str, an AddedToken dict, or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: a special token must be a string or {{\"content\": str}}, "
                     f"got {value!r}")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read tokenizer file {path}: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _template_from_config(config: Mapping[str, Any], path: str) -> str | None:
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    # Several named templates: transformers uses the one named "default".
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{path}: chat_template must be a string or a list holding a template "
                     f"named \"default\", got {str(value)[:200]!r}")


def read_meta(directory: str | os.PathLike) -> TokenizerMeta:
    """Reads the side files of `directory` (str path); absent files read as empty.

    Raises:
        ValueError: a file that exists but is not readable JSON (naming the file), or a
            chat_template of the wrong type.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    config = _read_json(config_path)
    template = _template_from_config(config, config_path)
    template_path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(template_path):
        try:
            with open(template_path, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read chat template {template_path}: {err}") from err
    return TokenizerMeta(directory, config,
                         _read_json(os.path.join(directory, SPECIAL_MAP_FILE)),
                         _read_json(os.path.join(directory, GENERATION_FILE)), template)


def eos_tuple(primary: int, extra: Iterable[int]) -> tuple[int, ...]:
    """(primary, *extra) without repeats, in order (tuple of int)."""
    return tuple(dict.fromkeys([primary, *extra]))


def _reserved_pad(specials: Iterable[tuple[int, str]], eos_ids: Sequence[int]) -> int | None:
    """A special token reserved for padding (rule 4 of the module docstring), or None."""
    candidates = sorted((i, text) for i, text in specials if i not in eos_ids)
    for i, text in candidates:
        if "pad" in text.lower():
            return i
    reserved = [(int(m.group(1)), i) for i, text in candidates
                if (m := _RESERVED.fullmatch(text))]
    return min(reserved)[1] if reserved else None


def choose_pad_id(*, explicit: int | None, pad: int | None, unk: int | None,
                  eos_ids: Sequence[int], specials: Iterable[tuple[int, str]],
                  vocab_size: int, where: str) -> int:
    """The pad id by the module docstring's rule.

    Args:
        explicit: a caller's pad id, or None.
        pad, unk: the tokenizer's pad and unknown ids, or None.
        eos_ids: every id that ends generation.
        specials: (id, text) of the special tokens, searched for a reserved pad token.
        vocab_size: V; an explicit pad id must lie in [0, V).
        where: the tokenizer's path, for error messages.

    Raises:
        ValueError: an explicit pad id outside the vocabulary or equal to an EOS id, or no
            rule applies.
    """
    if explicit is not None:
        if not 0 <= explicit < vocab_size or explicit in eos_ids:
            raise ValueError(f"tokenizer {where}: pad_id={explicit} must be an id in "
                             f"[0, {vocab_size}) other than the EOS ids {tuple(eos_ids)}")
        return explicit
    for candidate in (pad, unk):
        if candidate is not None and candidate not in eos_ids:
            return candidate
    reserved = _reserved_pad(specials, eos_ids)
    if reserved is not None:
        return reserved
    raise ValueError(
        f"tokenizer {where} has no pad id usable beside its EOS ids {tuple(eos_ids)} (no pad "
        "or unknown token other than EOS, no reserved special token): pass pad_id= (any id "
        "that never occurs in text, e.g. an unused special token)")


def write_json(path: str, value: Any) -> str:
    """Writes `value` as indented UTF-8 JSON to `path`; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2)
        f.write("\n")
    return path


def write_side_files(directory: str, files: Mapping[str, Mapping[str, Any]], *,
                     template_file: str | None, bos_id: int | None,
                     eos_ids: Sequence[int], pad_id: int) -> list[str]:
    """Writes the side files of a saved tokenizer into `directory` (str).

    Args:
        files: {file name: JSON object}; empty objects are not written.
        template_file: a chat template to write as chat_template.jinja, or None.
        bos_id, eos_ids, pad_id: written as generation_config.json when the directory has
            none, so the EOS ids survive a save (a model's own file stays authoritative).

    Returns:
        The paths written (list of str).
    """
    written = [write_json(os.path.join(directory, name), dict(value))
               for name, value in files.items() if value]
    if template_file is not None:
        path = os.path.join(directory, TEMPLATE_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(template_file)
        written.append(path)
    generation = os.path.join(directory, GENERATION_FILE)
    if not os.path.exists(generation):
        eos = list(eos_ids) if len(eos_ids) > 1 else eos_ids[0]
        written.append(write_json(generation, {"bos_token_id": bos_id, "eos_token_id": eos,
                                               "pad_token_id": pad_id}))
    return written
