"""Hugging Face chat templates: Jinja rendering as transformers does it, and answer spans.

Rendering follows transformers' `apply_chat_template` (transformers/utils/chat_template_utils.py):
an immutable sandboxed Jinja environment with trim_blocks and lstrip_blocks, the loopcontrols
extension, a `{% generation %}` tag that renders its body, `raise_exception(msg)`,
`strftime_now(fmt)`, a `tojson` filter that keeps non-ASCII text and takes indent /
separators / sort_keys; variables `messages` (list of {"role", "content"}), `tools` and
`documents` (None), `add_generation_prompt`, and the tokenizer's named special tokens
(`bos_token`, `eos_token`, `pad_token`, ...).

Answer spans (`JinjaChatTemplate.spans`), what the SFT loss is put on: for each assistant
message i, P = render(turns[:i], add_generation_prompt=True) must be a prefix of the whole
rendering (it is for ChatML, LLaMA 3 and Mistral templates). The answer span starts right
after P (so a separator the template puts before the content, e.g. Mistral's space after
[/INST], is text the model generates, as it must at rollout where the prompt ends at P) and
runs through the content (as rendered: templates may trim it) and the end-of-turn marker that
follows it, if any (the first of the tokenizer's EOS strings: <|im_end|>, <|eot_id|>, </s>),
but not the newline after it. A template for which this fails raises ChatTemplateError.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jinja2
from jinja2 import ext, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from instructjax.data.chat_encoding import ChatTemplate
from instructjax.data.formats import Turn

TEMPLATE_KINDS = ("chatyuan", "model")
_WHITESPACE = re.compile(r"\s*")
_PROBE = (Turn("user", "x"),)  # the smallest dialogue every template accepts


class ChatTemplateError(ValueError):
    """A chat template that does not render, or cannot mark the assistant's part."""


class _GenerationTag(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): the
    body, rendered in its own scope as transformers' call block does."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates want the text as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template of `source` (str), cached: data workers render thousands."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ChatTemplateError(f"chat template has a Jinja syntax error at line "
                                f"{err.lineno}: {err.message}") from err


def _occurrences(text: str, part: str, start: int, end: int) -> Iterator[int]:
    """Each index in [start, end - len(part)] where `part` occurs in `text`, in order."""
    at = text.find(part, start, end)
    while at >= 0:
        yield at
        at = text.find(part, at + 1, end) if part else -1


@dataclasses.dataclass(frozen=True)
class JinjaChatTemplate:
    """A Hugging Face chat template with `ChatTemplate`'s interface (spans, cue).

    Attributes:
        source: the Jinja text.
        special_tokens: (name, text) pairs of the named special tokens, e.g.
            (("bos_token", "<s>"), ("eos_token", "</s>")): template variables.
        end_markers: texts that may close an assistant message (the tokenizer's EOS tokens).
    """
    source: str
    special_tokens: tuple[tuple[str, str], ...] = ()
    end_markers: tuple[str, ...] = ()

    def __post_init__(self):
        compile_template(self.source)  # a syntax error surfaces here, not mid-training

    @classmethod
    def from_tokenizer(cls, tokenizer) -> JinjaChatTemplate:
        """The template of a tokenizer with chat_template, special_tokens_map, eos_ids and
        token_text (`tokenizer.load_tokenizer`'s tokenizers).

        Raises:
            ValueError: naming the tokenizer's path when it has no chat template.
        """
        if not tokenizer.chat_template:
            raise ChatTemplateError(
                f"tokenizer {tokenizer.model_path} has no chat template (no chat_template in "
                "tokenizer_config.json, no chat_template.jinja); use the 'chatyuan' template")
        markers = [tokenizer.token_text(i) for i in tokenizer.eos_ids] + [tokenizer.eos_token]
        return cls(tokenizer.chat_template, tuple(sorted(tokenizer.special_tokens_map.items())),
                   tuple(dict.fromkeys(m for m in markers if m)))

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
        """The template applied to `turns` (str), as transformers' apply_chat_template(
        messages, tokenize=False, add_generation_prompt=...) renders it."""
        messages = [{"role": t.role, "content": t.content} for t in turns]
        try:
            return compile_template(self.source).render(
                messages=messages, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **dict(self.special_tokens))
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(f"chat template failed on a dialogue of {len(turns)} "
                                    f"messages: {err}") from err

    @property
    def cue(self) -> str:
        """The generation prompt that ends a prompt (e.g. "<|im_start|>assistant\\n")."""
        with_cue = self.render(_PROBE, add_generation_prompt=True)
        plain = self.render(_PROBE)
        return with_cue[len(plain):] if with_cue.startswith(plain) else with_cue

    def _cannot_mark(self, i: int, why: str) -> ChatTemplateError:
        return ChatTemplateError(f"the chat template cannot mark the assistant's part of "
                                 f"message {i}: {why}")

    def _answer_end(self, text: str, start: int, limit: int, turn: Turn, i: int) -> int:
        """End of the answer span of message i that starts at `start` in `text`: after the
        content (found in [start, limit)) and the end marker right after it, if any."""
        content = turn.content
        markers = sorted(self.end_markers, key=len, reverse=True)
        for variant in dict.fromkeys((content, content.strip(), content.lstrip(),
                                      content.rstrip())):
            first = None
            # The occurrence closed by a marker wins: short contents ("hi") can also occur
            # inside the template's own text before the content.
            for at in _occurrences(text, variant, start, limit):
                end = at + len(variant)
                first = end if first is None else first
                after_gap = _WHITESPACE.match(text, end, limit).end()
                marker = next((m for m in markers if text.startswith(m, after_gap, limit)), None)
                if marker is not None:
                    return after_gap + len(marker)
            if first is not None:
                return first
        raise self._cannot_mark(i, f"its content {content[:60]!r} is not in the rendered "
                                   f"text after the generation prompt")

    def spans(self, turns: Sequence[Turn], cue: bool) -> list[tuple[str, bool]]:
        """The rendered text (with the generation prompt when `cue`) as (text, is_answer)
        spans, answer spans as the module docstring defines them.

        Raises:
            ChatTemplateError: when an assistant message cannot be located (module
                docstring).
        """
        turns = tuple(turns)
        text = self.render(turns, add_generation_prompt=cue)
        answers = [i for i, t in enumerate(turns) if t.role == "assistant"]
        starts = []
        for i in answers:
            prefix = self.render(turns[:i], add_generation_prompt=True)
            if not text.startswith(prefix):
                raise self._cannot_mark(i, "the dialogue before it, rendered with "
                                           "add_generation_prompt=True, is not a prefix of the "
                                           "rendered dialogue")
            starts.append(len(prefix))
        spans: list[tuple[str, bool]] = []
        pos = 0
        for k, (i, start) in enumerate(zip(answers, starts)):
            limit = starts[k + 1] if k + 1 < len(starts) else len(text)
            # Search the content within message i's own rendering where that is a prefix of
            # the text too (not so in Qwen3's, which renders a last answer differently).
            own = self.render(turns[:i + 1])
            if start <= len(own) <= limit and text.startswith(own):
                limit = len(own)
            if start < pos:
                raise self._cannot_mark(i, "it starts inside the previous answer")
            end = self._answer_end(text, start, limit, turns[i], i)
            if start > pos:
                spans.append((text[pos:start], False))
            spans.append((text[start:end], True))
            pos = end
        if pos < len(text) or not spans:
            spans.append((text[pos:], False))
        return spans

    def answer_text(self, context: Sequence[Turn], content: str) -> str:
        """The answer span (str) of an assistant reply `content` after `context` (turns
        ending with a user turn): what the model generates after the generation prompt."""
        spans = self.spans((*context, Turn("assistant", content)), cue=False)
        return next(text for text, is_answer in reversed(spans) if is_answer)


_SENTINEL = "Qz7xW"  # an answer text no template contains


def end_of_turn_token(source: str, named_tokens: dict[str, str],
                      special_tokens: Sequence[str]) -> str | None:
    """The special token a chat template closes an assistant message with, or None.

    Rendered on a one-exchange probe: the first of `special_tokens` right after the answer
    (whitespace allowed between), e.g. "<|im_end|>" for ChatML. A base model's tokenizer
    often names another EOS (Qwen2.5 base: <|endoftext|>), yet a model chatting in the
    template must stop at the template's end of turn.

    Args:
        source: the Jinja template; named_tokens: {"bos_token": "<s>", ...} variables;
        special_tokens: the tokenizer's special token texts.
    """
    probe = (Turn("user", "x"), Turn("assistant", _SENTINEL))
    try:
        text = compile_template(source).render(
            messages=[{"role": t.role, "content": t.content} for t in probe], tools=None,
            documents=None, add_generation_prompt=False, **named_tokens)
    except jinja2.exceptions.TemplateError:
        return None  # a template that refuses the probe marks no end of turn
    at = text.find(_SENTINEL)
    if at < 0:
        return None
    after = text[at + len(_SENTINEL):].lstrip()
    return next((t for t in sorted(special_tokens, key=len, reverse=True)
                 if t and after.startswith(t)), None)


def model_chat_template(tokenizer) -> JinjaChatTemplate:
    """The tokenizer's own chat template (`JinjaChatTemplate.from_tokenizer`).

    Raises:
        ValueError: naming the tokenizer's path when it has no chat template.
    """
    return JinjaChatTemplate.from_tokenizer(tokenizer)


def chat_template_for(tokenizer, kind: str = "chatyuan", *, user: str = "用户",
                      assistant: str = "小元") -> ChatTemplate | JinjaChatTemplate:
    """The chat template a stage uses.

    Args:
        tokenizer: a `tokenizer.load_tokenizer` tokenizer.
        kind: "chatyuan" (our `用户：q\\n小元：a` format with the given role names) or
            "model" (the tokenizer's own Jinja chat_template).
        user, assistant: ChatYuan role names.

    Raises:
        ValueError: an unknown kind, or "model" for a tokenizer without a chat template.
    """
    if kind == "chatyuan":
        return ChatTemplate(user=user, assistant=assistant)
    if kind == "model":
        return model_chat_template(tokenizer)
    raise ValueError(f"chat template kind must be one of {TEMPLATE_KINDS}, got {kind!r}")
