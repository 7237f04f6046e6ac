"""JSON bodies in and out of the node: orjson, with Python's ``json`` where the two differ.

An inference answer is mostly floats — the outputs, and the node's timings in ``parameters`` — and Python's
``json`` spends ~1 µs on each: for the overhead benchmark's 1 KiB answer 38 µs to write and 20 µs to read its
request on the CI box, against 2.5 and 2 µs with orjson. Where orjson and ``json`` differ:

* **Reading**: orjson refuses ``NaN``, ``Infinity`` and numbers beyond a double, which ``json`` reads (and
  Python clients write ``NaN`` by default): what orjson refuses is read again with ``json``, so the node takes
  what it always took and a malformed body fails with ``json``'s message. Integers beyond 64 bits come back as
  floats from orjson (``json``: ints).
* **Writing**: orjson writes NaN and ±Infinity as ``null``; a document that may hold them (``finite=False``)
  is written by ``json``, as ``NaN`` and ``Infinity``, as the node always has.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """A JSON document; raises ``ValueError`` (or ``RecursionError``) as ``json.loads`` does."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)


def dumps(doc: Any, *, finite: bool = True) -> bytes:
    """``doc`` as compact JSON (keys that are not strings written as strings, as ``json`` does); ``finite=False``
    where its floats may be NaN or infinite."""
    if finite:
        return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    return json.dumps(doc, separators=(",", ":")).encode()
