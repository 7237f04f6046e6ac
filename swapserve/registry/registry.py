"""The function registry: which functions a node serves, persisted in SQLite plus a bundle directory.

Layout of a node's home::

    registry.sqlite3        functions (name → version, spec, size, serving), WAL mode
    registry.lock           held (flock) while a Registry is open: one node per home
    functions/<name>/v<N>/  the deployed bundle of version N (function.yaml, artifact/, handler)
    .staging/               uploads being unpacked and trees being deleted; emptied on open

A deploy is atomic: the bundle is staged on the same filesystem, renamed into ``v<N>`` and recorded in
one transaction; the previous version's directory is deleted only after that commit. A crash at any
point leaves either the old or the new version registered, never a half-written one: on open, staging
leftovers and unreferenced version directories are removed, and rows whose directory vanished dropped.

The node is the registry's only writer. Deploy exclusion (:meth:`Registry.begin_deploy`) is per process;
the lock file keeps a second process (another ``swapserve serve`` on the same home) out altogether.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from swapserve.errors import ConflictError, NotFoundError, SwapserveError
from swapserve.functions.spec import FunctionSpec, SpecError, check_name
from swapserve.node.api import BUNDLE_ARTIFACT_DIR

log = logging.getLogger(__name__)

DB_FILE = "registry.sqlite3"
LOCK_FILE = "registry.lock"
FUNCTIONS_DIR = "functions"
STAGING_DIR = ".staging"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS functions (
    name       TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    spec       TEXT NOT NULL,      -- FunctionSpec.to_dict() as JSON
    nbytes     INTEGER NOT NULL,   -- model weight bytes
    created_at REAL NOT NULL,      -- unix time of this version's deploy
    serving    INTEGER NOT NULL    -- 0 after an OIP unload: stays unloaded across restarts
);
-- The last version ever given to a name, kept after delete so that a redeployed name never reuses a
-- version number: caches and metrics keyed by (name, version) cannot mistake a successor for the old one.
CREATE TABLE IF NOT EXISTS versions (name TEXT PRIMARY KEY, last INTEGER NOT NULL);
"""


class RegistryError(SwapserveError):
    """The registry's storage is unusable (a newer schema, a corrupt database)."""

    http_status = 500


@dataclass(frozen=True)
class FunctionRecord:
    """One registered function: its current version and where that version's bundle lies."""

    name: str
    version: int
    spec: FunctionSpec
    path: Path
    """The bundle directory ``home/functions/<name>/v<version>`` (function.yaml, artifact/, handler)."""
    nbytes: int
    """Model weight bytes."""
    created_at: float
    """Unix time of this version's deploy."""
    serving: bool
    """False after an unload; persisted, so an unloaded function stays unloaded after a restart."""

    @property
    def artifact_path(self) -> Path:
        return self.path / BUNDLE_ARTIFACT_DIR

    @property
    def handler_path(self) -> Path | None:
        return self.path / self.spec.handler if self.spec.handler else None


class DeployTicket:
    """Holds a name's deploy slot from :meth:`Registry.begin_deploy` until released (``with`` exit)."""

    def __init__(self, registry: Registry, name: str):
        self.registry = registry
        self.name = name
        self._released = False

    def commit(self, bundle_dir: Path, spec: FunctionSpec, nbytes: int) -> FunctionRecord:
        return self.registry.commit(self.name, bundle_dir, spec, nbytes)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.registry._end_deploy(self.name)

    def __enter__(self) -> DeployTicket:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class Registry:
    """Functions of one node, persisted under ``home``. Thread-safe; one open Registry per home."""

    def __init__(self, home: str | os.PathLike[str], clock: Callable[[], float] = time.time):
        self.home = Path(home)
        self._clock = clock
        self._lock = threading.RLock()
        """Serialises database use and the rename + transaction of a commit."""
        self._in_flight: set[str] = set()
        self.home.mkdir(parents=True, exist_ok=True)
        self._functions = self.home / FUNCTIONS_DIR
        self._staging = self.home / STAGING_DIR
        self._functions.mkdir(exist_ok=True)
        self._staging.mkdir(exist_ok=True)
        self._lock_fd = _lock_home(self.home)
        try:
            self._db = sqlite3.connect(self.home / DB_FILE, isolation_level=None, check_same_thread=False)
            self._open_db()
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # --- deploys ---------------------------------------------------------------------------------

    def begin_deploy(self, name: str) -> DeployTicket:
        """Claim ``name`` for a deploy; ConflictError if one of that name is already in flight.

        Use as ``with registry.begin_deploy(name) as ticket: ... ticket.commit(...)``; the slot is
        released on exit whether the deploy committed or failed.
        """
        check_name(name)
        with self._lock:
            if name in self._in_flight:
                raise ConflictError(f"a deploy of {name!r} is already in flight; retry when it has finished")
            self._in_flight.add(name)
        return DeployTicket(self, name)

    def _end_deploy(self, name: str) -> None:
        with self._lock:
            self._in_flight.discard(name)

    @property
    def staging_root(self) -> Path:
        """The staging area (``home/.staging``): bundles anywhere inside it are moved by :meth:`commit`, not
        copied, so point the gateway's ``uploads_dir`` here. It is emptied when the registry is opened."""
        return self._staging

    def staging_dir(self) -> Path:
        """A fresh empty directory on the registry's filesystem: unpack an upload here so that
        :meth:`commit` only renames it. Leftovers are removed when the registry is next opened."""
        d = self._staging / f"bundle-{uuid.uuid4().hex[:12]}"
        d.mkdir()
        return d

    def commit(self, name: str, bundle_dir: Path, spec: FunctionSpec, nbytes: int) -> FunctionRecord:
        """Make ``bundle_dir`` version N+1 of ``name``, atomically, and return its record.

        A ``bundle_dir`` inside :attr:`staging_root` (e.g. from :meth:`staging_dir`) is moved: the registry
        takes it over. Any other directory is copied into staging first, so the final step is always a
        rename within one filesystem followed by one transaction. The new version serves (``serving``
        True). The previous version's directory is removed right after the transaction commits: whatever
        still reads its files must hold them open. Call inside :meth:`begin_deploy`.
        """
        check_name(name)
        if spec.name != name:
            raise SpecError([f"name: the bundle's function.yaml names {spec.name!r}, not {name!r}"])
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise NotFoundError(f"bundle directory {bundle_dir} does not exist")
        staged = self._stage(bundle_dir)
        with self._lock:
            self._check_open()
            prev = self._row(name)
            version = self._next_version(name)
            final = self._version_dir(name, version)
            final.parent.mkdir(exist_ok=True)
            if final.exists():  # unreferenced (the version counter never reissues): a crash leftover
                self._discard(final)
            try:
                os.rename(staged, final)
            except BaseException:
                _remove(staged)
                raise
            _fsync_dir(final.parent)
            now = self._clock()
            try:
                with self._transaction():
                    self._db.execute(
                        "INSERT INTO functions (name, version, spec, nbytes, created_at, serving) "
                        "VALUES (?, ?, ?, ?, ?, 1) "
                        "ON CONFLICT(name) DO UPDATE SET version=excluded.version, spec=excluded.spec, "
                        "nbytes=excluded.nbytes, created_at=excluded.created_at, serving=1",
                        (name, version, json.dumps(spec.to_dict()), int(nbytes), now))
                    self._db.execute("INSERT INTO versions (name, last) VALUES (?, ?) "
                                     "ON CONFLICT(name) DO UPDATE SET last=excluded.last", (name, version))
            except BaseException:
                self._discard(final)  # not recorded: the previous version stays the registered one
                raise
        if prev is not None:
            self._discard(self._version_dir(name, prev[1]))
        log.info("registered %s v%d (%d weight bytes)", name, version, nbytes)
        return FunctionRecord(name, version, spec, final, int(nbytes), now, True)

    # --- queries and changes ---------------------------------------------------------------------

    def get(self, name: str) -> FunctionRecord:
        """NotFoundError if ``name`` is not registered."""
        check_name(name)
        with self._lock:
            self._check_open()
            row = self._row(name)
        record = self._record(row) if row is not None else None
        if record is None:
            raise NotFoundError(f"no function named {name!r}")
        return record

    def list(self) -> list[FunctionRecord]:
        """Every registered function, by name."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM functions ORDER BY name").fetchall()
        return [r for r in map(self._record, rows) if r is not None]

    def delete(self, name: str) -> None:
        """Forget ``name`` and remove its bundle. NotFoundError if unknown; ConflictError while it deploys."""
        check_name(name)
        with self._lock:
            self._check_open()
            if name in self._in_flight:
                raise ConflictError(f"a deploy of {name!r} is in flight; delete it when that has finished")
            if self._row(name) is None:
                raise NotFoundError(f"no function named {name!r}")
            with self._transaction():
                self._db.execute("DELETE FROM functions WHERE name = ?", (name,))
            # Detached under the lock, so a deploy of the same name starting right after cannot have its
            # new version directory removed with the old ones; the slow removal happens outside it.
            doomed = self._detach(self._functions / name)
        if doomed is not None:
            _remove(doomed)
        log.info("deleted %s", name)

    def set_serving(self, name: str, serving: bool) -> FunctionRecord:
        """Persist whether ``name`` serves (OIP load/unload). NotFoundError if unknown."""
        check_name(name)
        with self._lock:
            self._check_open()
            with self._transaction():
                cur = self._db.execute("UPDATE functions SET serving = ? WHERE name = ?", (int(bool(serving)), name))
            if cur.rowcount == 0:
                raise NotFoundError(f"no function named {name!r}")
        return self.get(name)

    def close(self) -> None:
        """Close the database and release the home's lock; idempotent."""
        with self._lock:
            if self._lock_fd < 0:
                return
            self._db.close()
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------

    def _open_db(self) -> None:
        db = self._db
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("%s: SQLite refused WAL mode (%s)", self.home / DB_FILE, mode)
            # Deploys are rare and must survive power loss once acknowledged: fsync every commit.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            with self._transaction():
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(stmt)
                row = db.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                elif row[0] > SCHEMA_VERSION:
                    raise RegistryError(f"{self.home / DB_FILE} has schema version {row[0]}; this swapserve "
                                        f"understands up to {SCHEMA_VERSION}: upgrade swapserve")
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise RegistryError(f"cannot open the registry database {self.home / DB_FILE}: {e}") from None

    def _recover(self) -> None:
        """Undo what a crash may have left: staging leftovers, unreferenced versions, vanished bundles."""
        for leftover in list(self._staging.iterdir()):
            log.info("removing leftover staging entry %s", leftover)
            _remove(leftover)
        rows = self._db.execute("SELECT name, version FROM functions").fetchall()
        live = {name: version for name, version in rows}
        for name, version in rows:
            if not (self._version_dir(name, version) / "function.yaml").is_file():
                log.warning("function %s v%d: its bundle directory %s vanished; dropping it from the registry",
                            name, version, self._version_dir(name, version))
                with self._transaction():
                    self._db.execute("DELETE FROM functions WHERE name = ?", (name,))
                del live[name]
        for fdir in list(self._functions.iterdir()):
            for vdir in list(fdir.iterdir()) if fdir.is_dir() else []:
                if live.get(fdir.name) is None or vdir.name != f"v{live[fdir.name]}":
                    log.info("removing unreferenced bundle %s", vdir)
                    _remove(vdir)
            if fdir.name not in live:
                _remove(fdir)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock at once, so a transaction never fails half-way on a busy database.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise RegistryError("the registry is closed")

    def _row(self, name: str) -> tuple[str, int, str, int, float, int] | None:
        return self._db.execute(f"SELECT {_COLUMNS} FROM functions WHERE name = ?", (name,)).fetchone()

    def _next_version(self, name: str) -> int:
        row = self._db.execute("SELECT last FROM versions WHERE name = ?", (name,)).fetchone()
        current = self._db.execute("SELECT version FROM functions WHERE name = ?", (name,)).fetchone()
        return max(row[0] if row else 0, current[0] if current else 0) + 1

    def _version_dir(self, name: str, version: int) -> Path:
        return self._functions / name / f"v{version}"

    def _record(self, row: tuple[str, int, str, int, float, int]) -> FunctionRecord | None:
        name, version, spec_json, nbytes, created_at, serving = row
        try:
            spec = FunctionSpec.from_dict(json.loads(spec_json))
        except (SpecError, ValueError) as e:
            # A spec written by another swapserve version that this one rejects: keep it on disk, hide it.
            log.warning("function %s v%d: stored spec no longer valid (%s); not serving it", name, version, e)
            return None
        return FunctionRecord(name, version, spec, self._version_dir(name, version), nbytes, created_at, bool(serving))

    def _stage(self, bundle_dir: Path) -> Path:
        """``bundle_dir`` as a directory in staging (moved if already inside it, else copied)."""
        resolved = bundle_dir.resolve()
        if resolved.is_relative_to(self._staging.resolve()) and resolved != self._staging.resolve():
            return resolved
        staged = self._staging / f"copy-{uuid.uuid4().hex[:12]}"
        try:
            shutil.copytree(bundle_dir, staged, symlinks=False)
        except BaseException:
            _remove(staged)
            raise
        return staged

    def _discard(self, path: Path) -> None:
        doomed = self._detach(path)
        if doomed is not None:
            _remove(doomed)

    def _detach(self, path: Path) -> Path | None:
        """Rename a tree into staging before removing it, so a crash mid-removal leaves only staging
        garbage (cleaned on open) rather than a half-deleted bundle where a version is expected."""
        if not path.exists():
            return None
        doomed = self._staging / f"deleted-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, doomed)
        except OSError:
            return path
        return doomed


_COLUMNS = "name, version, spec, nbytes, created_at, serving"


def _lock_home(home: Path) -> int:
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConflictError(f"{home} is in use by another swapserve node ({LOCK_FILE} is locked)") from None
    return fd


def _fsync_dir(path: Path) -> None:
    """Make a rename durable before the transaction that refers to it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


__all__ = ["DeployTicket", "FunctionRecord", "Registry", "RegistryError"]
