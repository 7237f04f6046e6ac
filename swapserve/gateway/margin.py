"""The gateway's margin: how long each function's answers take after the run the node planned — the reply's
way back, outputs copied out of the worker's slab, the answer encoded and written — learned from the answers
themselves, so that the node plans each request to finish that much before its SLO ends (with the request's own
decoding time: ``NodeAPI.infer(margin_ms=...)``, scheduling setting ``gateway_margin``).

Small answers take a fraction of a millisecond. GPT-2's 13 MB of logits took 3–9 ms on an H200 node. A plan to
the SLO alone does not leave that time free, so those requests waited behind others whose deadlines were only
earlier at the node, and were answered late. Planning for it is on by default since two A/Bs on H200s found
more requests in their SLO with it (docs/design.md, "The gateway's margin"). The margin is learned and passed
whatever the setting; only the node's plan uses it or not.

A function's first answers have nothing of its own to learn from, and with hundreds of functions of a few
requests a minute that is many of them: in a replay at N = 800 on two H200s (session 24), 7 of GPT-2's 23 late
requests were planned to the whole SLO, their function not having answered yet. Until its own answers come, a
function takes the estimate of answers shaped as its are (the same declared outputs: the same bytes a row),
learned from every function that declares them; its own answers then move it from there, as any answer moves
an estimate. Its first answer used to set it outright. In a replay on two H200s (session 30) a VGG-19
function's estimate began near 9 ms for a 2 KB answer (most likely its first answer, written in the warmup's
congestion); its requests were planned to 8.8 ms of their 17.6 (half: ``MIN_BUDGET``), coming back up a
twentieth of the excess an answer to 12.3 ms by the replay's end, and a burst's two followers were refused
for it.
"""

from __future__ import annotations

from collections.abc import Hashable

UP = 0.2
"""Weight of an observation above the estimate."""
DOWN = 0.05
"""Weight of one below. Unequal weights make the estimate an expectile rather than the mean: it settles where
the times above it, weighted by UP, balance those below, weighted by DOWN — above most of them, as a margin
should be, yet one slow answer moves it only a fifth of the way."""


class Margins:
    """Per function name, the expected time of an answer after its run (ms), and per shape of answer (``shape``:
    any hashable the caller derives from a function's declared outputs) the same over every function of that
    shape; a function redeployed under the name carries the old estimate until its own answers move it. Used
    from the gateway's event loop."""

    def __init__(self) -> None:
        self._after: dict[str, float] = {}
        self._shaped: dict[Hashable, float] = {}

    def after_ms(self, function: str, shape: Hashable = None) -> float:
        """The expected time: the function's own, else (before its first answer) that of answers of its
        ``shape``, else 0."""
        after = self._after.get(function)
        return after if after is not None else self._shaped.get(shape, 0.0)

    def observe(self, function: str, after_ms: float, shape: Hashable = None) -> None:
        """An answer of ``function`` (of ``shape``) took ``after_ms`` after its run."""
        if not after_ms >= 0:  # NaN or a clock step: nothing learned
            return
        self._after[function] = _learn(self._after.get(function, self._shaped.get(shape)), after_ms)
        if shape is not None:
            self._shaped[shape] = _learn(self._shaped.get(shape), after_ms)


def _learn(old: float | None, ms: float) -> float:
    """The estimate ``old`` moved by an observation of ``ms`` (the first estimate: the observation)."""
    return ms if old is None else old + (UP if ms > old else DOWN) * (ms - old)


__all__ = ["DOWN", "UP", "Margins"]
