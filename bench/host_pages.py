"""What the host store's page size costs a GPU node: each model's host buffer is a file in the node's
``shm_dir`` (a tmpfs), written by ``pwrite`` and registered (page-locked and mapped for the GPU) by every worker,
and a worker's exit unlocks it all again. At N = 800 on two H200s (a 187 GB store) every node took 15 s to stop,
its workers' exits most of it (session 24). A tmpfs mounted with ``huge=within_size`` backs the files with
2 MiB pages instead of 4 KiB ones.

For each directory — by default ``/dev/shm`` and, run as root, a tmpfs this script mounts with
``huge=within_size`` — a ``--gib`` file is written as the store writes it and mapped; then timed: registering
it (``cudaHostRegister``), copying it to the GPU from there (GB/s), unregistering it, and the exit of a process
that registered it and ends without unregistering (as a worker does). The share of the map the kernel backed
with huge pages comes from ``/proc/self/smaps``.

    python bench/host_pages.py --out bench/results/<gpu>_<yyyymmdd>/host_pages [--gib 8] [--repeats 3]
        [--dirs /dev/shm,/mnt/huge]

Writes host_pages.json, host_pages.md and host_pages.png.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swapserve.engine.store import _pwrite_all  # noqa: E402

CHUNK = 64 << 20
"""Bytes per ``pwrite`` (the store writes a tensor per call) and per copy to the GPU."""


def fill(path: Path, nbytes: int) -> tuple[mmap.mmap, float]:
    """The file written as ``HostStore._fill`` writes a model's buffer, and its map; the seconds it took."""
    data = os.urandom(CHUNK)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        for off in range(0, nbytes, CHUNK):
            _pwrite_all(fd, memoryview(data)[:min(CHUNK, nbytes - off)], off)  # the store's own writes
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return mm, time.perf_counter() - t0


def huge_fraction(address: int) -> float:
    """Of the mapping at ``address``, the share mapped by huge pages (``ShmemPmdMapped`` / ``Rss``)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        start = line.split("-", 1)[0]
        if all(c in "0123456789abcdef" for c in start) and int(start, 16) == address:
            fields = {}
            for rest in lines[i + 1:]:
                key, _, value = rest.partition(":")
                if not value.strip().endswith("kB"):
                    break
                fields[key] = int(value.split()[0])
            rss = fields.get("Rss", 0)
            return fields.get("ShmemPmdMapped", 0) / rss if rss else 0.0
    raise RuntimeError(f"no mapping at {address:#x} in /proc/self/smaps")


def check(err: object, what: str) -> None:
    if int(err) != 0:  # type: ignore[call-overload]
        raise RuntimeError(f"{what} failed: cudaError {int(err)}")  # type: ignore[call-overload]


def measure(path: Path, nbytes: int) -> dict[str, float]:
    """One round on a file at ``path``: fill, register, copy to the GPU, unregister; then a process's exit."""
    import torch

    cudart = torch.cuda.cudart()
    mm, fill_s = fill(path, nbytes)
    try:
        host = torch.frombuffer(mm, dtype=torch.uint8)
        ptr = host.data_ptr()
        t0 = time.perf_counter()
        check(cudart.cudaHostRegister(ptr, nbytes, 0), "cudaHostRegister")
        register_s = time.perf_counter() - t0
        huge = huge_fraction(ptr)
        dev = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for off in range(0, nbytes - CHUNK + 1, CHUNK):
            dev.copy_(host[off:off + CHUNK], non_blocking=True)
        torch.cuda.synchronize()
        h2d = (nbytes // CHUNK * CHUNK) / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        check(cudart.cudaHostUnregister(ptr), "cudaHostUnregister")
        unregister_s = time.perf_counter() - t0
        del host, dev
    finally:
        mm.close()
    exit_s = exit_after_register(path, nbytes)
    path.unlink()
    return {"fill_s": fill_s, "register_s": register_s, "huge_fraction": huge, "h2d_GBps": h2d,
            "unregister_s": unregister_s, "exit_s": exit_s}


def exit_after_register(path: Path, nbytes: int) -> float:
    """Seconds from a process's last line (the file registered, its exit next: ``os._exit``, as a worker's) to
    its end."""
    child = subprocess.Popen([sys.executable, __file__, "--child", str(path), str(nbytes)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    t0 = time.perf_counter()
    if line.strip() != "exiting":
        child.kill()
        raise RuntimeError(f"the registering process said {line!r}")
    child.wait()
    return time.perf_counter() - t0


def child(path: Path, nbytes: int) -> None:
    import torch

    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    host = torch.frombuffer(mm, dtype=torch.uint8)
    check(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0), "cudaHostRegister")
    print("exiting", flush=True)
    os._exit(0)


def mount_options(directory: Path) -> str:
    """The options of the mount ``directory`` is on (the longest mount point above it)."""
    best, options = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, _, opts, *_ = line.split()
        if str(directory).startswith(point) and len(point) > len(best):
            best, options = point, opts
    return options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--gib", type=float, default=8.0, help="size of each file (GiB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dirs", help="directories to compare, comma-separated (default: /dev/shm and, as root, a "
                                   "tmpfs mounted here with huge=within_size)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]))
        return
    if args.out is None:
        ap.error("--out is required")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("host_pages.py needs a CUDA GPU")
    nbytes = int(args.gib * (1 << 30)) // CHUNK * CHUNK
    mounted = None
    if args.dirs:
        dirs = [Path(d) for d in args.dirs.split(",")]
    else:
        dirs = [Path("/dev/shm")]
        if os.geteuid() == 0:
            mounted = Path(tempfile.mkdtemp(prefix="swapserve-huge-"))
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes + (1 << 30)},huge=within_size", "tmpfs",
                            str(mounted)], check=True)
            dirs.append(mounted)
        else:
            print("not root: only /dev/shm (give --dirs to compare a tmpfs mounted with huge=within_size)")
    rows = []
    try:
        for d in dirs:
            runs = []
            for i in range(args.repeats):
                runs.append(measure(d / f"swapserve-host-pages-{os.getpid()}", nbytes))
                print(d, i, {k: round(v, 4) for k, v in runs[-1].items()}, flush=True)
            rows.append({"dir": str(d), "mount_options": mount_options(d), "runs": runs,
                         **{k: statistics.median(r[k] for r in runs) for k in runs[0]}})
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=False)
            mounted.rmdir()
    result = {"gpu": torch.cuda.get_device_name(0), "date": date.today().isoformat(), "gib": nbytes / (1 << 30),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_pages.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Host pages — {result['gpu']}, {result['date']}", "",
             f"A {result['gib']:g} GiB file per directory, medians of {args.repeats} rounds (`bench/host_pages.py`).", "",
             "| directory | mount | huge pages | fill s | register s | H2D GB/s | unregister s | exit s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dir']} | {r['mount_options']} | {r['huge_fraction']:.0%} | {r['fill_s']:.2f} | "
                     f"{r['register_s']:.3f} | {r['h2d_GBps']:.1f} | {r['unregister_s']:.3f} | {r['exit_s']:.3f} |")
    (args.out / "host_pages.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    from bars import bars

    bars(args.out / "host_pages.png", f"Host pages, {result['gib']:g} GiB — {result['gpu']}",
         [(f"{name} {Path(r['dir']).name}", r[key]) for r in rows
          for name, key in (("register", "register_s"), ("unregister", "unregister_s"), ("exit", "exit_s"))],
         unit="s")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
