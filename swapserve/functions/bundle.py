"""Deploy bundles on the wire: a gzip-compressed tar of a bundle directory.

A bundle directory holds ``function.yaml``, ``artifact/`` and the handler file if any (see
:func:`swapserve.functions.build.build_bundle`). :func:`pack` runs on the client; :func:`unpack` is the
one implementation of the server's safety rules for uploads (the gateway's too), so an archive can never
write outside its destination, create links or device files, or fill the disk; :func:`bundle_root` then
finds function.yaml at the top or in a single top-level directory (``tar czf fn.tgz fn/``).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from swapserve.errors import InvalidInputError, PayloadTooLargeError
from swapserve.functions.spec import SPEC_FILE

MAX_MEMBERS = 10_000
"""More entries than any real bundle has; bounds the work an archive of empty entries can cause."""
_COPY_BUFFER = 4 << 20


class BundleError(InvalidInputError):
    """An uploaded bundle archive that is malformed or unsafe (400); nothing of it was kept."""


def pack(bundle_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write ``bundle_dir``'s contents to a .tar.gz (default: ``<bundle_dir>.tar.gz`` beside it).

    Entries are relative to the bundle's root (``function.yaml``, ``artifact/...``), regular files and
    directories only, in sorted order, with owners and modes normalised.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root} is not a directory")
    target = Path(out) if out is not None else root.parent / f"{root.name}.tar.gz"
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        # Weights hardly compress: a low level keeps packing fast for GB-sized bundles.
        with tarfile.open(tmp, "w:gz", compresslevel=1, format=tarfile.PAX_FORMAT) as tf:
            for path in _walk(root):
                rel = path.relative_to(root).as_posix()
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    raise BundleError(f"{rel}: only regular files and directories can be packed")
                info = tf.gettarinfo(str(path), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if info.isdir() else 0o644
                if info.isdir():
                    tf.addfile(info)
                else:
                    with path.open("rb") as f:
                        tf.addfile(info, f)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _walk(root: Path) -> list[Path]:
    """Every entry under ``root``, sorted; symlinks are listed (and refused by the caller), never followed."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        found += [Path(dirpath) / n for n in (*dirnames, *filenames)]
    return sorted(found)


def unpack(archive: str | os.PathLike[str], dest: str | os.PathLike[str], max_bytes: int,
           max_members: int = MAX_MEMBERS) -> Path:
    """Extract the .tar.gz ``archive`` into ``dest`` (created; if it exists it must be an empty directory).

    Refused, with nothing left in ``dest``: absolute paths, ``..`` components, backslashes, symlinks,
    hard links, device files, FIFOs, anything but regular files and directories, an entry given twice
    (BundleError, an InvalidInputError: 400); more than ``max_members`` entries or file contents
    totalling more than ``max_bytes`` (PayloadTooLargeError: 413). The archive is read as a stream and
    checked entry by entry, so a compressed bomb is stopped once it passes ``max_bytes``, never
    decompressed whole. Files are written 0644 and directories 0755 whatever the archive says.
    Returns ``dest``; :func:`bundle_root` then finds function.yaml in it.
    """
    dest = Path(dest)
    created = not dest.exists()
    if not created and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"cannot unpack into {dest}: it exists and is not an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        _extract(Path(archive), root, max_bytes, max_members)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for child in dest.iterdir():
                if child.is_dir():  # unpack never creates symlinks, so is_dir cannot follow one
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise
    return dest


def _extract(archive: Path, root: Path, max_bytes: int, max_members: int) -> None:
    total = 0
    count = 0
    try:
        # "r|gz": a forward-only stream, so no member is read before the ones ahead of it are checked.
        with tarfile.open(archive, "r|gz") as tf:
            for member in tf:
                count += 1
                if count > max_members:
                    raise PayloadTooLargeError(f"the bundle has more than {max_members} entries")
                rel = _safe_relative(member.name)
                if member.isdir():
                    target = _inside(root, rel)
                    try:
                        target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    except (FileExistsError, NotADirectoryError):
                        raise BundleError(f"{member.name}: a directory where a file was already unpacked") from None
                    continue
                if not member.isreg():
                    kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk() else
                            "a device file" if member.ischr() or member.isblk() else
                            "a FIFO" if member.isfifo() else "not a regular file")
                    raise BundleError(f"{member.name}: {kind}; a bundle may hold only regular files and directories")
                if rel == PurePosixPath("."):
                    raise BundleError(f"{member.name!r}: a file entry without a name")
                total += member.size
                if total > max_bytes:
                    raise PayloadTooLargeError(f"the bundle unpacks to more than {max_bytes} bytes (the limit)")
                target = _inside(root, rel)
                if target.is_dir():
                    raise BundleError(f"{member.name}: a file where a directory was already unpacked")
                try:
                    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    raise BundleError(f"{member.name}: a path through a file already unpacked") from None
                src = tf.extractfile(member)
                assert src is not None  # a regular file always has contents
                try:
                    # "xb": never overwrite, so an entry given twice cannot replace a checked file.
                    with open(target, "xb") as out:
                        shutil.copyfileobj(src, out, _COPY_BUFFER)
                except FileExistsError:
                    raise BundleError(f"{member.name}: appears twice in the bundle") from None
                os.chmod(target, 0o644)
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise BundleError(f"the bundle is not a valid .tar.gz archive: {type(e).__name__}: {e}") from None


def _inside(root: Path, rel: PurePosixPath) -> Path:
    """``root / rel``, checked once more after resolving: implied by the name rules and by never creating
    links, but it is the property that matters, so it is verified rather than assumed."""
    target = root / rel
    if not target.resolve().is_relative_to(root):
        raise BundleError(f"{rel}: resolves outside the bundle")
    return target


def bundle_root(dest: str | os.PathLike[str]) -> Path:
    """The directory holding function.yaml in an unpacked bundle: ``dest`` itself (what :func:`pack` makes)
    or its single top-level directory (what ``tar czf fn.tgz fn/`` makes). BundleError otherwise."""
    dest = Path(dest)
    if (dest / SPEC_FILE).is_file():
        return dest
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / SPEC_FILE).is_file():
        return entries[0]
    raise BundleError(f"the bundle has no {SPEC_FILE} at its top level (nor in a single top-level directory)")


def _safe_relative(name: str) -> PurePosixPath:
    """The member's path, checked to stay inside the destination."""
    # A backslash is a separator to Windows tools: refused rather than guessed at.
    if not name or "\x00" in name or "\\" in name:
        raise BundleError(f"{name!r}: an empty or unusable entry name")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise BundleError(f"{name}: an absolute path; a bundle's entries must be relative")
    if ".." in path.parts:
        raise BundleError(f"{name}: '..' in a path; a bundle's entries must stay inside it")
    parts = [p for p in path.parts if p not in (".", "")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


__all__ = ["BundleError", "MAX_MEMBERS", "bundle_root", "pack", "unpack"]
