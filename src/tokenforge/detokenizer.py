"""Incremental detokenization of one request's output: UTF-8-safe text deltas and stop strings.

Each step decodes only a small window of token ids (the ids of the last emitted chunk plus the new
ones) and emits what that window adds beyond its first part, as TGI and vLLM do. Decoding the ids
together lets leading-space (Metaspace "▁") and byte-fallback / byte-level tokens come out as they do
in a full decode; the first window starts inside the prompt so the first output token's leading space
is right. A window whose text ends in U+FFFD may be a UTF-8 character still being assembled, so it
waits for more tokens. (`tokenizers.decoders.DecodeStream` does the same windowing but cannot release
held text at the end of a request and raises when a decoder's output is not prefix-stable.)
"""

from __future__ import annotations

from dataclasses import dataclass

import tokenizers

from tokenforge.sampling_params import SamplingParams

_PROMPT_CONTEXT_TOKENS = 5
_MAX_CHAR_TOKENS = 4  # a UTF-8 character is at most 4 bytes, so at most 4 byte tokens
# A run of pending tokens much longer than one character that still ends in U+FFFD is undecodable
# bytes (or skipped special tokens), so it is emitted as decoded to keep the window, and the cost, bounded.
_MAX_PENDING_TOKENS = 32
_REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DetokenizerStep:
    text_delta: str  # new text safe to emit now: whole characters, never a possible stop-string prefix
    stop_string: str | None = None  # the stop string found; the text ends before it


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas. Stops for good at the first stop string."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stops = list(params.stop)
        self._max_held = max((len(s) for s in self._stops), default=1) - 1
        # The window is all of self._ids; its first self._read ids (context already emitted, or the
        # prompt's tail) decode to the first self._window_prefix_len characters of the window's text.
        self._ids = self._prompt_context(prompt_token_ids)
        self._read = len(self._ids)
        self._window_prefix_len = len(self._decode(self._ids))
        self._held = ""  # decoded text that could be the start of a stop string
        self._text = ""
        self._finished = False

    @property
    def output_text(self) -> str:
        return self._text

    def step(self, new_token_ids: list[int]) -> DetokenizerStep:
        if self._finished:
            return DetokenizerStep("")
        self._ids.extend(new_token_ids)
        return self._emit(self._decode_new(force=False), final=False)

    def flush(self) -> str:
        """The request ended for another reason: release held-back text (still cut at a stop string)."""
        if self._finished:
            return ""
        return self._emit(self._decode_new(force=True), final=True).text_delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The prompt's last few ids, starting on a character boundary: with byte fallback, a run of
        byte tokens that starts mid-character decodes to one U+FFFD per byte, the new bytes included."""
        start = max(len(prompt_token_ids) - _PROMPT_CONTEXT_TOKENS, 0)
        earliest = max(start - (_MAX_CHAR_TOKENS - 1), 0)
        while start > earliest and self._decode(prompt_token_ids[start:]).startswith(_REPLACEMENT_CHAR):
            start -= 1
        return list(prompt_token_ids[start:])

    def _decode_new(self, force: bool) -> str:
        """Text the window's new ids add, or "" while it may end inside a character."""
        text = self._decode(self._ids)
        force = force or len(self._ids) - self._read > _MAX_PENDING_TOKENS
        if not force and (len(text) <= self._window_prefix_len or text.endswith(_REPLACEMENT_CHAR)):
            return ""
        new_text = text[self._window_prefix_len:]
        # Slide: the ids just decoded become the next window's context.
        del self._ids[:self._read]
        self._read = len(self._ids)
        self._window_prefix_len = len(self._decode(self._ids))
        return new_text

    def _emit(self, new_text: str, final: bool) -> DetokenizerStep:
        text = self._held + new_text
        stop, cut = self._find_stop(text)
        if stop is not None:
            text, self._held, self._finished = text[:cut], "", True
        elif final:
            self._held, self._finished = "", True
        else:
            num_held = self._possible_stop_prefix_len(text)
            text, self._held = text[:len(text) - num_held], text[len(text) - num_held:]
        self._text += text
        return DetokenizerStep(text, stop)

    def _find_stop(self, text: str) -> tuple[str | None, int]:
        """The stop string that occurs first in `text`, and where it starts."""
        best, best_at = None, len(text)
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and at < best_at:
                best, best_at = stop, at
        return best, best_at

    def _possible_stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that some stop string starts with."""
        for n in range(min(len(text), self._max_held), 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0
