"""Deploy bundles at the gateway: stream an upload to disk under a size limit, then extract it with the
safety rules of :mod:`swapserve.functions.bundle` (the one implementation, shared with the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from swapserve.errors import InvalidInputError
from swapserve.functions.bundle import bundle_root, unpack
from swapserve.gateway.common import too_large

_CHUNK = 1 << 20


@dataclass(frozen=True)
class BundleLimits:
    max_bytes: int
    """Total size of the extracted files."""
    max_files: int
    """Members of the archive, directories included."""


async def receive_upload(request: web.Request, path: Path, limit: int) -> int:
    """Stream the request body into the new file ``path``; 413 past ``limit`` bytes. Returns the size.

    Writes are synchronous: each is one chunk to a local file, far shorter than a network read, and a write
    never straddles an ``await`` (so a cancelled upload leaves no write in flight)."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit, "deploy bundle")
    total = 0
    with open(path, "xb") as f:
        async for chunk in request.content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise too_large(limit, "deploy bundle")
            f.write(chunk)
    if total == 0:
        raise InvalidInputError("empty body: send the function directory as a gzip'd tar (tar czf)")
    return total


def extract_bundle(archive: Path, dest: Path, limits: BundleLimits) -> Path:
    """Extract ``archive`` into ``dest`` with swapserve's one set of safety rules
    (:func:`swapserve.functions.bundle.unpack`) and return the bundle's root (the directory holding
    ``function.yaml``). InvalidInputError (400) for an unsafe or malformed archive, PayloadTooLargeError (413)
    past the limits."""
    return bundle_root(unpack(archive, dest, max_bytes=limits.max_bytes, max_members=limits.max_files))


__all__ = ["BundleLimits", "extract_bundle", "receive_upload"]
