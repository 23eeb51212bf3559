"""A request's stop strings as one Aho-Corasick automaton, fed only the text each token adds.

Its state after the text so far is the longest suffix of that text that begins a stop string: feeding
a token's characters from it finds every stop string they complete, and the state's depth is the tail
that must not stream yet. Per token the work follows the new characters (failure links amortized),
not the number or length of the stop strings."""

from __future__ import annotations

import collections
import functools
from array import array

ROOT = 0
_CHAR_BITS = 21  # a code point fits in 21 bits: (state << 21) | ord(ch) keys one transition


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        children: list[dict[str, int]] = [{}]
        self.depth = array("i", [0])
        self.match_len = array("i", [0])  # the longest stop string that ends at this state (0: none)
        for stop in stops:
            self._insert(children, stop)
        self.goto = {(state << _CHAR_BITS) | ord(ch): child
                     for state, edges in enumerate(children) for ch, child in edges.items()}
        self.fail = array("i", [ROOT]) * len(children)
        self._link(children)
        self.max_len = max(map(len, stops), default=0)

    def _insert(self, children: list[dict[str, int]], stop: str) -> None:
        state = ROOT
        for ch in stop:
            if ch not in children[state]:
                children[state][ch] = len(children)
                children.append({})
                self.depth.append(self.depth[state] + 1)
                self.match_len.append(0)
            state = children[state][ch]
        self.match_len[state] = len(stop)

    def _link(self, children: list[dict[str, int]]) -> None:
        """Failure links, breadth first: each state's longest proper suffix that is also a state."""
        queue = collections.deque(children[ROOT].values())
        while queue:
            state = queue.popleft()
            for ch, child in children[state].items():
                self.fail[child] = self._next(self.fail[state], ch) if state != ROOT else ROOT
                self.match_len[child] = self.match_len[child] or self.match_len[self.fail[child]]
                queue.append(child)

    def _next(self, state: int, ch: str) -> int:
        code = ord(ch)
        while (child := self.goto.get((state << _CHAR_BITS) | code)) is None:
            if state == ROOT:
                return ROOT
            state = self.fail[state]
        return child

    def feed(self, state: int, text: str) -> tuple[int, int | None]:
        """The state after `text`, and where in `text` the earliest stop string it completes begins
        (negative: in the text before it); None when it completes none."""
        earliest = None
        for i, ch in enumerate(text):
            if earliest is not None and i + 1 - self.max_len >= earliest:
                break  # a stop string ending here or later cannot begin earlier
            state = self._next(state, ch)
            if self.match_len[state]:
                start = i + 1 - self.match_len[state]
                earliest = start if earliest is None else min(earliest, start)
        return state, earliest

    def pending(self, state: int) -> int:
        """How many characters at the end of the text may still grow into a stop string."""
        return self.depth[state]


@functools.lru_cache(maxsize=16)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """One automaton per distinct stop list, shared by the requests that send it (the 16 lists used last
    are kept: 16 strings of 256 characters make about 0.3 MiB)."""
    return StopMatcher(stops)
