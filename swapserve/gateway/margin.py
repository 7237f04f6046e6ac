"""The gateway's margin: how long each function's answers take after the run the node planned — the reply's
way back, outputs copied out of the worker's slab, the answer encoded and written — learned from the answers
themselves, so that the node plans each request to finish that much before its SLO ends (with the request's own
decoding time: ``NodeAPI.infer(margin_ms=...)``, scheduling setting ``gateway_margin``).

Small answers take a fraction of a millisecond. GPT-2's 13 MB of logits took 3–9 ms on an H200 node. A plan to
the SLO alone does not leave that time free, so those requests waited behind others whose deadlines were only
earlier at the node, and were answered late. Planning for it is on by default since two A/Bs on H200s found
more requests in their SLO with it (docs/design.md, "The gateway's margin"). The margin is learned and passed
whatever the setting; only the node's plan uses it or not.
"""

from __future__ import annotations

UP = 0.2
"""Weight of an observation above the estimate."""
DOWN = 0.05
"""Weight of one below. Unequal weights make the estimate an expectile rather than the mean: it settles where
the times above it, weighted by UP, balance those below, weighted by DOWN — above most of them, as a margin
should be, yet one slow answer moves it only a fifth of the way."""


class Margins:
    """Per function name, the expected time of an answer after its run (ms); a function redeployed under the
    name carries the old estimate until its own answers move it. Used from the gateway's event loop."""

    def __init__(self) -> None:
        self._after: dict[str, float] = {}

    def after_ms(self, function: str) -> float:
        """The expected time (0 before the function's first answer)."""
        return self._after.get(function, 0.0)

    def observe(self, function: str, after_ms: float) -> None:
        """An answer of ``function`` took ``after_ms`` after its run."""
        if not after_ms >= 0:  # NaN or a clock step: nothing learned
            return
        old = self._after.get(function)
        if old is None:
            self._after[function] = after_ms
        else:
            self._after[function] = old + (UP if after_ms > old else DOWN) * (after_ms - old)


__all__ = ["DOWN", "UP", "Margins"]
