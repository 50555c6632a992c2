"""The completion written out as it is generated, for `wina generate`."""
from __future__ import annotations

import sys
from typing import Callable


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class TextStream:
    """Called with the tokens generated so far after each new one; writes the text they add (raw text: generated
    brackets are not rich markup).

    Each call decodes only the tokens since the last write but one, never the whole completion, so a long
    generation costs linear, not quadratic, time. The tokens of the previous write are decoded again as context:
    some tokenizers drop a word's leading space when it starts the decoded text. A token that ends inside a
    multi-byte character decodes to U+FFFD; its text waits for the tokens that complete it."""

    def __init__(self, tok, prefix: str = "", write: Callable[[str], None] = _stdout):
        self.tok, self.write = tok, write
        self.start = self.read = 0  # decode from `start`; tokens before `read` are written
        self.written = 0  # characters of the completion written
        self.write(prefix)

    def __call__(self, new: list[int]) -> None:
        head = self.tok.decode(new[self.start:self.read], skip_special_tokens=True)
        text = self.tok.decode(new[self.start:], skip_special_tokens=True)
        if len(text) > len(head) and not text.endswith("\ufffd"):
            self.write(text[len(head):])
            self.written += len(text) - len(head)
            self.start, self.read = self.read, len(new)

    def finish(self, text: str) -> None:
        """`text`: the whole completion decoded at once. Writes what the stream held back, and ends the line."""
        self.write(text[self.written:] + "\n")
