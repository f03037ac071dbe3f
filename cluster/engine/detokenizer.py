"""Incremental detokenisation and stop strings for one sequence.

Text comes from the tokenizers library's DecodeStream (handles UTF-8 split across tokens). Stop
strings may straddle tokens, so while generation goes on the last `longest stop - 1` characters are
held back: a streamed delta never has to be taken back.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from .tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], include_stop: bool,
                 skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.stop, self.include_stop = stop, include_stop
        self.text = ""  # all text so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of self.text already handed out
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> str | None:
        """Appends a token; returns the stop string if the text now contains one (text is cut)."""
        piece = self._tokenizer.decode_step(self._stream, token_id)
        if not piece:
            return None
        search_from = max(0, len(self.text) - self._holdback)
        self.text += piece
        hits = [(self.text.find(s, search_from), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, stop = min(hits)
            self.text = self.text[: index + (len(stop) if self.include_stop else 0)]
            return stop
        return None

    def delta(self, final: bool) -> str:
        """New text since the last call; all of it when the sequence has finished."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self._holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
