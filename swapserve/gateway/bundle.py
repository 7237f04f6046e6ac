"""Deploy bundles: stream an upload to disk under a size limit, then extract it without trusting it.

A bundle is a gzip'd tar of a function directory (``function.yaml`` plus ``artifact/``), either at the top of
the archive or inside one top-level directory (what ``tar czf fn.tgz fn/`` makes). Extraction writes each
regular file itself rather than calling ``extractall``: nothing but regular files and directories is created
(no links, devices, fifos), no path may be absolute or climb out with ``..``, tar permissions and owners are
ignored, and the extracted total is bounded before a byte of it is written.
"""

from __future__ import annotations

import shutil
import tarfile
import zlib
from gzip import BadGzipFile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from aiohttp import web

from swapserve.errors import InvalidInputError, PayloadTooLargeError
from swapserve.functions.spec import SPEC_FILE
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
    """Extract ``archive`` into the new directory ``dest`` and return the bundle's root (the directory holding
    ``function.yaml``). Raises InvalidInputError (400) for an unsafe or malformed archive and
    PayloadTooLargeError (413) past the limits; the caller removes ``dest`` whatever happens."""
    dest.mkdir()
    written: set[PurePosixPath] = set()
    total = 0
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > limits.max_files:
                    raise PayloadTooLargeError(f"the bundle has more than {limits.max_files} entries")
                rel = _safe_path(member.name)
                if rel is None:  # the archive's own root ("." or "./")
                    continue
                if member.isdir():
                    _inside(dest, rel).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    raise InvalidInputError(f"bundle entry {member.name!r} is a {_kind(member)}: only regular files "
                                            "and directories are allowed")
                if rel in written:
                    raise InvalidInputError(f"bundle entry {member.name!r} appears twice")
                total += member.size
                if total > limits.max_bytes:  # checked on the headers, before the data is inflated
                    raise PayloadTooLargeError(f"the bundle's files exceed {limits.max_bytes} bytes uncompressed")
                target = _inside(dest, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular member always has a file object
                try:
                    out = open(target, "xb")  # "x": never through an existing path
                except (FileExistsError, IsADirectoryError, NotADirectoryError):
                    raise InvalidInputError(f"bundle entry {member.name!r} clashes with another entry") from None
                with source, out:
                    shutil.copyfileobj(source, out, _CHUNK)
                written.add(rel)
    except (tarfile.TarError, EOFError, zlib.error, BadGzipFile) as e:
        raise InvalidInputError(f"the bundle is not a valid gzip'd tar: {e}") from None
    return _bundle_root(dest)


def _safe_path(name: str) -> PurePosixPath | None:
    """The member's path relative to the bundle, or InvalidInputError for anything that could leave it."""
    if not name or "\x00" in name or "\\" in name:
        raise InvalidInputError(f"bundle entry {name!r} has an unusable name")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise InvalidInputError(f"bundle entry {name!r} is an absolute path")
    if ".." in path.parts:
        raise InvalidInputError(f"bundle entry {name!r} climbs out of the bundle ('..')")
    return path if path.parts else None


def _inside(dest: Path, rel: PurePosixPath) -> Path:
    # Implied by _safe_path and by never creating links, and checked anyway: it is the property that matters.
    target = dest.joinpath(rel)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise InvalidInputError(f"bundle entry {str(rel)!r} resolves outside the bundle")
    return target


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "fifo"
    return "special entry"


def _bundle_root(dest: Path) -> Path:
    if (dest / SPEC_FILE).is_file():
        return dest
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / SPEC_FILE).is_file():
        return entries[0]
    raise InvalidInputError(f"the bundle has no {SPEC_FILE} at its top level (nor in a single top-level directory)")


__all__ = ["BundleLimits", "extract_bundle", "receive_upload"]
