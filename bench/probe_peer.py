"""Can one GPU worker copy a model's pages straight from another worker's GPU (NVLink), as the node issue asks
("copy from a peer GPU that holds it")? Each worker process sees only its own GPU (``CUDA_VISIBLE_DEVICES``)
and places weights in pages made with ``cuMemCreate``; a peer copy needs those pages exported as POSIX file
descriptors (``cuMemExportToShareableHandle``), passed to the other worker over a Unix socket
(``SCM_RIGHTS``), imported, mapped and granted access there. This probe does exactly that between two
processes, for GPU 0 → GPU 1, with the importer seeing only its GPU (as workers do) and, for comparison,
seeing both; it checks the bytes and times a 64 MiB device-to-device copy against a host→device one.

    python bench/probe_peer.py --out bench/results/<gpu>x2_<yyyymmdd>

Needs two GPUs. Writes probe_peer.json (each step's outcome, so a failure says where it failed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZE = 64 << 20
ROUNDS = 20


def _check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {int(err)} ({err})")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def _pattern(torch: Any, device: Any) -> Any:
    return (torch.arange(SIZE, dtype=torch.int64, device=device) % 251).to(torch.uint8)


def _access(cu: Any, ordinal: int) -> list[Any]:
    acc = cu.CUmemAccessDesc()
    acc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    acc.location.id = ordinal
    acc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return [acc]


def exporter(sock_path: str) -> None:
    """GPU 0's side: a shareable page holding a known pattern, its descriptor sent to the importer."""
    import torch
    from cuda.bindings import driver as cu

    from swapserve.engine.backend.cuda import wrap_device_memory

    torch.zeros(1, device="cuda:0")
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    handle = _check(cu.cuMemCreate(SIZE, prop, 0))
    va = int(_check(cu.cuMemAddressReserve(SIZE, 0, 0, 0)))
    _check(cu.cuMemMap(va, SIZE, 0, handle, 0))
    _check(cu.cuMemSetAccess(va, SIZE, _access(cu, 0), 1))
    wrap_device_memory(va, SIZE, torch.device("cuda:0")).copy_(_pattern(torch, "cuda:0"))
    torch.cuda.synchronize()
    fd = int(_check(cu.cuMemExportToShareableHandle(
        handle, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(sock_path)
        srv.listen(1)
        conn, _ = srv.accept()
        with conn:
            socket.send_fds(conn, [b"page"], [fd])
            conn.recv(16)  # the importer is done with it


def importer(sock_path: str, ordinal: int) -> None:
    """The other GPU's side: import the page, map it, read it, time copies. Prints one JSON line."""
    out: dict[str, Any] = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES", "all")}
    step = "init"
    try:
        import torch
        from cuda.bindings import driver as cu

        from swapserve.engine.backend.cuda import wrap_device_memory

        dev = torch.device(f"cuda:{ordinal}")
        torch.zeros(1, device=dev)
        out["gpu"] = torch.cuda.get_device_name(dev)
        step = "receive"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            for _ in range(100):
                try:
                    conn.connect(sock_path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.1)
            _, fds, _, _ = socket.recv_fds(conn, 16, 1)
            step = "import"
            handle = _check(cu.cuMemImportFromShareableHandle(
                fds[0], cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR))
            step = "map"
            va = int(_check(cu.cuMemAddressReserve(SIZE, 0, 0, 0)))
            _check(cu.cuMemMap(va, SIZE, 0, handle, 0))
            step = "grant access"
            _check(cu.cuMemSetAccess(va, SIZE, _access(cu, ordinal), 1))
            step = "read"
            remote = wrap_device_memory(va, SIZE, dev)
            local = torch.empty(SIZE, dtype=torch.uint8, device=dev)
            local.copy_(remote)
            torch.cuda.synchronize(dev)
            out["bytes_ok"] = bool(torch.equal(local, _pattern(torch, dev)))
            step = "time"
            host = torch.empty(SIZE, dtype=torch.uint8).pin_memory()
            for name, src in (("peer_GBps", remote), ("h2d_GBps", host)):
                best = 0.0
                for _ in range(ROUNDS):
                    torch.cuda.synchronize(dev)
                    t = time.perf_counter()
                    local.copy_(src, non_blocking=True)
                    torch.cuda.synchronize(dev)
                    best = max(best, SIZE / (time.perf_counter() - t) / 1e9)
                out[name] = best
            _check(cu.cuMemUnmap(va, SIZE))
            _check(cu.cuMemRelease(handle))
            conn.send(b"done")
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - the probe reports where it failed
        out.update(ok=False, failed_at=step, error=f"{type(e).__name__}: {e}")
    print(json.dumps(out), flush=True)


def run_pair(visible: str | None, ordinal: int) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    sock_path = tempfile.mktemp(prefix="swapserve-peer-", suffix=".sock")
    env = {**os.environ, "PYTHONPATH": str(root)}
    exp = subprocess.Popen([sys.executable, __file__, "--role", "export", "--sock", sock_path],
                           env={**env, "CUDA_VISIBLE_DEVICES": "0"})
    imp_env = dict(env)
    if visible is None:
        imp_env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        imp_env["CUDA_VISIBLE_DEVICES"] = visible
    try:
        done = subprocess.run([sys.executable, __file__, "--role", "import", "--sock", sock_path,
                               "--ordinal", str(ordinal)], env=imp_env, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"ok": False, "error": done.stderr[-2000:]}
    finally:
        exp.kill()
        exp.wait()
        Path(sock_path).unlink(missing_ok=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--role", choices=("export", "import"), help=argparse.SUPPRESS)
    ap.add_argument("--sock", help=argparse.SUPPRESS)
    ap.add_argument("--ordinal", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "export":
        exporter(args.sock)
        return
    if args.role == "import":
        importer(args.sock, args.ordinal)
        return
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
    result = {"date": time.strftime("%Y-%m-%d"), "topology": topo,
              "importer_sees_own_gpu_only": run_pair("1", 0),  # as the node's workers run
              "importer_sees_both": run_pair(None, 1)}
    (args.out / "probe_peer.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "topology"}, indent=1))


if __name__ == "__main__":
    main()
