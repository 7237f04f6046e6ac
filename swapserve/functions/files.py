"""The files a handler brings along: everything beside ``handler.py`` in the function directory (helper
modules, vocabularies, tables), chosen on the client and copied into the bundle.

What is left out: ``function.yaml`` (the bundle gets a normalised one), the directories of prebuilt
artifacts (they become the bundle's artifacts), hidden entries and ``__pycache__``. What is refused, with
the path named: a symlink that leads out of the function directory (one that stays inside is copied as
the file it points to), a symlinked directory, a name the bundle reserves (``artifact``, ``models``), and
more than :data:`MAX_FILES` files or :data:`MAX_BYTES` bytes in all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from swapserve.config import MiB
from swapserve.functions.spec import SPEC_FILE, FunctionSpec, SpecError

MAX_FILES = 1000
MAX_BYTES = 64 * MiB
"""Handler files in all; weights belong in models (artifacts), not beside the handler."""
RESERVED = ("artifact", "models")
"""Top-level names of the bundle's artifacts."""


def handler_files(src: Path, spec: FunctionSpec) -> list[Path]:
    """The files to bundle with ``spec``'s handler, relative to ``src`` (none without a handler)."""
    if spec.handler is None:
        return []
    root = src.resolve()
    skip = {Path(m.ref).parts[0] for m in spec.models.values() if m.kind == "artifact"} | {SPEC_FILE}
    for name in RESERVED:
        if (root / name).exists() and name not in skip:
            raise SpecError([f"handler files: {name} is a name the bundle reserves for models"])
    found: list[Path] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        top = here == root
        dirnames[:] = sorted(d for d in dirnames if _wanted(d) and not (top and d in skip))
        for d in dirnames:
            if (here / d).is_symlink():
                raise SpecError([f"handler files: {(here / d).relative_to(root)} is a symlinked directory; "
                                 "bundle its files instead"])
        for name in sorted(filenames):
            if not _wanted(name) or (top and name in skip):
                continue
            path = here / name
            rel = path.relative_to(root)
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise SpecError([f"handler files: {rel} is a symlink out of the function directory"])
            if not path.is_file():
                continue  # sockets, FIFOs, dangling links: nothing to bundle
            total += path.stat().st_size
            found.append(rel)
            if len(found) > MAX_FILES or total > MAX_BYTES:
                raise SpecError([f"handler files: more than {MAX_FILES} files or {MAX_BYTES >> 20} MiB beside the "
                                 f"handler in {src} (put weights in a model, data elsewhere)"])
    return found


def copy_handler_files(src: Path, files: list[Path], dest: Path) -> None:
    """Copy ``files`` (relative to ``src``) into ``dest`` as regular files."""
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)  # follows an inside symlink: the bundle holds no links


def _wanted(name: str) -> bool:
    return not name.startswith(".") and name != "__pycache__"


__all__ = ["MAX_BYTES", "MAX_FILES", "copy_handler_files", "handler_files"]
