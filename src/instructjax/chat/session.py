"""A multi-turn conversation with a model: history, truncation to the context, streamed text.

The prompt of each turn is the whole history rendered by the chat template and encoded as
PPO encodes its prompts (`chat_encoding.encode_prompt`), so a model answers in chat exactly
the prompts it was trained on; when the history outgrows the context (max_seq_len minus the
answer's max_new_tokens) the oldest exchanges are dropped first, by the same rules.
"""

from __future__ import annotations

from collections.abc import Iterator

from instructjax.chat.engine import SamplingOptions, StreamingDecoder, StreamStats
from instructjax.data import chat_encoding
from instructjax.data.formats import Prompt, Turn


class ChatSession:
    """One conversation: `reply(text)` streams the answer and keeps both turns.

    Args:
        decoder: the StreamingDecoder of the model.
        tokenizer: its tokenizer (encode, stream_decoder, bos/eos as chat_encoding needs).
        template: a chat template (chat_encoding.ChatTemplate or a Jinja template).
        options: SamplingOptions of every answer.
        system: optional system message kept at the start of the history.
        max_turns: exchanges kept at most (None = as many as fit the context).
        seed: answer t draws with seed + t, so a scripted conversation is reproducible.
    """

    def __init__(self, decoder: StreamingDecoder, tokenizer, template, options: SamplingOptions,
                 *, system: str = "", max_turns: int | None = None, seed: int = 0):
        self.decoder, self.tokenizer, self.template = decoder, tokenizer, template
        self.options, self.system, self.max_turns, self.seed = options, system, max_turns, seed
        self.history: list[Turn] = []
        self.last_stats = StreamStats()
        self.truncations: list[str] = []
        self._answers = 0

    def reset(self) -> None:
        """Forgets the conversation (the system message stays)."""
        self.history = []

    def prompt_ids(self, user_text: str) -> list[int]:
        """The ids the model reads before answering `user_text` after the history so far."""
        turns = ([Turn("system", self.system)] if self.system else []) + self.history
        prompt = Prompt(tuple(turns) + (Turn("user", user_text),))
        budget = self.decoder.max_seq_len - self.options.max_new_tokens
        return chat_encoding.encode_prompt(prompt, self.tokenizer, self.template,
                                           max_length=budget, max_turns=self.max_turns,
                                           on_truncate=self.truncations.append)

    def reply(self, user_text: str) -> Iterator[str]:
        """Streams the answer to `user_text` as printable text pieces (never half a
        character); when the stream is exhausted both turns join the history."""
        if not user_text.strip():
            raise ValueError("the message is empty")
        ids = self.prompt_ids(user_text)
        stream = self.tokenizer.stream_decoder()
        self.last_stats = StreamStats()
        pieces = []
        for token in self.decoder.stream(ids, self.options, seed=self.seed + self._answers,
                                         stats=self.last_stats):
            text = stream.push(token)
            if text:
                pieces.append(text)
                yield text
        tail = stream.flush()
        if tail:
            pieces.append(tail)
            yield tail
        self._answers += 1
        self.history += [Turn("user", user_text), Turn("assistant", "".join(pieces))]

    def answer(self, user_text: str) -> str:
        """The whole answer to `user_text` (reply, collected)."""
        return "".join(self.reply(user_text))
