"""Bad requests against the real node: each gets a JSON ``{"error": ...}`` with the right status, and the node
stays up with its other functions still answering correctly (checked after every test)."""

from __future__ import annotations

import http.client
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from swapserve.functions.bundle import pack

from .harness import Functions, Server, assert_serves, assert_stopped_cleanly, deploy, infer_json

pytestmark = pytest.mark.integration

DEFAULT_MAX_BODY = 64 << 20
"""``serve --max-body``'s default."""
DEFAULT_MAX_UPLOAD = 8 << 30
"""``serve --max-upload``'s default."""


@pytest.fixture(autouse=True)
def still_serving(server: Server, functions: Functions) -> Iterator[None]:
    yield
    r = server.request("GET", "/v2/health/live")
    assert (r.status, r.json()) == (200, {"live": True}), "the node went down"
    assert server.request("GET", "/v2/health/ready").status == 200
    assert_serves(server, functions.pair, seed=11)
    assert_serves(server, functions.mlp, seed=12)


def post_infer(server: Server, name: str, body: bytes, headers: dict[str, str] | None = None):
    return server.request("POST", f"/v2/models/{name}/infer", body,
                          {"Content-Type": "application/json", **(headers or {})})


# -- infer bodies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [1,',
                                  b"not json at all", b"", b"[1, 2, 3]", b'"a string"', b"\xff\xfe\x00garbage",
                                  b'{"inputs": "x"}'],
                         ids=["truncated", "text", "empty", "list", "string", "bytes", "inputs-not-a-list"])
def test_malformed_json(server: Server, body: bytes):
    message = post_infer(server, "mlp", body).error(400)
    assert "json" in message.lower() or "inputs" in message


def test_binary_header_length_larger_than_body(server: Server):
    x = torch.randn(1, 16)
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 64}}]}).encode()
    body = header + x.numpy().tobytes()
    r = post_infer(server, "mlp", body, {"Inference-Header-Content-Length": str(len(body) + 100)})
    assert "Inference-Header-Content-Length" in r.error(400)
    for bad in ("-5", "abc", "0"):
        post_infer(server, "mlp", body, {"Inference-Header-Content-Length": bad}).error(400)


def test_binary_data_shorter_than_declared(server: Server):
    x = torch.randn(1, 16)
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 64}}]}).encode()
    body = header + x.numpy().tobytes()[:40]
    message = post_infer(server, "mlp", body, {"Inference-Header-Content-Length": str(len(header))}).error(400)
    assert "bytes" in message
    # binary_data_size without the header that says where the JSON ends
    post_infer(server, "mlp", header + x.numpy().tobytes()).error(400)


def test_wrong_shape(server: Server):
    assert "shape" in infer_json(server, "mlp", {"x": torch.randn(1, 15)}).error(400)
    assert "shape" in infer_json(server, "mlp", {"x": torch.randn(16)}).error(400)
    message = infer_json(server, "mlp", {"x": torch.randn(9, 16)}).error(400)
    assert "max_batch" in message, "batch 9 > max_batch 8"
    ids = torch.zeros(3, 3, dtype=torch.int64)
    message = infer_json(server, "pair", {"x": torch.randn(2, 8), "ids": ids}).error(400)
    assert "batch" in message
    # data that does not fill the shape it claims
    doc = {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": [0.0] * 16}]}
    assert "elements" in server.post_json("/v2/models/mlp/infer", doc).error(400)


def test_wrong_datatype(server: Server):
    message = infer_json(server, "mlp", {"x": torch.randn(1, 16).to(torch.float16)}).error(400)
    assert "FP16" in message and "FP32" in message
    ids = torch.zeros(1, 3, dtype=torch.int32)
    message = infer_json(server, "pair", {"x": torch.randn(1, 8), "ids": ids}).error(400)
    assert "INT32" in message
    doc = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP42", "data": [0.0] * 16}]}
    assert "FP42" in server.post_json("/v2/models/mlp/infer", doc).error(400)
    doc = {"inputs": [{"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [0.5, 1, 2]},
                      {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]}
    assert "integers" in server.post_json("/v2/models/pair/infer", doc).error(400)


def test_unknown_and_missing_input_names(server: Server):
    message = infer_json(server, "mlp", {"image": torch.randn(1, 16)}).error(400)
    assert "'image'" in message
    message = infer_json(server, "pair", {"x": torch.randn(1, 8)}).error(400)
    assert "ids" in message and "missing" in message
    doc = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}],
           "outputs": [{"name": "nope"}]}
    assert "nope" in server.post_json("/v2/models/mlp/infer", doc).error(400)


def test_unknown_function_and_routes(server: Server):
    assert "nosuch" in infer_json(server, "nosuch", {"x": torch.randn(1, 16)}).error(404)
    server.request("GET", "/v2/models/nosuch").error(404)
    server.request("GET", "/v2/models/nosuch/ready").error(404)
    server.request("GET", "/v3/whatever").error(404)
    r = server.request("GET", "/v2/models/mlp/infer")
    r.error(405)
    assert "POST" in r.headers.get("allow", "")


LIMIT = 1 << 20
"""``serve --max-body`` and ``--max-upload`` of the ``limited`` node."""


@pytest.fixture(scope="module")
def limited(server_factory: Callable[..., Server], functions: Functions,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A node of its own with ``serve --max-body 1MiB --max-upload 1MiB``, serving ``mlp`` (its upload within the
    limit)."""
    s = server_factory(extra=("--max-body", "1MiB", "--max-upload", "1MiB")).start()
    archive = functions.mlp.archive(tmp_path_factory.mktemp("limited"))  # built while the node starts
    assert archive.stat().st_size < LIMIT
    s.wait_ready()
    assert deploy(s, archive)["state"] == "READY"
    yield s
    assert_stopped_cleanly(s, s.stop())


def _announced(server: Server, path: str, length: int, first: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """POST ``path`` announcing ``length`` bytes of body and sending only ``first``: (status, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        for k, v in {"Content-Length": str(length), **headers}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(first)
        r = conn.getresponse()
        status, ctype, body = r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()
    assert ctype.startswith("application/json"), (status, ctype, body[:300])
    return status, json.loads(body)


def test_oversized_infer_body(server: Server, limited: Server):
    """413 from the announced length, before the body is read: past ``--max-body`` (1 MiB), or its default
    (64 MiB) on a node started without it; a body within the limit is served."""
    json_head = {"Content-Type": "application/json"}
    status, doc = _announced(limited, "/v2/models/mlp/infer", LIMIT + 1, b'{"inputs": [', json_head)
    assert status == 413 and "limit" in doc["error"], (status, doc)
    status, doc = _announced(server, "/v2/models/mlp/infer", DEFAULT_MAX_BODY + 1, b'{"inputs": [', json_head)
    assert status == 413 and "limit" in doc["error"], (status, doc)
    padded = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}],
                         "id": "p" * (LIMIT - 4096)}).encode()
    assert LIMIT - 4096 < len(padded) <= LIMIT
    r = post_infer(limited, "mlp", padded, {"Content-Type": "application/json"})
    assert r.status == 200, r.body[:300]


def test_oversized_chunked_infer_body(limited: Server, functions: Functions):
    """Without a Content-Length the node counts as it reads and stops past the limit (1 MiB + 1 sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=60)
    chunk = b" " * (64 << 10)
    status = None
    try:
        conn.putrequest("POST", "/v2/models/mlp/infer")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for _ in range(LIMIT // len(chunk) + 1):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node answered and closed while we were still sending: what we want to see next
        r = conn.getresponse()
        status, body = r.status, r.read()
    finally:
        conn.close()
    assert status == 413, body[:300]
    assert "limit" in json.loads(body)["error"]
    assert_serves(limited, functions.mlp, seed=13)


def test_oversized_deploy_upload(server: Server, limited: Server):
    """A deploy upload past ``--max-upload`` (1 MiB), or its default (8 GiB), gets 413 from its announced
    length."""
    head = {"Authorization": f"Bearer {limited.token}", "Content-Type": "application/gzip"}
    status, doc = _announced(limited, "/api/v1/functions", LIMIT + 1, b"\x1f\x8b", head)
    assert status == 413 and "bundle" in doc["error"], (status, doc)
    head["Authorization"] = f"Bearer {server.token}"
    status, doc = _announced(server, "/api/v1/functions", DEFAULT_MAX_UPLOAD + 1, b"\x1f\x8b", head)
    assert status == 413 and "bundle" in doc["error"], (status, doc)


# -- deploys -------------------------------------------------------------------------------------------------


def _upload(server: Server, archive: bytes | Path, content_type: str = "application/gzip"):
    data = archive.read_bytes() if isinstance(archive, Path) else archive
    return server.request("POST", "/api/v1/functions", data, {"Content-Type": content_type}, token=True)


def _bundle_with_spec(functions: Functions, tmp_path: Path, **changes) -> Path:
    dest = tmp_path / "bad-bundle"
    import shutil

    shutil.copytree(functions.mlp.bundle, dest)
    raw = yaml.safe_load((dest / "function.yaml").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    (dest / "function.yaml").write_text(yaml.safe_dump(raw))
    return pack(dest)


def test_deploy_invalid_function_yaml(server: Server, functions: Functions, tmp_path: Path):
    before = {f["name"] for f in server.client().list_functions()}
    archive = _bundle_with_spec(functions, tmp_path, name="badspec", slo_ms=-3, late_policy="sometimes")
    message = _upload(server, archive).error(400)
    assert "slo_ms" in message and "late_policy" in message, message
    assert {f["name"] for f in server.client().list_functions()} == before
    server.request("GET", "/v2/models/badspec").error(404)


def test_deploy_spec_that_does_not_match_the_model(server: Server, functions: Functions, tmp_path: Path):
    archive = _bundle_with_spec(functions, tmp_path, name="mismatch",
                                inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 17]}])
    assert "inputs[0].shape" in _upload(server, archive).error(400)
    server.request("GET", "/v2/models/mismatch").error(404)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_deploy_bundle_with_path_traversal(server: Server, functions: Functions):
    spec = (functions.mlp.bundle / "function.yaml").read_bytes().replace(b"name: mlp", b"name: evil")
    marker = f"swapserve-it-escaped-{server.port}.txt"
    for bad in (f"../../{marker}", f"artifact/../../../{marker}", f"/tmp/{marker}"):
        archive = _tar_gz({"function.yaml": spec, bad: b"pwned"})
        message = _upload(server, archive).error(400)
        assert marker in message
    # os.walk, not Path.rglob: other processes come and go under /tmp meanwhile (a directory removed during
    # the walk is skipped, not an error).
    escaped = [Path(d) / marker for top in (server.home, server.home.parent, Path("/tmp"))
               for d, _, files in os.walk(top) if marker in files]
    assert not escaped, escaped
    server.request("GET", "/v2/models/evil").error(404)


def test_deploy_bundle_with_a_symlink(server: Server, functions: Functions):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = (functions.mlp.bundle / "function.yaml").read_bytes()
        info = tarfile.TarInfo("function.yaml")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("artifact")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc"
        tf.addfile(link)
    assert "link" in _upload(server, buf.getvalue()).error(400)


def test_deploy_not_a_bundle(server: Server):
    assert "tar" in _upload(server, b"this is not gzip").error(400)
    _upload(server, b"").error(400)
    _upload(server, _tar_gz({"README": b"no function.yaml here"})).error(400)
    assert "gzip" in _upload(server, b"{}", content_type="application/json").error(415)
