"""Streaming text from tokens as they come, with stop strings: the one code path the CLI's
streaming output and the server's streamed responses share, so both cut and hold back alike.

A token's text is only known in the context of the tokens around it (a multi-byte character
split over tokens, a tokenizer that merges spaces), so every push decodes the whole output and
hands out only the part that can no longer change: text that could still turn out to begin a
stop string is held back until it cannot, and so is a trailing "\ufffd" (an incomplete UTF-8
sequence that the next token may complete).
"""
from __future__ import annotations

from jaxlm.generate.sampling import cut_at_stop


class TextStream:
    """One output's text, handed out piece by piece; `stopped` once a stop string occurred
    (the text ends before it; later pushes add nothing)."""

    def __init__(self, tokenizer, stops=()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.shown = 0          # characters of the (cut) text handed out so far
        self.stopped = False

    def push(self, token_ids) -> str:
        """Take new tokens; return the text that became safe to show."""
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in token_ids)
        text, self.stopped = cut_at_stop(self.tokenizer.decode(self.ids), self.stops)
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
        text = cut_at_stop(self.tokenizer.decode(self.ids), self.stops)[0]
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
