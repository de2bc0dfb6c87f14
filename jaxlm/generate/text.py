"""Streaming text from tokens as they come, with stop strings: the one code path the CLI's
streaming output and the server's streamed responses share, so both cut and hold back alike.

A token's text is only known in the context of the tokens around it (a multi-byte character
split over tokens, a tokenizer that drops the space of a text's first word), so a push decodes
the tokens since the last settled point together with a few before it, and keeps the part after
those few: the whole output is never decoded again (that was quadratic in its length, on the
server's event loop). Text settles once it does not end in "\ufffd" (an incomplete UTF-8
sequence the next token may complete). Only the part that can no longer change is handed out:
text that could still turn out to begin a stop string is held back until it cannot.
"""
from __future__ import annotations

from jaxlm.generate.sampling import cut_at_stop

CONTEXT = 4  # settled tokens decoded again before new ones, so their join comes out right


class TextStream:
    """One output's text, handed out piece by piece; `stopped` once a stop string occurred
    (the text ends before it; later pushes add nothing)."""

    def __init__(self, tokenizer, stops=()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.shown = 0          # characters of the (cut) text handed out so far
        self.stopped = False
        self._settled = 0       # tokens whose text is final ...
        self._settled_text = ""  # ... and that text

    def _text(self) -> str:
        """The whole output's text, decoding only the unsettled tokens (with CONTEXT before)."""
        start = max(0, self._settled - CONTEXT)
        before = self.tokenizer.decode(self.ids[start:self._settled])
        now = self.tokenizer.decode(self.ids[start:])
        if not now.startswith(before):  # the context itself decodes otherwise: start over
            self._settled, self._settled_text = 0, ""
            now, before = self.tokenizer.decode(self.ids), ""
        tail = now[len(before):]
        if tail.endswith("\ufffd"):
            return self._settled_text + tail
        self._settled, self._settled_text = len(self.ids), self._settled_text + tail
        return self._settled_text

    def push(self, token_ids) -> str:
        """Take new tokens; return the text that became safe to show."""
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in token_ids)
        text, self.stopped = cut_at_stop(self._text(), self.stops)
        safe = len(text) if self.stopped else len(text) - held_back(text, self.stops)
        if text.endswith("\ufffd") and not self.stopped:  # an incomplete UTF-8 sequence so far
            safe = min(safe, len(text) - 1)
        if safe <= self.shown:
            return ""
        new, self.shown = text[self.shown:safe], safe
        return new

    def finish(self) -> str:
        """The output ended without a stop string: whatever was held back."""
        if self.stopped:
            return ""
        text = cut_at_stop(self._text(), self.stops)[0]
        rest, self.shown = text[self.shown:], max(self.shown, len(text))
        return rest


def held_back(text: str, stops) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
