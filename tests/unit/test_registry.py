"""The registry on a real SQLite file and a real directory tree: atomic deploys, restarts, recovery."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import pytest

from swapserve.errors import ConflictError, NotFoundError
from swapserve.functions.spec import FunctionSpec, SpecError
from swapserve.registry import Registry
from swapserve.registry.registry import DB_FILE, FUNCTIONS_DIR, STAGING_DIR


def make_spec(name: str = "fn", slo_ms: float = 50.0) -> FunctionSpec:
    return FunctionSpec.from_dict({
        "name": name, "model": {"zoo": "resnet18", "dtype": "float16"}, "slo_ms": slo_ms, "max_batch": 4,
        "inputs": [{"name": "x", "datatype": "FP16", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "y", "datatype": "FP16", "shape": [-1, 1000]}], "handler": "handler.py"})


def make_bundle(parent: Path, marker: str) -> Path:
    d = parent / f"bundle-{marker}"
    (d / "artifact").mkdir(parents=True)
    (d / "function.yaml").write_text(f"# {marker}\n")
    (d / "artifact" / "weights.safetensors").write_bytes(marker.encode() * 100)
    (d / "handler.py").write_text("")
    return d


def deploy(reg: Registry, tmp: Path, name: str, marker: str, **kw: float):
    with reg.begin_deploy(name) as ticket:
        return ticket.commit(make_bundle(tmp, marker), make_spec(name, **kw), nbytes=len(marker) * 100)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def reg(home: Path):
    r = Registry(home)
    yield r
    r.close()


def test_deploy_records_and_moves_the_bundle(reg: Registry, home: Path, tmp_path: Path):
    rec = deploy(reg, tmp_path, "fn", "one")
    assert (rec.name, rec.version, rec.nbytes, rec.serving) == ("fn", 1, 300, True)
    assert rec.path == home / FUNCTIONS_DIR / "fn" / "v1"
    assert rec.artifact_path.joinpath("weights.safetensors").read_bytes() == b"one" * 100
    assert rec.handler_path == rec.path / "handler.py"
    assert rec.spec == make_spec("fn")
    assert reg.get("fn") == rec
    assert [r.name for r in reg.list()] == ["fn"]
    assert (tmp_path / "bundle-one").exists(), "a bundle outside staging is copied, not taken"
    assert (home / DB_FILE).is_file()
    mode = sqlite3.connect(home / DB_FILE).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_staged_bundle_is_renamed_and_versions_increase(reg: Registry, home: Path, tmp_path: Path):
    versions = []
    for i in range(3):
        staging = reg.staging_dir()
        assert staging.parent == home / STAGING_DIR and not any(staging.iterdir())
        src = make_bundle(tmp_path, f"v{i}")
        for p in src.iterdir():
            p.rename(staging / p.name)
        with reg.begin_deploy("fn") as t:
            rec = t.commit(staging, make_spec("fn", slo_ms=10 + i), nbytes=i)
        assert not staging.exists(), "a staged bundle is moved into place"
        versions.append(rec.version)
    assert versions == [1, 2, 3]
    # Only the live version's directory remains; the old ones went after their successor committed.
    assert sorted(p.name for p in (home / FUNCTIONS_DIR / "fn").iterdir()) == ["v3"]
    assert reg.get("fn").spec.slo_ms == 12
    assert not any((home / STAGING_DIR).iterdir())


def test_a_bundle_anywhere_under_staging_is_moved(reg: Registry, tmp_path: Path):
    # The gateway's layout with uploads_dir = staging_root: <staging>/<upload tmp>/bundle
    workdir = reg.staging_root / "swapserve-deploy-abc"
    workdir.mkdir()
    make_bundle(workdir, "up").rename(workdir / "bundle")
    with reg.begin_deploy("fn") as t:
        rec = t.commit(workdir / "bundle", make_spec("fn"), 1)
    assert not (workdir / "bundle").exists() and workdir.exists()
    assert rec.artifact_path.joinpath("weights.safetensors").read_bytes() == b"up" * 100


def test_a_second_deploy_of_the_same_name_conflicts_while_in_flight(reg: Registry, tmp_path: Path):
    ticket = reg.begin_deploy("fn")
    with pytest.raises(ConflictError, match="already in flight"):
        reg.begin_deploy("fn")
    with reg.begin_deploy("other"):  # other names are independent
        pass
    with pytest.raises(ConflictError):
        reg.delete("fn")
    ticket.release()
    with reg.begin_deploy("fn") as t:  # released: free again, even after a failed deploy
        t.commit(make_bundle(tmp_path, "a"), make_spec("fn"), 1)
    with pytest.raises(ConflictError):
        with reg.begin_deploy("fn"):
            reg.begin_deploy("fn")
    with reg.begin_deploy("fn"):  # the with-block released it despite the exception
        pass


def test_a_failed_commit_leaves_the_previous_version(reg: Registry, home: Path, tmp_path: Path, monkeypatch):
    deploy(reg, tmp_path, "fn", "old")

    def broken_transaction():
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(reg, "_transaction", broken_transaction)
    with pytest.raises(sqlite3.OperationalError):
        deploy(reg, tmp_path, "fn", "new")
    monkeypatch.undo()
    rec = reg.get("fn")
    assert rec.version == 1
    assert rec.artifact_path.joinpath("weights.safetensors").read_bytes() == b"old" * 100
    assert sorted(p.name for p in (home / FUNCTIONS_DIR / "fn").iterdir()) == ["v1"]
    assert not any((home / STAGING_DIR).iterdir())
    assert deploy(reg, tmp_path, "fn", "next").version == 2


def test_restart_brings_every_function_back(home: Path, tmp_path: Path):
    with Registry(home) as reg:
        deploy(reg, tmp_path, "a", "a1")
        deploy(reg, tmp_path, "b", "b1")
        deploy(reg, tmp_path, "b", "b2")
        reg.set_serving("a", False)
        before = reg.list()
    with Registry(home) as reg:
        after = reg.list()
        assert after == before
        assert [(r.name, r.version, r.serving) for r in after] == [("a", 1, False), ("b", 2, True)]
        assert after[1].artifact_path.joinpath("weights.safetensors").read_bytes() == b"b2" * 100
        # Redeploying an unloaded function makes it serve again.
        assert deploy(reg, tmp_path, "a", "a2").serving is True


def test_set_serving_is_persisted(home: Path, tmp_path: Path):
    with Registry(home) as reg:
        deploy(reg, tmp_path, "fn", "x")
        assert reg.set_serving("fn", False).serving is False
        with pytest.raises(NotFoundError):
            reg.set_serving("nope", True)
    with Registry(home) as reg:
        assert reg.get("fn").serving is False
        assert reg.set_serving("fn", True).serving is True
    with Registry(home) as reg:
        assert reg.get("fn").serving is True


def test_delete_removes_row_and_directory_and_versions_keep_increasing(reg: Registry, home: Path, tmp_path: Path):
    deploy(reg, tmp_path, "fn", "x")
    deploy(reg, tmp_path, "fn", "y")
    reg.delete("fn")
    assert not (home / FUNCTIONS_DIR / "fn").exists()
    with pytest.raises(NotFoundError):
        reg.get("fn")
    with pytest.raises(NotFoundError):
        reg.delete("fn")
    assert reg.list() == []
    # A successor never reuses a version number of the deleted function.
    assert deploy(reg, tmp_path, "fn", "z").version == 3


@pytest.mark.parametrize("bad", ["../evil", "a/b", "/abs", "Upper", "", ".hidden", "x" * 64, "a b"])
def test_invalid_names_are_refused(reg: Registry, tmp_path: Path, bad: str):
    for call in (lambda: reg.begin_deploy(bad), lambda: reg.get(bad), lambda: reg.delete(bad),
                 lambda: reg.set_serving(bad, True), lambda: reg.commit(bad, make_bundle(tmp_path, "q"), make_spec(), 1)):
        with pytest.raises(SpecError, match="name"):
            call()
    assert not list((reg.home / FUNCTIONS_DIR).iterdir())


def test_commit_refuses_a_spec_of_another_name(reg: Registry, tmp_path: Path):
    with pytest.raises(SpecError, match="names 'other'"):
        reg.commit("fn", make_bundle(tmp_path, "a"), make_spec("other"), 1)


class _Capture(logging.Handler):
    """Log capture that works with ``-p no:logging`` (which removes pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_open_cleans_leftovers_and_drops_vanished_functions(home: Path, tmp_path: Path):
    with Registry(home) as reg:
        deploy(reg, tmp_path, "kept", "k")
        deploy(reg, tmp_path, "gone", "g")
        leftover = reg.staging_dir()
        (leftover / "weights.safetensors").write_bytes(b"partial upload")
    # A crash between the rename and the commit, or during an old version's removal:
    orphan = home / FUNCTIONS_DIR / "kept" / "v7"
    orphan.mkdir()
    (home / FUNCTIONS_DIR / "stray").mkdir()
    (home / FUNCTIONS_DIR / "stray" / "v1").mkdir()
    # Someone removed a bundle by hand:
    shutil.rmtree(home / FUNCTIONS_DIR / "gone" / "v1")
    capture = _Capture()
    logger = logging.getLogger("swapserve.registry.registry")
    logger.addHandler(capture)
    try:
        reg = Registry(home)
    finally:
        logger.removeHandler(capture)
    with reg:
        assert [r.name for r in reg.list()] == ["kept"]
        assert any("gone" in m and "vanished" in m for m in capture.messages)
        assert not any((home / STAGING_DIR).iterdir())
        assert not orphan.exists()
        assert sorted(p.name for p in (home / FUNCTIONS_DIR).iterdir()) == ["kept"]
        assert reg.get("kept").artifact_path.joinpath("weights.safetensors").read_bytes() == b"k" * 100


def test_one_registry_per_home(home: Path):
    with Registry(home):
        with pytest.raises(ConflictError, match="in use"):
            Registry(home)
    Registry(home).close()  # free again once closed
