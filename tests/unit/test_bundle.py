"""Bundle archives: pack/unpack round trip, and every unsafe archive refused with nothing written outside."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from swapserve.errors import PayloadTooLargeError
from swapserve.errors import InvalidInputError
from swapserve.functions.bundle import BundleError, bundle_root, pack, unpack


def make_bundle_dir(root: Path) -> Path:
    (root / "artifact").mkdir(parents=True)
    (root / "function.yaml").write_text("name: fn\n")
    (root / "artifact" / "weights.safetensors").write_bytes(os.urandom(300_000))
    (root / "artifact" / "manifest.json").write_text("{}")
    (root / "handlers").mkdir()
    (root / "handlers" / "handler.py").write_text("def handle(x):\n    return x\n")
    (root / "empty").mkdir()
    return root


def files_under(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_pack_unpack_round_trip(tmp_path: Path):
    src = make_bundle_dir(tmp_path / "bundle")
    os.chmod(src / "function.yaml", 0o4755)  # setuid in the source must not survive
    archive = pack(src)
    assert archive == tmp_path / "bundle.tar.gz"
    with tarfile.open(archive) as tf:
        names = tf.getnames()
    assert "function.yaml" in names and "artifact/weights.safetensors" in names
    assert not any(n.startswith(("/", "bundle/")) for n in names), "entries are relative to the bundle root"
    dest = unpack(archive, tmp_path / "out" / "dest", max_bytes=10 << 20)
    assert files_under(dest) == files_under(src)
    assert (dest / "function.yaml").stat().st_mode & 0o7777 == 0o644
    assert (dest / "artifact").stat().st_mode & 0o777 == 0o755
    # An existing empty directory is a valid destination too (e.g. Registry.staging_dir()).
    (tmp_path / "empty").mkdir()
    assert files_under(unpack(archive, tmp_path / "empty", max_bytes=10 << 20)) == files_under(src)


def test_pack_refuses_symlinks(tmp_path: Path):
    src = make_bundle_dir(tmp_path / "bundle")
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="link"):
        pack(src, tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def test_unpack_refuses_a_non_empty_destination(tmp_path: Path):
    archive = pack(make_bundle_dir(tmp_path / "bundle"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep").write_text("mine")
    with pytest.raises(BundleError, match="not an empty directory"):
        unpack(archive, tmp_path / "busy", max_bytes=10 << 20)
    assert (tmp_path / "busy" / "keep").read_text() == "mine"


# --- unsafe archives ----------------------------------------------------------------------------


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


Case = Callable[[Path], list[tuple[tarfile.TarInfo, bytes | None]]]

UNSAFE: dict[str, tuple[Case, type[Exception], str]] = {
    "absolute path": (lambda box: [_file("function.yaml"), _file(str(box / "abs-evil"))], BundleError, "absolute"),
    "dot-dot": (lambda box: [_file("function.yaml"), _file("../evil")], BundleError, r"'\.\.'"),
    "backslash": (lambda box: [_file("..\\evil")], BundleError, "unusable"),
    "nested dot-dot": (lambda box: [_file("artifact/../../evil")], BundleError, r"'\.\.'"),
    "symlink": (lambda box: [_file("function.yaml"), _special("link", tarfile.SYMTYPE, "/etc")], BundleError,
                "symbolic link"),
    "symlink then write through it": (lambda box: [_special("a", tarfile.SYMTYPE, ".."), _file("a/evil")],
                                      BundleError, "symbolic link"),
    "hard link": (lambda box: [_file("function.yaml"), _special("h", tarfile.LNKTYPE, "function.yaml")], BundleError,
                  "hard link"),
    "hard link outside": (lambda box: [_special("h", tarfile.LNKTYPE, "/etc/passwd")], BundleError, "hard link"),
    "char device": (lambda box: [_special("null", tarfile.CHRTYPE)], BundleError, "device"),
    "block device": (lambda box: [_special("sda", tarfile.BLKTYPE)], BundleError, "device"),
    "fifo": (lambda box: [_special("pipe", tarfile.FIFOTYPE)], BundleError, "FIFO"),
    "too large": (lambda box: [_file("function.yaml"), _file("artifact/w", b"\0" * 600), _file("x", b"\0" * 500)],
                  PayloadTooLargeError, "more than 1000 bytes"),
    "duplicate entry": (lambda box: [_file("function.yaml", b"good"), _file("function.yaml", b"evil")], BundleError,
                        "twice"),
    "file over directory": (lambda box: [_file("artifact/w"), _file("artifact")], BundleError, "a directory was"),
    "directory over file": (lambda box: [_file("a"), _special("a/b", tarfile.DIRTYPE)], BundleError, "a file was"),
    "file under file": (lambda box: [_file("a"), _file("a/b")], BundleError, "through a file"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_archives_are_refused_and_leave_nothing(tmp_path: Path, case: str):
    make, error, match = UNSAFE[case]
    box = tmp_path / "box"
    box.mkdir()
    archive = _archive(tmp_path / "evil.tar.gz", make(box))
    outside_before = files_under(tmp_path)
    with pytest.raises(error, match=match):
        unpack(archive, box / "dest", max_bytes=1000)
    assert not (box / "dest").exists(), "a refused archive leaves no destination behind"
    assert files_under(tmp_path) == outside_before, "nothing written anywhere else"
    assert error is PayloadTooLargeError or issubclass(error, InvalidInputError)  # 413 or 400


def test_too_many_entries(tmp_path: Path):
    archive = _archive(tmp_path / "many.tar.gz", [_file(f"f{i}") for i in range(20)])
    with pytest.raises(PayloadTooLargeError, match="more than 10 entries"):
        unpack(archive, tmp_path / "dest", max_bytes=1 << 20, max_members=10)
    assert not (tmp_path / "dest").exists()


def test_a_compressed_bomb_stops_at_the_limit(tmp_path: Path):
    archive = _archive(tmp_path / "bomb.tar.gz", [_file("big", b"\0" * (8 << 20))])
    assert archive.stat().st_size < 100_000
    with pytest.raises(PayloadTooLargeError):
        unpack(archive, tmp_path / "dest", max_bytes=1 << 20)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("content", [b"not an archive at all", b""])
def test_garbage_is_refused(tmp_path: Path, content: bytes):
    (tmp_path / "x.tar.gz").write_bytes(content)
    with pytest.raises(BundleError, match="not a valid .tar.gz"):
        unpack(tmp_path / "x.tar.gz", tmp_path / "dest", max_bytes=1 << 20)
    assert not (tmp_path / "dest").exists()


def test_uncompressed_and_truncated_archives_are_refused(tmp_path: Path):
    plain = _archive(tmp_path / "plain.tar", [_file("function.yaml")], mode="w")
    with pytest.raises(BundleError, match="not a valid .tar.gz"):
        unpack(plain, tmp_path / "d1", max_bytes=1 << 20)
    good = pack(make_bundle_dir(tmp_path / "bundle"))
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BundleError, match="not a valid .tar.gz"):
        unpack(truncated, tmp_path / "d2", max_bytes=10 << 20)
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


def test_a_refusal_empties_an_existing_destination(tmp_path: Path):
    (tmp_path / "dest").mkdir()
    archive = _archive(tmp_path / "e.tar.gz", [_file("artifact/ok", b"fine"), _file("../evil")])
    with pytest.raises(BundleError):
        unpack(archive, tmp_path / "dest", max_bytes=1 << 20)
    assert (tmp_path / "dest").is_dir() and not any((tmp_path / "dest").iterdir())
    assert not (tmp_path / "evil").exists()


def test_bundle_root_at_the_top_or_in_one_directory(tmp_path: Path):
    flat = unpack(pack(make_bundle_dir(tmp_path / "fn")), tmp_path / "flat", max_bytes=10 << 20)
    assert bundle_root(flat) == flat
    # What `tar czf fn.tgz fn/` makes: everything inside one top-level directory.
    with tarfile.open(tmp_path / "nested.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "fn", arcname="fn")
    nested = unpack(tmp_path / "nested.tar.gz", tmp_path / "nested", max_bytes=10 << 20)
    assert bundle_root(nested) == nested / "fn"
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "README").write_text("")
    with pytest.raises(BundleError, match="no function.yaml"):
        bundle_root(tmp_path / "none")
