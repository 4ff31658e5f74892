"""Stop strings: where generated text ends, whether it arrives whole or in streamed pieces.

Used by the engine (the template's multi-token stop strings, e.g. ChatML's `<|im_end|>` spelt in several
tokens) and by the server (a request's `stop`).
"""
from __future__ import annotations

from typing import Callable


def find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def tokens_through_stop(ids: list[int], decode: Callable[[list[int]], str], stops: list[str]) -> int:
    """The length of the shortest prefix of `ids` whose text holds a stop string (the tokens an answer cut
    there used); len(ids) when none does. Counted from the ids, so it does not depend on how many tokens were
    generated after the stop before generation ended."""
    if find_stop(decode(ids), stops) < 0:
        return len(ids)
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if find_stop(decode(ids[:mid]), stops) >= 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


class StopScanner:
    """Cut streamed text before the first stop string, holding back a possible partial match.

    The concatenation of `feed` outputs plus `flush()` equals the whole text cut before its first stop
    string (`find_stop`), however the text was split into deltas."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit = False

    def feed(self, delta: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return delta
        self.buf += delta
        cut = find_stop(self.buf, self.stops)
        if cut >= 0:
            self.hit = True
            out, self.buf = self.buf[:cut], ""
            return out
        keep = 0  # longest tail of buf that starts some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out
