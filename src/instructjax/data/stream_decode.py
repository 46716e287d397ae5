"""Incremental detokenisation: text that becomes printable as token ids arrive one by one.

A token need not end on a character boundary: byte-fallback pieces (`<0xE4><0xBD><0xA0>` is
"你") and byte-level BPE tokens hold parts of one UTF-8 character, and decoding a prefix that
stops inside a character yields U+FFFD at its end. Decoding each token alone would also lose
what depends on neighbours (a sentencepiece decoder drops the leading space of the first piece
only). So the decoder decodes a short window of recent ids twice, with and without the
newest tokens, and emits the difference once it no longer ends in U+FFFD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Turns a growing sequence of token ids into newly printable text.

    `push(id)` returns the text completed by that id ("" while a character is incomplete);
    `flush()` returns what is left (U+FFFD for bytes that never completed a character). The
    concatenation of everything returned equals `decode(all ids)` for decoders whose output
    is the concatenation of their tokens' texts (sentencepiece, byte-level BPE, byte fallback)
    whenever the ids spell valid UTF-8. Bytes that never form a character (a model can sample
    them) come out as U+FFFD, though not always as many as `decode` writes for them.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        # ids[_start:_read] are context already printed; ids[_read:] wait to be printed.
        self._start = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Adds one id (int); returns the newly printable text (str, possibly "")."""
        self._ids.append(int(token_id))
        printed = self._decode(self._ids[self._start:self._read])
        text = self._decode(self._ids[self._start:])
        if len(text) <= len(printed) or text.endswith(_REPLACEMENT):
            return ""
        self._start, self._read = self._read, len(self._ids)
        return text[len(printed):]

    def flush(self) -> str:
        """The text of ids not yet printed (str), incomplete characters as U+FFFD; resets."""
        printed = self._decode(self._ids[self._start:self._read])
        text = self._decode(self._ids[self._start:])
        self._ids, self._start, self._read = [], 0, 0
        return text[len(printed):]
